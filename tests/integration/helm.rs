//! The Helm chart on a real control plane: lint, the values schema, rendered manifests accepted
//! by the API server, and an install whose ServiceAccount runs the operator.
//!
//! The chart's Deployment is scheduled on the kwok node, where no container runs. The operator
//! binary runs here instead, out of cluster, configured exactly as the installed Deployment
//! configures its container (its env, secrets resolved) and impersonating the chart's
//! ServiceAccount, so RBAC is evaluated for that identity: what it reconciles proves the
//! one-namespace install's Roles (the watched namespace, its credential Secret, its Lease)
//! suffice, and what it is refused proves they stop there.

use crate::support;

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::rbac::{named, operator_rules, rules, strings, token_review_binder_rules};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::rbac::v1::Role;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use mlflow_gateway_operator::api::GatewayEndpoint;
use mlflow_gateway_operator::mlflow::{Auth, MlflowClient, MlflowConfig};
use support::{Mlflow, Operator, cluster, eventually, repo_root};

pub(crate) const KUBE_VERSION: &str = "v1.34.4";

pub(crate) fn chart() -> PathBuf {
    repo_root().join("charts/mlflow-gateway-operator")
}

pub(crate) fn ci_values(name: &str) -> String {
    chart().join("ci").join(name).to_str().unwrap().to_string()
}

/// `helm template` of the chart: Ok(manifests) or Err(stderr).
pub(crate) fn template(namespace: &str, args: &[&str]) -> Result<String, String> {
    let chart = chart();
    let mut all = vec![
        "template",
        "rel",
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
        "--kube-version",
        KUBE_VERSION,
    ];
    all.extend_from_slice(args);
    let (ok, out, err) = cluster().helm(&all);
    if ok { Ok(out) } else { Err(err) }
}

