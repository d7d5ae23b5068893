//! End-to-end: the operator deploys each endpoint as gateway pods, on a real control plane
//! (controller-manager, scheduler and kwok make Deployments Running pods) and a real MLflow.

use crate::support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use mlflow_gateway_operator::api::GatewayEndpoint;
use serde_json::{Value, json};
use support::fake_llm::FakeLlm;
use support::{Mlflow, Operator, apply, cluster, eventually};

const QUICK: &[(&str, &str)] = &[
    ("RESYNC_PERIOD_SECONDS", "3"),
    ("MAX_BACKOFF_SECONDS", "4"),
    ("GATEWAY_IMAGE", "registry.example.com/mgo:test"),
];
const API_KEY: &str = "sk-e2e-pods-0123456789";

struct Env {
    client: kube::Client,
    ns: String,
    endpoints: Api<GatewayEndpoint>,
    deployments: Api<Deployment>,
    config_maps: Api<ConfigMap>,
    services: Api<Service>,
    secrets: Api<Secret>,
}

async fn setup(prefix: &str, with_secret: bool) -> Env {
    let client = cluster().client().await;
    let ns = support::namespace(&client, prefix).await;
    if with_secret {
        support::secret(&client, &ns, "llm-keys", &[("openai", API_KEY)]).await;
    }
    Env {
        endpoints: Api::namespaced(client.clone(), &ns),
        deployments: Api::namespaced(client.clone(), &ns),
        config_maps: Api::namespaced(client.clone(), &ns),
        services: Api::namespaced(client.clone(), &ns),
        secrets: Api::namespaced(client.clone(), &ns),
        client,
        ns,
    }
}

async fn wait_condition(
    env: &Env,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> GatewayEndpoint {
    support::wait_condition(&env.endpoints, name, type_, status, reason, 90).await
}

async fn ready(env: &Env, name: &str) -> GatewayEndpoint {
    wait_condition(env, name, "Ready", "True", None).await
}

/// The pods of the endpoint that are Running, with their config hash.
async fn running_pods(env: &Env, name: &str) -> Vec<(String, String)> {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}")))
        .await
        .unwrap();
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .map(|p| {
            let hash = p.annotations()["mlflow-gateway.dev/config-hash"].clone();
            (p.name_any(), hash)
        })
        .collect()
}

/// Waits until every Running pod of the endpoint carries `hash`, and there are `n` of them.
async fn pods_rolled_to(env: &Env, name: &str, hash: &str, n: usize) {
    eventually(
        90,
        &format!("{n} Running pods with config {hash}"),
        || async {
            let pods = running_pods(env, name).await;
            (pods.len() == n && pods.iter().all(|(_, h)| h == hash)).then_some(())
        },
    )
    .await
}

async fn events(env: &Env, name: &str, reason: &str) -> Vec<Event> {
    support::events(&env.client, &env.ns, name, reason).await
}

async fn search_traces(ml: &Mlflow, experiment_id: &str) -> Vec<Value> {
    let resp = ml
        .request(reqwest::Method::POST, "/api/3.0/mlflow/traces/search")
        .json(&json!({
            "locations": [{"type": "MLFLOW_EXPERIMENT",
                           "mlflow_experiment": {"experiment_id": experiment_id}}],
            "max_results": 50
        }))
        .send()
        .await
        .expect("search traces");
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let body: Value = resp.json().await.unwrap();
    body["traces"].as_array().cloned().unwrap_or_default()
}

