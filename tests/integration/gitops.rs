//! GitOps: the Argo CD health check (docs/argocd/health.lua) in Argo CD's own Lua runtime, and no
//! drift between what a user applied and what the operator leaves on the object.

use crate::support;

use std::process::Command;

use kube::api::Api;
use mlflow_gateway_operator::api::GatewayEndpoint;
use support::{Operator, cluster, eventually, repo_root};

/// tools/argocd-lua, built once and cached by hack/argocd-lua.sh.
fn argocd_lua() -> std::path::PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("hack/argocd-lua.sh"))
        .output()
        .expect("run hack/argocd-lua.sh");
    assert!(
        out.status.success(),
        "hack/argocd-lua.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().into()
}

fn run_health_tests(tests: &std::path::Path) -> (bool, String) {
    let script = repo_root().join("docs/argocd/health.lua");
    let out = Command::new(argocd_lua())
        .arg(&script)
        .arg(tests)
        .output()
        .expect("run argocd-lua");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn argo_cd_health_check_reads_each_sample_status_as_expected() {
    let (ok, out) = run_health_tests(&repo_root().join("docs/argocd/health_test.yaml"));
    assert!(ok, "{out}");
    for (sample, health) in [
        ("healthy", "Healthy"),
        ("degraded", "Degraded"),
        ("progressing", "Progressing"),
        ("no-status", "Progressing"),
        ("stale-generation", "Progressing"),
        ("stale-condition", "Progressing"),
    ] {
        assert!(
            out.contains(&format!("ok   testdata/{sample}.yaml: {health} ")),
            "{sample}: {out}"
        );
    }
}

#[test]
fn the_health_check_runner_fails_on_a_wrong_expectation() {
    let dir = repo_root().join("docs/argocd");
    let wrong = std::env::temp_dir().join(format!("health-wrong-{}.yaml", support::suffix()));
    let text = format!(
        "tests:\n  - healthStatus: {{status: Healthy, message: x}}\n    inputPath: {}\n",
        dir.join("testdata/degraded.yaml").display()
    );
    std::fs::write(&wrong, text).unwrap();
    let (ok, out) = run_health_tests(&wrong);
    assert!(!ok, "a Degraded sample passed as Healthy: {out}");
    assert!(out.contains("FAIL"), "{out}");
}

#[test]
fn the_argocd_cm_snippet_in_the_docs_is_the_health_check() {
    let script = std::fs::read_to_string(repo_root().join("docs/argocd/health.lua")).unwrap();
    let readme = std::fs::read_to_string(repo_root().join("docs/argocd/README.md")).unwrap();
    let indented: String = script
        .lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("    {l}\n")
            }
        })
        .collect();
    let key = "  resource.customizations.health.mlflow-gateway.dev_GatewayEndpoint: |\n";
    assert!(
        readme.contains(&format!("{key}{indented}```")),
        "docs/argocd/README.md's argocd-cm snippet differs from docs/argocd/health.lua"
    );
}

fn manifest(name: &str, model: &str) -> String {
    format!(
        r#"apiVersion: mlflow-gateway.dev/v1alpha1
kind: GatewayEndpoint
metadata:
  name: {name}
  labels:
    app.kubernetes.io/part-of: gitops-test
spec:
  endpointType: llm/v1/chat
  models:
    - name: mini
      provider: openai
      model: {model}
      weight: 3
      apiKeySecretRef: {{name: llm-keys, key: openai}}
  fallbacks:
    - name: backup
      provider: openai
      model: gpt-4o
      apiKeySecretRef: {{name: llm-keys, key: openai}}
  fallback: {{maxAttempts: 2}}
"#
    )
}

/// `kubectl diff`: Ok(()) when there is no difference, Err(diff) when there is one. With a field
/// manager, a server-side diff as that manager.
fn diff(ns: &str, yaml: &str, server_side_as: Option<&str>) -> Result<(), String> {
    let mut args = vec!["diff", "-n", ns, "-f", "-"];
    if let Some(manager) = server_side_as {
        args.extend(["--server-side", "--field-manager", manager]);
    }
    let mut cmd = cluster().kubectl();
    cmd.args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    match out.status.code() {
        Some(0) => Ok(()),
        Some(1) => Err(String::from_utf8_lossy(&out.stdout).into_owned()),
        code => panic!(
            "kubectl diff failed ({code:?}): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[tokio::test]
async fn nothing_the_operator_writes_shows_as_drift_in_what_the_user_applied() {
    let client = cluster().client().await;
    let ns = support::namespace(&client, "gitops").await;
    support::secret(&client, &ns, "llm-keys", &[("openai", "sk-test")]).await;
    let _op = Operator::start(
        &ns,
        &support::mlflow().uri,
        &[("RESYNC_PERIOD_SECONDS", "2")],
    );
    // Argo CD applies client-side by default, Flux server-side.
    let client_side = manifest("argo", "gpt-4o-mini");
    let server_side = manifest("flux", "gpt-4o-mini");
    let (ok, _, err) = cluster().kubectl_run(&["apply", "-n", &ns, "-f", "-"], Some(&client_side));
    assert!(ok, "{err}");
    let (ok, _, err) = cluster().kubectl_run(
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "kustomize-controller",
            "-n",
            &ns,
            "-f",
            "-",
        ],
        Some(&server_side),
    );
    assert!(ok, "{err}");
    let api = Api::<GatewayEndpoint>::namespaced(client.clone(), &ns);
    for name in ["argo", "flux"] {
        eventually(60, &format!("{name} Ready"), || async {
            let ep = api.get(name).await.ok()?;
            let ready = ep.status.as_ref()?.condition("Ready")?.status == "True";
            // The finalizer is the operator's write to the object itself.
            let finalized = ep
                .metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| !f.is_empty());
            (ready && finalized).then_some(())
        })
        .await;
    }
    // Let a resync pass too, so any periodic write has happened.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    diff(&ns, &client_side, None).unwrap_or_else(|d| panic!("client-side drift (argo):\n{d}"));
    diff(&ns, &client_side, Some("kubectl-client-side-apply"))
        .unwrap_or_else(|d| panic!("server-side drift (argo):\n{d}"));
    diff(&ns, &server_side, Some("kustomize-controller"))
        .unwrap_or_else(|d| panic!("server-side drift (flux):\n{d}"));

    // The diff does see a real change (the check can fail).
    assert!(
        diff(&ns, &manifest("argo", "gpt-4.1-mini"), None).is_err(),
        "kubectl diff missed a changed model"
    );
}
