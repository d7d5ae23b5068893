//! End-to-end: the per-endpoint MLflow trace credential, on the real API server and a real
//! basic-auth MLflow. Two team namespaces (an operator watching each, as with one watched
//! namespace per install), each endpoint's own MLflow user writing traces to its own experiment
//! and refused (403) on the other team's; rotation, re-grant, deletion; and the fallback to the
//! mirrored credential, with the condition saying which mode is in use.

use crate::mlflow_users::start_trace;
use crate::support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use mlflow_gateway_operator::api::GatewayEndpoint;
use serde_json::{Value, json};
use support::fake_llm::FakeLlm;
use support::{Mlflow, Operator, apply, cluster, eventually};

const QUICK: &[(&str, &str)] = &[
    ("RESYNC_PERIOD_SECONDS", "3"),
    ("MAX_BACKOFF_SECONDS", "4"),
    ("GATEWAY_IMAGE", "registry.example.com/mgo:test"),
];
const API_KEY: &str = "sk-e2e-cred-0123456789";
const SECRET: &str = "chat-mlflow-credentials";

struct Team {
    ns: String,
    endpoints: Api<GatewayEndpoint>,
    secrets: Api<Secret>,
    deployments: Api<Deployment>,
}

async fn team(client: &kube::Client, prefix: &str) -> Team {
    let ns = support::namespace(client, prefix).await;
    support::secret(client, &ns, "llm-keys", &[("openai", API_KEY)]).await;
    Team {
        endpoints: Api::namespaced(client.clone(), &ns),
        secrets: Api::namespaced(client.clone(), &ns),
        deployments: Api::namespaced(client.clone(), &ns),
        ns,
    }
}

async fn condition(t: &Team, type_: &str, status: &str, reason: &str) -> GatewayEndpoint {
    support::wait_condition(&t.endpoints, "chat", type_, status, Some(reason), 300).await
}

/// The username and password in the endpoint's credential Secret.
async fn credential(t: &Team) -> (String, String) {
    let s = t.secrets.get(SECRET).await.expect("the credential Secret");
    let data = s.data.expect("its data");
    let text = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    (text("username"), text("password"))
}

fn operator_env(admin: &(String, String)) -> Vec<(&str, &str)> {
    let mut vars = QUICK.to_vec();
    vars.extend([
        ("MLFLOW_TRACKING_USERNAME", admin.0.as_str()),
        ("MLFLOW_TRACKING_PASSWORD", admin.1.as_str()),
    ]);
    vars
}

/// Waits until an Event with `reason` about the endpoint is there (one or more: a mode Event
/// may be recorded again by a reconcile that ran before the status write was seen).
async fn saw_event(client: &kube::Client, ns: &str, reason: &str) {
    eventually(120, &format!("a {reason} Event"), || async {
        (!support::events(client, ns, "chat", reason).await.is_empty()).then_some(())
    })
    .await;
}

