//! The checked-in CRDs (crds/ and the Helm chart's copy) are exactly what the binary generates.

fn generated() -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mlflow-gateway-operator"))
        .arg("crd")
        .output()
        .expect("run `mlflow-gateway-operator crd`");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn assert_fresh(relative: &str) {
    let path = format!("{}/{relative}", env!("CARGO_MANIFEST_DIR"));
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        generated() == checked_in,
        "{relative} is stale: run `make crd` and commit crds/ and charts/mlflow-gateway-operator/crds/"
    );
}

#[test]
fn checked_in_crd_matches_the_generated_one() {
    assert_fresh("crds/gatewayendpoints.mlflow-gateway.dev.yaml");
}

#[test]
fn the_helm_charts_crd_matches_the_generated_one() {
    assert_fresh("charts/mlflow-gateway-operator/crds/gatewayendpoints.mlflow-gateway.dev.yaml");
}
