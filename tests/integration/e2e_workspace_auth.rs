//! End-to-end: MLflow's basic auth and workspaces together (issue #13), on the real API server
//! and a real MLflow with both. Two team namespaces, each with its operator holding the MLflow
//! admin's credential (per-endpoint credential mode): each endpoint's experiment lives in its
//! namespace's workspace, its MLflow user's EDIT grant is stored in that workspace (a grant sent
//! to another workspace would be silently useless), the gateway run from team A's Deployment
//! traces into A's experiment, and A's credential cannot write into B's.
//! Every MLflow write is checked by its answer, read back as the admin with the workspace header.

use crate::support;
use mlflow_gateway_operator::mlflow::WORKSPACE_HEADER;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use mlflow_gateway_operator::api::GatewayEndpoint;
use serde_json::{Value, json};
use support::fake_llm::FakeLlm;
use support::{Mlflow, Operator, apply, cluster, eventually};

const QUICK: &[(&str, &str)] = &[
    ("RESYNC_PERIOD_SECONDS", "3"),
    ("MAX_BACKOFF_SECONDS", "4"),
    ("GATEWAY_IMAGE", "registry.example.com/mgo:test"),
];
const API_KEY: &str = "sk-e2e-wsauth-0123456789";
const SECRET: &str = "chat-mlflow-credentials";

/// A team namespace (its name is also its MLflow workspace) with the LLM key Secret.
struct Team {
    ns: String,
    endpoints: Api<GatewayEndpoint>,
    secrets: Api<Secret>,
}

async fn team(client: &kube::Client, prefix: &str) -> Team {
    let ns = support::namespace(client, prefix).await;
    support::secret(client, &ns, "llm-keys", &[("openai", API_KEY)]).await;
    Team {
        endpoints: Api::namespaced(client.clone(), &ns),
        secrets: Api::namespaced(client.clone(), &ns),
        ns,
    }
}

/// The username and password in the endpoint's credential Secret.
async fn credential(t: &Team) -> (String, String) {
    let s = t.secrets.get(SECRET).await.expect("the credential Secret");
    let data = s.data.expect("its data");
    let text = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    (text("username"), text("password"))
}

/// `GET experiments/get` as the admin in `workspace` (None: no header, MLflow's default): the
/// HTTP status and the body.
async fn get_experiment(ml: &Mlflow, workspace: Option<&str>, id: &str) -> (u16, Value) {
    let mut rb = ml
        .request(reqwest::Method::GET, "/api/2.0/mlflow/experiments/get")
        .query(&[("experiment_id", id)]);
    if let Some(w) = workspace {
        rb = rb.header(WORKSPACE_HEADER, w);
    }
    let resp = rb.send().await.expect("experiments/get");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Every permission row of `username`, across all workspaces, as the admin sees it.
async fn permissions(ml: &Mlflow, username: &str) -> Vec<Value> {
    let resp = ml
        .request(
            reqwest::Method::GET,
            "/api/3.0/mlflow/users/permissions/list",
        )
        .query(&[("username", username)])
        .send()
        .await
        .expect("users/permissions/list");
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let body: Value = resp.json().await.unwrap();
    body["permissions"].as_array().cloned().unwrap_or_default()
}

async fn search_traces_in(ml: &Mlflow, workspace: &str, experiment_id: &str) -> Vec<Value> {
    let resp = ml
        .request(reqwest::Method::POST, "/api/3.0/mlflow/traces/search")
        .header(WORKSPACE_HEADER, workspace)
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

fn random_hex(len: usize) -> String {
    let mut s = String::new();
    while s.len() < len {
        s.push_str(&support::suffix());
    }
    s.truncate(len);
    s
}

/// A client with room for a loaded machine: a basic-auth MLflow request may take seconds.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .unwrap()
}

/// StartTraceV3 of one empty trace into `experiment_id` in `workspace`, as `(user, password)`:
/// the HTTP status.
async fn start_trace(ml: &Mlflow, cred: &(String, String), workspace: &str, exp: &str) -> u16 {
    let body = json!({"trace": {"trace_info": {
        "trace_id": format!("tr-{}", random_hex(32)),
        "trace_location": {"type": "MLFLOW_EXPERIMENT",
                           "mlflow_experiment": {"experiment_id": exp}},
        "request_time": "2026-11-30T00:00:00Z",
        "execution_duration": "0.001s",
        "state": "OK",
        "trace_metadata": {}, "tags": {}
    }}});
    http()
        .post(format!("{}/api/3.0/mlflow/traces", ml.uri))
        .basic_auth(&cred.0, Some(&cred.1))
        .header(WORKSPACE_HEADER, workspace)
        .json(&body)
        .send()
        .await
        .expect("StartTraceV3")
        .status()
        .as_u16()
}

/// OTLP/HTTP (JSON encoding) of one span into `experiment_id` in `workspace`, as the gateway
/// exports it, as `(user, password)`: the HTTP status.
async fn otlp(ml: &Mlflow, cred: &(String, String), workspace: &str, exp: &str) -> u16 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let body = json!({"resourceSpans": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "e2e-wsauth"}}]},
        "scopeSpans": [{"scope": {"name": "e2e"}, "spans": [{
            "traceId": random_hex(32),
            "spanId": random_hex(16),
            "name": "probe",
            "kind": 1,
            "startTimeUnixNano": (now - 1_000_000).to_string(),
            "endTimeUnixNano": now.to_string(),
            "status": {"code": 1}
        }]}]
    }]});
    http()
        .post(format!("{}/v1/traces", ml.uri))
        .basic_auth(&cred.0, Some(&cred.1))
        .header(WORKSPACE_HEADER, workspace)
        .header("x-mlflow-experiment-id", exp)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("OTLP export")
        .status()
        .as_u16()
}

