//! The checked-in CRD is exactly what the binary generates.

#[test]
fn checked_in_crd_matches_the_generated_one() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mlflow-gateway-operator"))
        .arg("crd")
        .output()
        .expect("run `mlflow-gateway-operator crd`");
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/gatewayendpoints.mlflow-gateway.dev.yaml"
    );
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        generated == checked_in,
        "crds/ is stale: run `make crd` and commit crds/gatewayendpoints.mlflow-gateway.dev.yaml"
    );
}
