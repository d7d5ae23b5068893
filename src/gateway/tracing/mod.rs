//! The gateway's MLflow traces: one trace per LLM invocation, in the shape MLflow's own AI gateway
//! writes, queued and delivered in the background so that a slow or dead tracking server never
//! fails or slows a request, and loses no trace within the queue's bound. This file is the trace
//! API request handling calls (start an invocation, its attempts, record outputs and usage); the
//! pieces it drives live beside it.
//!
//! # Shape
//!
//! ```text
//! gateway/<endpoint>               root, no parent; mlflow.spanInputs = request, mlflow.spanOutputs =
//!  |                               response; endpoint_id, endpoint_name; mlflow.traceTag.mlflow.traceName
//!  |- provider/<provider>/<model>  one per attempt: mlflow.spanType=LLM, mlflow.llm.provider,
//!  '- provider/<provider>/<model>  mlflow.llm.model, method (+ streaming=true), mlflow.chat.tokenUsage;
//!                                  a failed attempt has status ERROR and an "exception" event
//! gateway metadata: mlflow.gateway.endpointId, mlflow.gateway.requestType, mlflow.gateway.caller,
//! and for an authenticated caller mlflow.auth.username, mlflow.auth.userId, mlflow.trace.user
//! (also user.id on the root): trace metadata or tags by the export mode (see below);
//! mlflow.trace.tokenUsage and mlflow.trace.cost (summed by the server)
//! trace tag: mlflow.traceName = gateway/<endpoint>
//! ```
//!
//! # Pipeline
//!
//! No OpenTelemetry SDK span is built: each span is one buffer that grows into the body of an
//! OTLP protobuf `Span` as the request goes ([`record::SpanBuf`]). When the root and every attempt
//! have ended, the trace is written once as a queue *record* (the gateway metadata, the framed
//! attempts, the root's body: [`record`]) and pushed into the trace queue ([`queue`]), which never
//! blocks a request: it keeps records in memory and, with `GATEWAY_TRACE_QUEUE_DIR`, on disk, up
//! to `GATEWAY_TRACE_QUEUE_MAX_BYTES`. A trace started while the queue is full is dropped whole
//! at its start (nothing is built; it keeps a trace id), one that no longer fits at its end is
//! dropped then; both are counted (`traces_dropped_total{reason="queue_full"}`).
//!
//! The delivery task ([`delivery`], on a thread of its own) takes records oldest first, batches
//! them into one `ExportTraceServiceRequest` by copying bytes (a few length prefixes, no
//! decoding), and posts it to `<tracking uri>/v1/traces` through the MLflow transport
//! ([`crate::mlflow::Transport`]: TLS, User-Agent and the credentials, which live only there) with
//! `x-mlflow-experiment-id`. While MLflow is down or failing the same batch is sent again after a
//! pause (0.5 s doubling to 30 s); a batch refused with a 4xx is split down to the trace MLflow
//! refuses, which is dropped and counted (`reason="rejected"`). A batch is acknowledged to the
//! queue (its durable cursor) only once settled. On SIGTERM ([`Telemetry::shutdown`]) new
//! invocations are not traced, the queue is written to disk, and delivery goes on until the grace
//! period is up; the rest is delivered by the next process.
//!
//! # Export modes (`GATEWAY_TRACE_EXPORT_MODE`)
//!
//! MLflow's OTLP handler (`mlflow/server/otel_api.py` → `SqlAlchemyStore.log_spans`) derives the
//! trace's state, times, previews, token usage, cost, the user from `user.id`, and tags from
//! root-span attributes `mlflow.traceTag.<key>`, but turns no other span attribute into trace
//! metadata; `mlflow.gateway.*` metadata needs one StartTraceV3 request per trace.
//!
//! * `info-then-spans`: per batch of at most 32 traces, their trace infos (StartTraceV3, 4 at a
//!   time, for at most 1 s), then their spans: a trace shows complete within about a second of its
//!   info; MLflow creates it from the info (about 26 ms of its CPU instead of 45 for the other
//!   order). Infos that had no time go after their spans.
//! * `spans-only` (the default): one OTLP request per batch (up to 64 traces, 2 MiB); every
//!   gateway metadata key rides on the root span as `mlflow.traceTag.<key>`; a new trace appears
//!   complete at once.
//! * `adaptive`: `info-then-spans` while the queue keeps up; `spans-only` while it is behind
//!   (its oldest trace older than 2 s, or more than 32 traces waiting); infos that had no time in
//!   their stage go as tags with their spans.
//!
//! Where each key lives, as MLflow 3.17.2 stores it (checked by
//! `tests/integration/telemetry_mlflow.rs`, `*_mode_stores_*`):
//!
//! | key | info-then-spans (and adaptive keeping up) | spans-only (and adaptive behind) |
//! |---|---|---|
//! | `mlflow.gateway.endpointId`, `.requestType`, `.caller` | trace metadata | trace tags |
//! | `mlflow.auth.username`, `mlflow.auth.userId` | trace metadata | trace tags |
//! | `mlflow.trace.user` | trace metadata | trace metadata (from `user.id`) and a tag |
//! | `mlflow.trace_schema.version` = 3, `mlflow.trace.infoFinalized` | trace metadata | absent |
//! | `mlflow.trace.tokenUsage`, `mlflow.trace.cost` | trace metadata (server) | trace metadata (server) |
//! | `mlflow.traceName` | tag | tag |
//! | previews, state, times, spans | trace info | trace info |
//!
//! Search by the metadata of MLflow's own gateway (`metadata.\`mlflow.gateway.caller\``) in the
//! first mode, by tags (`tags.\`mlflow.gateway.caller\``) in the second.
//!
//! # Files
//!
//! This file is the trace API that request handling uses ([`Telemetry`], [`Invocation`],
//! [`Attempt`]); [`context`] what a trace takes from the request (caller, `traceparent`);
//! [`schema`] holds the names MLflow reads and [`RequestType`], [`capture`] what
//! of the content goes into spans, [`record`] the protobuf spans and queue records, [`counters`]
//! the accounting, [`delivery`] the delivery task and the modes, [`trace_info`] the StartTraceV3
//! client, [`http`] the export's requests (through the MLflow transport). Nothing here imports
//! from the rest of the gateway.

