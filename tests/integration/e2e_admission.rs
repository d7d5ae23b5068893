//! Every rule that needs no I/O rejects its bad manifest at `kubectl apply`, with a message that
//! says what to fix (the API server evaluates the CRD's schema and CEL rules).

use crate::support;

use support::cluster;

const VALID_MODEL: &str = "    - {name: mini, provider: openai, model: gpt-4o-mini, apiKeySecretRef: {name: llm-keys, key: openai}}\n";

fn manifest(spec: &str) -> String {
    format!(
        "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata:\n  name: ep-{}\nspec:\n{spec}",
        support::suffix()
    )
}

/// Applies `spec` for real and returns kubectl's error output, failing if it was accepted.
fn rejected(ns: &str, spec: &str) -> String {
    let (ok, out, err) =
        cluster().kubectl_run(&["apply", "-n", ns, "-f", "-"], Some(&manifest(spec)));
    assert!(!ok, "accepted but should be rejected:\n{spec}\n{out}");
    err
}

async fn test_namespace() -> String {
    support::install_crds();
    let client = cluster().client().await;
    support::namespace(&client, "admission").await
}

fn assert_says(err: &str, wanted: &str) {
    assert!(err.contains(wanted), "expected {wanted:?} in:\n{err}");
}

#[tokio::test]
async fn a_valid_manifest_is_accepted_with_defaults() {
    let ns = test_namespace().await;
    let (ok, out, err) = cluster().kubectl_run(
        &[
            "apply",
            "-n",
            &ns,
            "-o",
            "jsonpath={.spec.usageTracking} {.spec.endpointType} {.spec.experimentDeletionPolicy}",
            "-f",
            "-",
        ],
        Some(&manifest(&format!("  models:\n{VALID_MODEL}"))),
    );
    assert!(ok, "{err}");
    assert_eq!(out, "true llm/v1/chat Retain");
}

#[tokio::test]
async fn no_models_is_rejected() {
    let ns = test_namespace().await;
    assert_says(
        &rejected(&ns, "  models: []\n"),
        "spec.models: Invalid value: 0: spec.models in body should have at least 1 items",
    );
    assert_says(
        &rejected(&ns, "  endpointType: llm/v1/chat\n"),
        "spec.models: Required value",
    );
}

#[tokio::test]
async fn duplicate_model_names_across_models_and_fallbacks_are_rejected() {
    let ns = test_namespace().await;
    let err = rejected(
        &ns,
        &format!(
            "  models:\n{VALID_MODEL}  fallbacks:\n    - {{name: MINI, provider: anthropic, model: claude, apiKeySecretRef: {{name: k, key: a}}}}\n"
        ),
    );
    assert_says(
        &err,
        "model names must be unique across models and fallbacks",
    );
    let err = rejected(
        &ns,
        &format!(
            "  models:\n{VALID_MODEL}{}",
            VALID_MODEL.replace("mini,", "mini-x,")
        )
        .replace("mini-x", "mini"),
    );
    assert_says(&err, "model names must be unique");
}

#[tokio::test]
async fn negative_weights_and_all_zero_weights_are_rejected() {
    let ns = test_namespace().await;
    let err = rejected(
        &ns,
        &format!(
            "  models:\n{}",
            VALID_MODEL.replace("model: gpt-4o-mini", "model: gpt-4o-mini, weight: -1")
        ),
    );
    assert_says(
        &err,
        "spec.models[0].weight: Invalid value: -1: spec.models[0].weight in body should be greater than or equal to 0",
    );
    let err = rejected(
        &ns,
        &format!(
            "  models:\n{}",
            VALID_MODEL.replace("model: gpt-4o-mini", "model: gpt-4o-mini, weight: 0")
        ),
    );
    assert_says(&err, "at least one model needs a weight above 0");
}

#[tokio::test]
async fn max_attempts_below_one_is_rejected() {
    let ns = test_namespace().await;
    let err = rejected(
        &ns,
        &format!("  models:\n{VALID_MODEL}  fallback: {{maxAttempts: 0}}\n"),
    );
    assert_says(
        &err,
        "spec.fallback.maxAttempts: Invalid value: 0: spec.fallback.maxAttempts in body should be greater than or equal to 1",
    );
}

