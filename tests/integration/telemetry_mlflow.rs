//! The gateway's trace export against a real MLflow tracking server: the trace MLflow stores
//! (span tree, metadata, tags, previews), content capture off, distributed tracing, a dead server,
//! a full queue, and basic auth without the password leaking.

use crate::support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use mlflow_gateway_operator::gateway::tracing::{
    ExportMode, RequestType, Telemetry, TelemetryConfig, TokenUsage,
};
use mlflow_gateway_operator::mlflow::{Auth, MlflowClient, MlflowConfig};
use serde_json::{Value, json};
use url::Url;

// ---------------------------------------------------------------------------------------------
// Helpers

fn mlflow_config(uri: &str, auth: Auth) -> MlflowConfig {
    MlflowConfig::builder(Url::parse(uri).expect("server URI"))
        .auth(auth)
        .build()
        .expect("MLflow configuration")
}

fn admin_auth(ml: &support::Mlflow) -> Auth {
    match &ml.admin {
        Some((username, password)) => Auth::Basic {
            username: username.clone(),
            password: password.clone(),
        },
        None => Auth::None,
    }
}

async fn create_experiment(ml: &support::Mlflow, prefix: &str) -> String {
    let client = MlflowClient::new(&mlflow_config(&ml.uri, admin_auth(ml))).expect("client");
    let name = format!("{prefix}-{}", support::suffix());
    match client.create_experiment(&name, &[]).await {
        Ok(id) => id,
        // A retried create whose first attempt went through.
        Err(e) if e.is_already_exists() => {
            client
                .get_experiment_by_name(&name)
                .await
                .expect("experiment")
                .experiment_id
        }
        Err(e) => panic!("create experiment: {e}"),
    }
}

fn telemetry_config(uri: &str, auth: Auth, experiment_id: &str, endpoint: &str) -> TelemetryConfig {
    let mut c = TelemetryConfig::new(
        mlflow_config(uri, auth),
        experiment_id,
        endpoint,
        format!("uid-{endpoint}"),
    );
    // A server that just started can take seconds to answer its first OTLP request on a busy
    // machine; an export that times out counts as failed and gets no trace metadata.
    c.export_timeout = Duration::from_secs(30);
    // The mode whose metadata these tests read (the modes side by side: `*_mode_stores_*`).
    c.export_mode = ExportMode::InfoThenSpans;
    c
}

/// `GET /api/3.0/mlflow/traces/get`: the trace (info and spans), if stored.
async fn get_trace(ml: &support::Mlflow, trace_id: &str) -> Option<Value> {
    let resp = ml
        .request(
            reqwest::Method::GET,
            &format!("/api/3.0/mlflow/traces/get?trace_id={trace_id}"),
        )
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json::<Value>().await.ok()?.get("trace").cloned()
}