mod capture;
mod context;
mod counters;
mod delivery;
mod http;
pub mod queue;
mod record;
mod schema;
mod settings;
#[cfg(test)]
mod tests;
mod trace_info;

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::mlflow::Transport;
use capture::{content_attribute, cut_content, error_message, record_error, summary_of};
use context::clean_caller;
use counters::Counters;
use delivery::{Delivery, ExportThread, retried_since};
use http::ExportHttp;
use queue::{QueueConfig, TraceQueue};
use record::{
    Head, KIND_CLIENT, KIND_SERVER, STATUS_ERROR, STATUS_OK, SpanBuf, Value, append_child,
    encode_record, now_ns,
};
use schema::*;
use trace_info::TraceInfoPoster;

pub use capture::MAX_CONTENT_BYTES;
pub use context::{caller_from, caller_from_headers, parse_traceparent};
pub use counters::ExportStats;
pub use delivery::ExportMode;
pub use schema::{CALLER_HEADER, EXPERIMENT_ID_HEADER, RequestType};
use settings::Settings;
pub use settings::{MAX_BATCH_BYTES, TelemetryConfig, TelemetryError};

/// One endpoint's trace export. Cheap to clone; clones share the export pipeline.
#[derive(Clone)]
pub struct Telemetry {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    queue: TraceQueue,
    counters: Arc<Counters>,
    /// Set by `shutdown`: new invocations are not traced.
    closed: AtomicBool,
    capture_content: bool,
    export_timeout: Duration,
    root_name: String,
    endpoint_id: String,
    endpoint_name: String,
    experiment_id: String,
    delivery: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Ends (the delivery task with it) when the last reference goes.
    _export_thread: Option<ExportThread>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            None => f.write_str("Telemetry(disabled)"),
            Some(inner) => f
                .debug_struct("Telemetry")
                .field("experiment_id", &inner.experiment_id)
                .field("root_span", &inner.root_name)
                .field("capture_content", &inner.capture_content)
                .field("stats", &inner.counters.stats())
                .finish_non_exhaustive(),
        }
    }
}

