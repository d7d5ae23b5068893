//! Trace delivery (#15) against a real MLflow: an outage (a private server stopped, then started
//! again on the same port and store) loses nothing within the queue's bound; a gateway killed or
//! stopped with a non-empty disk queue delivers it after its restart; a full queue drops whole
//! traces, counted, and requests do not notice; each export mode stores the same trace (previews,
//! usage, cost, state, user, caller) with the gateway's keys where the README says; and the
//! operator gives each endpoint's pods their queue volume, bound and mode.
//!
//! The gateway runs as a process (`support::GatewayProcess`) with the variables its Deployment sets
//! (`GATEWAY_TRACE_QUEUE_DIR`, `..._MAX_BYTES`, `GATEWAY_TRACE_EXPORT_MODE`); its queue directory is
//! a temporary directory standing for the pod's emptyDir, which outlives the container's restarts.
//! What a test says is stored, it reads back through MLflow's API: a trace counts as stored when
//! MLflow holds it with its spans (the request preview comes from them) in a final state.

use crate::support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use mlflow_gateway_operator::api::GatewayEndpoint;
use serde_json::{Value, json};
use support::fake_llm::FakeLlm;
use support::{GatewayProcess, Mlflow, Operator, eventually};

const PROVIDER_KEY: &str = "sk-provider-key-delivery-0123";
const CALLER_KEY: &str = "sk-caller-ci-delivery-4567";
const OPEN: &str = "  access: {open: true}\n";
const MIB: u64 = 1 << 20;

const QUEUE_TRACES: &str = "mlflow_gateway_trace_queue_traces";
const QUEUE_BYTES: &str = "mlflow_gateway_trace_queue_bytes";
const DELIVERED: &str = "mlflow_gateway_traces_delivered_total";
const DROPPED: &str = "mlflow_gateway_traces_dropped_total";
const QUEUE_FULL: &str = r#"reason="queue_full""#;

// ---------------------------------------------------------------------------------------------
// Helpers

fn manifest(fake: &FakeLlm, access: &str) -> String {
    format!(
        "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {{name: chat, namespace: team-a, uid: delivery-uid}}\nspec:\n  models:\n    - {{name: main, provider: openai, model: gpt-4o-mini, apiBase: \"{}/v1\", apiKeySecretRef: {{name: keys, key: k}}}}\n{access}",
        fake.url
    )
}

async fn experiment(ml: &Mlflow) -> String {
    use mlflow_gateway_operator::mlflow::{MlflowClient, MlflowConfig};
    let client = MlflowClient::new(&MlflowConfig::new(ml.uri.parse().unwrap()).unwrap()).unwrap();
    support::new_experiment(&client, &format!("delivery-{}", support::suffix())).await
}

/// A directory of its own standing for a pod's `trace-queue` emptyDir.
fn queue_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mgo-trace-queue-{}", support::suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The variables the operator gives a traced pod, pointed at `ml`, `exp` and `queue`.
fn env(
    ml: &Mlflow,
    exp: &str,
    queue: &Path,
    max_bytes: u64,
    mode: Option<&str>,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("GATEWAY_API_KEY_MAIN".to_string(), PROVIDER_KEY.to_string()),
        ("MLFLOW_TRACKING_URI".into(), ml.uri.clone()),
        ("MLFLOW_EXPERIMENT_ID".into(), exp.to_string()),
        (
            "GATEWAY_TRACE_QUEUE_DIR".into(),
            queue.to_string_lossy().into_owned(),
        ),
        (
            "GATEWAY_TRACE_QUEUE_MAX_BYTES".into(),
            max_bytes.to_string(),
        ),
    ];
    if let Some(mode) = mode {
        env.push(("GATEWAY_TRACE_EXPORT_MODE".into(), mode.into()));
    }
    env
}

async fn start(manifest: &str, env: &[(String, String)]) -> GatewayProcess {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    GatewayProcess::start(manifest, &pairs).await
}

