//! Tests of the whole trace pipeline: the span tree, capture, drops and failures with an
//! in-process exporter, and the export order against a local recording server.

use super::*;
use crate::mlflow::Auth;
use axum::http::StatusCode;
use opentelemetry::Value as OtelValue;
use opentelemetry::trace::SpanId;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::SpanData;
use serde_json::json;
use std::sync::Mutex;
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

/// An exporter that keeps what it gets, or fails, or never answers.
#[derive(Debug, Clone, Default)]
struct Recorder {
    spans: Arc<Mutex<Vec<SpanData>>>,
    mode: Arc<Mutex<Mode>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum Mode {
    #[default]
    Accept,
    Fail,
    Hang,
}

impl SpanExporter for Recorder {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mode = *self.mode.lock().unwrap();
        match mode {
            Mode::Accept => {
                self.spans.lock().unwrap().extend(batch);
                Ok(())
            }
            Mode::Fail => Err(OTelSdkError::InternalFailure("HTTP 503".into())),
            Mode::Hang => {
                std::future::pending::<()>().await;
                Ok(())
            }
        }
    }
}

fn settings(capture: bool, queue: usize) -> Settings {
    let mut config = TelemetryConfig::new(
        MlflowConfig::new(Url::parse("http://127.0.0.1:1").unwrap()).unwrap(),
        "7",
        "chat",
        "uid-1",
    );
    config.capture_content = capture;
    config.max_queue_spans = queue;
    config.export_timeout = Duration::from_millis(300);
    Settings::from_config(&config).unwrap()
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a OtelValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_tree_shape() {
    let recorder = Recorder::default();
    let telemetry = Telemetry::build(settings(true, 100), recorder.clone(), None);
    let request = json!({"messages": [{"role": "user", "content": "hello"}]});
    let invocation = telemetry.start_invocation(
        RequestType::UnifiedChat,
        Some("agent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        &request,
    );
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

    let spans = recorder.spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 3);
    let root = spans.iter().find(|s| s.name == "gateway/chat").unwrap();
    assert_eq!(root.parent_span_id, SpanId::INVALID);
    assert_eq!(root.status, Status::Ok);
    assert_eq!(
        attr(root, ATTR_LINKED_TRACE_ID).map(|v| v.as_str().into_owned()),
        Some("tr-4bf92f3577b34da6a3ce929d0e0e4736".to_string())
    );
    assert_eq!(root.links.links.len(), 1);
    assert_eq!(
        format!("{:032x}", root.links.links[0].span_context.trace_id()),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(
        attr(root, META_CALLER).map(|v| v.as_str().into_owned()),
        Some("agent".into())
    );
    assert!(attr(root, ATTR_INPUTS).unwrap().as_str().contains("hello"));
    let failed = spans
        .iter()
        .find(|s| s.name == "provider/openai/gpt-4o")
        .unwrap();
    let ok = spans
        .iter()
        .find(|s| s.name == "provider/openai/gpt-4o-mini")
        .unwrap();
    for child in [failed, ok] {
        assert_eq!(child.parent_span_id, root.span_context.span_id());
        assert_eq!(child.span_context.trace_id(), root.span_context.trace_id());
        assert!(!child.parent_span_is_remote);
    }
    assert!(
        matches!(&failed.status, Status::Error { description } if description == "UpstreamError: rate limited")
    );
    assert_eq!(failed.events.events[0].name, "exception");
    assert_eq!(
        attr(ok, ATTR_TOKEN_USAGE).map(|v| v.as_str().into_owned()),
        Some(r#"{"input_tokens":3,"output_tokens":4,"total_tokens":7}"#.into())
    );
    assert_eq!(attr(ok, ATTR_STREAMING), Some(&OtelValue::Bool(true)));
    assert_eq!(attr(failed, ATTR_STREAMING), None);
    let stats = telemetry.stats();
    assert_eq!(
        (stats.exported_spans, stats.exported_traces, stats.queued),
        (3, 1, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_off_and_aborts() {
    let recorder = Recorder::default();
    let telemetry = Telemetry::build(settings(false, 100), recorder.clone(), None);
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
    drop(dangling);
    drop(inv); // the client went away
    telemetry.flush().await;
    let spans = recorder.spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 3);
    let dump = format!("{spans:?}");
    assert!(!dump.contains("SECRET-PROMPT"), "{dump}");
    let root = spans.iter().find(|s| s.name == "gateway/chat").unwrap();
    assert!(root.links.links.is_empty());
    assert!(attr(root, ATTR_LINKED_TRACE_ID).is_none());
    assert!(
        matches!(&root.status, Status::Error { description } if description.contains("aborted"))
    );
    assert_eq!(
        attr(root, ATTR_INPUTS).map(|v| v.as_str().into_owned()),
        Some(r#"{"content_omitted":true,"messages":1}"#.into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_drops_are_counted() {
    let recorder = Recorder::default();
    *recorder.mode.lock().unwrap() = Mode::Fail;
    let telemetry = Telemetry::build(settings(true, 1000), recorder.clone(), None);
    for _ in 0..10 {
        telemetry
            .start_invocation(RequestType::UnifiedChat, None, None, &json!({}))
            .finish(None, None);
    }
    telemetry.flush().await;
    let s = telemetry.stats();
    assert_eq!((s.failed_spans, s.exported_spans, s.queued), (10, 0, 0));

    // A server that never answers: exports are abandoned at the timeout, the queue fills
    // up, and spans beyond it are dropped, all without blocking the caller.
    *recorder.mode.lock().unwrap() = Mode::Hang;
    let telemetry = Telemetry::build(settings(true, 5), recorder.clone(), None);
    let started = std::time::Instant::now();
    for _ in 0..50 {
        telemetry
            .start_invocation(RequestType::UnifiedChat, None, None, &json!({}))
            .finish(None, None);
    }
    assert!(started.elapsed() < Duration::from_millis(200));
    let s = telemetry.stats();
    assert!(s.dropped_spans >= 45, "{s:?}");
    assert!(s.queued <= 5, "{s:?}");
    telemetry.shutdown(Duration::from_secs(2)).await;
    let s = telemetry.stats();
    assert_eq!(s.dropped_spans + s.failed_spans + s.queued, 50, "{s:?}");
    // After shutdown nothing is traced.
    assert!(
        telemetry
            .start_invocation(RequestType::UnifiedChat, None, None, &json!({}))
            .trace_id()
            .is_none()
    );
}

/// With the queue full, a trace is dropped whole at its start: nothing is built or
/// serialized for it, it keeps a trace id, and it and its spans are counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_traces_before_building_them() {
    let recorder = Recorder::default();
    *recorder.mode.lock().unwrap() = Mode::Hang;
    let telemetry = Telemetry::build(settings(true, 2), recorder.clone(), None);
    let response = json!({"choices": [{"message": {"content": "answer"}}]});
    let first = telemetry.start_invocation(RequestType::UnifiedChat, None, None, &json!({}));
    assert!(first.is_traced());
    let outputs = first.outputs(&response);
    first
        .start_attempt("openai", "m", "chat", false)
        .succeed_with(None, Some(&outputs));
    first.finish_with(Some(&outputs), None);
    assert_eq!(telemetry.stats().queued, 2);
    for _ in 0..10 {
        let shed = telemetry.start_invocation(RequestType::UnifiedChat, None, None, &json!({}));
        assert!(!shed.is_traced());
        assert!(shed.trace_id().is_some_and(|id| id.starts_with("tr-")));
        assert!(
            shed.outputs(&response).0.is_none(),
            "serialized for nothing"
        );
        shed.start_attempt("openai", "m", "chat", false)
            .fail("UpstreamError", "429", Some(429));
        shed.start_attempt("openai", "m2", "chat", false)
            .succeed(None, Some(&response));
        shed.finish(Some(&response), None);
    }
    // One more, abandoned (the client went away): its root still counts.
    drop(telemetry.start_invocation(RequestType::UnifiedChat, None, None, &json!({})));
    let s = telemetry.stats();
    assert_eq!(
        (s.dropped_traces, s.dropped_spans, s.queued),
        (11, 31, 2),
        "{s:?}"
    );
}

/// The SDK shuts its provider down when the last clone goes; that must not block a runtime
/// thread, even on a current-thread runtime where the export task cannot run meanwhile.
#[tokio::test]
async fn dropping_without_shutdown_does_not_block() {
    let recorder = Recorder::default();
    *recorder.mode.lock().unwrap() = Mode::Hang;
    let telemetry = Telemetry::build(settings(true, 100), recorder, None);
    let invocation = telemetry.start_invocation(RequestType::UnifiedChat, None, None, &json!({}));
    let attempt = invocation.start_attempt("openai", "m", "chat", false);
    invocation.finish(None, None);
    let started = std::time::Instant::now();
    drop(telemetry);
    drop(attempt); // the last reference to the provider
    assert!(started.elapsed() < Duration::from_millis(100));
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

/// A local tracking server that records, in order, what reaches it: `info <trace id>` for a
/// StartTraceV3 request, `spans <status>` for an OTLP batch. It refuses the first
/// `refuse_spans` batches with 503, holds the first `slow_infos` info requests for 2 s, and
/// answers the first `failing_infos` info requests with 500.
async fn recording_server(
    refuse_spans: usize,
    slow_infos: usize,
    failing_infos: usize,
) -> (Url, Arc<Mutex<Vec<String>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let left = Arc::new((
        AtomicUsize::new(refuse_spans),
        AtomicUsize::new(slow_infos),
        AtomicUsize::new(failing_infos),
    ));
    let (info_log, info_left) = (Arc::clone(&log), Arc::clone(&left));
    let (span_log, span_left) = (Arc::clone(&log), Arc::clone(&left));
    let app = axum::Router::new()
        .route(
            "/api/3.0/mlflow/traces",
            axum::routing::post(move |body: String| async move {
                let body: serde_json::Value = serde_json::from_str(&body).unwrap();
                let id = body["trace"]["trace_info"]["trace_id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                info_log.lock().unwrap().push(format!("info {id}"));
                let slow = info_left
                    .1
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                if slow.is_ok() {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                let fail = info_left
                    .2
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                if fail.is_ok() {
                    return (StatusCode::INTERNAL_SERVER_ERROR, "database is locked");
                }
                (StatusCode::OK, "{}")
            }),
        )
        .route(
            "/v1/traces",
            axum::routing::post(move || async move {
                let refuse = span_left
                    .0
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                let status = if refuse.is_ok() {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                span_log
                    .lock()
                    .unwrap()
                    .push(format!("spans {}", status.as_u16()));
                (status, "")
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (Url::parse(&format!("http://{addr}")).unwrap(), log)
}

/// Both spans of [`one_traced_invocation`]'s trace exported, and the trace counted as exported.
fn assert_the_trace_was_exported(telemetry: &Telemetry) {
    let s = telemetry.stats();
    assert_eq!(
        (s.exported_spans, s.exported_traces, s.failed_traces),
        (2, 1, 0),
        "{s:?}"
    );
}

async fn one_traced_invocation(uri: Url) -> (Telemetry, String) {
    let mut config = TelemetryConfig::new(MlflowConfig::new(uri).unwrap(), "7", "chat", "uid-1");
    config.export_timeout = Duration::from_millis(500);
    let telemetry = Telemetry::new(config).unwrap();
    let invocation = telemetry.start_invocation(RequestType::UnifiedChat, None, None, &json!({}));
    let trace_id = invocation.trace_id().unwrap();
    invocation
        .start_attempt("openai", "gpt-4o", "chat", false)
        .succeed(None, None);
    invocation.finish(None, None);
    telemetry.flush().await;
    (telemetry, trace_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_info_goes_before_its_spans() {
    let (uri, log) = recording_server(0, 0, 0).await;
    let (telemetry, trace_id) = one_traced_invocation(uri).await;
    assert_eq!(
        *log.lock().unwrap(),
        [format!("info {trace_id}"), "spans 200".to_string()]
    );
    assert_the_trace_was_exported(&telemetry);
}

/// A batch refused after its trace info was stored is sent again: no trace is left with an
/// info and no spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_after_its_infos_gets_a_second_try() {
    let (uri, log) = recording_server(1, 0, 0).await;
    let (telemetry, trace_id) = one_traced_invocation(uri).await;
    assert_eq!(
        *log.lock().unwrap(),
        [
            format!("info {trace_id}"),
            "spans 503".to_string(),
            "spans 200".to_string()
        ]
    );
    let s = telemetry.stats();
    assert_eq!(
        (
            s.exported_spans,
            s.failed_spans,
            s.exported_traces,
            s.failed_traces
        ),
        (2, 0, 1, 0),
        "{s:?}"
    );
}

/// An info that takes longer than the stage allows does not hold its batch: the spans go,
/// then the info is posted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_info_is_posted_after_its_spans() {
    let (uri, log) = recording_server(0, 1, 0).await;
    let (telemetry, trace_id) = one_traced_invocation(uri).await;
    assert_eq!(
        *log.lock().unwrap(),
        [
            format!("info {trace_id}"),
            "spans 200".to_string(),
            format!("info {trace_id}")
        ]
    );
    assert_the_trace_was_exported(&telemetry);
}

/// StartTraceV3 answers 500 only when the server fails (a locked sqlite database under load: it
/// has no business-rule 500 like the experiments API's INVALID_STATE), so the info is tried
/// again rather than lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_info_answered_500_is_tried_again() {
    let (uri, log) = recording_server(0, 0, 1).await;
    let (telemetry, trace_id) = one_traced_invocation(uri).await;
    assert_eq!(
        *log.lock().unwrap(),
        [
            format!("info {trace_id}"),
            format!("info {trace_id}"),
            "spans 200".to_string()
        ]
    );
    assert_the_trace_was_exported(&telemetry);
}

/// The hot path's cost, and the whole pipeline's CPU per invocation (span creation, OTLP
/// protobuf encoding and HTTP export to a local sink that answers 200 at once). Run with
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
    let mut config = TelemetryConfig::new(
        MlflowConfig::new(Url::parse(&format!("http://{addr}")).unwrap()).unwrap(),
        "1",
        "chat",
        "uid",
    );
    config.max_queue_spans = 1 << 16;
    let settings = Settings::from_config(&config).unwrap();
    let transport = Transport::new(&config.mlflow, config.export_timeout).unwrap();
    let http = ExportHttp::new(Arc::new(transport), "1").unwrap();
    let otlp = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(http)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("http://{addr}/v1/traces"))
        .build()
        .unwrap();
    // No trace-info requests: this measures the span pipeline.
    let telemetry = Telemetry::build(settings, otlp, None);

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
    telemetry.flush().await;
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
    assert_eq!(stats.dropped_spans + stats.failed_spans, 0, "{stats:?}");
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
