.PHONY: test unit demo demo-down crd helm-lint build

## Run every test (unit, integration against MLflow, end-to-end against Kubernetes).
test:
	hack/test.sh

## The tests that need no outside service (no Go, no MLflow, no cluster), with the format check and
## clippy: the unit tests, the golden provider tests, the fake LLM's tests, the benchmark's own
## unit tests, and the integration
## tests listed in UNIT_TESTS (the CRD drift check; the gateway against fake providers, MLflow off).
## MGO_NO_SERVICES makes a listed test that asks for a cluster or MLflow fail instead of starting one.
UNIT_TESTS := crd:: \
	gateway::client_errors_pass_through_without_fallback_and_total_failure_is_502 \
	gateway::malformed_requests_get_openai_style_errors \
	gateway::traffic_split_follows_the_weights \
	gateway::the_gateway_refuses_to_start_with_a_message_naming_what_is_wrong \
	gateway::a_stream_falls_back_only_before_its_first_event_reached_the_client \
	gateway::a_slow_model_times_out_per_attempt_and_the_fallback_answers \
	gateway::a_tracking_server_answering_500_or_taking_10_s_changes_nothing_for_clients \
	gateway::usage_tracking_off_exports_nothing \
	callers::an_endpoint_without_access_refuses_every_call_and_open_admits_all \
	gateway_limits:: \
	telemetry_mlflow::tiny_queue_drops_and_counts
unit:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	cargo test --workspace --locked --lib --bins --test fake_llm
	MGO_NO_SERVICES=1 cargo test --locked --test integration -- $(UNIT_TESTS)
	python3 -m unittest discover -s hack/bench_gateway -t .

## Bring up a local control plane, MLflow and the operator, and show an endpoint with its experiment.
demo:
	hack/demo.sh up

## Stop everything `make demo` started.
demo-down:
	hack/demo.sh down

## Regenerate the checked-in CRD: crds/ and the Helm chart's copy (tests/integration/crd.rs checks both).
CRD_FILE := gatewayendpoints.mlflow-gateway.dev.yaml
crd:
	cargo run --quiet -- crd > crds/$(CRD_FILE)
	cp crds/$(CRD_FILE) charts/mlflow-gateway-operator/crds/$(CRD_FILE)

## Lint the Helm chart with the helm the tests use.
helm-lint:
	PATH="$$(hack/build-tools.sh):$$PATH" helm lint --strict --kube-version 1.34.4 charts/mlflow-gateway-operator -f charts/mlflow-gateway-operator/ci/default-values.yaml
	PATH="$$(hack/build-tools.sh):$$PATH" helm lint --strict --kube-version 1.34.4 charts/mlflow-gateway-operator -f charts/mlflow-gateway-operator/ci/full-values.yaml

build:
	cargo build --release