#[tokio::test]
async fn with_auth_and_workspaces_each_teams_user_is_granted_in_its_own_workspace() {
    let ml = Mlflow::start_with_workspaces(true);
    let admin = ml.admin.clone().expect("the admin's credentials");
    let client = cluster().client().await;
    let a = team(&client, "e2e-wsauth-a").await;
    let b = team(&client, "e2e-wsauth-b").await;
    let fake = FakeLlm::start("openai-fake", API_KEY).await;
    let mut vars = QUICK.to_vec();
    vars.extend([
        ("MLFLOW_TRACKING_USERNAME", admin.0.as_str()),
        ("MLFLOW_TRACKING_PASSWORD", admin.1.as_str()),
    ]);
    let op_a = Operator::start(&a.ns, &ml.uri, &vars);
    let op_b = Operator::start(&b.ns, &ml.uri, &vars);
    let yaml = support::endpoint_yaml("chat", &format!("{}/v1", fake.url), "");
    apply(&a.ns, &yaml);
    apply(&b.ns, &yaml);

    let mut experiments = Vec::new();
    for t in [&a, &b] {
        // Generous: the first writes of a private basic-auth MLflow on a loaded machine are slow.
        support::wait_condition(&t.endpoints, "chat", "Ready", "True", None, 300).await;
        let ep = support::wait_condition(
            &t.endpoints,
            "chat",
            "TraceCredentialReady",
            "True",
            Some("PerEndpointCredential"),
            300,
        )
        .await;
        let status = ep.status.clone().unwrap();
        let exp = status.experiment_id.clone().unwrap();
        let message = &status.condition("ExperimentReady").unwrap().message;
        assert!(
            message.contains(&format!("in MLflow workspace {}", t.ns)),
            "{message}"
        );

        // The experiment is in the namespace's workspace (made by the operator, as the admin),
        // and only there.
        let (code, body) = get_experiment(&ml, Some(&t.ns), &exp).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["experiment"]["name"], format!("gateway/{}/chat", t.ns));
        assert_eq!(body["experiment"]["workspace"], t.ns.as_str(), "{body}");
        assert_eq!(get_experiment(&ml, None, &exp).await.0, 404);

        // The per-endpoint user's only grant: EDIT on that experiment, stored in that workspace.
        let (user, _) = credential(t).await;
        assert_eq!(user, format!("gateway-endpoint/{}/chat", t.ns));
        let rows = eventually(120, "the user's grant", || async {
            let rows = permissions(&ml, &user).await;
            (!rows.is_empty()).then_some(rows)
        })
        .await;
        assert_eq!(rows.len(), 1, "{rows:#?}");
        let row = &rows[0];
        assert_eq!(row["resource_type"], "experiment", "{row}");
        assert_eq!(row["resource_pattern"], exp.as_str(), "{row}");
        assert_eq!(row["permission"], "EDIT", "{row}");
        assert_eq!(row["workspace"], t.ns.as_str(), "{row}");
        experiments.push(exp);
    }
    let (exp_a, exp_b) = (experiments[0].clone(), experiments[1].clone());
    assert_ne!(exp_a, exp_b);
    // Each team's experiment is invisible from the other's workspace.
    assert_eq!(get_experiment(&ml, Some(&b.ns), &exp_a).await.0, 404);
    assert_eq!(get_experiment(&ml, Some(&a.ns), &exp_b).await.0, 404);

    // The gateway, run as team A's Deployment declares it (A's credential, A's workspace),
    // traces into A's experiment.
    let gw = support::gateway_from_deployment(&client, &a.ns, "chat", &[]).await;
    let resp = http()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&json!({"model": "chat",
                      "messages": [{"role": "user", "content": "hello from team a"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let trace_id = resp.headers()["x-mlflow-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    // Found by its id (StartTraceV3) with the request as its preview (MLflow derives it from the
    // spans, so the OTLP export landed too).
    eventually(
        300,
        "the gateway's trace, with its spans, in team A's experiment",
        || async {
            search_traces_in(&ml, &a.ns, &exp_a)
                .await
                .into_iter()
                .find(|t| {
                    t["trace_id"] == trace_id.as_str()
                        && t["request_preview"]
                            .as_str()
                            .is_some_and(|p| p.contains("hello from team a"))
                })
        },
    )
    .await;
    drop(gw);

    // Team A's credential writes to its own experiment in its workspace (both ways the gateway
    // writes), and is refused on team B's experiment in team B's workspace.
    let cred_a = credential(&a).await;
    assert_eq!(start_trace(&ml, &cred_a, &a.ns, &exp_a).await, 200);
    assert_eq!(otlp(&ml, &cred_a, &a.ns, &exp_a).await, 200);
    let refused = start_trace(&ml, &cred_a, &b.ns, &exp_b).await;
    assert!(matches!(refused, 403 | 404), "StartTraceV3: {refused}");
    let refused = otlp(&ml, &cred_a, &b.ns, &exp_b).await;
    assert!(matches!(refused, 403 | 404), "OTLP: {refused}");
    // Nothing landed in team B's experiment (its gateway never ran).
    let in_b = search_traces_in(&ml, &b.ns, &exp_b).await;
    assert!(in_b.is_empty(), "{in_b:#?}");

    // No password in either operator's log.
    let cred_b = credential(&b).await;
    for log in [op_a.log_text(), op_b.log_text()] {
        assert!(!log.contains(&cred_a.1) && !log.contains(&cred_b.1) && !log.contains(&admin.1));
    }
}