async fn user_exists(ml: &Mlflow, username: &str) -> bool {
    let resp = ml
        .request(reqwest::Method::GET, "/api/2.0/mlflow/users/get")
        .query(&[("username", username)])
        .send()
        .await
        .unwrap();
    resp.status().is_success()
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

#[tokio::test]
async fn each_team_endpoint_writes_traces_to_its_own_experiment_only() {
    let ml = Mlflow::start(true);
    let admin = ml.admin.clone().unwrap();
    let client = cluster().client().await;
    let a = team(&client, "e2e-cred-a").await;
    let b = team(&client, "e2e-cred-b").await;
    let fake = FakeLlm::start("openai-fake", API_KEY).await;
    let op_a = Operator::start(&a.ns, &ml.uri, &operator_env(&admin));
    let _op_b = Operator::start(&b.ns, &ml.uri, &operator_env(&admin));
    let yaml = support::endpoint_yaml("chat", &format!("{}/v1", fake.url), "");
    apply(&a.ns, &yaml);
    apply(&b.ns, &yaml);

    // Each endpoint: Ready, with its own MLflow user, said by the condition and an Event.
    let mut ids = Vec::new();
    for t in [&a, &b] {
        support::wait_condition(&t.endpoints, "chat", "Ready", "True", None, 300).await;
        let ep = condition(t, "TraceCredentialReady", "True", "PerEndpointCredential").await;
        let status = ep.status.clone().unwrap();
        let msg = &status.condition("TraceCredentialReady").unwrap().message;
        let user = format!("gateway-endpoint/{}/chat", t.ns);
        assert!(msg.contains(&user) && msg.contains(SECRET), "{msg}");
        ids.push(status.experiment_id.unwrap());
        saw_event(&client, &t.ns, "TraceCredentialCreated").await;
        saw_event(&client, &t.ns, "PerEndpointCredential").await;

        // The Secret: owned by the endpoint, the endpoint's username, a long random password.
        let s = t.secrets.get(SECRET).await.unwrap();
        assert_eq!(s.owner_references()[0].uid, ep.uid().unwrap());
        let (username, password) = credential(t).await;
        assert_eq!(username, user);
        assert_eq!(password.len(), 32);
        // The pods read it.
        let d = t.deployments.get("chat").await.unwrap();
        let vars = support::env_of(&d);
        for (var, key) in [
            ("MLFLOW_TRACKING_USERNAME", "username"),
            ("MLFLOW_TRACKING_PASSWORD", "password"),
        ] {
            assert_eq!(vars[var]["valueFrom"]["secretKeyRef"]["name"], SECRET);
            assert_eq!(vars[var]["valueFrom"]["secretKeyRef"]["key"], key);
        }
        // The operator's own credential is nowhere in the team's namespace.
        for s in t.secrets.list(&ListParams::default()).await.unwrap() {
            let text = serde_json::to_string(&s).unwrap();
            assert!(!text.contains(&admin.1), "{}", s.name_any());
        }
    }
    let (exp_a, exp_b) = (ids[0].clone(), ids[1].clone());
    assert_ne!(exp_a, exp_b);

    // Each credential writes traces to its own experiment, and gets 403 on the other team's.
    let (user_a, pw_a) = credential(&a).await;
    let (user_b, pw_b) = credential(&b).await;
    assert_eq!(start_trace(&ml.uri, &user_a, &pw_a, &exp_a).await, 200);
    assert_eq!(start_trace(&ml.uri, &user_a, &pw_a, &exp_b).await, 403);
    assert_eq!(start_trace(&ml.uri, &user_b, &pw_b, &exp_b).await, 200);
    assert_eq!(start_trace(&ml.uri, &user_b, &pw_b, &exp_a).await, 403);

    // The gateway, run as team A's Deployment declares it, traces into A's experiment.
    let gw = support::gateway_from_deployment(&client, &a.ns, "chat", &[]).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let trace_id = resp.headers()["x-mlflow-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    eventually(
        180,
        "the gateway's trace in team A's experiment",
        || async {
            search_traces(&ml, &exp_a)
                .await
                .into_iter()
                .find(|t| t["trace_id"] == trace_id.as_str())
        },
    )
    .await;
    drop(gw);

    // Rotation: a new annotation value gives a new password; the old one is refused, the pods roll.
    let before = support::config_hash(&a.deployments.get("chat").await.unwrap());
    a.endpoints
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "mlflow-gateway.dev/rotate-credential": "2026-11-30"}}})),
        )
        .await
        .unwrap();
    let rotated = eventually(180, "a new password in the Secret", || async {
        let (_, pw) = credential(&a).await;
        (pw != pw_a).then_some(pw)
    })
    .await;
    eventually(180, "the pods rolled to the new password", || async {
        let d = a.deployments.get("chat").await.ok()?;
        (support::config_hash(&d) != before).then_some(())
    })
    .await;
    saw_event(&client, &a.ns, "TraceCredentialRotated").await;
    assert_eq!(start_trace(&ml.uri, &user_a, &pw_a, &exp_a).await, 401);
    assert_eq!(start_trace(&ml.uri, &user_a, &rotated, &exp_a).await, 200);

    // Another experiment: the user is re-granted there, and the old one is closed to it.
    let other = ml
        .request(reqwest::Method::POST, "/api/2.0/mlflow/experiments/create")
        .json(&json!({"name": format!("team-a-own-{}", support::suffix())}))
        .send()
        .await
        .unwrap();
    let other: Value = other.json().await.unwrap();
    let exp_other = other["experiment_id"].as_str().unwrap().to_string();
    apply(
        &a.ns,
        &support::endpoint_yaml(
            "chat",
            &format!("{}/v1", fake.url),
            &format!("  experimentId: \"{exp_other}\"\n"),
        ),
    );
    eventually(180, "status names the new experiment", || async {
        let ep = a.endpoints.get("chat").await.ok()?;
        (ep.status?.experiment_id? == exp_other).then_some(())
    })
    .await;
    eventually(
        60,
        "the credential re-granted on the new experiment",
        || async {
            (start_trace(&ml.uri, &user_a, &rotated, &exp_other).await == 200).then_some(())
        },
    )
    .await;
    assert_eq!(start_trace(&ml.uri, &user_a, &rotated, &exp_a).await, 403);
    saw_event(&client, &a.ns, "TraceCredentialGranted").await;
    // The password was not changed by the re-grant.
    assert_eq!(credential(&a).await.1, rotated);

    // Deleting team B's endpoint deletes its MLflow user.
    b.endpoints
        .delete("chat", &DeleteParams::default())
        .await
        .unwrap();
    eventually(180, "team B's endpoint gone", || async {
        b.endpoints
            .get_opt("chat")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        !user_exists(&ml, &user_b).await,
        "the MLflow user is deleted"
    );
    assert_eq!(start_trace(&ml.uri, &user_b, &pw_b, &exp_b).await, 401);
    // Team A's user is untouched.
    assert!(user_exists(&ml, &user_a).await);

    // Team A switches to a Secret of its own: its MLflow user is deleted, the condition says so.
    support::secret(&client, &a.ns, "team-writer", &[("token", "tok-team")]).await;
    apply(
        &a.ns,
        &support::endpoint_yaml(
            "chat",
            &format!("{}/v1", fake.url),
            &format!(
                "  experimentId: \"{exp_other}\"\n  tracing: {{credentialsSecretRef: {{name: team-writer}}}}\n"
            ),
        ),
    );
    condition(&a, "TraceCredentialReady", "True", "EndpointCredential").await;
    eventually(180, "team A's MLflow user deleted", || async {
        (!user_exists(&ml, &user_a).await).then_some(())
    })
    .await;
    saw_event(&client, &a.ns, "TraceCredentialDeleted").await;
    assert_eq!(
        start_trace(&ml.uri, &user_a, &rotated, &exp_other).await,
        401
    );

    // No password in the operator's log.
    let log = op_a.log_text();
    assert!(!log.contains(&rotated) && !log.contains(&pw_a) && !log.contains(&admin.1));
}

