.PHONY: test demo demo-down crd helm-lint build

## Run every test (unit, integration against MLflow, end-to-end against Kubernetes).
test:
	hack/test.sh

## Bring up a local control plane, MLflow and the operator, and show an endpoint with its experiment.
demo:
	hack/demo.sh up

## Stop everything `make demo` started.
demo-down:
	hack/demo.sh down

## Regenerate the checked-in CRD: crds/ and the Helm chart's copy (tests/crd.rs checks both).
CRD_FILE := gatewayendpoints.mlflow-gateway.dev.yaml
crd:
	cargo run --quiet -- crd > crds/$(CRD_FILE)
	cp crds/$(CRD_FILE) charts/mlflow-gateway-operator/crds/$(CRD_FILE)

## Lint the Helm chart with the helm the tests use.
helm-lint:
	PATH="$$(hack/build-tools.sh):$$PATH" helm lint charts/mlflow-gateway-operator -f charts/mlflow-gateway-operator/ci/default-values.yaml
	PATH="$$(hack/build-tools.sh):$$PATH" helm lint charts/mlflow-gateway-operator -f charts/mlflow-gateway-operator/ci/full-values.yaml

build:
	cargo build --release