#[tokio::test]
async fn unknown_provider_or_endpoint_type_is_rejected() {
    let ns = test_namespace().await;
    let err = rejected(
        &ns,
        &format!(
            "  models:\n{}",
            VALID_MODEL.replace("provider: openai", "provider: openia")
        ),
    );
    assert_says(
        &err,
        r#"spec.models[0].provider: Unsupported value: "openia": supported values: "openai", "azure", "anthropic""#,
    );
    let err = rejected(
        &ns,
        &format!("  endpointType: llm/v2/chat\n  models:\n{VALID_MODEL}"),
    );
    assert_says(
        &err,
        r#"spec.endpointType: Unsupported value: "llm/v2/chat": supported values: "llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings""#,
    );
}

#[tokio::test]
async fn experiment_id_with_experiment_name_is_rejected() {
    let ns = test_namespace().await;
    let err = rejected(
        &ns,
        &format!("  models:\n{VALID_MODEL}  experimentId: \"3\"\n  experimentName: mine\n"),
    );
    assert_says(
        &err,
        "set either experimentId (use an existing experiment) or experimentName",
    );
}

#[tokio::test]
async fn malformed_secret_references_are_rejected() {
    let ns = test_namespace().await;
    let err = rejected(
        &ns,
        &format!(
            "  models:\n{}",
            VALID_MODEL.replace("name: llm-keys", "name: LLM_Keys")
        ),
    );
    assert_says(
        &err,
        "spec.models[0].apiKeySecretRef.name: Invalid value: \"LLM_Keys\"",
    );
    let err = rejected(
        &ns,
        &format!("  models:\n{}", VALID_MODEL.replace(", key: openai", "")),
    );
    assert_says(&err, "spec.models[0].apiKeySecretRef.key: Required value");
    let err = rejected(
        &ns,
        &format!(
            "  models:\n{}",
            VALID_MODEL.replace(", apiKeySecretRef: {name: llm-keys, key: openai}", "")
        ),
    );
    assert_says(
        &err,
        "apiKeySecretRef is required: name the Secret and key holding this provider's API key",
    );
}

#[tokio::test]
async fn azure_without_its_settings_and_fallback_weights_are_rejected() {
    let ns = test_namespace().await;
    let err = rejected(
        &ns,
        &format!(
            "  models:\n{}",
            VALID_MODEL.replace("provider: openai", "provider: azure")
        ),
    );
    assert_says(&err, "provider azure needs apiBase");
    let err = rejected(
        &ns,
        &format!(
            "  models:\n{VALID_MODEL}  fallbacks:\n    - {{name: b, provider: openai, model: m, weight: 3, apiKeySecretRef: {{name: k, key: a}}}}\n"
        ),
    );
    assert_says(&err, "weight applies to models only");
}

#[tokio::test]
async fn embeddings_with_a_provider_without_an_embeddings_api_is_rejected() {
    let ns = test_namespace().await;
    let anthropic = "{name: claude, provider: anthropic, model: claude-sonnet-4-5, apiKeySecretRef: {name: k, key: a}}";
    for spec in [
        format!("  endpointType: llm/v1/embeddings\n  models:\n    - {anthropic}\n"),
        format!(
            "  endpointType: llm/v1/embeddings\n  models:\n{VALID_MODEL}  fallbacks:\n    - {anthropic}\n"
        ),
    ] {
        assert_says(
            &rejected(&ns, &spec),
            "endpointType llm/v1/embeddings needs models with an embeddings API: provider anthropic has none",
        );
    }
    // The same models serve chat.
    let (ok, _, err) = cluster().kubectl_run(
        &["apply", "-n", &ns, "-f", "-"],
        Some(&manifest(&format!(
            "  models:\n{VALID_MODEL}  fallbacks:\n    - {anthropic}\n"
        ))),
    );
    assert!(ok, "{err}");
}