#[tokio::test]
async fn without_an_admin_account_the_mirrored_credential_is_used_and_said() {
    let ml = Mlflow::start(true);
    let client = cluster().client().await;
    let t = team(&client, "e2e-cred-mirror").await;
    // The operator's account may create experiments but is not an MLflow admin.
    let operator_user = "operator-not-admin";
    let operator_password = "operator-password-0123";
    let created = ml
        .request(reqwest::Method::POST, "/api/2.0/mlflow/users/create")
        .json(&json!({"username": operator_user, "password": operator_password}))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{:?}", created.text().await);
    let op_ns = support::namespace(&client, "e2e-cred-operator").await;
    support::secret(
        &client,
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
        ("MLFLOW_TRACKING_USERNAME", operator_user),
        ("MLFLOW_TRACKING_PASSWORD", operator_password),
        ("GATEWAY_MLFLOW_CREDENTIALS_SECRET", "gateway-writer"),
        ("POD_NAMESPACE", op_ns.as_str()),
    ]);
    let _op = Operator::start(&t.ns, &ml.uri, &vars);
    apply(
        &t.ns,
        &support::endpoint_yaml("chat", "http://127.0.0.1:9/v1", ""),
    );

    let ep = condition(&t, "TraceCredentialReady", "True", "MirroredCredential").await;
    let msg = ep
        .status
        .unwrap()
        .condition("TraceCredentialReady")
        .unwrap()
        .message
        .clone();
    assert!(
        msg.contains("operator-not-admin is not an MLflow admin")
            && msg.contains(&format!("{op_ns}/gateway-writer"))
            && msg.contains("shared by every endpoint"),
        "{msg}"
    );
    saw_event(&client, &t.ns, "MirroredCredential").await;
    assert_eq!(
        credential(&t).await,
        ("gateway-writer".into(), "writer-password-1".into())
    );
    assert!(!user_exists(&ml, &format!("gateway-endpoint/{}/chat", t.ns)).await);
}

#[tokio::test]
async fn a_tracking_server_without_users_api_is_said_in_the_condition() {
    let ml = support::mlflow();
    let client = cluster().client().await;
    let t = team(&client, "e2e-cred-noauth").await;
    let _op = Operator::start(&t.ns, &ml.uri, QUICK);
    apply(
        &t.ns,
        &support::endpoint_yaml("chat", "http://127.0.0.1:9/v1", ""),
    );
    let ep = condition(&t, "TraceCredentialReady", "True", "NoCredential").await;
    let msg = ep
        .status
        .unwrap()
        .condition("TraceCredentialReady")
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("no users API"), "{msg}");
    assert!(t.secrets.get_opt(SECRET).await.unwrap().is_none());
}