/// Polls until the trace is stored with its gateway metadata (export is asynchronous).
async fn wait_for_trace(ml: &support::Mlflow, trace_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        if let Some(trace) = get_trace(ml, trace_id).await {
            let info = &trace["trace_info"];
            // The gateway metadata: trace metadata, or tags in the spans-only mode.
            let complete = ["trace_metadata", "tags"]
                .iter()
                .any(|k| info[k].get("mlflow.gateway.endpointId").is_some())
                && info["state"] != "IN_PROGRESS"
                && trace["spans"].as_array().is_some_and(|s| !s.is_empty());
            if complete {
                return trace;
            }
            last = Some(trace);
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for trace {trace_id} with its metadata; last seen: {last:#?}; logs:\n{}",
            our_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn search_traces(ml: &support::Mlflow, experiment_id: &str) -> Value {
    let resp = ml
        .request(reqwest::Method::POST, "/api/3.0/mlflow/traces/search")
        .json(&json!({
            "locations": [{"type": "MLFLOW_EXPERIMENT",
                           "mlflow_experiment": {"experiment_id": experiment_id}}],
            "max_results": 10
        }))
        .send()
        .await
        .expect("search traces");
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    resp.json().await.expect("search answer")
}

fn spans_of(trace: &Value) -> Vec<Value> {
    trace["spans"].as_array().cloned().unwrap_or_default()
}

fn span_named<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no span {name} in {spans:#?}"))
}

fn parent_id(span: &Value) -> Option<&str> {
    span.get("parent_span_id")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
}

/// An OTLP AnyValue (as the v3 API renders it) as plain JSON.
fn any_value(v: &Value) -> Value {
    if let Some(s) = v.get("string_value") {
        return s.clone();
    }
    if let Some(b) = v.get("bool_value") {
        return b.clone();
    }
    if let Some(i) = v.get("int_value") {
        return match i {
            Value::String(s) => s.parse::<i64>().map(Value::from).unwrap_or(i.clone()),
            other => other.clone(),
        };
    }
    if let Some(d) = v.get("double_value") {
        return d.clone();
    }
    if let Some(list) = v.get("kvlist_value") {
        let mut map = serde_json::Map::new();
        for kv in list["values"].as_array().into_iter().flatten() {
            map.insert(
                kv["key"].as_str().unwrap_or_default().to_string(),
                any_value(&kv["value"]),
            );
        }
        return Value::Object(map);
    }
    if let Some(arr) = v.get("array_value") {
        return Value::Array(
            arr["values"]
                .as_array()
                .into_iter()
                .flatten()
                .map(any_value)
                .collect(),
        );
    }
    Value::Null
}

fn attr(span: &Value, key: &str) -> Option<Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|kv| kv["key"] == key)
        .map(|kv| any_value(&kv["value"]))
}

fn b64_hex(b64: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 id")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Logs of this test binary, captured from every thread (to look for secrets). The Kubernetes
/// client's own chatter is left out: the other modules of the binary poll the API server all run
/// long, and no MLflow credential goes through that client.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    use tracing_subscriber::layer::SubscriberExt;
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        let filter = tracing_subscriber::filter::Targets::new()
            .with_default(tracing::Level::TRACE)
            .with_target("kube", tracing::Level::WARN)
            .with_target("tower_http", tracing::Level::WARN);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogSink(Arc::clone(&sink)))
            .finish()
            .with(filter);
        let _ = tracing::subscriber::set_global_default(subscriber);
        buffer
    })
    .clone()
}

/// The captured lines of this crate.
fn our_logs() -> String {
    String::from_utf8_lossy(&captured_logs().lock().unwrap())
        .lines()
        .filter(|l| l.contains("mlflow_gateway_operator"))
        .collect::<Vec<_>>()
        .join("\n")
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

/// One invocation with a fallback: the first attempt fails, the second answers with usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_invocation_is_one_complete_trace() {
    one_complete_trace(ExportMode::InfoThenSpans).await;
}

/// Spans only: the same stored trace (previews, usage, state, spans); the gateway metadata as
/// trace tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_only_mode_stores_the_same_trace_with_tags() {
    one_complete_trace(ExportMode::SpansOnly).await;
}

/// Adaptive, with MLflow keeping up: the trace info goes first, as in info-then-spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_mode_stores_the_same_trace() {
    one_complete_trace(ExportMode::Adaptive).await;
}