impl Telemetry {
    /// Opens the queue (recovering what a previous process left on disk) and starts the
    /// delivery task for one endpoint. Must be called inside a tokio runtime.
    pub fn new(config: TelemetryConfig) -> Result<Self, TelemetryError> {
        tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
        let settings = Settings::from_config(&config)?;
        let transport = Arc::new(Transport::new(&config.mlflow, config.export_timeout)?);
        let http =
            ExportHttp::new(Arc::clone(&transport), &config.experiment_id).ok_or_else(|| {
                TelemetryError::Invalid("experiment_id is not usable in an HTTP header".to_string())
            })?;
        let http = http
            .in_workspace(config.workspace.as_deref())
            .ok_or_else(|| {
                TelemetryError::Invalid("the workspace is not usable in an HTTP header".to_string())
            })?;
        let uri = |path: &str| {
            let url = transport.url(path);
            axum::http::Uri::try_from(url.as_str())
                .map_err(|e| TelemetryError::Invalid(format!("tracking URI {url}: {e}")))
        };
        let otlp_uri = uri("v1/traces")?;
        let poster = TraceInfoPoster {
            http: http.clone(),
            uri: uri("api/3.0/mlflow/traces")?,
            experiment_id: config.experiment_id.clone(),
            trace_name: settings.root_name.clone(),
        };
        tracing::info!(
            experiment_id = %config.experiment_id,
            workspace = config.workspace.as_deref().unwrap_or("-"),
            endpoint = %config.endpoint_name,
            tracking_uri = %config.mlflow.tracking_uri(),
            capture_content = config.capture_content,
            export_mode = config.export_mode.as_str(),
            queue_dir = config.queue_dir.as_ref().map(|d| d.display().to_string()).as_deref().unwrap_or("(memory)"),
            queue_max_bytes = config.queue_max_bytes,
            "exporting gateway traces to MLflow"
        );
        Self::build(settings, http, otlp_uri, Some(poster))
    }

    fn build(
        settings: Settings,
        http: ExportHttp,
        otlp_uri: axum::http::Uri,
        poster: Option<TraceInfoPoster>,
    ) -> Result<Self, TelemetryError> {
        let (queue, reader) = queue::open(QueueConfig {
            dir: settings.queue_dir.clone(),
            max_bytes: settings.queue_max_bytes,
        })
        .map_err(|e| TelemetryError::Queue(e.to_string()))?;
        let counters = Arc::new(Counters::default());
        let delivery = Delivery {
            http,
            otlp_uri,
            poster,
            counters: Arc::clone(&counters),
            queue: queue.clone(),
            mode: settings.export_mode,
            max_batch: settings.max_export_batch,
            max_batch_bytes: MAX_BATCH_BYTES,
            export_timeout: settings.export_timeout,
            experiment_id: settings.experiment_id.clone(),
        };
        // Encoding and sending run on a thread of their own: never on a runtime thread that
        // serves requests.
        let export_thread = ExportThread::start();
        let task = match &export_thread {
            Some(thread) => thread.handle.spawn(delivery.run(reader)),
            None => tokio::spawn(delivery.run(reader)),
        };
        Ok(Telemetry {
            inner: Some(Arc::new(Inner {
                queue,
                counters,
                closed: AtomicBool::new(false),
                capture_content: settings.capture_content,
                export_timeout: settings.export_timeout,
                endpoint_id: settings.endpoint_id,
                endpoint_name: settings.endpoint_name,
                root_name: settings.root_name,
                experiment_id: settings.experiment_id,
                delivery: Mutex::new(Some(task)),
                _export_thread: export_thread,
            })),
        })
    }

