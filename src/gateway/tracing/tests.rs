//! Tests of the whole trace pipeline against a local recording server: the span tree as MLflow
//! receives it (decoded with the `opentelemetry-proto` types), capture, the export modes and their
//! order, retries, a refused trace split out of its batch, drops at a full queue.

use super::*;
use crate::mlflow::{Auth, MlflowConfig};
use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;
use std::sync::atomic::AtomicUsize;
use url::Url;

#[test]
fn credentials_are_redacted() {
    let config = MlflowConfig::builder(Url::parse("http://127.0.0.1:1").unwrap())
        .auth(Auth::Basic {
            username: "writer".into(),
            password: "hunter2-SECRET".into(),
        })
        .build()
        .unwrap();
    let tc = TelemetryConfig::new(config, "7", "ep", "uid");
    let shown = format!("{tc:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("d3JpdGVy"),
        "{shown}"
    );
}

/// What a local tracking server saw, in order: `info <trace id>` per StartTraceV3 request,
/// `spans <status> <traces>` per OTLP request; and the spans of the requests it stored.
#[derive(Default)]
struct Seen {
    log: Mutex<Vec<String>>,
    spans: Mutex<Vec<Span>>,
}

/// How the local server answers.
#[derive(Default)]
struct Script {
    /// OTLP requests answered 503 first.
    refuse_spans: AtomicUsize,
    /// Info requests held for 2 s first.
    slow_infos: AtomicUsize,
    /// Info requests answered 500 first.
    failing_infos: AtomicUsize,
    /// OTLP requests never answered while set.
    hang: AtomicBool,
}