async fn chat(url: &str, text: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": text}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_endpoint_runs_as_a_configmap_a_deployment_and_a_service_with_running_pods() {
    let ml = support::mlflow();
    let env = setup("e2e-pods", true).await;
    let _op = Operator::start(&env.ns, &ml.uri, QUICK);
    apply(
        &env.ns,
        &support::endpoint_yaml(
            "chat",
            "https://api.openai.com/v1",
            "  replicas: 2\n  gateway:\n    podLabels: {team: a}\n    resources: {requests: {cpu: 50m}, limits: {memory: 128Mi}}\n",
        ),
    );
    ready(&env, "chat").await;
    // Ready needs the Deployment Available; the counts and the finished rollout can come later.
    let ep = eventually(90, "2 ready replicas and the rollout complete", || async {
        let ep = env.endpoints.get("chat").await.ok()?;
        let status = ep.status.as_ref()?;
        let done = status.condition("Progressing")?.status == "False";
        (status.ready_replicas == Some(2) && done).then_some(ep.clone())
    })
    .await;
    let status = ep.status.clone().unwrap();
    assert_eq!(
        status.url.as_deref(),
        Some(format!("http://chat.{}.svc:8080", env.ns).as_str())
    );
    assert_eq!(status.ready_replicas, Some(2));
    assert_eq!(status.replicas, Some(2));
    for (t, s) in [
        ("ExperimentReady", "True"),
        ("SecretsReady", "True"),
        ("Available", "True"),
        ("Progressing", "False"),
    ] {
        assert_eq!(
            status.condition(t).map(|c| c.status.as_str()),
            Some(s),
            "{t}"
        );
    }
    eventually(60, "2 Running pods", || async {
        (running_pods(&env, "chat").await.len() == 2).then_some(())
    })
    .await;

    // The ConfigMap: the endpoint as the gateway reads it, with uid and namespace, nothing secret.
    let cm = env.config_maps.get("chat").await.unwrap();
    let config = &cm.data.as_ref().unwrap()["endpoint.yaml"];
    let served: GatewayEndpoint = serde_yaml::from_str(config).unwrap();
    assert_eq!(served.uid(), ep.uid());
    assert_eq!(served.namespace().as_deref(), Some(env.ns.as_str()));
    assert_eq!(served.spec.models, ep.spec.models);
    assert!(!config.contains(API_KEY));

    // The Deployment: owned, API key from the Secret, MLflow settings, hardened, overrides applied.
    let d = env.deployments.get("chat").await.unwrap();
    let owner = &d.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), Some(&owner.uid)),
        ("GatewayEndpoint", ep.uid().as_ref())
    );
    assert_eq!(owner.controller, Some(true));
    let vars = support::env_of(&d);
    assert_eq!(
        vars["GATEWAY_API_KEY_MINI"]["valueFrom"]["secretKeyRef"],
        json!({"name": "llm-keys", "key": "openai", "optional": false})
    );
    assert_eq!(
        vars["MLFLOW_EXPERIMENT_ID"]["value"],
        json!(status.experiment_id.clone().unwrap())
    );
    assert_eq!(
        vars["MLFLOW_TRACKING_URI"]["value"],
        json!(ml.uri.trim_end_matches('/'))
    );
    let text = serde_json::to_string(&d).unwrap();
    assert!(!text.contains(API_KEY), "no secret value in the Deployment");
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("registry.example.com/mgo:test"));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(
        (
            sc.run_as_non_root,
            sc.read_only_root_filesystem,
            sc.allow_privilege_escalation
        ),
        (Some(true), Some(true), Some(false))
    );
    assert_eq!(
        pod.security_context
            .as_ref()
            .unwrap()
            .seccomp_profile
            .as_ref()
            .unwrap()
            .type_,
        "RuntimeDefault"
    );
    assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some());
    let res = c.resources.as_ref().unwrap();
    assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "50m");
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "128Mi");
    let labels = d
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert_eq!(labels["team"], "a");
    assert_eq!(
        d.managed_fields()
            .iter()
            .filter(|m| m.operation.as_deref() == Some("Apply"))
            .map(|m| m.manager.clone().unwrap_or_default())
            .collect::<Vec<_>>(),
        vec!["mlflow-gateway-operator".to_string()],
        "applied by one field manager"
    );

    // The Service.
    let svc = env.services.get("chat").await.unwrap();
    let spec = svc.spec.unwrap();
    assert_eq!(spec.ports.as_ref().unwrap()[0].port, 8080);
    assert_eq!(spec.selector.unwrap()["app.kubernetes.io/instance"], "chat");
}