async fn one_complete_trace(mode: ExportMode) {
    captured_logs();
    let ml = support::mlflow();
    let exp = create_experiment(ml, "mgo-telemetry-tree").await;
    let endpoint = format!("chat-{}", support::suffix());
    let mut config = telemetry_config(&ml.uri, Auth::None, &exp, &endpoint);
    config.export_mode = mode;
    let telemetry = Telemetry::new(config).expect("telemetry");

    let request = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "What is the capital of France?"}]
    });
    let response = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Paris is the capital."}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    });
    let mut invocation =
        telemetry.start_invocation(RequestType::UnifiedChat, Some("it-agent"), None, &request);
    invocation.set_authenticated_caller("apikey:it", Some("7"));
    let trace_id = invocation.trace_id().expect("trace id");
    assert!(
        trace_id.starts_with("tr-") && trace_id.len() == 35,
        "{trace_id}"
    );
    invocation
        .start_attempt("openai", "gpt-4o", "chat", false)
        .fail("UpstreamError", "upstream answered HTTP 500", Some(500));
    invocation
        .start_attempt("openai", "gpt-4o-mini", "chat", false)
        .succeed(
            Some(TokenUsage {
                input_tokens: 12,
                output_tokens: 5,
                total_tokens: 17,
            }),
            Some(&response),
        );
    invocation.finish(Some(&response), None);
    telemetry.flush().await;

    let trace = wait_for_trace(ml, &trace_id).await;
    let info = &trace["trace_info"];
    assert_eq!(info["trace_id"], trace_id.as_str());
    assert_eq!(info["state"], "OK", "{info:#}");
    assert_eq!(
        info["trace_location"]["mlflow_experiment"]["experiment_id"],
        exp.as_str()
    );
    eprintln!("{mode:?} stored: {info:#}");
    let metadata = &info["trace_metadata"];
    // Where the gateway metadata lives in this mode.
    let gateway_keys = match mode {
        ExportMode::SpansOnly => &info["tags"],
        _ => metadata,
    };
    assert_eq!(
        gateway_keys["mlflow.gateway.endpointId"],
        format!("uid-{endpoint}").as_str()
    );
    assert_eq!(gateway_keys["mlflow.gateway.requestType"], "unified/chat");
    assert_eq!(gateway_keys["mlflow.gateway.caller"], "it-agent");
    assert_eq!(gateway_keys["mlflow.auth.username"], "apikey:it");
    assert_eq!(gateway_keys["mlflow.auth.userId"], "7");
    // The trace's user, in every mode (spans only: from the root's `user.id`).
    assert_eq!(metadata["mlflow.trace.user"], "apikey:it", "{info:#}");
    assert_eq!(info["state"], "OK");
    let usage: Value = serde_json::from_str(
        metadata["mlflow.trace.tokenUsage"]
            .as_str()
            .unwrap_or_else(|| panic!("no token usage in {metadata:#}")),
    )
    .expect("token usage JSON");
    assert_eq!(
        usage,
        json!({"input_tokens": 12, "output_tokens": 5, "total_tokens": 17})
    );
    assert_eq!(
        info["tags"]["mlflow.traceName"],
        format!("gateway/{endpoint}").as_str()
    );
    let request_preview = info["request_preview"].as_str().unwrap_or_default();
    let response_preview = info["response_preview"].as_str().unwrap_or_default();
    assert!(
        request_preview.contains("What is the capital of France?"),
        "{request_preview}"
    );
    assert!(
        response_preview.contains("Paris is the capital."),
        "{response_preview}"
    );

    // The span tree.
    let spans = spans_of(&trace);
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let root = span_named(&spans, &format!("gateway/{endpoint}"));
    assert_eq!(parent_id(root), None, "the root has no parent");
    assert_eq!(attr(root, "endpoint_name"), Some(json!(endpoint)));
    assert_eq!(
        attr(root, "endpoint_id"),
        Some(json!(format!("uid-{endpoint}")))
    );
    assert_eq!(attr(root, "mlflow.spanInputs"), Some(request.clone()));
    assert_eq!(attr(root, "mlflow.spanOutputs"), Some(response.clone()));
    let root_id = root["span_id"].as_str().expect("root span id");

    let failed = span_named(&spans, "provider/openai/gpt-4o");
    let ok = span_named(&spans, "provider/openai/gpt-4o-mini");
    for child in [failed, ok] {
        assert_eq!(parent_id(child), Some(root_id));
        assert_eq!(attr(child, "mlflow.spanType"), Some(json!("LLM")));
        assert_eq!(attr(child, "mlflow.llm.provider"), Some(json!("openai")));
        assert_eq!(attr(child, "method"), Some(json!("chat")));
    }
    assert_eq!(attr(failed, "mlflow.llm.model"), Some(json!("gpt-4o")));
    assert_eq!(failed["status"]["code"], "STATUS_CODE_ERROR", "{failed:#}");
    let events = failed["events"].as_array().expect("events");
    let exception = events
        .iter()
        .find(|e| e["name"] == "exception")
        .expect("exception event");
    let exception_attrs = json!({"attributes": exception["attributes"]});
    assert_eq!(
        attr(&exception_attrs, "exception.type"),
        Some(json!("UpstreamError"))
    );
    assert_eq!(
        attr(&exception_attrs, "exception.message"),
        Some(json!("upstream answered HTTP 500"))
    );
    assert_eq!(ok["status"]["code"], "STATUS_CODE_OK", "{ok:#}");
    assert_eq!(attr(ok, "mlflow.llm.model"), Some(json!("gpt-4o-mini")));
    assert_eq!(
        attr(ok, "mlflow.chat.tokenUsage"),
        Some(json!({"input_tokens": 12, "output_tokens": 5, "total_tokens": 17}))
    );

    // The experiment's trace list shows it.
    support::eventually(30, "the trace in the experiment's list", || async {
        let found = search_traces(ml, &exp).await;
        found["traces"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["trace_id"] == trace_id.as_str())
            .then_some(())
    })
    .await;

    let stats = telemetry.stats();
    assert_eq!(
        (
            stats.exported_spans,
            stats.exported_traces,
            stats.failed_spans,
            stats.queued
        ),
        (3, 1, 0, 0),
        "{stats:?}"
    );
    telemetry.shutdown(Duration::from_secs(5)).await;
}