pub(crate) fn documents(manifests: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(manifests)
        .map(|d| serde_yaml::Value::deserialize(d).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

pub(crate) fn find<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn container_env(deploy: &serde_yaml::Value) -> BTreeMap<String, serde_yaml::Value> {
    deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

#[test]
fn helm_lint_passes_with_the_required_values_and_with_every_option() {
    for values in ["default-values.yaml", "full-values.yaml"] {
        let chart = chart();
        let (ok, out, err) = cluster().helm(&[
            "lint",
            "--strict",
            // Helm lints for Kubernetes 1.20 by default, where the admission policy is not rendered.
            "--kube-version",
            KUBE_VERSION,
            chart.to_str().unwrap(),
            "-f",
            &ci_values(values),
        ]);
        assert!(ok, "helm lint with ci/{values} failed:\n{out}\n{err}");
    }
}

#[test]
fn the_values_schema_and_the_chart_reject_bad_values_with_clear_messages() {
    let default = ci_values("default-values.yaml");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &[],
            &[
                "at '/mlflow': missing property 'trackingUri'",
                "at '/image': missing property 'repository'",
            ],
        ),
        (
            &["--set", "mlflow.trackingUri=mlflow:5000"],
            &["at '/mlflow/trackingUri'", "does not match pattern"],
        ),
        (
            &["--set", "mlflow.trackingUri=http://user:secret@mlflow:5000"],
            &["at '/mlflow/trackingUri'"],
        ),
        (
            &["--set", "replicaCount=-1"],
            &["at '/replicaCount': minimum: got -1, want 0"],
        ),
        (
            &["--set", "replicas=3"],
            &["additional properties 'replicas' not allowed"],
        ),
        (
            &["--set", "controller.logFormat=xml"],
            &["at '/controller/logFormat': value must be one of 'text', 'json'"],
        ),
        (
            &["--set", "controller.concurrency=0"],
            &["at '/controller/concurrency': minimum: got 0, want 1"],
        ),
        (&["--set", "image.digest=latest"], &["at '/image/digest'"]),
        (
            &["--set", "mlflow.uiUrl=mlflow.example.com"],
            &["at '/mlflow/uiUrl'"],
        ),
        (
            &[
                "--set",
                "mlflow.caBundle.configMap=ca",
                "--set",
                "mlflow.caBundle.secret=ca",
            ],
            &["mlflow.caBundle: set configMap or secret, not both"],
        ),
        (
            &[
                "--set",
                "mlflow.caBundle.configMap=ca",
                "--set",
                "mlflow.insecureTls=true",
            ],
            &["mlflow.insecureTls is true and mlflow.caBundle is set"],
        ),
        (
            &["--set", "gateway.tracing.exportMode=fast"],
            &[
                "at '/gateway/tracing/exportMode': value must be one of '', 'info-then-spans', 'spans-only', 'adaptive'",
            ],
        ),
        (
            &["--set", "leaderElection.enabled=false"],
            &["replicaCount is 2 with leaderElection.enabled false"],
        ),
        (
            &["--set", "leaderElection.renewDeadlineSeconds=15"],
            &["leaderElection.leaseDurationSeconds must be greater than renewDeadlineSeconds"],
        ),
    ];
    for (args, expected) in cases {
        let mut all: Vec<&str> = Vec::new();
        if !args.is_empty() {
            all.extend(["-f", default.as_str()]);
        }
        all.extend_from_slice(args);
        let err = template("ops", &all).expect_err(&format!("{args:?} was accepted"));
        for e in *expected {
            assert!(err.contains(e), "{args:?}: expected {e:?} in:\n{err}");
        }
    }
    // One replica without leader election is fine, and then there is no Lease Role.
    let out = template(
        "ops",
        &[
            "-f",
            &default,
            "--set",
            "replicaCount=1",
            "--set",
            "leaderElection.enabled=false",
        ],
    )
    .expect("one replica without leader election");
    let docs = documents(&out);
    assert!(find(&docs, "Role").is_empty());
    let env = container_env(find(&docs, "Deployment")[0]);
    assert_eq!(env["LEADER_ELECTION"]["value"].as_str(), Some("false"));
}

/// The gateway pods trust the operator's CA bundle, unless their TLS is not verified at all.
#[test]
fn the_gateway_pods_trust_the_operators_ca_bundle() {
    let ca_path = |extra: &[&str]| {
        let values = ci_values("default-values.yaml");
        let mut args = vec![
            "-f",
            values.as_str(),
            "--set",
            "mlflow.caBundle.configMap=tracking-ca",
        ];
        args.extend_from_slice(extra);
        let out = template("ops", &args).unwrap();
        let docs = documents(&out);
        let env = container_env(find(&docs, "Deployment")[0]);
        let value = |k: &str| env.get(k).map(|e| e["value"].as_str().unwrap().to_string());
        (
            value("MLFLOW_TRACKING_SERVER_CERT_PATH"),
            value("GATEWAY_MLFLOW_TRACKING_SERVER_CERT_PATH"),
        )
    };
    let (operator, gateway) = ca_path(&[]);
    assert_eq!(
        operator.as_deref(),
        Some("/etc/mlflow-gateway-operator/tracking-ca/ca.crt")
    );
    assert_eq!(gateway, operator);
    let (operator, gateway) = ca_path(&["--set", "gateway.insecureTls=true"]);
    assert!(operator.is_some());
    assert_eq!(gateway, None);
}

/// The gateway pods' export mode reaches the operator only when the chart sets one (else the
/// gateway's own default applies).
#[test]
fn the_gateway_export_mode_is_passed_on_only_when_set() {
    let mode = |extra: &[&str]| {
        let values = ci_values("default-values.yaml");
        let mut args = vec!["-f", values.as_str()];
        args.extend_from_slice(extra);
        let docs = documents(&template("ops", &args).unwrap());
        let env = container_env(find(&docs, "Deployment")[0]);
        env.get("GATEWAY_TRACE_EXPORT_MODE")
            .map(|e| e["value"].as_str().unwrap().to_string())
    };
    assert_eq!(mode(&[]), None);
    assert_eq!(
        mode(&["--set", "gateway.tracing.exportMode=spans-only"]).as_deref(),
        Some("spans-only")
    );
}

#[test]
fn the_rendered_rbac_and_pod_are_least_privilege_and_hardened() {
    let out = template("ops", &["-f", &ci_values("default-values.yaml")]).unwrap();
    let docs = documents(&out);

    let role = named(&docs, "ClusterRole", "rel-mlflow-gateway-operator");
    assert_eq!(
        rules(role),
        operator_rules()
            .into_iter()
            .chain([(
                strings(&[""]),
                strings(&["namespaces"]),
                strings(&["get", "list", "watch"])
            )])
            .chain(token_review_binder_rules())
            .collect::<Vec<_>>(),
        "the ClusterRole must grant exactly the requests the operator makes"
    );
    // `bind` on the token-review role only, which allows creating token reviews and nothing else.
    let bind = role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["verbs"][0] == "bind")
        .unwrap();
    assert_eq!(
        bind["resourceNames"][0].as_str(),
        Some("rel-mlflow-gateway-operator-gateway-tokenreview")
    );
    let review = named(
        &docs,
        "ClusterRole",
        "rel-mlflow-gateway-operator-gateway-tokenreview",
    );
    assert_eq!(
        serde_yaml::to_string(&review["rules"]).unwrap(),
        "- apiGroups:\n  - authentication.k8s.io\n  resources:\n  - tokenreviews\n  verbs:\n  - create\n"
    );
    // No wildcard in any role (the admission policy matches all versions of its own group).
    for kind in ["ClusterRole", "Role"] {
        for r in find(&docs, kind) {
            let text = serde_yaml::to_string(&r["rules"]).unwrap();
            assert!(!text.contains('*'), "a wildcard in {kind}:\n{text}");
        }
    }
    let binding = named(&docs, "ClusterRoleBinding", "rel-mlflow-gateway-operator");
    assert_eq!(
        binding["roleRef"]["name"].as_str(),
        Some("rel-mlflow-gateway-operator")
    );

    let lease_role = find(&docs, "Role")[0];
    assert_eq!(lease_role["metadata"]["namespace"].as_str(), Some("ops"));
    let lease_rules = serde_yaml::to_string(&lease_role["rules"]).unwrap();
    assert!(lease_rules.contains("leases"));
    assert!(lease_rules.contains("resourceNames:\n  - rel-mlflow-gateway-operator"));

    let deploy = find(&docs, "Deployment")[0];
    assert_eq!(deploy["spec"]["replicas"].as_u64(), Some(2));
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert!(c["resources"]["requests"]["memory"].as_str().is_some());
    let env = container_env(deploy);
    assert_eq!(env["LEADER_ELECTION"]["value"].as_str(), Some("true"));
    assert_eq!(
        env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.name")
    );
    assert_eq!(
        env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.namespace")
    );
    // The gateway pods default to the operator's own image.
    assert_eq!(
        env["GATEWAY_IMAGE"]["value"].as_str(),
        c["image"].as_str(),
        "GATEWAY_IMAGE defaults to the operator image"
    );
}