#[tokio::test]
async fn a_request_through_the_gateway_the_deployment_declares_is_traced_into_the_status_experiment()
 {
    let ml = support::mlflow();
    let env = setup("e2e-proof", true).await;
    let fake = FakeLlm::start("openai-fake", API_KEY).await;
    let _op = Operator::start(&env.ns, &ml.uri, QUICK);
    apply(
        &env.ns,
        &support::endpoint_yaml("chat", &format!("{}/v1", fake.url), ""),
    );
    let ep = ready(&env, "chat").await;
    let experiment_id = ep.status.clone().unwrap().experiment_id.unwrap();

    let gw = support::gateway_from_deployment(&env.client, &env.ns, "chat", &[]).await;
    let resp = chat(&gw.url, "hello from the pods").await;
    assert_eq!(resp.status(), 200);
    let trace_id = resp.headers()["x-mlflow-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        fake.reply_to("hello from the pods")
    );
    assert_eq!(
        fake.last_request().unwrap().header("authorization"),
        Some(format!("Bearer {API_KEY}").as_str()),
        "the API key came from the Secret the Deployment references"
    );
    let uid = ep.uid().unwrap();
    // The trace info goes first, its spans (from which MLflow derives the previews) right after.
    let trace = eventually(
        60,
        "the whole trace in the endpoint's experiment",
        || async {
            search_traces(ml, &experiment_id)
                .await
                .into_iter()
                .find(|t| {
                    t["trace_id"] == trace_id.as_str()
                        // Trace metadata or tags, by the gateway's export mode.
                        && ["trace_metadata", "tags"]
                            .iter()
                            .any(|k| t[k]["mlflow.gateway.endpointId"] == uid.as_str())
                        && t["request_preview"]
                            .as_str()
                            .is_some_and(|p| p.contains("hello from the pods"))
                })
        },
    )
    .await;
    assert_eq!(
        trace["trace_location"]["mlflow_experiment"]["experiment_id"],
        experiment_id.as_str()
    );
    assert!(!serde_json::to_string(&trace).unwrap().contains(API_KEY));
}