/// capture_content = false: no request, response or upstream error text anywhere in the trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_off_leaves_no_content_in_the_trace() {
    captured_logs();
    let ml = support::mlflow();
    let exp = create_experiment(ml, "mgo-telemetry-private").await;
    let mut config = telemetry_config(&ml.uri, Auth::None, &exp, "private");
    config.capture_content = false;
    let telemetry = Telemetry::new(config).expect("telemetry");

    let secret_prompt = format!("PROMPT-{}-the launch codes", support::suffix());
    let secret_answer = format!("ANSWER-{}-are 0000", support::suffix());
    let secret_system = format!("SYSTEM-{}", support::suffix());
    let request = json!({"model": "gpt-4o", "messages": [
        {"role": "system", "content": secret_system},
        {"role": "user", "content": secret_prompt}
    ]});
    let response =
        json!({"choices": [{"message": {"role": "assistant", "content": secret_answer}}]});
    let invocation =
        telemetry.start_invocation(RequestType::PassthroughOpenaiChat, None, None, &request);
    let trace_id = invocation.trace_id().expect("trace id");
    invocation
        .start_attempt("openai", "gpt-4o", "chat_stream", true)
        .fail(
            "UpstreamError",
            &format!("invalid request: '{secret_prompt}' is too long"),
            Some(400),
        );
    invocation
        .start_attempt("openai", "gpt-4o-mini", "chat_stream", true)
        .succeed(
            Some(TokenUsage {
                input_tokens: 3,
                output_tokens: 4,
                total_tokens: 7,
            }),
            Some(&response),
        );
    invocation.finish(Some(&response), None);
    telemetry.flush().await;

    let trace = wait_for_trace(ml, &trace_id).await;
    let listed = search_traces(ml, &exp).await;
    for (what, dump) in [
        ("trace", serde_json::to_string(&trace).unwrap()),
        ("search", serde_json::to_string(&listed).unwrap()),
    ] {
        for secret in [&secret_prompt, &secret_answer, &secret_system] {
            assert!(
                !dump.contains(secret.as_str()),
                "{what} holds {secret}: {dump}"
            );
        }
        assert!(!dump.contains("launch codes"), "{what}: {dump}");
    }
    let info = &trace["trace_info"];
    assert_eq!(info["state"], "OK");
    assert_eq!(
        info["trace_metadata"]["mlflow.gateway.requestType"],
        "passthrough/model/openai-chat"
    );
    let spans = spans_of(&trace);
    let root = span_named(&spans, "gateway/private");
    assert_eq!(
        attr(root, "mlflow.spanInputs"),
        Some(json!({"content_omitted": true, "messages": 2}))
    );
    assert_eq!(
        attr(root, "mlflow.spanOutputs"),
        Some(json!({"content_omitted": true, "choices": 1}))
    );
    let ok = span_named(&spans, "provider/openai/gpt-4o-mini");
    assert_eq!(attr(ok, "streaming"), Some(json!(true)));
    assert_eq!(attr(ok, "method"), Some(json!("chat_stream")));
    assert_eq!(attr(ok, "mlflow.spanOutputs"), None);
    telemetry.shutdown(Duration::from_secs(5)).await;
}