/// One chat call that must be answered in full, as if nothing were wrong with tracing; returns
/// its trace id.
async fn chat(gw: &GatewayProcess, fake: &FakeLlm, text: &str) -> String {
    call(gw, fake, text, None).await
}

/// [`chat`] as a caller: the caller's name header, and its API key when given.
async fn call(gw: &GatewayProcess, fake: &FakeLlm, text: &str, key: Option<&str>) -> String {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("x-mlflow-gateway-caller", "it-agent")
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": text}]}));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.expect("the gateway answers");
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    let trace_id = resp
        .headers()
        .get("x-mlflow-trace-id")
        .expect("x-mlflow-trace-id on the answer")
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        fake.reply_to(text)
    );
    trace_id
}

/// The ids of the experiment's traces MLflow holds whole: in a final state, with their spans
/// (the request preview is taken from them). Empty while the server does not answer.
async fn stored(ml: &Mlflow, exp: &str) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut page_token: Option<String> = None;
    // Bounded: 50 pages of 100 are more traces than any test here makes.
    for _ in 0..50 {
        let mut body = json!({
            "locations": [{"type": "MLFLOW_EXPERIMENT",
                           "mlflow_experiment": {"experiment_id": exp}}],
            "max_results": 100
        });
        if let Some(token) = &page_token {
            body["page_token"] = json!(token);
        }
        let Ok(resp) = ml
            .request(reqwest::Method::POST, "/api/3.0/mlflow/traces/search")
            .json(&body)
            .send()
            .await
        else {
            return HashSet::new();
        };
        let Ok(page) = resp.json::<Value>().await else {
            return HashSet::new();
        };
        for t in page["traces"].as_array().into_iter().flatten() {
            let whole =
                t["state"] == "OK" && t["request_preview"].as_str().is_some_and(|p| !p.is_empty());
            if whole && let Some(id) = t["trace_id"].as_str() {
                ids.insert(id.to_string());
            }
        }
        match page["next_page_token"].as_str() {
            Some(token) if !token.is_empty() => page_token = Some(token.to_string()),
            _ => break,
        }
    }
    ids
}

/// Waits until every trace of `ids` is stored whole; returns what the experiment holds. A fresh
/// private server on a loaded machine can take minutes over its first requests: the deadlines
/// are generous, and only a failure waits them out.
async fn wait_stored(ml: &Mlflow, exp: &str, ids: &HashSet<String>, secs: u64) -> HashSet<String> {
    eventually(
        secs,
        &format!("{} traces stored in MLflow", ids.len()),
        || async {
            let found = stored(ml, exp).await;
            ids.is_subset(&found).then_some(found)
        },
    )
    .await
}

/// The 16 bytes of an OpenTelemetry trace id, from MLflow's `tr-<32 hex>`.
fn trace_id_bytes(trace_id: &str) -> Vec<u8> {
    let hex = trace_id.strip_prefix("tr-").expect("an MLflow trace id");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex trace id"))
        .collect()
}

/// True when the queue's files hold a record of every trace in `ids` (each record carries its
/// spans' raw trace id), i.e. they are on disk, not only in the process.
fn on_disk(queue: &Path, ids: &HashSet<String>) -> bool {
    let mut bytes = Vec::new();
    let mut dirs = vec![queue.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(content) = std::fs::read(&path) {
                bytes.extend_from_slice(&content);
            }
        }
    }
    ids.iter().all(|id| {
        let needle = trace_id_bytes(id);
        bytes.windows(needle.len()).any(|w| w == needle.as_slice())
    })
}