#[tokio::test]
async fn a_changed_model_or_a_rotated_secret_rolls_the_pods_and_scaling_does_not() {
    let ml = support::mlflow();
    let env = setup("e2e-roll", true).await;
    let _op = Operator::start(&env.ns, &ml.uri, QUICK);
    apply(
        &env.ns,
        &support::endpoint_yaml("chat", "https://api.openai.com/v1", ""),
    );
    ready(&env, "chat").await;
    let first = support::config_hash(&env.deployments.get("chat").await.unwrap());
    pods_rolled_to(&env, "chat", &first, 1).await;

    // A changed model: a new config, new pods.
    apply(
        &env.ns,
        &support::endpoint_yaml("chat", "https://api.openai.com/v1", "")
            .replace("gpt-4o-mini", "gpt-4.1-mini"),
    );
    let second = eventually(60, "a new config hash", || async {
        let h = support::config_hash(&env.deployments.get("chat").await.ok()?);
        (h != first).then_some(h)
    })
    .await;
    pods_rolled_to(&env, "chat", &second, 1).await;
    eventually(30, "the new model in the ConfigMap", || async {
        let cm = env.config_maps.get("chat").await.ok()?;
        cm.data?["endpoint.yaml"]
            .contains("gpt-4.1-mini")
            .then_some(())
    })
    .await;
    wait_condition(
        &env,
        "chat",
        "Progressing",
        "False",
        Some("RolloutComplete"),
    )
    .await;

    // A rotated Secret: same config, new Secret version, new pods.
    support::secret(
        &env.client,
        &env.ns,
        "llm-keys",
        &[("openai", "sk-rotated")],
    )
    .await;
    let third = eventually(60, "a config hash after rotation", || async {
        let h = support::config_hash(&env.deployments.get("chat").await.ok()?);
        (h != second).then_some(h)
    })
    .await;
    pods_rolled_to(&env, "chat", &third, 1).await;

    // Scaling: more pods, same config.
    apply(
        &env.ns,
        &support::endpoint_yaml("chat", "https://api.openai.com/v1", "  replicas: 3\n")
            .replace("gpt-4o-mini", "gpt-4.1-mini"),
    );
    pods_rolled_to(&env, "chat", &third, 3).await;
    assert_eq!(
        support::config_hash(&env.deployments.get("chat").await.unwrap()),
        third
    );
    // Progressing may still show the last rollout's RolloutComplete: wait for the 3 replicas too.
    eventually(90, "3 ready replicas, rollout complete", || async {
        let ep = env.endpoints.get("chat").await.ok()?;
        let status = ep.status?;
        let c = status.condition("Progressing")?;
        (c.status == "False" && c.reason == "RolloutComplete" && status.ready_replicas == Some(3))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn owned_objects_edited_or_deleted_are_put_back() {
    let ml = support::mlflow();
    let env = setup("e2e-heal", true).await;
    let _op = Operator::start(&env.ns, &ml.uri, QUICK);
    apply(
        &env.ns,
        &support::endpoint_yaml("chat", "https://api.openai.com/v1", "  replicas: 2\n"),
    );
    ready(&env, "chat").await;
    let original = env.deployments.get("chat").await.unwrap();

    // Deleted Deployment: it comes back, with new pods.
    env.deployments
        .delete("chat", &DeleteParams::foreground())
        .await
        .unwrap();
    eventually(60, "the Deployment re-created", || async {
        let d = env.deployments.get_opt("chat").await.ok()??;
        (d.uid() != original.uid()).then_some(())
    })
    .await;
    ready(&env, "chat").await;

    // Edited by hand: scaled and re-imaged with kubectl, the declared state wins.
    let (ok, _, err) = cluster().kubectl_run(
        &["-n", &env.ns, "scale", "deployment/chat", "--replicas=5"],
        None,
    );
    assert!(ok, "{err}");
    let (ok, _, err) = cluster().kubectl_run(
        &[
            "-n",
            &env.ns,
            "set",
            "image",
            "deployment/chat",
            "gateway=evil.example.com/x:1",
        ],
        None,
    );
    assert!(ok, "{err}");
    eventually(60, "the Deployment put back", || async {
        let d = env.deployments.get("chat").await.ok()?;
        let spec = d.spec?;
        let image = spec.template.spec?.containers[0].image.clone()?;
        (spec.replicas == Some(2) && image == "registry.example.com/mgo:test").then_some(())
    })
    .await;

    // ConfigMap edited, Service deleted: both put back.
    env.config_maps
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"endpoint.yaml": "tampered"}})),
        )
        .await
        .unwrap();
    env.services
        .delete("chat", &DeleteParams::default())
        .await
        .unwrap();
    eventually(60, "ConfigMap and Service put back", || async {
        let cm = env.config_maps.get("chat").await.ok()?;
        let svc = env.services.get_opt("chat").await.ok()??;
        (cm.data?["endpoint.yaml"].contains("gpt-4o-mini") && svc.spec.is_some()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_deleted_endpoint_takes_its_objects_with_it() {
    let ml = support::mlflow();
    let env = setup("e2e-gc", true).await;
    let _op = Operator::start(&env.ns, &ml.uri, QUICK);
    apply(
        &env.ns,
        &support::endpoint_yaml("chat", "https://api.openai.com/v1", ""),
    );
    ready(&env, "chat").await;
    let (ok, _, err) = cluster().kubectl_run(
        &[
            "-n",
            &env.ns,
            "delete",
            "gatewayendpoint",
            "chat",
            "--wait=true",
        ],
        None,
    );
    assert!(ok, "{err}");
    eventually(
        90,
        "ConfigMap, Deployment, Service and pods gone",
        || async {
            let gone = env.deployments.get_opt("chat").await.ok()?.is_none()
                && env.config_maps.get_opt("chat").await.ok()?.is_none()
                && env.services.get_opt("chat").await.ok()?.is_none()
                && running_pods(&env, "chat").await.is_empty();
            gone.then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_missing_secret_or_key_is_named_leaves_the_pods_alone_and_heals_when_fixed() {
    let ml = support::mlflow();
    let env = setup("e2e-secret", false).await;
    let _op = Operator::start(&env.ns, &ml.uri, QUICK);
    apply(
        &env.ns,
        &support::endpoint_yaml("chat", "https://api.openai.com/v1", ""),
    );

    // No Secret: named in the condition and an Event; no pods that would crash.
    let ep = wait_condition(
        &env,
        "chat",
        "SecretsReady",
        "False",
        Some("SecretNotFound"),
    )
    .await;
    let status = ep.status.unwrap();
    let msg = &status.condition("SecretsReady").unwrap().message;
    assert!(
        msg.contains("llm-keys") && msg.contains("model mini"),
        "{msg}"
    );
    assert_eq!(status.condition("Ready").unwrap().status, "False");
    assert_eq!(status.condition("Ready").unwrap().reason, "SecretNotFound");
    assert!(env.deployments.get_opt("chat").await.unwrap().is_none());
    eventually(30, "a SecretNotFound Event", || async {
        (!events(&env, "chat", "SecretNotFound").await.is_empty()).then_some(())
    })
    .await;

    // Fixed: heals without anyone touching the endpoint.
    support::secret(&env.client, &env.ns, "llm-keys", &[("openai", API_KEY)]).await;
    ready(&env, "chat").await;
    let running = env.deployments.get("chat").await.unwrap();

    // The key goes away: named, and the running pods are left as they were.
    support::secret(&env.client, &env.ns, "llm-keys", &[("other", "x")]).await;
    let ep = wait_condition(
        &env,
        "chat",
        "SecretsReady",
        "False",
        Some("SecretKeyNotFound"),
    )
    .await;
    let msg = ep
        .status
        .unwrap()
        .condition("SecretsReady")
        .unwrap()
        .message
        .clone();
    assert!(
        msg.contains("\"openai\"") && msg.contains("llm-keys"),
        "{msg}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = env.deployments.get("chat").await.unwrap();
    assert_eq!(
        after.metadata.generation, running.metadata.generation,
        "no rollout into a crash loop"
    );
    assert_eq!(support::config_hash(&after), support::config_hash(&running));
    assert!(
        !running_pods(&env, "chat").await.is_empty(),
        "the pods still run"
    );

    // Fixed again: the new Secret version rolls the pods, and it is Ready.
    support::secret(&env.client, &env.ns, "llm-keys", &[("openai", API_KEY)]).await;
    ready(&env, "chat").await;
    let healed = env.deployments.get("chat").await.unwrap();
    assert_ne!(
        support::config_hash(&healed),
        support::config_hash(&running)
    );
}

#[tokio::test]
async fn an_object_of_the_same_name_that_is_not_ours_is_left_untouched() {
    let ml = support::mlflow();
    let env = setup("e2e-conflict", true).await;
    let foreign: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "chat"}, "data": {"owner": "someone else"}
    }))
    .unwrap();
    env.config_maps
        .create(&Default::default(), &foreign)
        .await
        .unwrap();
    let _op = Operator::start(&env.ns, &ml.uri, QUICK);
    apply(
        &env.ns,
        &support::endpoint_yaml("chat", "https://api.openai.com/v1", ""),
    );
    let ep = wait_condition(&env, "chat", "Available", "False", Some("NameConflict")).await;
    let msg = ep
        .status
        .unwrap()
        .condition("Ready")
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("ConfigMap") && msg.contains("chat"), "{msg}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let cm = env.config_maps.get("chat").await.unwrap();
    assert_eq!(cm.data.as_ref().unwrap()["owner"], "someone else");
    assert!(cm.owner_references().is_empty());
    assert!(env.deployments.get_opt("chat").await.unwrap().is_none());
}

/// Creates an MLflow user that may edit `experiment_id` (and nothing else): the gateway's
/// trace-writing credential.
async fn trace_writer(ml: &Mlflow, username: &str, password: &str, experiment_id: &str) {
    let resp = ml
        .request(reqwest::Method::POST, "/api/2.0/mlflow/users/create")
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let resp = ml
        .request(
            reqwest::Method::POST,
            "/api/3.0/mlflow/users/permissions/grant",
        )
        .json(&json!({"username": username, "resource_type": "experiment",
                      "resource_id": experiment_id, "permission": "EDIT"}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
}

#[tokio::test]
async fn gateway_pods_write_traces_with_their_own_credential_never_the_operators() {
    let ml = Mlflow::start(true);
    let (admin_user, admin_password) = ml.admin.clone().unwrap();
    let env = setup("e2e-creds", true).await;
    let fake = FakeLlm::start("openai-fake", API_KEY).await;
    // The operator-wide gateway credential lives in the operator's namespace.
    let op_ns = support::namespace(&env.client, "e2e-operator").await;
    support::secret(
        &env.client,
        &op_ns,
        "gateway-writer",
        &[
            ("username", "gateway-writer"),
            ("password", "writer-password-1"),
        ],
    )
    .await;
    let mut vars = QUICK.to_vec();
    vars.extend([
        ("MLFLOW_TRACKING_USERNAME", admin_user.as_str()),
        ("MLFLOW_TRACKING_PASSWORD", admin_password.as_str()),
        ("GATEWAY_MLFLOW_CREDENTIALS_SECRET", "gateway-writer"),
        ("POD_NAMESPACE", op_ns.as_str()),
        // The operator's account is an admin: without this it would make a user per endpoint
        // (e2e_credential); this test is about the mirror.
        ("GATEWAY_TRACE_CREDENTIALS", "mirrored"),
    ]);
    let op = Operator::start(&env.ns, &ml.uri, &vars);
    apply(
        &env.ns,
        &support::endpoint_yaml("chat", &format!("{}/v1", fake.url), ""),
    );
    let ep = ready(&env, "chat").await;
    let experiment_id = ep.status.clone().unwrap().experiment_id.unwrap();

    // Mirrored as a Secret the endpoint owns; the Deployment reads it from there.
    let mirror = env.secrets.get("chat-mlflow-credentials").await.unwrap();
    assert_eq!(mirror.owner_references()[0].uid, ep.uid().unwrap());
    let d = env.deployments.get("chat").await.unwrap();
    let vars = support::env_of(&d);
    assert_eq!(
        vars["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"]["name"],
        "chat-mlflow-credentials"
    );
    assert_eq!(
        vars["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"],
        "password"
    );
    // The operator's own credential is nowhere in the endpoint's namespace.
    for s in env.secrets.list(&ListParams::default()).await.unwrap() {
        let text = serde_json::to_string(&s).unwrap();
        let encoded = base64_of(&admin_password);
        assert!(
            !text.contains(&admin_password) && !text.contains(&encoded),
            "{}",
            s.name_any()
        );
    }
    assert!(!serde_json::to_string(&d).unwrap().contains(&admin_password));
    assert!(
        !op.log_text().contains(&admin_password) && !op.log_text().contains("writer-password-1")
    );

    // The pods' credential writes traces into the experiment.
    trace_writer(&ml, "gateway-writer", "writer-password-1", &experiment_id).await;
    let gw = support::gateway_from_deployment(&env.client, &env.ns, "chat", &[]).await;
    let resp = chat(&gw.url, "traced with the gateway's credential").await;
    assert_eq!(resp.status(), 200);
    let trace_id = resp.headers()["x-mlflow-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    eventually(
        60,
        "the trace written with the gateway credential",
        || async {
            search_traces(&ml, &experiment_id)
                .await
                .into_iter()
                .find(|t| t["trace_id"] == trace_id.as_str())
        },
    )
    .await;

    // Rotating the operator-wide credential rolls the pods.
    let before = support::config_hash(&d);
    support::secret(
        &env.client,
        &op_ns,
        "gateway-writer",
        &[
            ("username", "gateway-writer"),
            ("password", "writer-password-2"),
        ],
    )
    .await;
    eventually(
        60,
        "the pods rolled after the credential rotation",
        || async {
            let d = env.deployments.get("chat").await.ok()?;
            (support::config_hash(&d) != before).then_some(())
        },
    )
    .await;
    eventually(30, "the rotated password in the mirror", || async {
        let mirror = env.secrets.get("chat-mlflow-credentials").await.ok()?;
        (mirror.data?["password"].0 == b"writer-password-2").then_some(())
    })
    .await;

    // An endpoint that names its own credential uses it, and gets no mirror.
    support::secret(
        &env.client,
        &env.ns,
        "team-writer",
        &[("token", "tok-team")],
    )
    .await;
    apply(
        &env.ns,
        &support::endpoint_yaml(
            "own",
            &format!("{}/v1", fake.url),
            "  tracing: {credentialsSecretRef: {name: team-writer}}\n",
        ),
    );
    ready(&env, "own").await;
    let d = env.deployments.get("own").await.unwrap();
    let vars = support::env_of(&d);
    assert_eq!(
        vars["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]["name"],
        "team-writer"
    );
    assert!(!vars.contains_key("MLFLOW_TRACKING_USERNAME"));
    assert!(
        env.secrets
            .get_opt("own-mlflow-credentials")
            .await
            .unwrap()
            .is_none()
    );
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn usage_tracking_off_runs_pods_without_any_mlflow_setting() {
    let ml = support::mlflow();
    let env = setup("e2e-notrack", true).await;
    let _op = Operator::start(&env.ns, &ml.uri, QUICK);
    apply(
        &env.ns,
        &support::endpoint_yaml(
            "chat",
            "https://api.openai.com/v1",
            "  usageTracking: false\n",
        ),
    );
    let ep = ready(&env, "chat").await;
    assert_eq!(ep.status.unwrap().experiment_id, None);
    let d = env.deployments.get("chat").await.unwrap();
    assert!(!support::env_of(&d).keys().any(|k| k.starts_with("MLFLOW_")));
    assert!(d.meta().owner_references.is_some());
}

/// A CA bundle given to the operator for the gateway pods goes into each endpoint's ConfigMap,
/// beside the config, and the pods are told where it is; a file that holds no certificate stops
/// the operator at start with a message naming the variable.
#[tokio::test]
async fn the_gateway_pods_get_the_ca_bundle_the_operator_is_given() {
    let ml = support::mlflow();
    let env = setup("e2e-ca", true).await;
    let ca = support::repo_root().join("tests/fixtures/test-ca.pem");
    let pem = std::fs::read_to_string(&ca).unwrap();

    let not_pem = std::env::temp_dir().join(format!("not-a-ca-{}.pem", support::suffix()));
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let mut vars = QUICK.to_vec();
    vars.push((
        "GATEWAY_MLFLOW_TRACKING_SERVER_CERT_PATH",
        not_pem.to_str().unwrap(),
    ));
    let mut refused = Operator::start(&env.ns, &ml.uri, &vars);
    assert!(!refused.wait_exit(30).await.success());
    let log = refused.log_text();
    assert!(
        log.contains("GATEWAY_MLFLOW_TRACKING_SERVER_CERT_PATH")
            && log.contains("no PEM certificate"),
        "{log}"
    );
    let _ = std::fs::remove_file(&not_pem);

    let mut vars = QUICK.to_vec();
    vars.push((
        "GATEWAY_MLFLOW_TRACKING_SERVER_CERT_PATH",
        ca.to_str().unwrap(),
    ));
    let _op = Operator::start(&env.ns, &ml.uri, &vars);
    apply(
        &env.ns,
        &support::endpoint_yaml("chat", "https://api.openai.com/v1", ""),
    );
    ready(&env, "chat").await;
    let cm = env.config_maps.get("chat").await.unwrap();
    assert_eq!(cm.data.as_ref().unwrap()["mlflow-ca.crt"], pem);
    let d = env.deployments.get("chat").await.unwrap();
    assert_eq!(
        support::env_of(&d)["MLFLOW_TRACKING_SERVER_CERT_PATH"]["value"],
        "/etc/mlflow-gateway/mlflow-ca.crt"
    );
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let mount = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/etc/mlflow-gateway")
        .expect("the config volume");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(volume.config_map.as_ref().unwrap().name, "chat");
}
