// Test tooling only: runs docs/argocd/health.lua in Argo CD's Lua runtime (gopher-lua).
module mlflow-gateway-operator/tools/argocd-lua

go 1.24.0

require (
	github.com/yuin/gopher-lua v1.1.1
	sigs.k8s.io/yaml v1.4.0
)