fn take(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// A local tracking server. An OTLP body holding the text `POISON` is refused with 400.
async fn server(script: Arc<Script>) -> (Url, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let (info_seen, info_script) = (Arc::clone(&seen), Arc::clone(&script));
    let span_seen = Arc::clone(&seen);
    let app = axum::Router::new()
        .route(
            "/api/3.0/mlflow/traces",
            axum::routing::post(move |body: String| async move {
                let body: serde_json::Value = serde_json::from_str(&body).unwrap();
                let id = body["trace"]["trace_info"]["trace_id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                info_seen.log.lock().unwrap().push(format!("info {id}"));
                if take(&info_script.slow_infos) {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                if take(&info_script.failing_infos) {
                    return (StatusCode::INTERNAL_SERVER_ERROR, "database is locked");
                }
                (StatusCode::OK, "{}")
            }),
        )
        .route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| async move {
                if script.hang.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                let request = ExportTraceServiceRequest::decode(body.as_ref()).unwrap();
                let status = if take(&script.refuse_spans) {
                    StatusCode::SERVICE_UNAVAILABLE
                } else if body.windows(6).any(|w| w == b"POISON") {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::OK
                };
                span_seen.log.lock().unwrap().push(format!(
                    "spans {} {}",
                    status.as_u16(),
                    request.resource_spans.len()
                ));
                if status == StatusCode::OK {
                    let mut spans = span_seen.spans.lock().unwrap();
                    for rs in request.resource_spans {
                        for ss in rs.scope_spans {
                            spans.extend(ss.spans);
                        }
                    }
                }
                (status, "")
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (Url::parse(&format!("http://{addr}")).unwrap(), seen)
}

fn config(uri: &Url, mode: ExportMode) -> TelemetryConfig {
    let mut config = TelemetryConfig::new(
        MlflowConfig::new(uri.clone()).unwrap(),
        "7",
        "chat",
        "uid-1",
    );
    config.export_mode = mode;
    config.export_timeout = Duration::from_millis(500);
    config
}

async fn telemetry(mode: ExportMode) -> (Telemetry, Arc<Seen>, Arc<Script>) {
    let script = Arc::new(Script::default());
    let (uri, seen) = server(Arc::clone(&script)).await;
    let telemetry = Telemetry::new(config(&uri, mode)).unwrap();
    (telemetry, seen, script)
}

/// Requests may take 5 s: a slow info (2 s) is answered, after the infos' stage (1 s).
async fn slow_info_telemetry(mode: ExportMode) -> (Telemetry, Arc<Seen>, Arc<Script>) {
    let script = Arc::new(Script::default());
    let (uri, seen) = server(Arc::clone(&script)).await;
    let mut config = config(&uri, mode);
    config.export_timeout = Duration::from_secs(5);
    (Telemetry::new(config).unwrap(), seen, script)
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            any_value::Value::StringValue(s) => s.clone(),
            any_value::Value::BoolValue(b) => b.to_string(),
            any_value::Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_tree_shape() {
    let (telemetry, seen, _) = telemetry(ExportMode::SpansOnly).await;
    let request = json!({"messages": [{"role": "user", "content": "hello"}]});
    let mut invocation = telemetry.start_invocation(
        RequestType::UnifiedChat,
        Some("agent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        &request,
    );
    invocation.set_authenticated_caller("apikey:ci", Some("42"));
    let trace_id = invocation.trace_id().unwrap();
    assert!(trace_id.starts_with("tr-") && trace_id.len() == 35);
    assert_ne!(trace_id, "tr-4bf92f3577b34da6a3ce929d0e0e4736");
    invocation
        .start_attempt("openai", "gpt-4o", "chat", false)
        .fail("UpstreamError", "rate limited", Some(429));
    let usage = TokenUsage {
        input_tokens: 3,
        output_tokens: 4,
        total_tokens: 7,
    };
    invocation
        .start_attempt("openai", "gpt-4o-mini", "chat_stream", true)
        .succeed(Some(usage), None);
    invocation.finish(Some(&json!({"choices": []})), None);
    telemetry.flush().await;

    let spans = seen.spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 3);
    let root = spans.iter().find(|s| s.name == "gateway/chat").unwrap();
    assert_eq!(format!("tr-{}", hex(&root.trace_id)), trace_id);
    assert!(root.parent_span_id.is_empty());
    assert_eq!(root.status.as_ref().unwrap().code, 1);
    assert_eq!(
        attr(root, ATTR_LINKED_TRACE_ID).as_deref(),
        Some("tr-4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(root.links.len(), 1);
    assert_eq!(
        hex(&root.links[0].trace_id),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(attr(root, META_CALLER).as_deref(), Some("agent"));
    assert_eq!(attr(root, ATTR_USER_ID).as_deref(), Some("apikey:ci"));
    assert_eq!(
        attr(root, ATTR_TRACE_NAME_TAG).as_deref(),
        Some("gateway/chat")
    );
    assert!(attr(root, ATTR_INPUTS).unwrap().contains("hello"));
    // Spans only: every metadata key as a tag.
    for (key, value) in [
        (META_ENDPOINT_ID, "uid-1"),
        (META_REQUEST_TYPE, "unified/chat"),
        (META_CALLER, "agent"),
        (META_AUTH_USERNAME, "apikey:ci"),
        (META_AUTH_USER_ID, "42"),
        (META_TRACE_USER, "apikey:ci"),
    ] {
        let tag = format!("{TAG_ATTRIBUTE_PREFIX}{key}");
        assert_eq!(attr(root, &tag).as_deref(), Some(value), "{tag}");
    }
    let failed = spans
        .iter()
        .find(|s| s.name == "provider/openai/gpt-4o")
        .unwrap();
    let ok = spans
        .iter()
        .find(|s| s.name == "provider/openai/gpt-4o-mini")
        .unwrap();
    for child in [failed, ok] {
        assert_eq!(child.parent_span_id, root.span_id);
        assert_eq!(child.trace_id, root.trace_id);
        assert!(child.start_time_unix_nano >= root.start_time_unix_nano);
        assert!(child.end_time_unix_nano <= root.end_time_unix_nano);
    }
    let status = failed.status.as_ref().unwrap();
    assert_eq!(
        (status.code, status.message.as_str()),
        (2, "UpstreamError: rate limited")
    );
    assert_eq!(failed.events[0].name, "exception");
    assert_eq!(attr(failed, ATTR_HTTP_STATUS).as_deref(), Some("429"));
    assert_eq!(
        attr(ok, ATTR_TOKEN_USAGE).as_deref(),
        Some(r#"{"input_tokens":3,"output_tokens":4,"total_tokens":7}"#)
    );
    assert_eq!(attr(ok, ATTR_STREAMING).as_deref(), Some("true"));
    assert_eq!(attr(failed, ATTR_STREAMING), None);
    let stats = telemetry.stats();
    assert_eq!(
        (
            stats.exported_spans,
            stats.exported_traces,
            stats.queued,
            stats.info_ok
        ),
        (3, 1, 0, 0)
    );
    assert_eq!(*seen.log.lock().unwrap(), ["spans 200 1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_off_and_aborts() {
    let script = Arc::new(Script::default());
    let (uri, seen) = server(script).await;
    let mut config = config(&uri, ExportMode::SpansOnly);
    config.capture_content = false;
    let telemetry = Telemetry::new(config).unwrap();
    let inv = telemetry.start_invocation(
        RequestType::UnifiedChat,
        None,
        Some("not-a-traceparent"),
        &json!({"messages": [{"content": "SECRET-PROMPT"}]}),
    );
    inv.start_attempt("openai", "gpt-4o", "chat", false).fail(
        "UpstreamError",
        "echo: SECRET-PROMPT",
        Some(400),
    );
    let dangling = inv.start_attempt("openai", "gpt-4o", "chat", false);
    drop(inv); // the client went away
    drop(dangling);
    telemetry.flush().await;
    let spans = seen.spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 3);
    let dump = format!("{spans:?}");
    assert!(!dump.contains("SECRET-PROMPT"), "{dump}");
    let root = spans.iter().find(|s| s.name == "gateway/chat").unwrap();
    assert!(root.links.is_empty());
    assert!(attr(root, ATTR_LINKED_TRACE_ID).is_none());
    let status = root.status.as_ref().unwrap();
    assert!(status.code == 2 && status.message.contains("aborted"));
    assert_eq!(
        attr(root, ATTR_INPUTS).as_deref(),
        Some(r#"{"content_omitted":true,"messages":1}"#)
    );
}

/// With the queue full, a trace is dropped whole at its start: nothing is built or
/// serialized for it, it keeps a trace id, and it and its spans are counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_traces_before_building_them() {
    let script = Arc::new(Script::default());
    script.hang.store(true, Ordering::SeqCst);
    let (uri, _) = server(script).await;
    let mut config = config(&uri, ExportMode::SpansOnly);
    config.queue_max_bytes = 1;
    let telemetry = Telemetry::new(config).unwrap();
    let response = json!({"choices": [{"message": {"content": "answer"}}]});
    let one = |telemetry: &Telemetry| {
        let inv = telemetry.start_invocation(RequestType::UnifiedChat, None, None, &json!({}));
        let traced = inv.is_traced();
        if !traced {
            assert!(inv.trace_id().is_some_and(|id| id.starts_with("tr-")));
            assert!(inv.outputs(&response).0.is_none(), "serialized for nothing");
        }
        inv.start_attempt("openai", "m", "chat", false)
            .fail("UpstreamError", "429", Some(429));
        let outputs = inv.outputs(&response);
        inv.start_attempt("openai", "m2", "chat", false)
            .succeed_with(None, Some(&outputs));
        inv.finish_with(Some(&outputs), None);
        traced
    };
    // A record larger than the bound is dropped at its end.
    assert!(one(&telemetry));
    let s = telemetry.stats();
    assert_eq!((s.dropped_traces, s.dropped_spans, s.queued), (1, 3, 0));
    // The size of one record in the queue, taken as the bound: once one waits, the queue is
    // full and later traces are dropped at their start.
    let (uri, _) = server(Arc::new(Script {
        hang: AtomicBool::new(true),
        ..Script::default()
    }))
    .await;
    let probe = Telemetry::new(config_for(&uri, 1 << 20)).unwrap();
    one(&probe);
    let record_bytes = probe.stats().queue_bytes;
    let telemetry = Telemetry::new(config_for(&uri, record_bytes)).unwrap();
    assert!(one(&telemetry));
    for _ in 0..10 {
        assert!(!one(&telemetry));
    }
    // One more, abandoned (the client went away): its root still counts.
    drop(telemetry.start_invocation(RequestType::UnifiedChat, None, None, &json!({})));
    let s = telemetry.stats();
    assert_eq!(
        (s.dropped_traces, s.dropped_spans, s.queued),
        (11, 31, 1),
        "{s:?}"
    );
}

fn config_for(uri: &Url, max_bytes: u64) -> TelemetryConfig {
    let mut c = config(uri, ExportMode::SpansOnly);
    c.queue_max_bytes = max_bytes;
    c
}

/// Dropping the telemetry without shutdown does not block a runtime thread, even on a
/// current-thread runtime.
#[tokio::test]
async fn dropping_without_shutdown_does_not_block() {
    let (telemetry, _, script) = telemetry(ExportMode::SpansOnly).await;
    script.hang.store(true, Ordering::SeqCst);
    let invocation = telemetry.start_invocation(RequestType::UnifiedChat, None, None, &json!({}));
    let attempt = invocation.start_attempt("openai", "m", "chat", false);
    invocation.finish(None, None);
    let started = std::time::Instant::now();
    drop(telemetry);
    drop(attempt); // the last reference to the pipeline
    assert!(started.elapsed() < Duration::from_millis(100));
}

async fn one_trace(telemetry: &Telemetry) -> String {
    let invocation = telemetry.start_invocation(RequestType::UnifiedChat, None, None, &json!({}));
    let trace_id = invocation.trace_id().unwrap();
    invocation
        .start_attempt("openai", "gpt-4o", "chat", false)
        .succeed(None, None);
    invocation.finish(None, None);
    trace_id
}

/// Waits (a bounded poll) until every trace pushed so far is settled.
async fn settled(telemetry: &Telemetry) {
    let inner = telemetry.inner.as_ref().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while inner.counters.settled.load(Ordering::Relaxed)
        < inner.counters.pushed.load(Ordering::Relaxed)
    {
        assert!(std::time::Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_info_goes_before_its_spans() {
    let (telemetry, seen, _) = telemetry(ExportMode::InfoThenSpans).await;
    let trace_id = one_trace(&telemetry).await;
    settled(&telemetry).await;
    assert_eq!(
        *seen.log.lock().unwrap(),
        [format!("info {trace_id}"), "spans 200 1".to_string()]
    );
    let s = telemetry.stats();
    assert_eq!((s.exported_spans, s.exported_traces, s.info_ok), (2, 1, 1));
    // No tags in this mode: the metadata went in the info.
    let spans = seen.spans.lock().unwrap();
    let root = spans.iter().find(|s| s.name == "gateway/chat").unwrap();
    assert!(attr(root, "mlflow.traceTag.mlflow.gateway.endpointId").is_none());
}

/// MLflow down (503): the batch waits and is sent again, infos are not posted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_is_sent_again() {
    let (telemetry, seen, script) = telemetry(ExportMode::InfoThenSpans).await;
    script.refuse_spans.store(2, Ordering::SeqCst);
    let trace_id = one_trace(&telemetry).await;
    settled(&telemetry).await;
    assert_eq!(
        *seen.log.lock().unwrap(),
        [
            format!("info {trace_id}"),
            "spans 503 1".to_string(),
            "spans 503 1".to_string(),
            "spans 200 1".to_string()
        ]
    );
    let s = telemetry.stats();
    assert_eq!(
        (
            s.exported_traces,
            s.otlp_error,
            s.otlp_ok,
            s.rejected_traces
        ),
        (1, 2, 1, 0)
    );
}

/// A trace MLflow refuses (400) is split out of its batch and dropped alone, counted; the rest
/// of the batch is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_trace_is_split_out_and_dropped() {
    let (telemetry, seen, script) = telemetry(ExportMode::SpansOnly).await;
    script.hang.store(true, Ordering::SeqCst);
    // The first request hangs until the export timeout; meanwhile five traces queue up.
    one_trace(&telemetry).await;
    for i in 0..5 {
        let text = if i == 2 { "POISON" } else { "fine" };
        let inv = telemetry.start_invocation(
            RequestType::UnifiedChat,
            None,
            None,
            &json!({"messages": [{"content": text}]}),
        );
        inv.finish(None, None);
    }
    script.hang.store(false, Ordering::SeqCst);
    settled(&telemetry).await;
    let s = telemetry.stats();
    assert_eq!(
        (s.rejected_traces, s.failed_spans, s.delivered_traces()),
        (1, 1, 5),
        "{s:?} {:?}",
        seen.log.lock().unwrap()
    );
    let stored = seen.spans.lock().unwrap();
    assert!(!format!("{stored:?}").contains("POISON"));
}

/// An info that takes longer than its stage allows does not hold its batch: the spans go,
/// then the info is posted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_info_is_posted_after_its_spans() {
    let (telemetry, seen, script) = slow_info_telemetry(ExportMode::InfoThenSpans).await;
    script.slow_infos.store(1, Ordering::SeqCst);
    let trace_id = one_trace(&telemetry).await;
    settled(&telemetry).await;
    assert_eq!(
        *seen.log.lock().unwrap(),
        [
            format!("info {trace_id}"),
            "spans 200 1".to_string(),
            format!("info {trace_id}")
        ]
    );
    assert_eq!(telemetry.stats().exported_traces, 1);
}

/// Adaptive: an info that had no time in its stage goes as tags with the spans instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_sends_late_infos_as_tags() {
    let (telemetry, seen, script) = slow_info_telemetry(ExportMode::Adaptive).await;
    script.slow_infos.store(1, Ordering::SeqCst);
    let trace_id = one_trace(&telemetry).await;
    settled(&telemetry).await;
    assert_eq!(
        *seen.log.lock().unwrap(),
        [format!("info {trace_id}"), "spans 200 1".to_string()]
    );
    let spans = seen.spans.lock().unwrap();
    let root = spans.iter().find(|s| s.name == "gateway/chat").unwrap();
    assert_eq!(
        attr(root, "mlflow.traceTag.mlflow.gateway.endpointId").as_deref(),
        Some("uid-1")
    );
    assert_eq!(telemetry.stats().exported_traces, 1);
}

/// StartTraceV3 answers 500 only when the server fails, so the info is tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_info_answered_500_is_tried_again() {
    let (telemetry, seen, script) = telemetry(ExportMode::InfoThenSpans).await;
    script.failing_infos.store(1, Ordering::SeqCst);
    let trace_id = one_trace(&telemetry).await;
    settled(&telemetry).await;
    assert_eq!(
        *seen.log.lock().unwrap(),
        [
            format!("info {trace_id}"),
            format!("info {trace_id}"),
            "spans 200 1".to_string()
        ]
    );
    assert_eq!(telemetry.stats().exported_traces, 1);
}

/// Shutdown: nothing is traced afterwards; what is queued is delivered within the time given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delivers_then_stops_tracing() {
    let (telemetry, seen, _) = telemetry(ExportMode::SpansOnly).await;
    for _ in 0..20 {
        one_trace(&telemetry).await;
    }
    telemetry.shutdown(Duration::from_secs(10)).await;
    assert_eq!(telemetry.stats().delivered_traces(), 20);
    assert_eq!(seen.spans.lock().unwrap().len(), 40);
    assert!(
        telemetry
            .start_invocation(RequestType::UnifiedChat, None, None, &json!({}))
            .trace_id()
            .is_none()
    );
}

/// CPU time of this process (user + system), from /proc (Linux).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Duration::from_millis(ticks * 10) // USER_HZ = 100
}

/// The hot path's cost, and the whole pipeline's CPU per invocation (recording, encoding, the
/// queue and the HTTP export to a local sink that answers 200 at once). Run with
/// `cargo test --release --lib gateway::tracing::tests::hot_path_cost -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run in release mode"]
async fn hot_path_cost() {
    use std::sync::atomic::AtomicU64;
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(body.len() as u64, Ordering::Relaxed);
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let uri = Url::parse(&format!("http://{addr}")).unwrap();
    let telemetry = Telemetry::new(config(&uri, ExportMode::SpansOnly)).unwrap();

    let content = "word ".repeat(150); // ~750 bytes of prompt, the same of answer
    let request = json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": content}]});
    let response = json!({"id": "x", "choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 150, "completion_tokens": 150, "total_tokens": 300}});
    let usage = TokenUsage {
        input_tokens: 150,
        output_tokens: 150,
        total_tokens: 300,
    };
    let one = |telemetry: &Telemetry| {
        let inv =
            telemetry.start_invocation(RequestType::UnifiedChat, Some("bench"), None, &request);
        inv.start_attempt("openai", "gpt-4o-mini", "chat", false)
            .succeed(Some(usage), Some(&response));
        inv.finish(Some(&response), None);
    };
    for _ in 0..2000 {
        one(&telemetry);
    }
    telemetry.flush().await;

    const N: usize = 20_000;
    let mut latencies = Vec::with_capacity(N);
    let cpu = process_cpu();
    let wall = std::time::Instant::now();
    for i in 0..N {
        let t = std::time::Instant::now();
        one(&telemetry);
        latencies.push(t.elapsed());
        if i % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let hot = wall.elapsed();
    settled(&telemetry).await;
    let total_cpu = process_cpu().saturating_sub(cpu);
    latencies.sort();
    let stats = telemetry.stats();
    eprintln!(
        "hot path per invocation: mean {:?}, p50 {:?}, p99 {:?}, max {:?}; \
         pipeline CPU per invocation (incl. export + sink): {:?}; {} bytes sent; {stats:?}",
        hot / N as u32,
        latencies[N / 2],
        latencies[N * 99 / 100],
        latencies[N - 1],
        total_cpu / N as u32,
        received.load(Ordering::Relaxed),
    );
    assert_eq!(stats.dropped_traces + stats.rejected_traces, 0, "{stats:?}");
}

#[tokio::test]
async fn disabled_is_a_no_op() {
    let telemetry = Telemetry::disabled();
    let inv = telemetry.start_invocation(RequestType::UnifiedChat, None, None, &json!({}));
    assert!(inv.trace_id().is_none());
    inv.start_attempt("openai", "m", "chat", false)
        .succeed(None, None);
    inv.finish(None, Some("x"));
    telemetry.flush().await;
    telemetry.shutdown(Duration::from_secs(1)).await;
    assert_eq!(telemetry.stats(), ExportStats::default());
}

#[test]
fn handles_cross_threads() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync + Clone>() {}
    send::<Invocation>();
    send::<Attempt>();
    send_sync::<Telemetry>();
}

#[test]
fn new_needs_a_runtime() {
    let config = TelemetryConfig::new(
        MlflowConfig::new(Url::parse("http://127.0.0.1:1").unwrap()).unwrap(),
        "1",
        "ep",
        "uid",
    );
    assert!(matches!(
        Telemetry::new(config),
        Err(TelemetryError::NoRuntime)
    ));
}