/// An incoming traceparent: the gateway's trace stays complete under its own root and points to
/// the caller's trace with a span link and `mlflow.gateway.linkedTraceId`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_links_to_the_callers_trace() {
    captured_logs();
    let ml = support::mlflow();
    let exp = create_experiment(ml, "mgo-telemetry-linked").await;
    let telemetry =
        Telemetry::new(telemetry_config(&ml.uri, Auth::None, &exp, "linked")).expect("telemetry");

    let caller_trace = format!("{}{}", support::suffix(), "4bf92f3577b34da6a3ce929d");
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{caller_trace}-{caller_span}-01");
    let invocation = telemetry.start_invocation(
        RequestType::UnifiedChat,
        Some("agent"),
        Some(&traceparent),
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    let trace_id = invocation.trace_id().expect("trace id");
    assert_ne!(trace_id, format!("tr-{caller_trace}"), "a new trace id");
    invocation
        .start_attempt("anthropic", "claude-sonnet-4-5", "chat", false)
        .succeed(None, None);
    invocation.finish(Some(&json!({"choices": []})), None);
    telemetry.flush().await;

    let trace = wait_for_trace(ml, &trace_id).await;
    assert_eq!(trace["trace_info"]["state"], "OK");
    let spans = spans_of(&trace);
    assert_eq!(spans.len(), 2);
    let root = span_named(&spans, "gateway/linked");
    assert_eq!(parent_id(root), None, "the root has no parent: {root:#}");
    assert_eq!(
        attr(root, "mlflow.gateway.linkedTraceId"),
        Some(json!(format!("tr-{caller_trace}")))
    );
    let links = root["links"].as_array().expect("links on the root span");
    assert_eq!(links.len(), 1, "{links:#?}");
    assert_eq!(
        b64_hex(links[0]["trace_id"].as_str().expect("link trace id")),
        caller_trace
    );
    assert_eq!(
        b64_hex(links[0]["span_id"].as_str().expect("link span id")),
        caller_span
    );
    // Nothing was written into the caller's trace.
    assert!(get_trace(ml, &format!("tr-{caller_trace}")).await.is_none());

    // A malformed traceparent is ignored: a plain trace.
    let invocation = telemetry.start_invocation(
        RequestType::UnifiedChat,
        None,
        Some("00-zzzz-0000-01"),
        &json!({}),
    );
    let plain_id = invocation.trace_id().expect("trace id");
    invocation.finish(None, None);
    telemetry.flush().await;
    let plain = wait_for_trace(ml, &plain_id).await;
    let root = span_named(&spans_of(&plain), "gateway/linked").clone();
    assert_eq!(attr(&root, "mlflow.gateway.linkedTraceId"), None);
    assert!(root["links"].as_array().is_none_or(Vec::is_empty));
    telemetry.shutdown(Duration::from_secs(5)).await;
}

/// A deleted experiment: MLflow still stores the spans (200), but refuses the trace info (its
/// experiment must be active), so the trace lacks the gateway metadata and is counted failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_experiment_keeps_spans_without_metadata() {
    captured_logs();
    let ml = support::mlflow();
    let exp = create_experiment(ml, "mgo-telemetry-deleted").await;
    MlflowClient::new(&mlflow_config(&ml.uri, Auth::None))
        .expect("client")
        .delete_experiment(&exp)
        .await
        .expect("delete experiment");
    let telemetry =
        Telemetry::new(telemetry_config(&ml.uri, Auth::None, &exp, "deleted")).expect("telemetry");
    let invocation =
        telemetry.start_invocation(RequestType::UnifiedEmbeddings, None, None, &json!({}));
    let trace_id = invocation.trace_id().expect("trace id");
    invocation
        .start_attempt("openai", "text-embedding-3-small", "embeddings", false)
        .succeed(None, None);
    invocation.finish(Some(&json!({"data": []})), None);
    telemetry.flush().await;
    let stats = telemetry.stats();
    assert_eq!(
        (
            stats.exported_spans,
            stats.exported_traces,
            stats.failed_traces
        ),
        (2, 0, 1),
        "{stats:?}"
    );
    let trace = support::eventually(30, "the spans stored", || async {
        let trace = get_trace(ml, &trace_id).await?;
        let stored = trace["trace_info"]["state"] != "IN_PROGRESS" && spans_of(&trace).len() == 2;
        stored.then_some(trace)
    })
    .await;
    assert_eq!(trace["trace_info"]["state"], "OK");
    assert!(
        trace["trace_info"]["trace_metadata"]
            .get("mlflow.gateway.endpointId")
            .is_none()
    );
    assert_eq!(spans_of(&trace).len(), 2);
    telemetry.shutdown(Duration::from_secs(5)).await;
}

