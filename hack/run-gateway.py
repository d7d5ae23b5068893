#!/usr/bin/env python3
"""Runs an endpoint's gateway on this machine exactly as its pods run it: the endpoint.yaml of the
ConfigMap the Deployment mounts, and the gateway container's environment with every Secret
reference resolved through the API server (kubectl). Useful where pods run no process (kwok) and to
debug an endpoint locally.

    hack/run-gateway.py NAMESPACE ENDPOINT LISTEN_ADDR [BINARY]

Needs kubectl on PATH and KUBECONFIG set; reads Secrets, so it needs the rights to. Nothing secret
is printed or written to disk: keys go to the child process's environment only."""
import base64
import json
import os
import subprocess
import sys
import tempfile

ns, name, listen = sys.argv[1:4]
binary = sys.argv[4] if len(sys.argv) > 4 else "target/debug/mlflow-gateway-operator"


def kubectl_json(*args):
    out = subprocess.run(["kubectl", "-n", ns, "get", *args, "-o", "json"], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


deployment = kubectl_json("deployment", name)
pod = deployment["spec"]["template"]["spec"]
container = next(c for c in pod["containers"] if c["name"] == "gateway")
config_map = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "config")
manifest = kubectl_json("configmap", config_map)["data"]["endpoint.yaml"]

env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": os.environ.get("RUST_LOG", "info")}
secrets = {}
for var in container.get("env", []):
    if "value" in var:
        env[var["name"]] = var["value"]
    elif "secretKeyRef" in var.get("valueFrom", {}):
        ref = var["valueFrom"]["secretKeyRef"]
        if ref["name"] not in secrets:
            secrets[ref["name"]] = kubectl_json("secret", ref["name"]).get("data", {})
        value = secrets[ref["name"]].get(ref["key"])
        if value is None:
            if ref.get("optional"):
                continue
            sys.exit(f"Secret {ns}/{ref['name']} has no key {ref['key']!r} (variable {var['name']})")
        env[var["name"]] = base64.b64decode(value).decode()

with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
    f.write(manifest)
args = [binary, *container.get("args", ["gateway"]), "--endpoint", f.name, "--listen", listen]
os.execvpe(binary, args, env)
