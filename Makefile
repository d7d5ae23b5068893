.PHONY: test demo demo-down crd build

## Run every test (unit, integration against MLflow, end-to-end against Kubernetes).
test:
	hack/test.sh

## Bring up a local control plane, MLflow and the operator, and show an endpoint with its experiment.
demo:
	hack/demo.sh up

## Stop everything `make demo` started.
demo-down:
	hack/demo.sh down

## Regenerate the checked-in CRD.
crd:
	cargo run --quiet -- crd > crds/gatewayendpoints.mlflow-gateway.dev.yaml

build:
	cargo build --release