/// A stopped tracking server costs the request nothing: invocations are timed, the traces wait
/// in the queue, and all of them are delivered once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_server_never_blocks_requests() {
    captured_logs();
    let private = support::Mlflow::start(false);
    let exp = create_experiment(&private, "mgo-telemetry-outage").await;
    let mut config = telemetry_config(&private.uri, Auth::None, &exp, "outage");
    // One OTLP request per batch: the queue drains fast once the server is back.
    config.export_mode = ExportMode::SpansOnly;
    let telemetry = Telemetry::new(config).expect("telemetry");
    private.stop();

    const N: u32 = 200;
    let request = json!({"messages": [{"role": "user", "content": "hello"}]});
    let response = json!({"choices": [{"message": {"role": "assistant", "content": "hi"}}]});
    let mut start_total = Duration::ZERO;
    let mut finish_total = Duration::ZERO;
    for i in 0..N {
        let t = Instant::now();
        let invocation =
            telemetry.start_invocation(RequestType::UnifiedChat, Some("load"), None, &request);
        start_total += t.elapsed();
        let attempt = invocation.start_attempt("openai", "gpt-4o", "chat", false);
        attempt.succeed(
            Some(TokenUsage {
                input_tokens: 1,
                output_tokens: 1,
                total_tokens: 2,
            }),
            None,
        );
        let t = Instant::now();
        invocation.finish(Some(&response), None);
        finish_total += t.elapsed();
        if i % 50 == 0 {
            // Let the exporter run against the dead server meanwhile.
            tokio::task::yield_now().await;
        }
    }
    let start_avg = start_total / N;
    let finish_avg = finish_total / N;
    eprintln!(
        "with MLflow stopped: start_invocation {start_avg:?}, finish {finish_avg:?} on average"
    );
    assert!(start_avg < Duration::from_micros(500), "{start_avg:?}");
    assert!(finish_avg < Duration::from_micros(500), "{finish_avg:?}");

    let flushed = Instant::now();
    telemetry.flush().await;
    assert!(flushed.elapsed() < Duration::from_secs(30));
    let stats = telemetry.stats();
    eprintln!("{stats:?}");
    // Nothing lost: every trace waits in the queue.
    assert_eq!(stats.exported_spans, 0, "{stats:?}");
    assert_eq!(stats.dropped_traces + stats.rejected_traces, 0, "{stats:?}");
    assert_eq!(stats.queued, u64::from(N), "{stats:?}");
    assert!(stats.otlp_error > 0, "{stats:?}");

    // Back up: the waiting traces are delivered, oldest first, then new ones.
    private.resume();
    let drained = Instant::now() + Duration::from_secs(180);
    loop {
        let stats = telemetry.stats();
        if stats.delivered_traces() == u64::from(N) && stats.queued == 0 {
            break;
        }
        assert!(
            Instant::now() < drained,
            "not delivered after the server is back: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let invocation = telemetry.start_invocation(RequestType::UnifiedChat, None, None, &request);
    let trace_id = invocation.trace_id().expect("trace id");
    invocation.finish(Some(&response), None);
    let trace = wait_for_trace(&private, &trace_id).await;
    assert_eq!(trace["trace_info"]["state"], "OK");
    let stats = telemetry.stats();
    assert_eq!(stats.exported_spans, u64::from(2 * N) + 1, "{stats:?}");
    telemetry.shutdown(Duration::from_secs(5)).await;
}

/// A tiny queue and a tracking server that is down: traces beyond the queue's bound are dropped
/// whole and counted; the others wait.
#[tokio::test]
async fn tiny_queue_drops_and_counts() {
    captured_logs();
    // Nothing listens on this port: a tracking server that is down.
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let mut config = telemetry_config(&dead, Auth::None, "1", "tiny");
    config.queue_max_bytes = 4096;
    let telemetry = Telemetry::new(config).expect("telemetry");
    const N: u64 = 50;
    for _ in 0..N {
        let invocation =
            telemetry.start_invocation(RequestType::UnifiedChat, None, None, &json!({}));
        invocation
            .start_attempt("openai", "gpt-4o", "chat", false)
            .fail("Timeout", "no answer", None);
        invocation.finish(None, Some("all providers failed"));
    }
    telemetry.flush().await;
    let stats = telemetry.stats();
    assert!(stats.dropped_traces > 0, "{stats:?}");
    assert!(stats.queue_bytes <= 4096, "{stats:?}");
    assert_eq!(stats.dropped_traces + stats.queued, N, "{stats:?}");
    assert_eq!(stats.dropped_spans, 2 * stats.dropped_traces, "{stats:?}");
    assert_eq!(stats.exported_spans, 0, "{stats:?}");
    telemetry.shutdown(Duration::from_secs(2)).await;
}

/// A basic-auth server: a writer with EDIT permission stores traces; a wrong password and a
/// user without permission only produce failed counts; no password reaches a log line or a span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_writer_and_no_secret_in_logs() {
    let logs = captured_logs();
    let private = support::Mlflow::start(true);
    let (_, admin_password) = private.admin.clone().expect("admin credentials");
    let exp = create_experiment(&private, "mgo-telemetry-auth").await;

    let writer = format!("writer-{}", support::suffix());
    let writer_password = format!("pw-{}-{}", support::suffix(), support::suffix());
    let reader = format!("reader-{}", support::suffix());
    let reader_password = format!("pw-{}-{}", support::suffix(), support::suffix());
    for (user, password) in [(&writer, &writer_password), (&reader, &reader_password)] {
        let created = private
            .request(reqwest::Method::POST, "/api/2.0/mlflow/users/create")
            .json(&json!({"username": user, "password": password}))
            .send()
            .await
            .unwrap();
        assert!(created.status().is_success(), "{:?}", created.text().await);
    }
    let granted = private
        .request(
            reqwest::Method::POST,
            "/api/3.0/mlflow/users/permissions/grant",
        )
        .json(&json!({"username": writer, "resource_type": "experiment",
                      "resource_id": exp, "permission": "EDIT"}))
        .send()
        .await
        .unwrap();
    assert!(granted.status().is_success(), "{:?}", granted.text().await);

    let wrong_password = format!("wrong-{}", support::suffix());
    let basic = |username: &str, password: &str| Auth::Basic {
        username: username.to_string(),
        password: password.to_string(),
    };
    let run = |telemetry: Telemetry| async move {
        let invocation = telemetry.start_invocation(
            RequestType::UnifiedChat,
            Some("auth-test"),
            None,
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
        );
        let trace_id = invocation.trace_id().expect("trace id");
        invocation
            .start_attempt("openai", "gpt-4o", "chat", false)
            .succeed(None, None);
        invocation.finish(Some(&json!({"choices": []})), None);
        telemetry.flush().await;
        (trace_id, telemetry.stats())
    };

    // The writer: stored, with metadata.
    let writer_telemetry = Telemetry::new(telemetry_config(
        &private.uri,
        basic(&writer, &writer_password),
        &exp,
        "auth",
    ))
    .expect("telemetry");
    let (trace_id, stats) = run(writer_telemetry.clone()).await;
    let trace = wait_for_trace(&private, &trace_id).await;
    assert_eq!(trace["trace_info"]["state"], "OK");
    assert_eq!(
        trace["trace_info"]["trace_metadata"]["mlflow.gateway.caller"],
        "auth-test"
    );
    assert_eq!(
        (stats.exported_spans, stats.exported_traces),
        (2, 1),
        "{stats:?}"
    );

    // A wrong password (401) and a user with only READ (403): failures, counted.
    for (what, auth) in [
        ("wrong password", basic(&writer, &wrong_password)),
        ("read-only user", basic(&reader, &reader_password)),
    ] {
        let telemetry =
            Telemetry::new(telemetry_config(&private.uri, auth, &exp, "auth")).expect("telemetry");
        let (trace_id, stats) = run(telemetry.clone()).await;
        assert_eq!(
            (stats.exported_spans, stats.failed_spans),
            (0, 2),
            "{what}: {stats:?}"
        );
        assert!(get_trace(&private, &trace_id).await.is_none(), "{what}");
        telemetry.shutdown(Duration::from_secs(2)).await;
    }
    writer_telemetry.shutdown(Duration::from_secs(5)).await;

    // No secret in any log line of this binary, nor in the stored trace.
    let logged = || String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    support::eventually(10, "the failures logged", || async {
        logged()
            .contains("trace export to MLflow failed")
            .then_some(())
    })
    .await;
    let text = logged();
    for line in text.lines().filter(|l| l.contains("WARN")) {
        eprintln!("{line}");
    }
    let encoded =
        |u: &str, p: &str| base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
    for secret in [
        writer_password.clone(),
        reader_password.clone(),
        wrong_password.clone(),
        admin_password.clone(),
        encoded(&writer, &writer_password),
        encoded(&reader, &reader_password),
        encoded(&writer, &wrong_password),
    ] {
        assert!(!text.contains(&secret), "a secret is in the logs:\n{text}");
        let dump = serde_json::to_string(&trace).unwrap();
        assert!(!dump.contains(&secret), "a secret is in the trace: {dump}");
    }
}