async fn wait_on_disk(queue: &Path, ids: &HashSet<String>) {
    eventually(
        30,
        &format!("{} traces in the disk queue", ids.len()),
        || async { on_disk(queue, ids).then_some(()) },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Losing nothing within the bound

#[tokio::test]
async fn an_mlflow_outage_loses_no_trace_within_the_bound_and_requests_never_wait_for_it() {
    let ml = Mlflow::start(false);
    let exp = experiment(&ml).await;
    let fake = FakeLlm::start("delivery", PROVIDER_KEY).await;
    let queue = queue_dir();
    let gw = start(
        &manifest(&fake, OPEN),
        &env(&ml, &exp, &queue, 64 * MIB, Some("adaptive")),
    )
    .await;

    let mut before = HashSet::new();
    for i in 0..5 {
        before.insert(chat(&gw, &fake, &format!("before the outage {i}")).await);
    }
    wait_stored(&ml, &exp, &before, 300).await;

    ml.stop();
    // Every call is answered while MLflow is down; its trace waits on disk.
    let mut during = HashSet::new();
    for i in 0..20 {
        during.insert(chat(&gw, &fake, &format!("during the outage {i}")).await);
    }
    wait_on_disk(&queue, &during).await;
    eventually(30, "the backlog in the queue's gauges", || async {
        let traces = gw.metric(QUEUE_TRACES, &[]).await;
        let bytes = gw.metric(QUEUE_BYTES, &[]).await;
        let age = gw
            .metric("mlflow_gateway_trace_queue_oldest_age_seconds", &[])
            .await;
        (traces >= 1.0 && bytes > 0.0 && age > 0.0).then_some(())
    })
    .await;
    assert_eq!(gw.metric(DROPPED, &[]).await, 0.0);

    ml.resume();
    let all: HashSet<String> = before.union(&during).cloned().collect();
    let found = wait_stored(&ml, &exp, &all, 300).await;
    assert_eq!(found, all, "exactly the calls' traces, each once");
    eventually(
        60,
        "an empty queue and every trace counted once",
        || async {
            let traces = gw.metric(QUEUE_TRACES, &[]).await;
            let delivered = gw.metric(DELIVERED, &[]).await;
            (traces == 0.0 && delivered == all.len() as f64).then_some(())
        },
    )
    .await;
    assert_eq!(gw.metric(DROPPED, &[]).await, 0.0);
}

#[tokio::test]
async fn a_gateway_killed_or_stopped_with_a_disk_queue_delivers_it_after_its_restart() {
    let ml = Mlflow::start(false);
    let exp = experiment(&ml).await;
    let fake = FakeLlm::start("delivery", PROVIDER_KEY).await;
    let queue = queue_dir();
    let vars = env(&ml, &exp, &queue, 64 * MIB, None);
    let mut gw = start(&manifest(&fake, OPEN), &vars).await;
    let mut all = HashSet::new();
    all.insert(chat(&gw, &fake, "before the outage").await);
    wait_stored(&ml, &exp, &all, 300).await;

    // A crash: SIGKILL once the backlog is on disk.
    ml.stop();
    let mut killed = HashSet::new();
    for i in 0..8 {
        killed.insert(chat(&gw, &fake, &format!("queued, then killed {i}")).await);
    }
    wait_on_disk(&queue, &killed).await;
    gw.kill();

    // The next container finds the queue (MLflow still down), queues more, and is stopped the
    // way the kubelet stops it: SIGTERM, and it exits within the grace period (30 s), keeping
    // what it could not deliver.
    let mut gw = start(&manifest(&fake, OPEN), &vars).await;
    let mut stopped = HashSet::new();
    for i in 0..8 {
        stopped.insert(chat(&gw, &fake, &format!("queued, then stopped {i}")).await);
    }
    gw.terminate();
    let status = gw.wait_exit(45).await;
    assert!(status.success(), "the gateway's exit on SIGTERM: {status}");
    let backlog: HashSet<String> = killed.union(&stopped).cloned().collect();
    assert!(
        on_disk(&queue, &backlog),
        "the whole backlog is on disk after SIGTERM"
    );

    // MLflow is back, and so is the gateway: everything is delivered, nothing twice.
    ml.resume();
    let gw = start(&manifest(&fake, OPEN), &vars).await;
    all.extend(backlog.iter().cloned());
    let found = wait_stored(&ml, &exp, &all, 300).await;
    assert_eq!(found, all);
    eventually(60, "the restarted gateway's queue drained", || async {
        let traces = gw.metric(QUEUE_TRACES, &[]).await;
        let delivered = gw.metric(DELIVERED, &[]).await;
        (traces == 0.0 && delivered == backlog.len() as f64).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_full_disk_queue_drops_whole_traces_counted_and_requests_are_unaffected() {
    let ml = Mlflow::start(false);
    let exp = experiment(&ml).await;
    let fake = FakeLlm::start("delivery", PROVIDER_KEY).await;
    fake.set_recording(false);
    let queue = queue_dir();
    // The smallest bound the CRD allows.
    let max_bytes = MIB;
    let gw = start(
        &manifest(&fake, OPEN),
        &env(&ml, &exp, &queue, max_bytes, None),
    )
    .await;
    let mut warm = HashSet::new();
    warm.insert(chat(&gw, &fake, "before the outage").await);
    wait_stored(&ml, &exp, &warm, 300).await;

    ml.stop();
    // Large calls until some traces have been dropped (bounded: 400 calls of 32 KiB are far
    // beyond 1 MiB whatever the encoding). Every call is answered in full all along.
    let filler = "x".repeat(32 * 1024);
    let mut served = HashSet::new();
    for i in 0..400 {
        served.insert(chat(&gw, &fake, &format!("{i} {filler}")).await);
        if i % 10 == 9 && gw.metric(DROPPED, &[QUEUE_FULL]).await >= 5.0 {
            break;
        }
    }
    let dropped = gw.metric(DROPPED, &[QUEUE_FULL]).await;
    assert!(
        dropped >= 5.0,
        "{dropped} traces dropped after {} calls",
        served.len()
    );
    assert!(
        gw.metric(QUEUE_BYTES, &[]).await <= max_bytes as f64,
        "the queue stays within its bound"
    );
    // Everything a full queue dropped was dropped once, whole: the rest arrives complete.
    ml.resume();
    let kept = served.len() - dropped as usize;
    let found = eventually(
        300,
        &format!("the {kept} traces the queue kept"),
        || async {
            let found: HashSet<String> =
                stored(&ml, &exp).await.difference(&warm).cloned().collect();
            let delivered = gw.metric(DELIVERED, &[]).await;
            let queued = gw.metric(QUEUE_TRACES, &[]).await;
            (found.len() >= kept && queued == 0.0 && delivered >= kept as f64).then_some(found)
        },
    )
    .await;
    assert!(found.is_subset(&served), "only the calls' own traces");
    assert_eq!(
        found.len(),
        kept,
        "stored + dropped == served ({} served, {dropped} dropped)",
        served.len()
    );
    assert_eq!(gw.metric(DELIVERED, &[]).await, (kept + warm.len()) as f64);
    assert_eq!(gw.metric(DROPPED, &[QUEUE_FULL]).await, dropped);
}

// ---------------------------------------------------------------------------------------------
// The export modes

/// Where a mode puts the gateway's keys: trace metadata (a trace-info request per trace) or
/// trace tags (root-span attributes `mlflow.traceTag.<key>`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Keys {
    Metadata,
    Tags,
    /// adaptive: metadata while MLflow keeps up, tags for a backlog.
    Either,
}

/// What must be the same whatever the mode, read from a stored trace.
fn common(trace: &Value) -> Value {
    let info = &trace["trace_info"];
    let meta = &info["trace_metadata"];
    let usage: Value =
        serde_json::from_str(meta["mlflow.trace.tokenUsage"].as_str().unwrap_or("null"))
            .unwrap_or(Value::Null);
    let cost: Value = serde_json::from_str(meta["mlflow.trace.cost"].as_str().unwrap_or("null"))
        .unwrap_or(Value::Null);
    json!({
        "request_preview": info["request_preview"],
        "response_preview": info["response_preview"],
        "state": info["state"],
        "usage": usage,
        "cost": cost,
        "user": meta["mlflow.trace.user"],
        "trace_name": info["tags"]["mlflow.traceName"],
        "spans": trace["spans"].as_array().map_or(0, Vec::len),
    })
}

/// The gateway's keys and where they were found.
fn gateway_keys(trace: &Value) -> Vec<(&'static str, Keys, Value)> {
    let info = &trace["trace_info"];
    [
        "mlflow.gateway.endpointId",
        "mlflow.gateway.requestType",
        "mlflow.gateway.caller",
        "mlflow.auth.username",
    ]
    .into_iter()
    .map(|key| {
        let in_meta = &info["trace_metadata"][key];
        let in_tags = &info["tags"][key];
        match (in_meta.is_null(), in_tags.is_null()) {
            (false, true) => (key, Keys::Metadata, in_meta.clone()),
            (true, false) => (key, Keys::Tags, in_tags.clone()),
            (true, true) => (key, Keys::Either, Value::Null),
            (false, false) => panic!("{key} is both metadata and a tag: {info:#}"),
        }
    })
    .collect()
}

async fn get_trace(ml: &Mlflow, trace_id: &str) -> Option<Value> {
    let resp = ml
        .request(reqwest::Method::GET, "/api/3.0/mlflow/traces/get")
        .query(&[("trace_id", trace_id)])
        .send()
        .await
        .ok()?;
    let body: Value = resp.json().await.ok()?;
    body.get("trace").cloned()
}

#[tokio::test]
async fn each_export_mode_stores_the_same_trace_with_the_gateway_keys_where_the_readme_says() {
    let ml = support::mlflow();
    let exp = experiment(ml).await;
    let fake = FakeLlm::start("delivery", PROVIDER_KEY).await;
    let keys = queue_dir();
    std::fs::create_dir_all(keys.join("ci")).unwrap();
    std::fs::write(keys.join("ci").join("key"), CALLER_KEY).unwrap();
    let access = "  access:\n    apiKeys: [{name: ci, secretRef: {name: callers, key: ci}}]\n";
    let mut seen = Vec::new();
    for (mode, expected) in [
        ("info-then-spans", Keys::Metadata),
        ("spans-only", Keys::Tags),
        ("adaptive", Keys::Either),
    ] {
        let mut vars = env(ml, &exp, &queue_dir(), 64 * MIB, Some(mode));
        vars.push((
            "GATEWAY_CALLER_KEYS_DIR".into(),
            keys.to_string_lossy().into_owned(),
        ));
        let gw = start(&manifest(&fake, access), &vars).await;
        let trace_id = call(
            &gw,
            &fake,
            "What does each export mode store?",
            Some(CALLER_KEY),
        )
        .await;
        // Whole: spans, and every gateway key (the info may land after the spans, or before).
        let trace = eventually(90, &format!("the {mode} trace whole in MLflow"), || async {
            let t = get_trace(ml, &trace_id).await?;
            let whole = common(&t)["spans"].as_u64() == Some(2)
                && t["trace_info"]["state"] == "OK"
                && gateway_keys(&t)
                    .iter()
                    .all(|(_, at, _)| *at != Keys::Either);
            whole.then_some(t)
        })
        .await;
        let found = gateway_keys(&trace);
        for (key, at, value) in &found {
            assert!(
                expected == Keys::Either || *at == expected,
                "{mode}: {key} is in {at:?}, not {expected:?}: {trace:#}"
            );
            let want = match *key {
                "mlflow.gateway.endpointId" => "delivery-uid",
                "mlflow.gateway.requestType" => "unified/chat",
                "mlflow.gateway.caller" => "it-agent",
                _ => "apikey:ci",
            };
            assert_eq!(value, want, "{mode}: {key}");
        }
        let common = common(&trace);
        assert_eq!(common["user"], "apikey:ci", "{mode}: {common:#}");
        assert!(
            common["usage"]["total_tokens"].as_u64() > Some(0),
            "{mode}: {common:#}"
        );
        assert!(
            common["cost"]["total_cost"].as_f64() > Some(0.0),
            "{mode}: {common:#}"
        );
        assert!(
            common["request_preview"]
                .as_str()
                .is_some_and(|p| p.contains("What does each export mode store?")),
            "{mode}: {common:#}"
        );
        seen.push((mode, common));
    }
    for (mode, common) in &seen[1..] {
        assert_eq!(
            common, &seen[0].1,
            "{mode} stores what {} stores",
            seen[0].0
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The operator's side

/// The Deployment's gateway container environment value `key` (plain values only).
fn env_value(d: &Deployment, key: &str) -> Option<String> {
    support::env_of(d)
        .get(key)
        .and_then(|e| e["value"].as_str().map(str::to_string))
}

#[tokio::test]
async fn an_endpoints_queue_size_and_export_mode_reach_its_pods_and_their_queue_is_a_local_dir() {
    let ml = support::mlflow();
    let client = support::cluster().client().await;
    let ns = support::namespace(&client, "delivery").await;
    support::secret(&client, &ns, "llm-keys", &[("openai", PROVIDER_KEY)]).await;
    let fake = FakeLlm::start("delivery", PROVIDER_KEY).await;
    let _op = Operator::start(
        &ns,
        &ml.uri,
        &[
            ("RESYNC_PERIOD_SECONDS", "3"),
            ("MAX_BACKOFF_SECONDS", "4"),
            ("GATEWAY_TRACE_EXPORT_MODE", "spans-only"),
        ],
    );
    support::apply(
        &ns,
        &support::endpoint_yaml(
            "chat",
            &format!("{}/v1", fake.url),
            "  tracing: {queueSize: 64Mi}\n",
        ),
    );
    let endpoints = Api::<GatewayEndpoint>::namespaced(client.clone(), &ns);
    let ep = support::wait_condition(&endpoints, "chat", "Ready", "True", None, 120).await;
    let experiment_id = ep.status.unwrap().experiment_id.unwrap();
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let d = deployments.get("chat").await.unwrap();
    assert_eq!(
        env_value(&d, "GATEWAY_TRACE_QUEUE_DIR").as_deref(),
        Some("/var/lib/mlflow-gateway/trace-queue")
    );
    assert_eq!(
        env_value(&d, "GATEWAY_TRACE_QUEUE_MAX_BYTES").as_deref(),
        Some("67108864")
    );
    // The operator's default mode, as the endpoint names none.
    assert_eq!(
        env_value(&d, "GATEWAY_TRACE_EXPORT_MODE").as_deref(),
        Some("spans-only")
    );
    let pod = d.spec.unwrap().template.spec.unwrap();
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "trace-queue")
        .expect("the trace-queue volume");
    assert_eq!(
        volume
            .empty_dir
            .as_ref()
            .unwrap()
            .size_limit
            .as_ref()
            .unwrap()
            .0,
        "80Mi"
    );
    assert_eq!(pod.termination_grace_period_seconds, Some(30));

    // The gateway the Deployment declares, run here: its queue is a local directory.
    let gw = support::gateway_from_deployment(&client, &ns, "chat", &[]).await;
    let environ = std::fs::read(format!("/proc/{}/environ", gw.pid())).unwrap();
    let queue = environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("GATEWAY_TRACE_QUEUE_DIR="))
        .map(PathBuf::from)
        .expect("GATEWAY_TRACE_QUEUE_DIR in the gateway's environment");
    assert!(
        queue.is_dir() && queue.ends_with("var/lib/mlflow-gateway/trace-queue"),
        "{}",
        queue.display()
    );
    assert!(!queue.starts_with("/var/lib"), "{}", queue.display());
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(
            &json!({"model": "chat", "messages": [{"role": "user", "content": "queued locally"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let trace_id = resp.headers()["x-mlflow-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    wait_stored(ml, &experiment_id, &HashSet::from([trace_id]), 90).await;

    // The endpoint's own mode wins over the operator's.
    endpoints
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"tracing": {"exportMode": "InfoThenSpans"}}})),
        )
        .await
        .unwrap();
    eventually(60, "the endpoint's mode in its Deployment", || async {
        let d = deployments.get("chat").await.ok()?;
        (env_value(&d, "GATEWAY_TRACE_EXPORT_MODE").as_deref() == Some("info-then-spans"))
            .then_some(())
    })
    .await;
}