/// Server-side dry run of `manifests`, with strict field validation.
fn dry_run(manifests: &str) {
    let (ok, out, err) = cluster().kubectl_run(
        &["apply", "--dry-run=server", "--validate=strict", "-f", "-"],
        Some(manifests),
    );
    assert!(
        ok,
        "the API server rejected the rendered chart:\n{err}\n{out}"
    );
}

#[tokio::test]
async fn rendered_manifests_are_accepted_by_the_api_server() {
    let client = cluster().client().await;
    let ns = support::namespace(&client, "helm-dry").await;
    // A fresh cluster has no Prometheus Operator: install the reduced ServiceMonitor CRD fixture
    // (see its header) so the ServiceMonitor is checked too, not skipped.
    let fixture = repo_root().join("tests/fixtures/servicemonitor-crd.yaml");
    let (ok, _, err) = cluster().kubectl_run(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            fixture.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "ServiceMonitor CRD fixture: {err}");
    support::wait_crd_established(cluster(), "servicemonitors.monitoring.coreos.com");

    // full-values.yaml watches one namespace: its Role goes there, so it must exist.
    let watched = support::namespace(&client, "helm-dry-team").await;
    let watch = format!("controller.watchNamespace={watched}");
    for values in ["default-values.yaml", "full-values.yaml"] {
        let mut args = vec!["-f".to_string(), ci_values(values)];
        if values == "full-values.yaml" {
            args.extend(["--set".to_string(), watch.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = template(&ns, &args).unwrap();
        let docs = documents(&out);
        let kinds: Vec<_> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for kind in [
            "ServiceAccount",
            "ClusterRole",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ] {
            assert!(kinds.contains(&kind), "{values}: no {kind} in {kinds:?}");
        }
        if values == "full-values.yaml" {
            assert!(kinds.contains(&"ServiceMonitor") && kinds.contains(&"NetworkPolicy"));
        }
        dry_run(&out);
    }
}

// ---------------------------------------------------------------------------------------------
// Install, run as the chart's ServiceAccount, upgrade, uninstall.

/// The operator container's environment as the installed Deployment declares it, resolved the
/// way the kubelet would: downward API fields, Secret keys (optional ones skipped when absent).
async fn deployment_env(
    client: &kube::Client,
    ns: &str,
    name: &str,
    pod_name: &str,
) -> Vec<(String, String)> {
    let d = Api::<Deployment>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .expect("the chart's Deployment");
    let spec = d.spec.unwrap().template.spec.unwrap();
    let c = &spec.containers[0];
    assert_eq!(c.args.as_deref(), Some(&["controller".to_string()][..]));
    let mut env = support::container_env(client, ns, c, pod_name).await;
    // The container listens on 0.0.0.0; here the process stays on loopback.
    env.retain(|(k, _)| k != "METRICS_ADDR");
    env.push((
        "METRICS_ADDR".into(),
        format!("127.0.0.1:{}", support::free_port()),
    ));
    env
}

fn env_value(env: &[(String, String)], key: &str) -> Option<String> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

fn tracking(ml: &Mlflow) -> MlflowClient {
    let auth = match &ml.admin {
        Some((u, p)) => Auth::Basic {
            username: u.clone(),
            password: p.clone(),
        },
        None => Auth::None,
    };
    let config = MlflowConfig::builder(ml.uri.parse().unwrap())
        .auth(auth)
        .build()
        .unwrap();
    MlflowClient::new(&config).unwrap()
}

async fn ready(api: &Api<GatewayEndpoint>, name: &str, secs: u64) -> GatewayEndpoint {
    eventually(secs, &format!("{name} Ready"), || async {
        let ep = api.get(name).await.ok()?;
        let c = ep.status.as_ref()?.condition("Ready")?;
        (c.status == "True").then_some(ep.clone())
    })
    .await
}

fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name},
        "stringData": data.iter().cloned().collect::<BTreeMap<_, _>>(),
    }))
    .unwrap()
}

