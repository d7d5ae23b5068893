// Command argocd-lua runs an Argo CD resource health check (Lua) over sample objects, in the Lua
// runtime Argo CD runs (gopher-lua, Lua 5.1) and with the libraries Argo CD opens for a custom
// health check (package, base and table only: no string, math or io), and compares each result
// with the expected one. The test file has Argo CD's own health_test.yaml layout:
//
//	tests:
//	  - healthStatus: {status: Healthy, message: "..."}
//	    inputPath: testdata/healthy.yaml
//
// Usage: argocd-lua SCRIPT.lua TESTS.yaml. Exit status 1 if any case differs.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	lua "github.com/yuin/gopher-lua"
	"sigs.k8s.io/yaml"
)

type healthStatus struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

type testFile struct {
	Tests []struct {
		HealthStatus healthStatus `json:"healthStatus"`
		InputPath    string       `json:"inputPath"`
	} `json:"tests"`
}

// decodeValue is Argo CD's conversion of an object into Lua values (util/lua/lua.go).
func decodeValue(L *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []interface{}:
		arr := L.CreateTable(len(v), 0)
		for _, item := range v {
			arr.Append(decodeValue(L, item))
		}
		return arr
	case map[string]interface{}:
		tbl := L.CreateTable(0, len(v))
		for key, item := range v {
			tbl.RawSetH(lua.LString(key), decodeValue(L, item))
		}
		return tbl
	}
	return lua.LNil
}

func run(script string, obj map[string]interface{}) (healthStatus, error) {
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
		if err := L.CallByParam(lua.P{Fn: L.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return healthStatus{}, err
		}
	}
	L.SetGlobal("obj", decodeValue(L, obj))
	if err := L.DoString(script); err != nil {
		return healthStatus{}, err
	}
	tbl, ok := L.Get(-1).(*lua.LTable)
	if !ok {
		return healthStatus{}, fmt.Errorf("expect table output from Lua script, not %s", L.Get(-1).Type())
	}
	return healthStatus{
		Status:  lua.LVAsString(tbl.RawGetString("status")),
		Message: lua.LVAsString(tbl.RawGetString("message")),
	}, nil
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: argocd-lua SCRIPT.lua TESTS.yaml")
		os.Exit(2)
	}
	script, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	raw, err := os.ReadFile(os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var tests testFile
	if err := yaml.Unmarshal(raw, &tests); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if len(tests.Tests) == 0 {
		fmt.Fprintln(os.Stderr, "no tests in", os.Args[2])
		os.Exit(2)
	}
	failed := 0
	for _, tc := range tests.Tests {
		path := tc.InputPath
		if !filepath.IsAbs(path) {
			path = filepath.Join(filepath.Dir(os.Args[2]), path)
		}
		input, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		var obj map[string]interface{}
		if err := yaml.Unmarshal(input, &obj); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", tc.InputPath, err)
			os.Exit(2)
		}
		got, err := run(string(script), obj)
		if err != nil {
			fmt.Printf("FAIL %s: %v\n", tc.InputPath, err)
			failed++
			continue
		}
		if got != tc.HealthStatus {
			fmt.Printf("FAIL %s: got %+v, want %+v\n", tc.InputPath, got, tc.HealthStatus)
			failed++
			continue
		}
		fmt.Printf("ok   %s: %s %q\n", tc.InputPath, got.Status, got.Message)
	}
	if failed > 0 {
		os.Exit(1)
	}
}
