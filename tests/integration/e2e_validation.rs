//! Nothing fails silently: what only the API server can refuse is refused at `kubectl apply` with
//! a message naming the field (names a Service cannot carry, apiBase values the gateway would
//! refuse, overlong experiment names); what only I/O can tell (an owned object the API server
//! refuses) becomes a condition and a Warning Event; and the operator's `/readyz` says when a
//! watch cannot work.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, PostParams};
use mlflow_gateway_operator::api::GatewayEndpoint;
use mlflow_gateway_operator::api_base;
use mlflow_gateway_operator::gateway::config::{ModelConfig, ModelSettings, Provider};

use crate::support::{self, Operator, apply, cluster, eventually, wait_condition, wait_events};

const QUICK: &[(&str, &str)] = &[("RESYNC_PERIOD_SECONDS", "2"), ("MAX_BACKOFF_SECONDS", "2")];

fn endpoint(name: &str, model_extra: &str, spec_extra: &str) -> serde_json::Value {
    let yaml = format!(
        "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {{name: {name:?}}}\nspec:\n  models: [{{name: m, provider: openai, model: x, apiKeySecretRef: {{name: s, key: k}}{model_extra}}}]\n{spec_extra}"
    );
    serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}: {yaml}"))
}

/// Creates `obj` with `dryRun=All` (nothing is stored): Ok, or the API server's message.
async fn dry_run(api: &Api<GatewayEndpoint>, obj: serde_json::Value) -> Result<(), String> {
    let ep: GatewayEndpoint = serde_json::from_value(obj).unwrap();
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match api.create(&params, &ep).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err(status.message),
        Err(e) => panic!("API server: {e}"),
    }
}

async fn test_namespace(prefix: &str) -> (kube::Client, String) {
    support::install_crds();
    let client = cluster().client().await;
    let ns = support::namespace(&client, prefix).await;
    (client, ns)
}

#[tokio::test]
async fn names_a_service_cannot_carry_are_refused_naming_the_field() {
    let (client, ns) = test_namespace("names").await;
    let api = Api::<GatewayEndpoint>::namespaced(client, &ns);
    let too_long = "a".repeat(64);
    for bad in ["chat.v2", too_long.as_str(), "1chat", "chat-"] {
        let err = dry_run(&api, endpoint(bad, "", "")).await.unwrap_err();
        assert!(
            err.contains("metadata.name must be at most 63 characters") && err.contains("DNS-1035"),
            "{bad}: {err}"
        );
    }
    let longest = format!("a{}", "-b".repeat(31));
    assert_eq!(longest.len(), 63);
    dry_run(&api, endpoint(&longest, "", "")).await.unwrap();
}

#[tokio::test]
async fn an_experiment_name_over_256_characters_is_refused_naming_the_field() {
    let (client, ns) = test_namespace("exp-name").await;
    let api = Api::<GatewayEndpoint>::namespaced(client, &ns);
    let spec = |n: usize| format!("  experimentName: {}\n", "e".repeat(n));
    let err = dry_run(&api, endpoint("chat", "", &spec(257)))
        .await
        .unwrap_err();
    assert!(
        err.contains("spec.experimentName") && err.contains("256"),
        "{err}"
    );
    dry_run(&api, endpoint("chat", "", &spec(256)))
        .await
        .unwrap();
}

/// spec.tracing.queueSize: the API server admits exactly the sizes the operator can turn into the
/// pods' bound, from 1Mi to 1Ti, and says what a size looks like otherwise.
#[tokio::test]
async fn a_queue_size_is_admitted_exactly_when_it_is_a_size_from_1mi_to_1ti() {
    use mlflow_gateway_operator::api::quantity_bytes;
    let (client, ns) = test_namespace("queue-size").await;
    let api = Api::<GatewayEndpoint>::namespaced(client, &ns);
    let spec = |q: &str| format!("  tracing: {{queueSize: {q:?}}}\n");
    for q in [
        "1Mi", "256Mi", "1.5Gi", "1Ti", "1048576", "2M", "0.001Gi", "1024Ki",
    ] {
        let b = quantity_bytes(q).unwrap_or_else(|| panic!("{q}: the operator cannot read it"));
        assert!((1 << 20..=1 << 40).contains(&b), "{q}: {b}");
        dry_run(&api, endpoint("chat", "", &spec(q)))
            .await
            .unwrap_or_else(|e| panic!("{q} refused: {e}"));
    }
    for q in ["1e9", "100m", "-1Mi", "1mi", "1Pi", "1.Mi", "256 Mi"] {
        let err = dry_run(&api, endpoint("chat", "", &spec(q)))
            .await
            .expect_err(q);
        assert!(
            err.contains("spec.tracing.queueSize")
                && err.contains("a size in bytes")
                && err.contains("256Mi"),
            "{q}: {err}"
        );
        assert_eq!(quantity_bytes(q), None, "{q}");
    }
    for q in ["512Ki", "1000k", "1023.9Ki", "2Ti", "1.5Ti"] {
        let err = dry_run(&api, endpoint("chat", "", &spec(q)))
            .await
            .expect_err(q);
        assert!(
            err.contains("spec.tracing.queueSize") && err.contains("from 1Mi to 1Ti"),
            "{q}: {err}"
        );
    }
    // Left out, the API server stores 256Mi (the schema's default), and no mode.
    let yaml = serde_yaml::to_string(&endpoint("chat", "", "")).unwrap();
    apply(&ns, &yaml);
    let (ok, out, err) = cluster().kubectl_run(
        &[
            "get",
            "-n",
            &ns,
            "gwe",
            "chat",
            "-o",
            "jsonpath={.spec.tracing}",
        ],
        None,
    );
    assert!(ok, "{err}");
    let tracing: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(tracing["queueSize"], "256Mi", "{tracing}");
    assert!(tracing.get("exportMode").is_none(), "{tracing}");
}