fn is_forbidden<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(s)) if s.code == 403)
}

#[tokio::test]
async fn installed_chart_runs_the_operator_as_its_service_account_through_upgrade_and_uninstall() {
    // A private MLflow with basic auth: the chart's credential Secret wiring is exercised.
    let mlflow = tokio::task::spawn_blocking(|| Mlflow::start(true));
    let c = cluster();
    let admin = c.client().await;
    let rel_ns = support::namespace(&admin, "helm-op").await;
    let team = support::namespace(&admin, "helm-team").await;
    let ml = mlflow.await.unwrap();
    let (user, password) = ml.admin.clone().unwrap();

    Api::<Secret>::namespaced(admin.clone(), &rel_ns)
        .create(
            &PostParams::default(),
            &secret(
                "mlflow-operator",
                &[("username", &user), ("password", &password)],
            ),
        )
        .await
        .unwrap();
    // The gateway pods' trace-writing credential (a different MLflow user in real life).
    Api::<Secret>::namespaced(admin.clone(), &rel_ns)
        .create(
            &PostParams::default(),
            &secret(
                "gateway-writer",
                &[("username", "gateway-writer"), ("password", "writer-pw")],
            ),
        )
        .await
        .unwrap();

    let release = format!("mgo-{}", support::suffix());
    let fullname = format!("{release}-mlflow-gateway-operator");
    let chart = chart();
    let tracking_uri = format!("mlflow.trackingUri={}", ml.uri);
    let watch = format!("controller.watchNamespace={team}");
    let (ok, out, err) = c.helm(&[
        "install",
        &release,
        chart.to_str().unwrap(),
        "--namespace",
        &rel_ns,
        "--set",
        "image.repository=registry.example.com/mlflow-gateway-operator",
        "--set",
        &tracking_uri,
        "--set",
        "mlflow.credentials.existingSecret=mlflow-operator",
        "--set",
        "gateway.credentialsSecret=gateway-writer",
        "--set",
        &watch,
        "--wait",
        "--timeout",
        "180s",
    ]);
    assert!(ok, "helm install failed:\n{out}\n{err}");
    assert!(
        out.contains("kubectl -n team-a get gatewayendpoints"),
        "NOTES.txt tells the user what to do next:\n{out}"
    );

    // The operator, as the chart's Deployment configures it, as the chart's ServiceAccount.
    let sa = format!("system:serviceaccount:{rel_ns}:{fullname}");
    let kubeconfig = c.kubeconfig_as(&sa);
    let pod_a = format!("{fullname}-a");
    let env = deployment_env(&admin, &rel_ns, &fullname, &pod_a).await;
    assert_eq!(
        env_value(&env, "MLFLOW_TRACKING_USERNAME"),
        Some(user.clone())
    );
    assert_eq!(env_value(&env, "MLFLOW_TRACKING_TOKEN"), None);
    assert_eq!(env_value(&env, "LEADER_ELECTION"), Some("true".into()));
    let mut op = Operator::start_with(&kubeconfig, &env);

    Api::<Secret>::namespaced(admin.clone(), &team)
        .create(
            &PostParams::default(),
            &secret("llm-keys", &[("openai", "sk-test")]),
        )
        .await
        .unwrap();
    let manifest = r#"apiVersion: mlflow-gateway.dev/v1alpha1
kind: GatewayEndpoint
metadata:
  name: chat
spec:
  models:
    - name: mini
      provider: openai
      model: gpt-4o-mini
      apiKeySecretRef: {name: llm-keys, key: openai}
"#;
    let (ok, _, err) = c.kubectl_run(&["apply", "-n", &team, "-f", "-"], Some(manifest));
    assert!(ok, "{err}");
    let endpoints = Api::<GatewayEndpoint>::namespaced(admin.clone(), &team);
    let ep = ready(&endpoints, "chat", 90).await;
    let id = ep.status.as_ref().unwrap().experiment_id.clone().unwrap();
    let t = tracking(&ml);
    let e = t.get_experiment(&id).await.unwrap();
    assert_eq!(e.name, format!("gateway/{team}/chat"));
    assert_eq!(
        e.tag("mlflow-gateway.dev/endpoint"),
        Some(format!("{team}/chat").as_str())
    );
    assert_eq!(e.tag("mlflow.experiment.isGateway"), Some("true"));

    // The gateway pods, applied with the chart's RBAC: Deployment, Service, ConfigMap, and the
    // mirrored trace credential (the operator's own credential is not copied).
    let deployment = Api::<Deployment>::namespaced(admin.clone(), &team)
        .get("chat")
        .await
        .expect("the gateway Deployment");
    let image = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone();
    assert_eq!(
        image.as_deref(),
        Some(env_value(&env, "GATEWAY_IMAGE").unwrap().as_str())
    );
    assert!(
        Api::<Service>::namespaced(admin.clone(), &team)
            .get("chat")
            .await
            .is_ok()
    );
    assert!(
        Api::<ConfigMap>::namespaced(admin.clone(), &team)
            .get("chat")
            .await
            .is_ok()
    );
    // The chart's operator account is an MLflow admin, so (gateway.traceCredentials: auto) the
    // endpoint gets an MLflow user of its own rather than the mirrored gateway-writer.
    let credential = Api::<Secret>::namespaced(admin.clone(), &team)
        .get("chat-mlflow-credentials")
        .await
        .expect("the endpoint's trace credential");
    let data = credential.data.unwrap();
    assert_eq!(
        data["username"].0,
        format!("gateway-endpoint/{team}/chat").into_bytes()
    );
    assert_ne!(data["password"].0, b"writer-pw");
    assert_eq!(ep.status.as_ref().unwrap().ready_replicas, Some(1));
    // A deleted Deployment comes back, through the ServiceAccount's rights.
    Api::<Deployment>::namespaced(admin.clone(), &team)
        .delete("chat", &DeleteParams::default())
        .await
        .unwrap();
    eventually(60, "the Deployment re-created", || async {
        let d = Api::<Deployment>::namespaced(admin.clone(), &team)
            .get_opt("chat")
            .await
            .ok()??;
        (d.uid() != deployment.uid()).then_some(())
    })
    .await;

    // It leads through the Lease the chart's Role allows, in the release namespace.
    let leases = Api::<Lease>::namespaced(admin.clone(), &rel_ns);
    let lease = leases.get(&fullname).await.expect("the leader Lease");
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(pod_a.as_str())
    );
    eventually(20, "the operator's leader gauge", || async {
        (op.metric("mlflow_gateway_operator_leader", &[]).await == 1.0).then_some(())
    })
    .await;

    // Requests it has no business making are refused to its ServiceAccount.
    let as_sa = c.impersonating(&sa).await;
    assert!(
        is_forbidden(
            Api::<Secret>::namespaced(as_sa.clone(), &team)
                .delete("llm-keys", &DeleteParams::default())
                .await
        ),
        "the ServiceAccount may delete a Secret"
    );
    assert!(
        is_forbidden(
            Api::<GatewayEndpoint>::namespaced(as_sa.clone(), &team)
                .delete("chat", &DeleteParams::default())
                .await
        ),
        "the ServiceAccount may delete a GatewayEndpoint"
    );
    assert!(
        is_forbidden(
            // It may list them (why gateway pods do not serve), nothing else.
            Api::<Pod>::namespaced(as_sa.clone(), &team)
                .delete_collection(&DeleteParams::default(), &ListParams::default())
                .await
        ),
        "the ServiceAccount may delete pods"
    );
    assert!(
        is_forbidden(
            Api::<Lease>::namespaced(as_sa.clone(), &team)
                .get(&fullname)
                .await
        ),
        "the ServiceAccount may read Leases outside the release namespace"
    );
    assert!(
        Api::<Secret>::namespaced(admin.clone(), &team)
            .get("llm-keys")
            .await
            .is_ok()
    );

    // helm upgrade with a changed value: the new MLflow UI URL reaches status.experimentUrl.
    let ui = "http://mlflow-ui.example.com";
    let (ok, out, err) = c.helm(&[
        "upgrade",
        &release,
        chart.to_str().unwrap(),
        "--namespace",
        &rel_ns,
        "--reuse-values",
        "--set",
        &format!("mlflow.uiUrl={ui}"),
        "--wait",
        "--timeout",
        "180s",
    ]);
    assert!(ok, "helm upgrade failed:\n{out}\n{err}");
    // The rollout: the old process stops on SIGTERM (exit 0, Lease released), a new one starts
    // with the upgraded Deployment's environment.
    op.terminate();
    assert!(op.wait_exit(60).await.success(), "{}", op.log_text());
    let lease = leases.get(&fullname).await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity,
        None,
        "SIGTERM releases the Lease"
    );
    let pod_b = format!("{fullname}-b");
    let env = deployment_env(&admin, &rel_ns, &fullname, &pod_b).await;
    assert_eq!(env_value(&env, "MLFLOW_UI_URL").as_deref(), Some(ui));
    let mut op = Operator::start_with(&kubeconfig, &env);
    let expected = format!("{ui}/#/experiments/{id}/traces");
    eventually(60, "experimentUrl from the upgraded value", || async {
        let ep = endpoints.get("chat").await.ok()?;
        (ep.status?.experiment_url.as_deref() == Some(expected.as_str())).then_some(())
    })
    .await;

    // helm uninstall: the operator's objects go, the experiment stays in MLflow.
    op.terminate();
    assert!(op.wait_exit(60).await.success(), "{}", op.log_text());
    let (ok, out, err) = c.helm(&[
        "uninstall",
        &release,
        "--namespace",
        &rel_ns,
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert!(ok, "helm uninstall failed:\n{out}\n{err}");
    assert!(
        Api::<Role>::namespaced(admin.clone(), &team)
            .get_opt(&fullname)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        Api::<Deployment>::namespaced(admin.clone(), &rel_ns)
            .get_opt(&fullname)
            .await
            .unwrap()
            .is_none()
    );
    let e = t.get_experiment(&id).await.unwrap();
    assert_eq!(
        e.lifecycle_stage,
        mlflow_gateway_operator::mlflow::LifecycleStage::Active,
        "uninstall keeps the experiment"
    );
    assert!(
        endpoints.get_opt("chat").await.unwrap().is_some(),
        "uninstall keeps the CRD and the endpoints"
    );
}