    /// Usage tracking off: every call is a no-op and nothing is exported.
    pub fn disabled() -> Self {
        Telemetry { inner: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub fn stats(&self) -> ExportStats {
        let Some(inner) = &self.inner else {
            return ExportStats::default();
        };
        let queue = inner.queue.stats();
        ExportStats {
            queued: queue.traces,
            queue_bytes: queue.bytes,
            oldest_age: queue.oldest_age,
            ..inner.counters.stats()
        }
    }

    /// Starts one invocation's trace.
    ///
    /// `request_type`: what the client called, e.g. [`RequestType::UnifiedChat`]. `caller`: see [`caller_from`].
    /// `traceparent`: the incoming W3C header, if any; a valid one links the gateway's trace (a
    /// new trace, rooted at `gateway/<endpoint>`) to the caller's span, a malformed one is
    /// ignored. `inputs`: the request body.
    pub fn start_invocation(
        &self,
        request_type: RequestType,
        caller: Option<&str>,
        traceparent: Option<&str>,
        inputs: &serde_json::Value,
    ) -> Invocation {
        self.start_invocation_of(request_type, caller, traceparent, inputs, None)
    }

    /// [`Telemetry::start_invocation`] of a request whose JSON text is at hand (`json`, the text
    /// `inputs` was parsed from, as the client sent it): that text is kept, not serialized again.
    pub fn start_invocation_of(
        &self,
        request_type: RequestType,
        caller: Option<&str>,
        traceparent: Option<&str>,
        inputs: &serde_json::Value,
        json: Option<&[u8]>,
    ) -> Invocation {
        let Some(inner) = &self.inner else {
            return Invocation::disabled();
        };
        if inner.closed.load(Ordering::Relaxed) {
            return Invocation::disabled();
        }
        let trace_id = fastrand::u128(1..).to_be_bytes();
        if !inner.queue.has_room() {
            // Shed before any work: a trace that would not fit is not built at all. Its spans
            // (the root now, each attempt as it starts) are counted as dropped.
            inner.counters.drop_trace(0);
            return Invocation {
                inner: None,
                shed: Some(Shed {
                    counters: Arc::clone(&inner.counters),
                    trace_id,
                }),
            };
        }
        let inputs = match json {
            Some(json) if inner.capture_content => cut_content(String::from_utf8_lossy(json)),
            _ => content_attribute(inputs, inner.capture_content),
        };
        let span_id = fastrand::u64(1..).to_be_bytes();
        let mut root = SpanBuf::start(
            &trace_id,
            &span_id,
            None,
            &inner.root_name,
            KIND_SERVER,
            inputs.len() * 2 + 512,
        );
        root.str(ATTR_SPAN_TYPE, "UNKNOWN");
        root.str(ATTR_ENDPOINT_ID, &inner.endpoint_id);
        root.str(ATTR_ENDPOINT_NAME, &inner.endpoint_name);
        root.str(ATTR_TRACE_NAME_TAG, &inner.root_name);
        root.str(META_REQUEST_TYPE, request_type.as_str());
        let mut metadata = Vec::with_capacity(6);
        metadata.push((META_ENDPOINT_ID, inner.endpoint_id.clone()));
        metadata.push((META_REQUEST_TYPE, request_type.as_str().to_string()));
        if let Some(caller) = caller.and_then(clean_caller) {
            root.str(META_CALLER, &caller);
            metadata.push((META_CALLER, caller));
        }
        if let Some(format) = request_type.message_format() {
            root.str(ATTR_MESSAGE_FORMAT, format);
        }
        root.str(ATTR_INPUTS, &inputs);
        if let Some(parent) = traceparent.and_then(parse_traceparent) {
            root.str(ATTR_LINKED_TRACE_ID, &mlflow_trace_id(parent.trace_id()));
            root.link(&parent.trace_id().to_bytes(), &parent.span_id().to_bytes());
        }
        Invocation {
            inner: Some(Box::new(InvocationInner {
                root,
                metadata,
                trace: Arc::new(TraceShared {
                    telemetry: Arc::clone(inner),
                    trace_id,
                    span_id,
                    start_ns: now_ns(),
                    parts: Mutex::new(Parts::default()),
                }),
            })),
            shed: None,
        }
    }

    /// Waits until the traces finished so far are delivered (stored or refused), or until the
    /// delivery pauses to try again (MLflow is down: they wait in the queue), at most about
    /// three export timeouts.
    pub async fn flush(&self) {
        let Some(inner) = &self.inner else { return };
        let target = inner.counters.pushed.load(Ordering::Relaxed);
        let retries = inner.counters.retries.load(Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + inner.export_timeout.saturating_mul(3);
        while inner.counters.settled.load(Ordering::Relaxed) < target
            && !retried_since(&inner.counters, retries)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// On SIGTERM: new invocations are not traced from now on; the queue is written to disk
    /// (what is not delivered then survives a restart); delivery goes on until everything is
    /// delivered or `timeout` is up (or, with the queue on disk, until MLflow fails), then stops.
    pub async fn shutdown(&self, timeout: Duration) {
        let Some(inner) = &self.inner else { return };
        if inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let queue = inner.queue.clone();
        let flush_by = std::time::Instant::now() + timeout;
        let _ = tokio::task::spawn_blocking(move || queue.flush(flush_by)).await;
        let target = inner.counters.pushed.load(Ordering::Relaxed);
        // With the queue on disk, MLflow failing ends the wait: the next process delivers.
        let durable = inner.queue.stats().durable;
        let retries = inner.counters.retries.load(Ordering::Relaxed);
        while inner.counters.settled.load(Ordering::Relaxed) < target
            && tokio::time::Instant::now() < deadline
            && !(durable && retried_since(&inner.counters, retries))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(task) = inner.delivery.lock().ok().and_then(|mut t| t.take()) {
            task.abort();
        }
        let stats = self.stats();
        if stats.queued > 0 {
            tracing::warn!(
                queued = stats.queued,
                durable = inner.queue.stats().durable,
                "telemetry shutdown: traces still undelivered after {} ms (kept in the queue's directory, if it has one)",
                timeout.as_millis()
            );
        }
        tracing::info!(stats = ?stats, "telemetry shut down");
    }
}

/// One invocation's trace: its root span `gateway/<endpoint>`. Dropping it without
/// [`Invocation::finish`] ends the root span with the error "aborted" (the client went away).
pub struct Invocation {
    inner: Option<Box<InvocationInner>>,
    /// Set when the trace was dropped at its start (the export queue was full).
    shed: Option<Shed>,
}

/// A trace dropped at its start: it keeps its id (the response header names it) and counts its
/// attempts as dropped spans.
struct Shed {
    counters: Arc<Counters>,
    trace_id: [u8; 16],
}

/// A response as the `mlflow.spanOutputs` of a trace's spans: serialized once (only when the
/// invocation is traced) and shared by the attempt and the root that carry it.
#[derive(Clone, Debug, Default)]
pub struct Outputs(Option<Arc<str>>);

struct InvocationInner {
    root: SpanBuf,
    /// The gateway metadata, written into the record at the end.
    metadata: Vec<(&'static str, String)>,
    trace: Arc<TraceShared>,
}

/// What a trace's spans share: the trace's record is written and queued when the last of them
/// (the root or an attempt) lets go of it.
struct TraceShared {
    telemetry: Arc<Inner>,
    trace_id: [u8; 16],
    /// The root's id: the attempts' parent.
    span_id: [u8; 8],
    start_ns: u64,
    parts: Mutex<Parts>,
}

#[derive(Default)]
struct Parts {
    /// Ended attempts, as framed `ScopeSpans.spans` fields.
    children: Vec<u8>,
    spans: u32,
    /// The ended root's body, its end and error, and the gateway metadata.
    root: Option<Vec<u8>>,
    end_ns: u64,
    error: bool,
    metadata: Vec<(&'static str, String)>,
}

impl Drop for TraceShared {
    fn drop(&mut self) {
        let Ok(parts) = self.parts.get_mut() else {
            return;
        };
        let Some(root) = parts.root.take() else {
            return;
        };
        let head = Head {
            trace_id: self.trace_id,
            start_ns: self.start_ns,
            end_ns: parts.end_ns,
            error: parts.error,
            spans: parts.spans + 1,
            metadata: parts
                .metadata
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect(),
        };
        let record = encode_record(&head, &parts.children, &root);
        let counters = &self.telemetry.counters;
        match self.telemetry.queue.push(record) {
            Ok(()) => counters.pushed(),
            Err(_) => counters.drop_trace(u64::from(head.spans)),
        }
    }
}

impl fmt::Debug for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invocation")
            .field("trace_id", &self.trace_id())
            .finish()
    }
}

fn hex_trace_id(trace_id: &[u8; 16]) -> String {
    mlflow_trace_id(opentelemetry::trace::TraceId::from_bytes(*trace_id))
}

impl Invocation {
    /// A no-op invocation, as a disabled [`Telemetry`] gives.
    pub fn disabled() -> Self {
        Invocation {
            inner: None,
            shed: None,
        }
    }

    /// `tr-<32 hex>`, the MLflow trace id; None when telemetry is disabled.
    pub fn trace_id(&self) -> Option<String> {
        match (&self.inner, &self.shed) {
            (Some(i), _) => Some(hex_trace_id(&i.trace.trace_id)),
            (None, Some(shed)) => Some(hex_trace_id(&shed.trace_id)),
            (None, None) => None,
        }
    }

    /// Records the caller the access check admitted, as MLflow's gateway does under its auth
    /// (trace metadata `mlflow.auth.username`, `mlflow.auth.userId`), and as the trace's user
    /// (`mlflow.trace.user`, the UI's "User"; `user.id` on the root span, from which MLflow
    /// takes the user when the trace has no info). Values are clipped to what metadata holds.
    pub fn set_authenticated_caller(&mut self, username: &str, user_id: Option<&str>) {
        let Some(inv) = &mut self.inner else { return };
        let Some(username) = clean_caller(username) else {
            return;
        };
        inv.root.str(META_AUTH_USERNAME, &username);
        inv.root.str(META_TRACE_USER, &username);
        inv.root.str(ATTR_USER_ID, &username);
        inv.metadata.push((META_AUTH_USERNAME, username.clone()));
        inv.metadata.push((META_TRACE_USER, username));
        if let Some(uid) = user_id.and_then(clean_caller) {
            inv.root.str(META_AUTH_USER_ID, &uid);
            inv.metadata.push((META_AUTH_USER_ID, uid));
        }
    }

    /// Whether this invocation's spans are being built (telemetry on, the trace not dropped).
    pub fn is_traced(&self) -> bool {
        self.inner.is_some()
    }

    fn capture(&self) -> Option<bool> {
        self.inner
            .as_ref()
            .map(|inv| inv.trace.telemetry.capture_content)
    }

    /// `value` (a response) serialized for the spans' outputs, once; empty when not traced.
    pub fn outputs(&self, value: &serde_json::Value) -> Outputs {
        self.outputs_of(value, None)
    }

    /// [`Invocation::outputs`] of a response whose JSON text is at hand (`json`, the text
    /// `value` was parsed from, as the provider sent it): that text is kept, not serialized again.
    pub fn outputs_of(&self, value: &serde_json::Value, json: Option<&[u8]>) -> Outputs {
        let Some(capture) = self.capture() else {
            return Outputs(None);
        };
        let text = match json {
            Some(json) if capture => cut_content(String::from_utf8_lossy(json)),
            _ => content_attribute(value, capture),
        };
        Outputs(Some(Arc::from(text)))
    }

    /// [`Invocation::outputs`] of an answer at hand only as its JSON text, with the lengths of
    /// its top-level lists (for the summary kept without content capture).
    pub fn outputs_of_json(&self, json: &[u8], lists: &[(&str, usize)]) -> Outputs {
        let Some(capture) = self.capture() else {
            return Outputs(None);
        };
        let text = if capture {
            cut_content(String::from_utf8_lossy(json))
        } else {
            summary_of(lists.iter().copied())
        };
        Outputs(Some(Arc::from(text)))
    }

    /// Starts one provider attempt, `provider/<provider>/<model>`. `method`: `chat`,
    /// `chat_stream`, `completions`, `completions_stream` or `embeddings`.
    pub fn start_attempt(
        &self,
        provider: &str,
        model: &str,
        method: &str,
        streaming: bool,
    ) -> Attempt {
        let Some(inv) = &self.inner else {
            if let Some(shed) = &self.shed {
                shed.counters.drop_spans(1);
            }
            return Attempt { inner: None };
        };
        let name = if model.is_empty() {
            Cow::Owned(format!("provider/{provider}"))
        } else {
            Cow::Owned(format!("provider/{provider}/{model}"))
        };
        let capture_content = inv.trace.telemetry.capture_content;
        let mut span = SpanBuf::start(
            &inv.trace.trace_id,
            &fastrand::u64(1..).to_be_bytes(),
            Some(&inv.trace.span_id),
            &name,
            KIND_CLIENT,
            256,
        );
        span.str(ATTR_SPAN_TYPE, "LLM");
        span.str(ATTR_PROVIDER, provider);
        if !model.is_empty() {
            span.str(ATTR_MODEL, model);
        }
        span.str(ATTR_METHOD, method);
        if streaming {
            span.attribute(ATTR_STREAMING, Value::Bool(true));
        }
        Attempt {
            inner: Some(AttemptInner {
                span,
                trace: Arc::clone(&inv.trace),
                capture_content,
            }),
        }
    }

    /// Ends the root span: `outputs` = the response (if any); `error` = Some(message) when the
    /// invocation failed (root status ERROR with an "exception" event).
    pub fn finish(self, outputs: Option<&serde_json::Value>, error: Option<&str>) {
        let outputs = outputs.map(|v| self.outputs(v));
        self.finish_with(outputs.as_ref(), error);
    }

    /// [`Invocation::finish`] with outputs serialized by [`Invocation::outputs`].
    pub fn finish_with(mut self, outputs: Option<&Outputs>, error: Option<&str>) {
        let Some(mut inv) = self.inner.take() else {
            return;
        };
        let capture = inv.trace.telemetry.capture_content;
        if let Some(Outputs(Some(outputs))) = outputs {
            inv.root.str(ATTR_OUTPUTS, outputs);
        }
        match error {
            None => (*inv).end(STATUS_OK, ""),
            Some(message) => {
                let message = error_message(message, "GatewayError", None, capture);
                let status = record_error(&mut inv.root, "GatewayError", message);
                (*inv).end(STATUS_ERROR, &status);
            }
        }
    }
}

impl InvocationInner {
    /// Ends the root: the trace's record goes to the queue now, or when its last attempt ends.
    fn end(self, code: u64, message: &str) {
        let InvocationInner {
            root,
            metadata,
            trace,
        } = self;
        let body = root.end(code, message);
        if let Ok(mut parts) = trace.parts.lock() {
            parts.root = Some(body);
            parts.end_ns = now_ns();
            parts.error = code == STATUS_ERROR;
            parts.metadata = metadata;
        }
    }
}

impl Drop for Invocation {
    fn drop(&mut self) {
        if let Some(shed) = self.shed.take() {
            // The root span, dropped whether the invocation finished or was abandoned.
            shed.counters.drop_spans(1);
        }
        if let Some(mut inv) = self.inner.take() {
            let status = record_error(
                &mut inv.root,
                "Aborted",
                Cow::Borrowed("aborted: the request ended before the gateway finished it"),
            );
            inv.end(STATUS_ERROR, &status);
        }
    }
}

/// One provider attempt. Dropping it without ending it records the error "aborted".
pub struct Attempt {
    inner: Option<AttemptInner>,
}

struct AttemptInner {
    span: SpanBuf,
    trace: Arc<TraceShared>,
    capture_content: bool,
}

impl AttemptInner {
    fn end(self, code: u64, message: &str) {
        let body = self.span.end(code, message);
        if let Ok(mut parts) = self.trace.parts.lock() {
            append_child(&mut parts.children, &body);
            parts.spans += 1;
        }
    }
}

impl fmt::Debug for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attempt")
            .field("active", &self.inner.is_some())
            .finish()
    }
}

impl Attempt {
    /// A no-op attempt.
    pub fn disabled() -> Self {
        Attempt { inner: None }
    }

    /// The provider answered: `usage` from its answer (or the stream's final chunk), `outputs`
    /// its answer (kept only with `capture_content`; MLflow's provider spans carry none).
    pub fn succeed(self, usage: Option<TokenUsage>, outputs: Option<&serde_json::Value>) {
        let outputs = match (&self.inner, outputs) {
            (Some(attempt), Some(v)) if attempt.capture_content => {
                Some(Outputs(Some(Arc::from(content_attribute(v, true)))))
            }
            _ => None,
        };
        self.succeed_with(usage, outputs.as_ref());
    }

    /// [`Attempt::succeed`] with outputs serialized by [`Invocation::outputs`] (the same text
    /// the root gets; kept only with `capture_content`).
    pub fn succeed_with(mut self, usage: Option<TokenUsage>, outputs: Option<&Outputs>) {
        let Some(mut attempt) = self.inner.take() else {
            return;
        };
        if let Some(usage) = usage {
            attempt.span.str(ATTR_TOKEN_USAGE, &usage.to_json());
        }
        if attempt.capture_content
            && let Some(Outputs(Some(outputs))) = outputs
        {
            attempt.span.str(ATTR_OUTPUTS, outputs);
        }
        attempt.end(STATUS_OK, "");
    }

    /// The attempt failed: `error_type` e.g. `UpstreamError`, `Timeout`; `http_status` the
    /// provider's answer status, if it answered.
    pub fn fail(mut self, error_type: &str, message: &str, http_status: Option<u16>) {
        let Some(mut attempt) = self.inner.take() else {
            return;
        };
        if let Some(status) = http_status {
            attempt
                .span
                .attribute(ATTR_HTTP_STATUS, Value::Int(i64::from(status)));
        }
        let message = error_message(message, error_type, http_status, attempt.capture_content);
        let status = record_error(&mut attempt.span, error_type, message);
        attempt.end(STATUS_ERROR, &status);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(mut attempt) = self.inner.take() {
            let status = record_error(
                &mut attempt.span,
                "Aborted",
                Cow::Borrowed("aborted: the attempt was abandoned before it ended"),
            );
            attempt.end(STATUS_ERROR, &status);
        }
    }
}

/// Token counts of one provider answer (`mlflow.chat.tokenUsage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
}

impl TokenUsage {
    fn to_json(self) -> String {
        format!(
            r#"{{"input_tokens":{},"output_tokens":{},"total_tokens":{}}}"#,
            self.input_tokens, self.output_tokens, self.total_tokens
        )
    }
}