/// The API server's verdict on every apiBase of the table is the gateway's: what it accepts, the
/// gateway starts with; what it refuses, the gateway refuses; and its message names the field
/// and says what is wrong as the gateway's check says it.
#[tokio::test]
async fn api_base_is_refused_at_apply_exactly_when_the_gateway_refuses_it() {
    let (client, ns) = test_namespace("api-base").await;
    let api = Api::<GatewayEndpoint>::namespaced(client, &ns);
    let mut disagreements = Vec::new();
    for (base, valid) in api_base::CASES {
        let server = dry_run(&api, endpoint("chat", &format!(", apiBase: {base:?}"), "")).await;
        let gateway = ModelConfig::new(
            &ModelSettings {
                name: "m".into(),
                provider: Provider::Openai,
                model: "x".into(),
                api_base: Some(base.to_string()),
                api_version: None,
                deployment: None,
            },
            Some("sk-test".into()),
        );
        if server.is_ok() != *valid || gateway.is_ok() != *valid {
            disagreements.push(format!(
                "{base:?}: table {valid}, API server {server:?}, gateway {:?}",
                gateway.err()
            ));
            continue;
        }
        if let (Err(err), Some(problem)) = (&server, api_base::problem(base))
            && (!err.contains("spec.models[0].apiBase") || !err.contains(problem))
        {
            disagreements.push(format!("{base:?}: {err} (wanted {problem:?})"));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

/// Applies a ValidatingAdmissionPolicy that refuses every Service in `ns`, and waits until the
/// API server enforces it.
async fn refuse_services(client: &kube::Client, ns: &str, message: &str) -> String {
    let name = format!("no-services-{ns}");
    let yaml = format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {name}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - {{apiGroups: [""], apiVersions: ["v1"], operations: ["CREATE", "UPDATE"], resources: ["services"]}}
  validations:
    - {{expression: "false", message: "{message}"}}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {name}}}
spec:
  policyName: {name}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels: {{kubernetes.io/metadata.name: {ns}}}
"#
    );
    let (ok, _, err) = cluster().kubectl_run(&["apply", "-f", "-"], Some(&yaml));
    assert!(ok, "{err}");
    let services = Api::<Service>::namespaced(client.clone(), ns);
    let probe: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "probe"},
        "spec": {"ports": [{"port": 80}]}
    }))
    .unwrap();
    eventually(30, "the policy refuses Services", || async {
        let params = PostParams {
            dry_run: true,
            ..Default::default()
        };
        services
            .create(&params, &probe)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    name
}

#[tokio::test]
async fn a_refused_apply_is_a_condition_with_the_api_servers_message_and_a_warning() {
    let ml = support::mlflow();
    let (client, ns) = test_namespace("apply-failed").await;
    let message = "Services are closed in this namespace (test policy)";
    let policy = refuse_services(&client, &ns, message).await;
    support::secret(&client, &ns, "llm-keys", &[("openai", "sk-test")]).await;
    let _op = Operator::start(&ns, &ml.uri, QUICK);
    apply(
        &ns,
        "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {name: chat}\nspec:\n  usageTracking: false\n  models: [{name: m, provider: openai, model: x, apiKeySecretRef: {name: llm-keys, key: openai}}]\n",
    );
    let api = Api::<GatewayEndpoint>::namespaced(client.clone(), &ns);
    let ep = wait_condition(&api, "chat", "Available", "False", Some("ApplyFailed"), 60).await;
    let status = ep.status.unwrap();
    let available = status.condition("Available").unwrap();
    assert!(
        available
            .message
            .starts_with(&format!("could not apply Service {ns}/chat: "))
            && available.message.contains(message),
        "{}",
        available.message
    );
    assert_eq!(status.condition("Ready").unwrap().reason, "ApplyFailed");
    let events = wait_events(&client, &ns, "chat", "ApplyFailed", 1, 30).await;
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
    assert!(
        events[0]
            .note
            .as_deref()
            .unwrap_or_default()
            .contains(message),
        "{:?}",
        events[0].note
    );

    // Once the API server takes the Service, the condition says so.
    let (ok, _, err) = cluster().kubectl_run(
        &[
            "delete",
            "validatingadmissionpolicybinding,validatingadmissionpolicy",
            &policy,
        ],
        None,
    );
    assert!(ok, "{err}");
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    eventually(60, "the Service is applied", || async {
        services.get_opt("chat").await.ok().flatten()
    })
    .await;
    eventually(60, "Available no longer ApplyFailed", || async {
        let ep = api.get("chat").await.ok()?;
        let c = ep.status?.condition("Available")?.clone();
        (c.reason != "ApplyFailed").then_some(())
    })
    .await;
}

async fn readyz(op: &Operator) -> (u16, String) {
    let url = op.metrics_url.replace("/metrics", "/readyz");
    match reqwest::get(&url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// The operator, as a user whose Role lacks list/watch on Services, is not ready and says which
/// watch fails; given them, it becomes ready.
#[tokio::test]
async fn readyz_is_not_ready_while_a_watch_is_forbidden() {
    let ml = support::mlflow();
    let (client, ns) = test_namespace("readyz").await;
    let user = format!("operator-{ns}");
    let all = [
        "get", "list", "watch", "create", "update", "patch", "delete",
    ];
    let role = |services: &[&str]| -> Role {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "operator"},
            "rules": [
                {"apiGroups": ["mlflow-gateway.dev"], "resources": ["gatewayendpoints", "gatewayendpoints/status", "gatewayendpoints/finalizers"], "verbs": all},
                {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": all},
                {"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": all},
                {"apiGroups": [""], "resources": ["services"], "verbs": services},
                {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
            ]
        }))
        .unwrap()
    };
    let roles = Api::<Role>::namespaced(client.clone(), &ns);
    roles
        .create(&PostParams::default(), &role(&["get", "create", "patch"]))
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "operator"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    let kubeconfig = cluster().kubeconfig_as(&user);
    let env: Vec<(String, String)> = [
        ("MLFLOW_TRACKING_URI", ml.uri.as_str()),
        ("WATCH_NAMESPACE", ns.as_str()),
        ("MAX_BACKOFF_SECONDS", "2"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let op = Operator::start_with(&kubeconfig, &env);
    let (code, body) = eventually(30, "readyz names the forbidden watch", || async {
        let (code, body) = readyz(&op).await;
        // The other watches list meanwhile; the one forbidden stays failing.
        (code == 503 && body.contains("watch of services failing") && !body.contains("not yet"))
            .then_some((code, body))
    })
    .await;
    assert_eq!(
        body,
        format!(
            "not ready: watch of services failing: services is forbidden: User \"{user}\" cannot list resource \"services\" in API group \"\" in the namespace \"{ns}\""
        ),
        "{code}"
    );

    let mut granted = role(&all);
    granted.metadata.resource_version = None;
    roles
        .replace("operator", &PostParams::default(), &granted)
        .await
        .unwrap();
    // Polled by hand to say what readyz last answered if it never turns ready.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (code, body) = readyz(&op).await;
        if code == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readyz not ready 60 s after Services may be watched: {code} {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A gateway that exits at start (here: its pod's status says so, as the kubelet would write it;
/// kwok's pods run no process) makes `Available` False with the container's termination message,
/// not only "unavailable".
#[tokio::test]
async fn a_crash_looping_gateway_is_a_condition_quoting_its_termination_message() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{ListParams, Patch, PatchParams};
    let ml = support::mlflow();
    let (client, ns) = test_namespace("crash").await;
    support::secret(&client, &ns, "llm-keys", &[("openai", "sk-test")]).await;
    let _op = Operator::start(&ns, &ml.uri, QUICK);
    apply(
        &ns,
        "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {name: chat}\nspec:\n  usageTracking: false\n  models: [{name: m, provider: openai, model: x, apiKeySecretRef: {name: llm-keys, key: openai}}]\n",
    );
    let api = Api::<GatewayEndpoint>::namespaced(client.clone(), &ns);
    wait_condition(&api, "chat", "Ready", "True", None, 60).await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let pod = pods
        .list(&ListParams::default().labels("app.kubernetes.io/instance=chat"))
        .await
        .unwrap()
        .items
        .remove(0);
    let name = pod.metadata.name.clone().unwrap();
    let refusal = "error: model m: GATEWAY_API_KEY_M holds an invalid API key value";
    let status = serde_json::json!({"status": {
        "conditions": [{"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "False"}],
        "containerStatuses": [{
            "name": "gateway", "ready": false, "restartCount": 3,
            "image": "gateway", "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
            "lastState": {"terminated": {"exitCode": 2, "reason": "Error", "message": format!("{refusal}\n")}}
        }]
    }});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let ep = wait_condition(
        &api,
        "chat",
        "Available",
        "False",
        Some("CrashLoopBackOff"),
        60,
    )
    .await;
    let available = ep.status.unwrap().condition("Available").unwrap().clone();
    assert_eq!(
        available.message,
        format!("pod {name}: the gateway exits with code 2: {refusal}")
    );
    let events = wait_events(&client, &ns, "chat", "CrashLoopBackOff", 1, 30).await;
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
}
