//! The gateway's MLflow traces: one trace per LLM invocation, in the shape MLflow's own AI gateway
//! writes, exported in the background so that a slow or dead tracking server never fails or slows
//! a request.
//!
//! # Shape
//!
//! ```text
//! gateway/<endpoint>               root, no parent; mlflow.spanInputs = request, mlflow.spanOutputs =
//!  |                               response; endpoint_id, endpoint_name; mlflow.traceTag.mlflow.traceName
//!  |- provider/<provider>/<model>  one per attempt: mlflow.spanType=LLM, mlflow.llm.provider,
//!  '- provider/<provider>/<model>  mlflow.llm.model, method (+ streaming=true), mlflow.chat.tokenUsage;
//!                                  a failed attempt has status ERROR and an "exception" event
//! trace metadata: mlflow.gateway.endpointId, mlflow.gateway.requestType, mlflow.gateway.caller
//! (written by the trace-info request, see below); mlflow.trace.tokenUsage (summed by the server)
//! trace tag: mlflow.traceName = gateway/<endpoint>
//! ```
//!
//! # Pipeline
//!
//! A trace started while the queue is full is dropped whole at its start: no span is built and
//! nothing is serialized for it; it keeps a trace id, and it and its spans are counted as dropped
//! (`dropped_traces`, `dropped_spans`). Otherwise spans are OpenTelemetry SDK spans. When one
//! ends, [`GateProcessor`] admits it only while fewer
//! than `max_queue_spans` spans are in flight (ended, not yet exported or failed), else it drops
//! and counts it; admitted spans go to the SDK's tokio `BatchSpanProcessor`
//! (`span_processor_with_async_runtime`), whose queue is larger than the gate so that it never
//! drops on its own. Its exporter is [`CountingExporter`] around the OTLP/HTTP protobuf exporter,
//! which posts to `<tracking uri>/v1/traces` through [`MlflowHttp`] (our reqwest 0.12 client:
//! rustls, the tracking server's CA bundle, `x-mlflow-experiment-id`, and the credentials, which
//! live only there, as sensitive header values). `CountingExporter` counts exported and failed
//! spans and releases the gate, also when the batch processor abandons an export at its timeout.
//!
//! The batch processor's task, its OTLP requests and the trace-info requests run on a
//! current-thread tokio runtime on a thread of its own ([`ExportThread`]): encoding and sending
//! a batch never holds up a runtime thread that serves requests.
//!
//! Why the async-runtime batch processor: the default (thread-based) one drives the exporter's
//! future with `futures_executor::block_on` on its own OS thread, where reqwest's async client
//! has no tokio reactor, so it only works with reqwest's blocking client (another hidden runtime
//! thread per client). The async-runtime flavour is one task on our tokio runtime that awaits the
//! async client; `on_end` is a non-blocking `try_send`. Its `force_flush` and `shutdown` do block
//! the calling thread (`block_on` on a oneshot), so they are only ever called from
//! `spawn_blocking` ([`Telemetry::flush`], [`Telemetry::shutdown`]), never on a runtime thread,
//! and the SDK's shutdown-on-drop is turned into a detached best-effort flush.
//!
//! # Trace metadata
//!
//! The OTLP handler of the tracking server (`mlflow/server/otel_api.py` →
//! `SqlAlchemyStore.log_spans`) derives the trace's state, times, previews, token usage, cost,
//! `user.id`/`session.id` and `mlflow.traceTag.*` tags from the spans, but turns no other span
//! attribute into trace metadata. So one `POST /api/3.0/mlflow/traces` (StartTraceV3) per trace
//! carries the trace info with the gateway metadata.
//!
//! Order: [`CountingExporter`] posts the infos of the batch's root spans (a few at a time, within
//! `export_timeout`) *before* the batch. MLflow then creates each trace from its info (marked
//! final: `mlflow.trace.infoFinalized`) and adds the spans to it, filling in the previews and
//! token usage: the same stored trace as the other order (MLflow's Python SDK sends spans first),
//! for about 26 ms of server CPU instead of 45 on this project's benchmark machine, because the
//! other order makes `start_trace` take its `IntegrityError` merge path. An info stored before a
//! batch that is then lost would leave a trace without spans, so such a batch is sent a second
//! time. Infos the stage had no time for, or skipped because one failed on a transient error
//! after its retries (the server is struggling), are posted after the spans were stored, as the
//! Python SDK does, on a bounded background queue ([`trace_info_worker`]). A root whose children
//! went in an earlier batch also takes the merge path: both orders store the same trace.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags,
    TraceId, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, StringValue};
use opentelemetry_http::{Bytes, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue, USER_AGENT};
use url::Url;

use crate::mlflow::{Auth, ConfigError, MlflowConfig};

// ---------------------------------------------------------------------------------------------
// Names MLflow reads (mlflow/tracing/constant.py, mlflow/gateway/)

/// Header naming the experiment an OTLP request writes to.
pub const EXPERIMENT_ID_HEADER: &str = "x-mlflow-experiment-id";
/// Header a client sets to name itself (MLflow's `X-MLflow-Gateway-Caller`).
pub const CALLER_HEADER: &str = "x-mlflow-gateway-caller";

/// `mlflow.gateway.requestType` values (MLflow's `GatewayRequestType`).
pub mod request_type {
    pub const UNIFIED_CHAT: &str = "unified/chat";
    pub const UNIFIED_EMBEDDINGS: &str = "unified/embeddings";
    pub const PASSTHROUGH_OPENAI_CHAT: &str = "passthrough/model/openai-chat";
    pub const PASSTHROUGH_OPENAI_EMBEDDINGS: &str = "passthrough/model/openai-embeddings";
    pub const PASSTHROUGH_OPENAI_RESPONSES: &str = "passthrough/model/openai-responses";
    pub const PASSTHROUGH_ANTHROPIC_MESSAGES: &str = "passthrough/model/anthropic-messages";
    pub const PASSTHROUGH_GEMINI_GENERATE_CONTENT: &str =
        "passthrough/model/gemini-generateContent";
    pub const RAW_PROXY: &str = "proxy/raw";
}

const ATTR_SPAN_TYPE: &str = "mlflow.spanType";
const ATTR_INPUTS: &str = "mlflow.spanInputs";
const ATTR_OUTPUTS: &str = "mlflow.spanOutputs";
const ATTR_TOKEN_USAGE: &str = "mlflow.chat.tokenUsage";
const ATTR_MODEL: &str = "mlflow.llm.model";
const ATTR_PROVIDER: &str = "mlflow.llm.provider";
const ATTR_MESSAGE_FORMAT: &str = "mlflow.message.format";
const ATTR_TRACE_NAME_TAG: &str = "mlflow.traceTag.mlflow.traceName";
const ATTR_LINKED_TRACE_ID: &str = "mlflow.gateway.linkedTraceId";
const ATTR_ENDPOINT_ID: &str = "endpoint_id";
const ATTR_ENDPOINT_NAME: &str = "endpoint_name";
const ATTR_METHOD: &str = "method";
const ATTR_STREAMING: &str = "streaming";
const ATTR_HTTP_STATUS: &str = "http.response.status_code";
/// Root-span attributes that also become trace metadata (through the trace-info request).
const META_ENDPOINT_ID: &str = "mlflow.gateway.endpointId";
const META_REQUEST_TYPE: &str = "mlflow.gateway.requestType";
const META_CALLER: &str = "mlflow.gateway.caller";
const META_SCHEMA_VERSION: &str = "mlflow.trace_schema.version";
const TAG_TRACE_NAME: &str = "mlflow.traceName";

/// MLflow keeps trace metadata values up to this many characters on every backend.
const MAX_METADATA_CHARS: usize = 250;
/// Longest request or response body kept in a span (bytes of its JSON); longer ones are cut.
pub const MAX_CONTENT_BYTES: usize = 1 << 20;
/// Memory the spans in flight may hold at most (an estimate from their text), on top of the
/// `max_queue_spans` count: large bodies and a slow tracking server must not exhaust memory.
pub const MAX_QUEUE_BYTES: usize = 64 << 20;
/// Longest error message kept in a span.
const MAX_MESSAGE_CHARS: usize = 4096;
/// How long the batch processor waits for more spans before exporting a partial batch.
const SCHEDULED_DELAY: Duration = Duration::from_secs(1);
/// Trace-info requests in flight at once, and attempts per request.
const TRACE_INFO_CONCURRENCY: usize = 4;
const TRACE_INFO_ATTEMPTS: u32 = 3;
/// The pause before a refused span batch is sent a second time.
const SPAN_RETRY_DELAY: Duration = Duration::from_millis(500);

/// How long the batch processor lets one export take: the trace-info stage (at most
/// `export_timeout`), then the span batch, and its second try, each within `export_timeout`.
fn batch_export_limit(export_timeout: Duration) -> Duration {
    export_timeout.saturating_mul(3) + SPAN_RETRY_DELAY
}

// ---------------------------------------------------------------------------------------------
// Public API

/// Where and how one endpoint's invocations are traced.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// Tracking server, auth and TLS.
    pub mlflow: MlflowConfig,
    pub experiment_id: String,
    /// `<endpoint>` in the root span's name `gateway/<endpoint>`.
    pub endpoint_name: String,
    /// Trace metadata `mlflow.gateway.endpointId` (the resource uid).
    pub endpoint_id: String,
    /// `false`: no request or response text anywhere in the trace. Inputs and outputs become
    /// summaries such as `{"content_omitted":true,"messages":3}` (counts of the top-level arrays
    /// `messages`, `input`, `contents`, `choices`, `data`, `content`, `candidates`, `output`), and
    /// error messages (which may quote an upstream answer) are replaced by their error type and
    /// HTTP status.
    pub capture_content: bool,
    /// Spans ended but not yet exported, at most; beyond it (or beyond [`MAX_QUEUE_BYTES`] of
    /// their text) spans are dropped and counted.
    pub max_queue_spans: usize,
    /// Spans per OTLP request, at most.
    pub max_export_batch: usize,
    /// Time limit of one OTLP request (and of one trace-info request).
    pub export_timeout: Duration,
}

impl TelemetryConfig {
    pub const DEFAULT_MAX_QUEUE_SPANS: usize = 4096;
    pub const DEFAULT_MAX_EXPORT_BATCH: usize = 512;
    pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Content captured, default queue, batch and timeout.
    pub fn new(
        mlflow: MlflowConfig,
        experiment_id: impl Into<String>,
        endpoint_name: impl Into<String>,
        endpoint_id: impl Into<String>,
    ) -> Self {
        TelemetryConfig {
            mlflow,
            experiment_id: experiment_id.into(),
            endpoint_name: endpoint_name.into(),
            endpoint_id: endpoint_id.into(),
            capture_content: true,
            max_queue_spans: Self::DEFAULT_MAX_QUEUE_SPANS,
            max_export_batch: Self::DEFAULT_MAX_EXPORT_BATCH,
            export_timeout: Self::DEFAULT_EXPORT_TIMEOUT,
        }
    }
}

/// Export counters since [`Telemetry::new`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Spans ended and admitted but not yet exported or failed (a gauge).
    pub queued: u64,
    /// Spans the tracking server accepted.
    pub exported_spans: u64,
    /// Spans dropped because `max_queue_spans` were in flight (or telemetry was shut down),
    /// including the spans of traces dropped whole at their start (never built).
    pub dropped_spans: u64,
    /// Traces dropped whole at their start because the export queue was full: none of their
    /// spans was built (no request or response was serialized for them).
    pub dropped_traces: u64,
    /// Spans in OTLP requests that failed or timed out.
    pub failed_spans: u64,
    /// Traces whose root span was accepted and whose trace info (metadata) was stored.
    pub exported_traces: u64,
    /// Traces whose root span was accepted but whose trace info could not be stored (they lack
    /// the gateway metadata).
    pub failed_traces: u64,
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("Telemetry::new must be called inside a tokio runtime")]
    NoRuntime,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid telemetry setting: {0}")]
    Invalid(String),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

/// One endpoint's trace export. Cheap to clone; clones share the export pipeline.
#[derive(Clone)]
pub struct Telemetry {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    bsp: Arc<BatchSpanProcessor<Tokio>>,
    counters: Arc<Counters>,
    /// Set by `shutdown`: new invocations are not traced, the batch processor is being stopped.
    closed: Arc<AtomicBool>,
    capture_content: bool,
    export_timeout: Duration,
    root_name: String,
    endpoint_id: StringValue,
    endpoint_name: StringValue,
    root_name_value: StringValue,
    experiment_id: String,
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
    /// Starts the export pipeline for one endpoint. Must be called inside a tokio runtime.
    pub fn new(config: TelemetryConfig) -> Result<Self, TelemetryError> {
        tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
        let settings = Settings::from_config(&config)?;
        let http = MlflowHttp::new(&config.mlflow, &config.experiment_id, config.export_timeout)?;
        let otlp = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(http.clone())
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint_url(&config.mlflow.tracking_uri, "v1/traces").as_str())
            .with_timeout(config.export_timeout)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let poster = TraceInfoPoster {
            http,
            uri: endpoint_uri(&config.mlflow.tracking_uri, "api/3.0/mlflow/traces")?,
            experiment_id: config.experiment_id.clone(),
            endpoint_id: truncate_chars(&config.endpoint_id, MAX_METADATA_CHARS).into_owned(),
            trace_name: settings.root_name.clone(),
        };
        tracing::info!(
            experiment_id = %config.experiment_id,
            endpoint = %config.endpoint_name,
            tracking_uri = %config.mlflow.tracking_uri,
            capture_content = config.capture_content,
            "exporting gateway traces to MLflow"
        );
        Ok(Self::build(settings, otlp, Some(poster)))
    }

    /// Usage tracking off: every call is a no-op and nothing is exported.
    pub fn disabled() -> Self {
        Telemetry { inner: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub fn stats(&self) -> ExportStats {
        self.inner
            .as_ref()
            .map(|i| i.counters.stats())
            .unwrap_or_default()
    }

    /// Starts one invocation's trace.
    ///
    /// `request_type`: e.g. [`request_type::UNIFIED_CHAT`]. `caller`: see [`caller_from`].
    /// `traceparent`: the incoming W3C header, if any; a valid one links the gateway's trace (a
    /// new trace, rooted at `gateway/<endpoint>`) to the caller's span, a malformed one is
    /// ignored. `inputs`: the request body.
    pub fn start_invocation(
        &self,
        request_type: &str,
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
        request_type: &str,
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
        if inner.counters.queue_full() {
            // Shed before any work: a trace that would be dropped at the gate is not built at
            // all. Its spans (the root now, each attempt as it starts) are counted as dropped.
            inner.counters.drop_trace();
            return Invocation {
                inner: None,
                shed: Some(Shed {
                    counters: Arc::clone(&inner.counters),
                    trace_id: TraceId::from_bytes(fastrand::u128(1..).to_be_bytes()),
                }),
            };
        }
        let mut attributes = Vec::with_capacity(10);
        attributes.push(KeyValue::new(ATTR_SPAN_TYPE, "UNKNOWN"));
        attributes.push(KeyValue::new(ATTR_ENDPOINT_ID, inner.endpoint_id.clone()));
        attributes.push(KeyValue::new(
            ATTR_ENDPOINT_NAME,
            inner.endpoint_name.clone(),
        ));
        attributes.push(KeyValue::new(
            ATTR_TRACE_NAME_TAG,
            inner.root_name_value.clone(),
        ));
        attributes.push(KeyValue::new(
            META_REQUEST_TYPE,
            truncate_chars(request_type, MAX_METADATA_CHARS).into_owned(),
        ));
        if let Some(caller) = caller.and_then(clean_caller) {
            attributes.push(KeyValue::new(META_CALLER, caller));
        }
        if let Some(format) = message_format(request_type) {
            attributes.push(KeyValue::new(ATTR_MESSAGE_FORMAT, format));
        }
        let inputs = match json {
            Some(json) if inner.capture_content => cut_content(String::from_utf8_lossy(json)),
            _ => content_attribute(inputs, inner.capture_content),
        };
        attributes.push(KeyValue::new(ATTR_INPUTS, inputs));
        let mut builder = inner
            .tracer
            .span_builder(inner.root_name.clone())
            .with_kind(SpanKind::Server);
        if let Some(parent) = traceparent.and_then(parse_traceparent) {
            attributes.push(KeyValue::new(
                ATTR_LINKED_TRACE_ID,
                mlflow_trace_id(parent.trace_id()),
            ));
            builder = builder.with_links(vec![Link::with_context(parent)]);
        }
        // An empty parent context: the root never inherits an ambient span.
        let span = builder
            .with_attributes(attributes)
            .start_with_context(&inner.tracer, &Context::new());
        let context = span.span_context().clone();
        let trace_id = context.trace_id();
        Invocation {
            inner: Some(Box::new(InvocationInner {
                span,
                parent: Context::new().with_remote_span_context(context),
                trace_id,
                telemetry: Arc::clone(inner),
            })),
            shed: None,
        }
    }

    /// Exports everything ended so far and waits for it (and for the trace-info requests it
    /// causes), at most about `2 × export_timeout` plus the trace-info retries.
    pub async fn flush(&self) {
        let Some(inner) = &self.inner else { return };
        let bsp = Arc::clone(&inner.bsp);
        let closed = Arc::clone(&inner.closed);
        let flushed = tokio::task::spawn_blocking(move || {
            if !closed.load(Ordering::Relaxed) {
                let _ = bsp.force_flush();
            }
        });
        let limit = batch_export_limit(inner.export_timeout) + inner.export_timeout;
        let _ = tokio::time::timeout(limit, flushed).await;
        let _ = tokio::time::timeout(
            inner.export_timeout.saturating_mul(TRACE_INFO_ATTEMPTS + 1),
            inner.counters.trace_infos_idle(),
        )
        .await;
    }

    /// Flushes and stops (on SIGTERM), waiting at most `timeout`. Invocations started afterwards
    /// are not traced; spans ending afterwards are dropped (and counted).
    pub async fn shutdown(&self, timeout: Duration) {
        let Some(inner) = &self.inner else { return };
        let deadline = tokio::time::Instant::now() + timeout;
        if !inner.closed.swap(true, Ordering::SeqCst) {
            let bsp = Arc::clone(&inner.bsp);
            let stopped = tokio::task::spawn_blocking(move || bsp.shutdown());
            if tokio::time::timeout_at(deadline, stopped).await.is_err() {
                tracing::warn!(
                    queued = inner.counters.in_flight.load(Ordering::Relaxed),
                    "telemetry shutdown: spans still unexported after {} ms",
                    timeout.as_millis()
                );
            }
            let _ = tokio::time::timeout_at(deadline, inner.counters.trace_infos_idle()).await;
            // Marks the provider shut down; the gate does not stop the batch processor again.
            let _ = inner.provider.shutdown();
            tracing::info!(stats = ?inner.counters.stats(), "telemetry shut down");
        }
    }

    fn build<E: SpanExporter + 'static>(
        settings: Settings,
        exporter: E,
        poster: Option<TraceInfoPoster>,
    ) -> Self {
        let counters = Arc::new(Counters::new(
            settings.max_queue_spans,
            settings.max_queue_bytes,
        ));
        // Everything of the export pipeline (the batch processor's task, its OTLP requests and
        // the trace-info requests, with their connections) runs on a thread of its own, so that
        // encoding and sending a batch never holds up a runtime thread that serves requests.
        let export_thread = ExportThread::start();
        let _in_export_runtime = export_thread.as_ref().map(|t| t.handle.enter());
        let poster = poster.map(Arc::new);
        let (info_tx, info_rx) = tokio::sync::mpsc::channel(settings.max_queue_spans.max(16));
        tokio::spawn(trace_info_worker(
            info_rx,
            poster.clone(),
            Arc::clone(&counters),
        ));
        let exporter = CountingExporter {
            inner: exporter,
            counters: Arc::clone(&counters),
            poster,
            info_budget: settings.export_timeout,
            late_infos: info_tx,
            experiment_id: settings.experiment_id.clone(),
        };
        // The SDK queue is larger than the gate (plus room for flush messages): it never drops.
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(settings.max_queue_spans + 64)
            .with_max_export_batch_size(settings.max_export_batch)
            .with_scheduled_delay(SCHEDULED_DELAY)
            .with_max_export_timeout(batch_export_limit(settings.export_timeout))
            .with_max_concurrent_exports(1)
            .build();
        let bsp = Arc::new(
            BatchSpanProcessor::builder(exporter, Tokio)
                .with_batch_config(batch)
                .build(),
        );
        let closed = Arc::new(AtomicBool::new(false));
        let gate = GateProcessor {
            bsp: Arc::clone(&bsp),
            counters: Arc::clone(&counters),
            closed: Arc::clone(&closed),
            export_thread: std::sync::Mutex::new(export_thread),
        };
        let provider = SdkTracerProvider::builder()
            .with_resource(Resource::builder_empty().build())
            .with_sampler(Sampler::AlwaysOn)
            .with_span_processor(gate)
            .build();
        let tracer = provider.tracer(env!("CARGO_PKG_NAME"));
        Telemetry {
            inner: Some(Arc::new(Inner {
                tracer,
                provider,
                bsp,
                counters,
                closed,
                capture_content: settings.capture_content,
                export_timeout: settings.export_timeout,
                endpoint_id: StringValue::from(Arc::<str>::from(settings.endpoint_id)),
                endpoint_name: StringValue::from(Arc::<str>::from(settings.endpoint_name)),
                root_name_value: StringValue::from(Arc::<str>::from(settings.root_name.as_str())),
                root_name: settings.root_name,
                experiment_id: settings.experiment_id,
            })),
        }
    }
}

/// One invocation's trace: its root span `gateway/<endpoint>`. Dropping it without
/// [`Invocation::finish`] ends the root span with the error "aborted" (the client went away).
pub struct Invocation {
    inner: Option<Box<InvocationInner>>,
    /// Set when the trace was dropped at its start (the export queue was full).
    shed: Option<Shed>,
}

/// A trace dropped at its start: it keeps its id (the response header names it, as it names a
/// trace whose spans are dropped at the gate) and counts its attempts as dropped spans.
struct Shed {
    counters: Arc<Counters>,
    trace_id: TraceId,
}

/// A response as the `mlflow.spanOutputs` of a trace's spans: serialized once (only when the
/// invocation is traced) and shared by the attempt and the root that carry it.
#[derive(Clone, Debug, Default)]
pub struct Outputs(Option<StringValue>);

struct InvocationInner {
    span: opentelemetry_sdk::trace::Span,
    /// The root as a parent for attempts.
    parent: Context,
    trace_id: TraceId,
    telemetry: Arc<Inner>,
}

impl fmt::Debug for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invocation")
            .field("trace_id", &self.trace_id())
            .finish()
    }
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
            (Some(i), _) => Some(mlflow_trace_id(i.trace_id)),
            (None, Some(shed)) => Some(mlflow_trace_id(shed.trace_id)),
            (None, None) => None,
        }
    }

    /// Whether this invocation's spans are being built (telemetry on, the trace not dropped).
    pub fn is_traced(&self) -> bool {
        self.inner.is_some()
    }

    /// `value` (a response) serialized for the spans' outputs, once; empty when not traced.
    pub fn outputs(&self, value: &serde_json::Value) -> Outputs {
        self.outputs_of(value, None)
    }

    /// [`Invocation::outputs`] of a response whose JSON text is at hand (`json`, the text
    /// `value` was parsed from, as the provider sent it): that text is kept, not serialized again.
    pub fn outputs_of(&self, value: &serde_json::Value, json: Option<&[u8]>) -> Outputs {
        let Some(inv) = &self.inner else {
            return Outputs(None);
        };
        let text = match json {
            Some(json) if inv.telemetry.capture_content => {
                cut_content(String::from_utf8_lossy(json))
            }
            _ => content_attribute(value, inv.telemetry.capture_content),
        };
        Outputs(Some(StringValue::from(Arc::<str>::from(text))))
    }

    /// [`Invocation::outputs`] of an answer at hand only as its JSON text, with the lengths of
    /// its top-level lists (for the summary kept without content capture).
    pub fn outputs_of_json(&self, json: &[u8], lists: &[(&str, usize)]) -> Outputs {
        let Some(inv) = &self.inner else {
            return Outputs(None);
        };
        let text = if inv.telemetry.capture_content {
            cut_content(String::from_utf8_lossy(json))
        } else {
            summary_of(lists.iter().copied())
        };
        Outputs(Some(StringValue::from(Arc::<str>::from(text))))
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
            format!("provider/{provider}")
        } else {
            format!("provider/{provider}/{model}")
        };
        let mut attributes = Vec::with_capacity(5);
        attributes.push(KeyValue::new(ATTR_SPAN_TYPE, "LLM"));
        attributes.push(KeyValue::new(ATTR_PROVIDER, provider.to_string()));
        if !model.is_empty() {
            attributes.push(KeyValue::new(ATTR_MODEL, model.to_string()));
        }
        attributes.push(KeyValue::new(ATTR_METHOD, method.to_string()));
        if streaming {
            attributes.push(KeyValue::new(ATTR_STREAMING, true));
        }
        let tracer = &inv.telemetry.tracer;
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(tracer, &inv.parent);
        Attempt {
            inner: Some(AttemptInner {
                span,
                capture_content: inv.telemetry.capture_content,
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
        let capture = inv.telemetry.capture_content;
        if let Some(Outputs(Some(outputs))) = outputs {
            inv.span
                .set_attribute(KeyValue::new(ATTR_OUTPUTS, outputs.clone()));
        }
        match error {
            None => inv.span.set_status(Status::Ok),
            Some(message) => {
                let message = error_message(message, "GatewayError", None, capture);
                record_error(&mut inv.span, "GatewayError", message);
            }
        }
        inv.span.end();
    }
}

impl Drop for Invocation {
    fn drop(&mut self) {
        if let Some(shed) = self.shed.take() {
            // The root span, dropped whether the invocation finished or was abandoned.
            shed.counters.drop_spans(1);
        }
        if let Some(mut inv) = self.inner.take() {
            record_error(
                &mut inv.span,
                "Aborted",
                Cow::Borrowed("aborted: the request ended before the gateway finished it"),
            );
            inv.span.end();
        }
    }
}

/// One provider attempt. Dropping it without ending it records the error "aborted".
pub struct Attempt {
    inner: Option<AttemptInner>,
}

struct AttemptInner {
    span: opentelemetry_sdk::trace::Span,
    capture_content: bool,
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
            (Some(attempt), Some(v)) if attempt.capture_content => Some(Outputs(Some(
                StringValue::from(Arc::<str>::from(content_attribute(v, true))),
            ))),
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
            attempt
                .span
                .set_attribute(KeyValue::new(ATTR_TOKEN_USAGE, usage.to_json()));
        }
        if attempt.capture_content
            && let Some(Outputs(Some(outputs))) = outputs
        {
            attempt
                .span
                .set_attribute(KeyValue::new(ATTR_OUTPUTS, outputs.clone()));
        }
        attempt.span.set_status(Status::Ok);
        attempt.span.end();
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
                .set_attribute(KeyValue::new(ATTR_HTTP_STATUS, i64::from(status)));
        }
        let message = error_message(message, error_type, http_status, attempt.capture_content);
        record_error(&mut attempt.span, error_type, message);
        attempt.span.end();
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(mut attempt) = self.inner.take() {
            record_error(
                &mut attempt.span,
                "Aborted",
                Cow::Borrowed("aborted: the attempt was abandoned before it ended"),
            );
            attempt.span.end();
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

/// The caller's name, as MLflow's gateway derives it: the `X-MLflow-Gateway-Caller` header,
/// else the product token of the `User-Agent` (the part before the first `/`). Trimmed, control
/// characters removed, at most 250 characters; None when nothing is left.
pub fn caller_from(caller_header: Option<&str>, user_agent: Option<&str>) -> Option<String> {
    if let Some(caller) = caller_header.and_then(clean_caller) {
        return Some(caller);
    }
    user_agent
        .and_then(|ua| ua.split('/').next())
        .and_then(clean_caller)
}

/// [`caller_from`] on a request's headers.
pub fn caller_from_headers(headers: &axum::http::HeaderMap) -> Option<String> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    caller_from(get(CALLER_HEADER), get("user-agent"))
}

/// A W3C `traceparent` value as the remote span context it names; None when it is malformed
/// (wrong length or field count, not lowercase hex, all-zero ids, version `ff`).
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut fields = value.trim().split('-');
    let version = fields.next()?;
    let trace_id = fields.next()?;
    let span_id = fields.next()?;
    let flags = fields.next()?;
    // Version 00 has exactly four fields; a later version may append more.
    if version == "00" && fields.next().is_some() {
        return None;
    }
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2) || version == "ff" || !hex(trace_id, 32) || !hex(span_id, 16) {
        return None;
    }
    if !hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        TraceState::default(),
    ))
}

// ---------------------------------------------------------------------------------------------
// Span content helpers

fn mlflow_trace_id(trace_id: TraceId) -> String {
    format!("tr-{trace_id:032x}")
}

fn clean_caller(raw: &str) -> Option<String> {
    let cleaned: String = raw.trim().chars().filter(|c| !c.is_control()).collect();
    let cleaned = cleaned.trim();
    (!cleaned.is_empty()).then(|| truncate_chars(cleaned, MAX_METADATA_CHARS).into_owned())
}

/// `mlflow.message.format` for request types whose answers are not OpenAI-shaped (as MLflow's
/// gateway sets it, so that the UI renders the chat).
fn message_format(request_type: &str) -> Option<&'static str> {
    match request_type {
        request_type::PASSTHROUGH_ANTHROPIC_MESSAGES => Some("anthropic"),
        request_type::PASSTHROUGH_GEMINI_GENERATE_CONTENT => Some("gemini"),
        _ => None,
    }
}

/// Top-level arrays counted in a content summary.
const SUMMARY_ARRAYS: [&str; 8] = [
    "messages",
    "input",
    "contents",
    "choices",
    "data",
    "content",
    "candidates",
    "output",
];

/// The span attribute for a request or response body: its JSON (cut at [`MAX_CONTENT_BYTES`]),
/// or without `capture`, a summary that holds no text of it.
fn content_attribute(value: &serde_json::Value, capture: bool) -> String {
    if capture {
        return cut_content(Cow::Owned(serde_json::to_string(value).unwrap_or_default()));
    }
    content_summary(value)
}

/// JSON text as a span attribute: cut at [`MAX_CONTENT_BYTES`].
fn cut_content(json: Cow<'_, str>) -> String {
    if json.len() <= MAX_CONTENT_BYTES {
        return json.into_owned();
    }
    let mut end = MAX_CONTENT_BYTES;
    while !json.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated: {} bytes in all]", &json[..end], json.len())
}

fn content_summary(value: &serde_json::Value) -> String {
    let lists = SUMMARY_ARRAYS
        .iter()
        .filter_map(|&key| match value.get(key) {
            Some(serde_json::Value::Array(items)) => Some((key, items.len())),
            _ => None,
        });
    summary_of(lists)
}

/// `{"content_omitted":true,"<list>":<length>,...}`, the lists in [`SUMMARY_ARRAYS`] order.
fn summary_of<'a>(lists: impl Iterator<Item = (&'a str, usize)> + Clone) -> String {
    use std::fmt::Write as _;
    let mut summary = String::from(r#"{"content_omitted":true"#);
    for key in SUMMARY_ARRAYS {
        if let Some((_, len)) = lists.clone().find(|(k, _)| *k == key) {
            let _ = write!(summary, r#","{key}":{len}"#);
        }
    }
    summary.push('}');
    summary
}

/// The message recorded for an error: itself (cut) with content capture, else only its type
/// and status, since upstream messages may quote the request.
fn error_message<'a>(
    message: &'a str,
    error_type: &str,
    http_status: Option<u16>,
    capture: bool,
) -> Cow<'a, str> {
    if capture {
        return truncate_chars(message, MAX_MESSAGE_CHARS);
    }
    Cow::Owned(match http_status {
        Some(status) => format!("{error_type} (HTTP {status}; message omitted)"),
        None => format!("{error_type} (message omitted)"),
    })
}

/// Status ERROR and an "exception" event, as MLflow's `record_exception` writes them.
fn record_error(
    span: &mut opentelemetry_sdk::trace::Span,
    error_type: &str,
    message: Cow<'_, str>,
) {
    let description = format!("{error_type}: {message}");
    span.add_event(
        "exception",
        vec![
            KeyValue::new("exception.type", error_type.to_string()),
            KeyValue::new("exception.message", message.into_owned()),
        ],
    );
    span.set_status(Status::error(description));
}

fn truncate_chars(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        Some((i, _)) => Cow::Borrowed(&s[..i]),
        None => Cow::Borrowed(s),
    }
}

/// `<tracking uri>/<path>`, keeping any path prefix of the tracking URI.
fn endpoint_url(tracking_uri: &Url, path: &str) -> Url {
    let mut url = tracking_uri.clone();
    url.set_query(None);
    url.set_fragment(None);
    let prefix = url.path().trim_end_matches('/').to_string();
    url.set_path(&format!("{prefix}/{path}"));
    url
}

/// RFC 3339 UTC with nanoseconds, as protobuf's JSON mapping of `Timestamp` wants it.
/// [`endpoint_url`] as an HTTP request URI.
fn endpoint_uri(tracking_uri: &Url, path: &str) -> Result<axum::http::Uri, TelemetryError> {
    let url = endpoint_url(tracking_uri, path);
    axum::http::Uri::try_from(url.as_str())
        .map_err(|e| TelemetryError::Invalid(format!("tracking URI {url}: {e}")))
}

fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_nanos()
    )
}

/// Year, month, day of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Protobuf's JSON mapping of `Duration`.
fn proto_duration(d: Duration) -> String {
    format!("{}.{:09}s", d.as_secs(), d.subsec_nanos())
}

// ---------------------------------------------------------------------------------------------
// Settings

struct Settings {
    capture_content: bool,
    max_queue_spans: usize,
    max_queue_bytes: usize,
    max_export_batch: usize,
    export_timeout: Duration,
    experiment_id: String,
    endpoint_id: String,
    endpoint_name: String,
    root_name: String,
}

impl Settings {
    fn from_config(config: &TelemetryConfig) -> Result<Self, TelemetryError> {
        if config.experiment_id.trim().is_empty() {
            return Err(TelemetryError::Invalid(
                "experiment_id is empty".to_string(),
            ));
        }
        if HeaderValue::from_str(&config.experiment_id).is_err() {
            return Err(TelemetryError::Invalid(
                "experiment_id is not usable in an HTTP header".to_string(),
            ));
        }
        if config.endpoint_name.is_empty() {
            return Err(TelemetryError::Invalid(
                "endpoint_name is empty".to_string(),
            ));
        }
        if config.max_queue_spans == 0 || config.max_export_batch == 0 {
            return Err(TelemetryError::Invalid(
                "max_queue_spans and max_export_batch must be at least 1".to_string(),
            ));
        }
        if config.export_timeout.is_zero() {
            return Err(TelemetryError::Invalid(
                "export_timeout must be positive".to_string(),
            ));
        }
        Ok(Settings {
            capture_content: config.capture_content,
            max_queue_spans: config.max_queue_spans,
            max_queue_bytes: MAX_QUEUE_BYTES,
            max_export_batch: config.max_export_batch.min(config.max_queue_spans),
            export_timeout: config.export_timeout,
            experiment_id: config.experiment_id.clone(),
            endpoint_id: config.endpoint_id.clone(),
            endpoint_name: config.endpoint_name.clone(),
            root_name: format!("gateway/{}", config.endpoint_name),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Counters and the gate

struct Counters {
    max_in_flight: usize,
    max_bytes: usize,
    in_flight: AtomicUsize,
    in_flight_bytes: AtomicUsize,
    exported_spans: AtomicU64,
    dropped_spans: AtomicU64,
    dropped_traces: AtomicU64,
    failed_spans: AtomicU64,
    exported_traces: AtomicU64,
    failed_traces: AtomicU64,
    /// Log state: a warning at the start of a streak of drops or failures, not per span.
    dropping: AtomicBool,
    export_failing: AtomicBool,
    trace_info_failing: AtomicBool,
    /// Trace-info requests queued or running.
    trace_infos_pending: AtomicUsize,
    trace_infos_idle: tokio::sync::Notify,
}

impl Counters {
    fn new(max_in_flight: usize, max_bytes: usize) -> Self {
        Counters {
            max_in_flight,
            max_bytes,
            in_flight: AtomicUsize::new(0),
            in_flight_bytes: AtomicUsize::new(0),
            exported_spans: AtomicU64::new(0),
            dropped_spans: AtomicU64::new(0),
            dropped_traces: AtomicU64::new(0),
            failed_spans: AtomicU64::new(0),
            exported_traces: AtomicU64::new(0),
            failed_traces: AtomicU64::new(0),
            dropping: AtomicBool::new(false),
            export_failing: AtomicBool::new(false),
            trace_info_failing: AtomicBool::new(false),
            trace_infos_pending: AtomicUsize::new(0),
            trace_infos_idle: tokio::sync::Notify::new(),
        }
    }

    fn stats(&self) -> ExportStats {
        ExportStats {
            queued: self.in_flight.load(Ordering::Relaxed) as u64,
            exported_spans: self.exported_spans.load(Ordering::Relaxed),
            dropped_spans: self.dropped_spans.load(Ordering::Relaxed),
            dropped_traces: self.dropped_traces.load(Ordering::Relaxed),
            failed_spans: self.failed_spans.load(Ordering::Relaxed),
            exported_traces: self.exported_traces.load(Ordering::Relaxed),
            failed_traces: self.failed_traces.load(Ordering::Relaxed),
        }
    }

    /// Takes a place in the queue for one span of about `bytes`; false (and counted) when the
    /// queue is full. A span larger than the byte budget is still admitted into an empty queue.
    fn try_admit(&self, bytes: usize) -> bool {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let bytes_before = self.in_flight_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before < self.max_in_flight
            && (bytes_before == 0 || bytes_before.saturating_add(bytes) <= self.max_bytes)
        {
            return true;
        }
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.in_flight_bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.drop_spans(1);
        self.warn_dropping();
        false
    }

    fn drop_spans(&self, n: u64) {
        self.dropped_spans.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether a span would be dropped now (no place left, by count or bytes): a trace started
    /// now is dropped whole, before anything is built for it.
    fn queue_full(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) >= self.max_in_flight
            || self.in_flight_bytes.load(Ordering::Relaxed) >= self.max_bytes
    }

    /// Counts a trace dropped at its start (its spans are counted as they would have ended).
    fn drop_trace(&self) {
        self.dropped_traces.fetch_add(1, Ordering::Relaxed);
        self.warn_dropping();
    }

    fn warn_dropping(&self) {
        if !self.dropping.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                max_queue_spans = self.max_in_flight,
                max_queue_bytes = self.max_bytes,
                "trace export queue full: dropping traces (is the MLflow tracking server slow or down?)"
            );
        }
    }

    /// Frees the places of `n` spans (of `bytes` in all) that were exported or failed.
    fn release(&self, n: usize, bytes: usize) {
        self.in_flight_bytes.fetch_sub(bytes, Ordering::AcqRel);
        let before = self.in_flight.fetch_sub(n, Ordering::AcqRel);
        if before.saturating_sub(n) <= self.max_in_flight / 2
            && self.dropping.load(Ordering::Relaxed)
            && self.dropping.swap(false, Ordering::Relaxed)
        {
            tracing::info!(
                dropped_spans = self.dropped_spans.load(Ordering::Relaxed),
                "trace export queue has room again"
            );
        }
    }

    fn exported(&self, n: usize, bytes: usize, experiment_id: &str) {
        self.exported_spans.fetch_add(n as u64, Ordering::Relaxed);
        if self.export_failing.swap(false, Ordering::Relaxed) {
            tracing::info!(experiment_id, "trace export to MLflow works again");
        }
        self.release(n, bytes);
    }

    fn failed(&self, n: usize, bytes: usize, experiment_id: &str, reason: &str) {
        self.failed_spans.fetch_add(n as u64, Ordering::Relaxed);
        if self.export_failing.swap(true, Ordering::Relaxed) {
            tracing::debug!(experiment_id, spans = n, %reason, "trace export failed");
        } else {
            tracing::warn!(
                experiment_id,
                spans = n,
                %reason,
                "trace export to MLflow failed; spans are lost until it works again (further failures are logged at debug level)"
            );
        }
        self.release(n, bytes);
    }

    /// Counts `n` traces as exported (info and spans stored) or failed.
    fn traces_settled(&self, n: usize, stored: bool) {
        let counter = if stored {
            &self.exported_traces
        } else {
            &self.failed_traces
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Settles one trace info posted by [`trace_info_worker`].
    fn trace_info_done(&self, stored: bool) {
        self.traces_settled(1, stored);
        if self.trace_infos_pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.trace_infos_idle.notify_waiters();
        }
    }

    async fn trace_infos_idle(&self) {
        loop {
            let idle = self.trace_infos_idle.notified();
            if self.trace_infos_pending.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// In front of the SDK's batch processor: admits a span only while the queue has room.
#[derive(Debug)]
struct GateProcessor {
    bsp: Arc<BatchSpanProcessor<Tokio>>,
    counters: Arc<Counters>,
    closed: Arc<AtomicBool>,
    /// Ended (dropped) once the batch processor has shut down.
    export_thread: std::sync::Mutex<Option<ExportThread>>,
}

/// The export pipeline's thread: a current-thread tokio runtime that runs until this is dropped.
#[derive(Debug)]
struct ExportThread {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ExportThread {
    /// None (the export then runs on the caller's runtime) if the thread cannot be started.
    fn start() -> Option<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let runtime = match runtime {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::warn!(error = %e, "no runtime for trace export: it shares the gateway's");
                return None;
            }
        };
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let started = std::thread::Builder::new()
            .name("trace-export".to_string())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            });
        match started {
            Ok(_) => Some(ExportThread {
                handle,
                _stop: stop,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "no thread for trace export: it shares the gateway's");
                None
            }
        }
    }
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.stats().fmt(f)
    }
}

impl SpanProcessor for GateProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.closed.load(Ordering::Relaxed) {
            self.counters.drop_spans(1);
            return;
        }
        if self.counters.try_admit(span_size(&span)) {
            self.bsp.on_end(span);
        }
    }

    /// Blocking: only called through `spawn_blocking`.
    fn force_flush(&self) -> OTelSdkResult {
        self.bsp.force_flush()
    }

    /// Called by the provider's shutdown, also when its last clone is dropped (possibly on a
    /// runtime thread): never blocks. After `Telemetry::shutdown` it has nothing left to do;
    /// otherwise the batch processor is stopped on a detached thread (a best-effort flush).
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        let export_thread = self
            .export_thread
            .lock()
            .map(|mut t| t.take())
            .unwrap_or_default();
        if !self.closed.swap(true, Ordering::SeqCst) {
            let bsp = Arc::clone(&self.bsp);
            let _ = std::thread::Builder::new()
                .name("telemetry-shutdown".to_string())
                .spawn(move || {
                    let _ = bsp.shutdown();
                    drop(export_thread);
                });
        }
        // Else `Telemetry::shutdown` stopped the batch processor already: the thread ends here.
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Exporter

/// Around the OTLP exporter: posts the trace info of every root span in a batch, then the batch
/// (tried twice when an info was stored); counts exported and failed spans and traces; releases
/// the gate.
struct CountingExporter<E> {
    inner: E,
    counters: Arc<Counters>,
    /// Posts the trace infos of a batch before its spans; None in tests of the span pipeline
    /// (every trace then counts as stored).
    poster: Option<Arc<TraceInfoPoster>>,
    /// How long a batch's trace infos may take before its spans are sent.
    info_budget: Duration,
    /// The infos the stage had no time for, posted after their spans by [`trace_info_worker`].
    late_infos: tokio::sync::mpsc::Sender<TraceInfoJob>,
    experiment_id: String,
}

impl<E> fmt::Debug for CountingExporter<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingExporter")
            .field("experiment_id", &self.experiment_id)
            .finish_non_exhaustive()
    }
}

/// Settles an export's count once: exported, failed, or (dropped unfinished, i.e. abandoned at
/// the batch processor's timeout) failed.
struct ExportGuard<'a> {
    counters: &'a Counters,
    experiment_id: &'a str,
    spans: usize,
    bytes: usize,
    settled: bool,
}

impl ExportGuard<'_> {
    fn settle(mut self, result: &OTelSdkResult) {
        self.settled = true;
        match result {
            Ok(()) => self
                .counters
                .exported(self.spans, self.bytes, self.experiment_id),
            Err(e) => self.counters.failed(
                self.spans,
                self.bytes,
                self.experiment_id,
                &export_reason(e),
            ),
        }
    }
}

impl Drop for ExportGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.counters.failed(
                self.spans,
                self.bytes,
                self.experiment_id,
                "no answer within the export timeout",
            );
        }
    }
}

/// About the memory a span holds: its text (name, attribute and event values) and some fixed cost.
fn span_size(span: &SpanData) -> usize {
    fn attributes_size(attributes: &[KeyValue]) -> usize {
        attributes
            .iter()
            .map(|kv| {
                kv.key.as_str().len()
                    + match &kv.value {
                        opentelemetry::Value::String(s) => s.as_str().len(),
                        opentelemetry::Value::Array(_) => 64,
                        _ => 8,
                    }
            })
            .sum()
    }
    let events: usize = span
        .events
        .iter()
        .map(|e| e.name.len() + attributes_size(&e.attributes))
        .sum();
    256 + span.name.len() + attributes_size(&span.attributes) + events
}

fn export_reason(e: &OTelSdkError) -> String {
    let text = match e {
        OTelSdkError::InternalFailure(reason) => reason.clone(),
        other => other.to_string(),
    };
    truncate_chars(&text, 500).into_owned()
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let roots: Vec<TraceInfoJob> = batch
            .iter()
            .filter(|span| span.parent_span_id == SpanId::INVALID)
            .map(TraceInfoJob::from_root)
            .collect();
        let guard = ExportGuard {
            counters: &self.counters,
            experiment_id: &self.experiment_id,
            spans: batch.len(),
            bytes: batch.iter().map(span_size).sum(),
            settled: false,
        };
        // The trace infos first: MLflow then creates each trace from its info and adds the spans
        // to it, which costs it about 40% less than merging an info into a trace that its spans
        // created.
        let infos = match &self.poster {
            Some(poster) => post_infos(poster, &self.counters, roots, self.info_budget).await,
            None => InfoStage {
                stored: roots.len(),
                failed: 0,
                late: Vec::new(),
            },
        };
        // A batch lost now would leave traces with an info and no spans: it gets a second try.
        let second_try = (infos.stored > 0).then(|| batch.clone());
        let mut result = self.inner.export(batch).await;
        if let (Err(e), Some(batch)) = (&result, second_try) {
            tracing::debug!(reason = %export_reason(e), "span batch refused: trying once more");
            tokio::time::sleep(SPAN_RETRY_DELAY).await;
            result = self.inner.export(batch).await;
        }
        if result.is_ok() {
            self.counters.traces_settled(infos.stored, true);
            self.counters.traces_settled(infos.failed, false);
            // Infos the stage had no time for: posted now that their spans are stored.
            for job in infos.late {
                self.counters
                    .trace_infos_pending
                    .fetch_add(1, Ordering::AcqRel);
                if self.late_infos.try_send(job).is_err() {
                    tracing::debug!("trace-info queue full: a trace keeps no gateway metadata");
                    self.counters.trace_info_done(false);
                }
            }
        }
        // Else the traces are not counted: their spans are, as failed.
        guard.settle(&result);
        result
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The reqwest client for the tracking server, with the experiment header and credentials.
#[derive(Clone)]
struct MlflowHttp {
    /// For a tracking server with the public roots (no CA bundle, TLS verified): the gateway's
    /// hyper client (no per-request URL parsing); else reqwest, configured as the operator's.
    fast: Option<Arc<crate::gateway::client::UpstreamClient>>,
    client: reqwest::Client,
    timeout: Duration,
    experiment_id: HeaderValue,
    /// Marked sensitive: never printed by `Debug`.
    authorization: Option<HeaderValue>,
}

impl fmt::Debug for MlflowHttp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MlflowHttp")
            .field("experiment_id", &self.experiment_id)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl MlflowHttp {
    fn new(
        config: &MlflowConfig,
        experiment_id: &str,
        timeout: Duration,
    ) -> Result<Self, TelemetryError> {
        if !matches!(config.tracking_uri.scheme(), "http" | "https") {
            return Err(ConfigError::UnsupportedScheme {
                scheme: config.tracking_uri.scheme().to_string(),
            }
            .into());
        }
        if !config.tracking_uri.username().is_empty() || config.tracking_uri.password().is_some() {
            return Err(ConfigError::CredentialsInTrackingUri.into());
        }
        if config.insecure_tls && config.server_cert_path.is_some() {
            return Err(ConfigError::InsecureTlsWithCertPath.into());
        }
        let authorization = match &config.auth {
            Auth::None => None,
            Auth::Basic { username, password } => {
                use base64::Engine as _;
                let token = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{password}"));
                Some(sensitive_header(&format!("Basic {token}"))?)
            }
            Auth::Bearer { token } => Some(sensitive_header(&format!("Bearer {token}"))?),
        };
        let client = crate::mlflow::tracking_http_client(config, timeout)?;
        let fast = if config.server_cert_path.is_none() && !config.insecure_tls {
            let fast = crate::gateway::client::UpstreamClient::new()
                .map_err(|e| TelemetryError::Invalid(format!("HTTP client: {e}")))?;
            Some(Arc::new(fast))
        } else {
            None
        };
        let experiment_id = HeaderValue::from_str(experiment_id).map_err(|_| {
            TelemetryError::Invalid("experiment_id is not usable in an HTTP header".to_string())
        })?;
        Ok(MlflowHttp {
            fast,
            client,
            timeout,
            experiment_id,
            authorization,
        })
    }

    fn authorize(&self, headers: &mut reqwest::header::HeaderMap) {
        headers.insert(
            HeaderName::from_static(EXPERIMENT_ID_HEADER),
            self.experiment_id.clone(),
        );
        if let Some(authorization) = &self.authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
    }

    /// Sends `request` with the experiment and credential headers, and reads the answer, within
    /// the export timeout. The error is a reason for a log line: it holds no header.
    async fn send(&self, mut request: Request<Bytes>) -> Result<(StatusCode, Bytes), String> {
        self.authorize(request.headers_mut());
        if let Some(fast) = &self.fast {
            request
                .headers_mut()
                .insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
            let call = async {
                let response = fast.send(request).await.map_err(|e| e.message)?;
                let status = response.status;
                let body = response.bytes().await.map_err(|e| e.message)?;
                Ok((status, body))
            };
            return tokio::time::timeout(self.timeout, call)
                .await
                .map_err(|_| TIMEOUT_REASON.to_string())?;
        }
        let request: reqwest::Request = request.try_into().map_err(|e| transport_reason(&e))?;
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| transport_reason(&e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| transport_reason(&e))?;
        Ok((status, body))
    }
}

/// What the export requests call themselves (as the operator's MLflow client does).
const USER_AGENT_VALUE: &str = concat!(env!("CARGO_PKG_NAME"), "/", env!("CARGO_PKG_VERSION"));
const TIMEOUT_REASON: &str = "no answer within the export timeout";

fn sensitive_header(value: &str) -> Result<HeaderValue, TelemetryError> {
    let mut header = HeaderValue::from_str(value).map_err(|_| ConfigError::InvalidToken)?;
    header.set_sensitive(true);
    Ok(header)
}

/// The reason of a transport failure with its causes (reqwest's own message is generic). Holds
/// the URL at most, never a header.
fn transport_reason(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        return TIMEOUT_REASON.to_string();
    }
    crate::error_chain(err)
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for MlflowHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (status, body) = self.send(request).await.map_err(HttpError::from)?;
        // An error answer is only quoted in a log line: keep it short.
        let body = if status.is_success() {
            body
        } else {
            body.slice(..body.len().min(300))
        };
        Ok(Response::builder().status(status).body(body)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Trace info (metadata)

/// What the trace-info request needs from a root span.
#[derive(Debug, Clone)]
struct TraceInfoJob {
    trace_id: TraceId,
    start: SystemTime,
    end: SystemTime,
    error: bool,
    request_type: Option<String>,
    caller: Option<String>,
}

impl TraceInfoJob {
    fn from_root(span: &SpanData) -> Self {
        let attribute = |key: &str| {
            span.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.as_str().into_owned())
        };
        TraceInfoJob {
            trace_id: span.span_context.trace_id(),
            start: span.start_time,
            end: span.end_time,
            error: matches!(span.status, Status::Error { .. }),
            request_type: attribute(META_REQUEST_TYPE),
            caller: attribute(META_CALLER),
        }
    }
}

/// Why a trace info was not stored. `transient`: no answer, 429 or 5xx (after the retries).
#[derive(Debug)]
struct InfoFailure {
    reason: String,
    transient: bool,
}

#[derive(Clone)]
struct TraceInfoPoster {
    http: MlflowHttp,
    /// `<tracking uri>/api/3.0/mlflow/traces`.
    uri: axum::http::Uri,
    experiment_id: String,
    endpoint_id: String,
    trace_name: String,
}

impl TraceInfoPoster {
    /// The StartTraceV3 body: the trace's info with the gateway metadata. Written directly (one
    /// per exported trace: no `serde_json::Value` tree to build and drop).
    fn body(&self, job: &TraceInfoJob) -> String {
        use std::fmt::Write as _;
        // Escaping a string into JSON cannot fail.
        let str_json = |out: &mut String, s: &str| {
            out.push_str(&serde_json::to_string(s).unwrap_or_default());
        };
        let duration = job.end.duration_since(job.start).unwrap_or_default();
        let mut out = String::with_capacity(512);
        let _ = write!(
            out,
            r#"{{"trace":{{"trace_info":{{"trace_id":"{}","trace_location":{{"type":"MLFLOW_EXPERIMENT","mlflow_experiment":{{"experiment_id":"#,
            mlflow_trace_id(job.trace_id)
        );
        str_json(&mut out, &self.experiment_id);
        let _ = write!(
            out,
            r#"}}}},"request_time":"{}","execution_duration":"{}","state":"{}","trace_metadata":{{"{META_ENDPOINT_ID}":"#,
            rfc3339(job.start),
            proto_duration(duration),
            if job.error { "ERROR" } else { "OK" },
        );
        str_json(&mut out, &self.endpoint_id);
        let _ = write!(out, r#","{META_SCHEMA_VERSION}":"3""#);
        if let Some(request_type) = &job.request_type {
            let _ = write!(out, r#","{META_REQUEST_TYPE}":"#);
            str_json(&mut out, request_type);
        }
        if let Some(caller) = &job.caller {
            let _ = write!(out, r#","{META_CALLER}":"#);
            str_json(&mut out, caller);
        }
        let _ = write!(out, r#"}},"tags":{{"{TAG_TRACE_NAME}":"#);
        str_json(&mut out, &self.trace_name);
        out.push_str("}}}}");
        out
    }

    /// Posts the trace info, retrying transient failures; Err when it was not stored.
    async fn post(&self, job: &TraceInfoJob) -> Result<(), InfoFailure> {
        let body = Bytes::from(self.body(job));
        let mut delay = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            let mut request = Request::new(body.clone());
            *request.method_mut() = reqwest::Method::POST;
            *request.uri_mut() = self.uri.clone();
            request
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            let (reason, transient) = match self.http.send(request).await {
                Ok((status, _)) if status.is_success() => return Ok(()),
                Ok((status, text)) => {
                    let text = String::from_utf8_lossy(&text);
                    (
                        format!(
                            "HTTP {}: {}",
                            status.as_u16(),
                            truncate_chars(text.trim(), 300)
                        ),
                        status.as_u16() == 429 || status.is_server_error(),
                    )
                }
                Err(reason) => (reason, true),
            };
            if !transient || attempt >= TRACE_INFO_ATTEMPTS {
                return Err(InfoFailure { reason, transient });
            }
            tokio::time::sleep(delay).await;
            delay *= 4;
            attempt += 1;
        }
    }
}

/// What the trace-info stage of one batch did.
struct InfoStage {
    stored: usize,
    failed: usize,
    /// Not posted: the stage's time was up, or the tracking server kept failing.
    late: Vec<TraceInfoJob>,
}

/// Posts the trace infos of one batch, a few at a time, for at most `budget`. Stops early, leaving
/// the rest late, when one fails on a transient error after its retries (the server is struggling
/// or down: the rest would wait for the same).
async fn post_infos(
    poster: &TraceInfoPoster,
    counters: &Counters,
    jobs: Vec<TraceInfoJob>,
    budget: Duration,
) -> InfoStage {
    use futures::StreamExt as _;
    let deadline = tokio::time::Instant::now() + budget;
    let mut stage = InfoStage {
        stored: 0,
        failed: 0,
        late: Vec::new(),
    };
    let mut done = vec![false; jobs.len()];
    let mut next = 0;
    let mut running = futures::stream::FuturesUnordered::new();
    let mut struggling = false;
    loop {
        while !struggling && running.len() < TRACE_INFO_CONCURRENCY && next < jobs.len() {
            let index = next;
            next += 1;
            let job = &jobs[index];
            running.push(async move { (index, poster.post(job).await) });
        }
        let Ok(Some((index, result))) = tokio::time::timeout_at(deadline, running.next()).await
        else {
            break;
        };
        done[index] = true;
        match &result {
            Ok(()) => stage.stored += 1,
            Err(failure) => {
                struggling |= failure.transient;
                stage.failed += 1;
            }
        }
        note_info_result(poster, counters, &jobs[index], result.as_ref().err());
    }
    drop(running);
    stage.late = jobs
        .into_iter()
        .zip(done)
        .filter(|(_, done)| !done)
        .map(|(job, _)| job)
        .collect();
    stage
}

/// Logs a trace info's fate: a warning at the start of a streak of failures, not per trace.
fn note_info_result(
    poster: &TraceInfoPoster,
    counters: &Counters,
    job: &TraceInfoJob,
    failure: Option<&InfoFailure>,
) {
    match failure {
        None => {
            if counters.trace_info_failing.swap(false, Ordering::Relaxed) {
                tracing::info!("writing gateway trace metadata to MLflow works again");
            }
        }
        Some(failure) => {
            let trace_id = mlflow_trace_id(job.trace_id);
            let reason = &failure.reason;
            if counters.trace_info_failing.swap(true, Ordering::Relaxed) {
                tracing::debug!(%trace_id, %reason, "cannot write trace metadata");
            } else {
                tracing::warn!(
                    %trace_id,
                    experiment_id = %poster.experiment_id,
                    %reason,
                    "cannot write gateway trace metadata to MLflow; traces are stored without it (further failures are logged at debug level)"
                );
            }
        }
    }
}

/// Posts the trace infos left over from their batch's stage, a few at a time, after their spans.
/// Ends when the exporter (the sender) is gone.
async fn trace_info_worker(
    mut jobs: tokio::sync::mpsc::Receiver<TraceInfoJob>,
    poster: Option<Arc<TraceInfoPoster>>,
    counters: Arc<Counters>,
) {
    let Some(poster) = poster else {
        // No tracking server (tests of the span pipeline): nothing to write.
        while jobs.recv().await.is_some() {
            counters.trace_info_done(true);
        }
        return;
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(TRACE_INFO_CONCURRENCY));
    while let Some(job) = jobs.recv().await {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            counters.trace_info_done(false);
            continue;
        };
        let poster = Arc::clone(&poster);
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            let result = poster.post(&job).await;
            drop(slot);
            note_info_result(&poster, &counters, &job, result.as_ref().err());
            counters.trace_info_done(result.is_ok());
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Tests of the pure parts and of the pipeline (with an in-process exporter)

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::Value as OtelValue;
    use serde_json::json;
    use std::sync::Mutex;

    #[test]
    fn traceparent_valid() {
        let sc = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(
            format!("{:032x}", sc.trace_id()),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(format!("{:016x}", sc.span_id()), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        assert!(sc.is_remote());
        let unsampled =
            parse_traceparent(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00 ")
                .expect("valid with spaces");
        assert!(!unsampled.is_sampled());
        // A later version may append fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
    }

    #[test]
    fn traceparent_malformed() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47g6-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn caller_extraction() {
        assert_eq!(
            caller_from(Some("my-agent"), Some("curl/8.0")),
            Some("my-agent".to_string())
        );
        assert_eq!(
            caller_from(None, Some("OpenAI/Python 1.40.0")),
            Some("OpenAI".to_string())
        );
        assert_eq!(
            caller_from(Some("  "), Some(" python-requests/2.31")),
            Some("python-requests".to_string())
        );
        assert_eq!(caller_from(None, Some("/1.0")), None);
        assert_eq!(caller_from(None, None), None);
        assert_eq!(caller_from(Some("a\u{7}b\n"), None), Some("ab".to_string()));
        let long = "x".repeat(400);
        assert_eq!(
            caller_from(Some(&long), None).map(|c| c.len()),
            Some(MAX_METADATA_CHARS)
        );
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("user-agent", "claude-cli/1.2 (external)".parse().unwrap());
        assert_eq!(
            caller_from_headers(&headers),
            Some("claude-cli".to_string())
        );
        headers.insert(CALLER_HEADER, "nightly-eval".parse().unwrap());
        assert_eq!(
            caller_from_headers(&headers),
            Some("nightly-eval".to_string())
        );
    }

    #[test]
    fn content_without_capture_has_no_text() {
        let request = json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "SECRET-SYSTEM-PROMPT"},
                {"role": "user", "content": "SECRET-USER-QUESTION"}
            ],
            "temperature": 0.2
        });
        let summary = content_attribute(&request, false);
        assert_eq!(summary, r#"{"content_omitted":true,"messages":2}"#);
        let response = json!({"choices": [{"message": {"content": "SECRET-ANSWER"}}]});
        assert_eq!(
            content_attribute(&response, false),
            r#"{"content_omitted":true,"choices":1}"#
        );
        assert_eq!(
            content_attribute(&json!("SECRET-STRING"), false),
            r#"{"content_omitted":true}"#
        );
        // Captured: the JSON itself.
        assert!(content_attribute(&request, true).contains("SECRET-USER-QUESTION"));
        // Error messages lose their text without capture.
        let msg = error_message(
            "upstream said: SECRET-USER-QUESTION",
            "UpstreamError",
            Some(400),
            false,
        );
        assert_eq!(msg, "UpstreamError (HTTP 400; message omitted)");
        assert_eq!(
            error_message("boom", "Timeout", None, true),
            Cow::Borrowed("boom")
        );
    }

    #[test]
    fn content_is_cut_at_the_limit() {
        let big = serde_json::Value::String("é".repeat(MAX_CONTENT_BYTES));
        let attr = content_attribute(&big, true);
        assert!(attr.len() < MAX_CONTENT_BYTES + 100);
        assert!(attr.ends_with("bytes in all]"));
    }

    #[test]
    fn timestamps_and_durations() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_251_199, 123_456_789);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.123456789Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000000000Z");
        assert_eq!(proto_duration(Duration::from_millis(1500)), "1.500000000s");
    }

    #[test]
    fn urls_keep_the_prefix() {
        let u = Url::parse("https://host/mlflow/").unwrap();
        assert_eq!(
            endpoint_url(&u, "v1/traces").as_str(),
            "https://host/mlflow/v1/traces"
        );
        let u = Url::parse("http://127.0.0.1:5000").unwrap();
        assert_eq!(
            endpoint_url(&u, "api/3.0/mlflow/traces").as_str(),
            "http://127.0.0.1:5000/api/3.0/mlflow/traces"
        );
    }

    #[test]
    fn gate_accounting() {
        let c = Counters::new(2, 1000);
        assert!(c.try_admit(10));
        assert!(c.try_admit(10));
        assert!(!c.try_admit(10));
        assert_eq!(c.stats().dropped_spans, 1);
        assert_eq!(c.stats().queued, 2);
        c.exported(1, 10, "1");
        assert!(c.try_admit(10));
        c.failed(2, 20, "1", "test");
        let s = c.stats();
        assert_eq!(
            (s.queued, s.exported_spans, s.failed_spans, s.dropped_spans),
            (0, 1, 2, 1)
        );
        assert_eq!(c.in_flight_bytes.load(Ordering::Relaxed), 0);
        // An export abandoned at the timeout (its future dropped) counts as failed.
        assert!(c.try_admit(10));
        drop(ExportGuard {
            counters: &c,
            experiment_id: "1",
            spans: 1,
            bytes: 10,
            settled: false,
        });
        assert_eq!((c.stats().queued, c.stats().failed_spans), (0, 3));
    }

    #[test]
    fn gate_byte_budget() {
        let c = Counters::new(100, 1000);
        // A span larger than the budget still goes into an empty queue...
        assert!(c.try_admit(5000));
        // ...but nothing joins it until it is out.
        assert!(!c.try_admit(1));
        c.exported(1, 5000, "1");
        assert!(c.try_admit(600));
        assert!(c.try_admit(400));
        assert!(!c.try_admit(1));
        assert_eq!(c.stats().dropped_spans, 2);
        c.failed(2, 1000, "1", "test");
        assert_eq!(c.in_flight_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(c.stats().queued, 0);
    }

    #[test]
    fn credentials_are_redacted() {
        let mut config = MlflowConfig::new(Url::parse("http://127.0.0.1:1").unwrap());
        config.auth = Auth::Basic {
            username: "writer".into(),
            password: "hunter2-SECRET".into(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let http =
            rt.block_on(async { MlflowHttp::new(&config, "7", Duration::from_secs(1)).unwrap() });
        let shown = format!("{http:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("d3JpdGVy"),
            "{shown}"
        );
        let tc = TelemetryConfig::new(config, "7", "ep", "uid");
        assert!(!format!("{tc:?}").contains("hunter2"));
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
            MlflowConfig::new(Url::parse("http://127.0.0.1:1").unwrap()),
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
            request_type::UNIFIED_CHAT,
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
            "unified/chat",
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
                .start_invocation("unified/chat", None, None, &json!({}))
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
                .start_invocation("unified/chat", None, None, &json!({}))
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
                .start_invocation("unified/chat", None, None, &json!({}))
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
        let first = telemetry.start_invocation("unified/chat", None, None, &json!({}));
        assert!(first.is_traced());
        let outputs = first.outputs(&response);
        first
            .start_attempt("openai", "m", "chat", false)
            .succeed_with(None, Some(&outputs));
        first.finish_with(Some(&outputs), None);
        assert_eq!(telemetry.stats().queued, 2);
        for _ in 0..10 {
            let shed = telemetry.start_invocation("unified/chat", None, None, &json!({}));
            assert!(!shed.is_traced());
            assert!(shed.trace_id().is_some_and(|id| id.starts_with("tr-")));
            assert!(
                shed.outputs(&response).0.is_none(),
                "serialized for nothing"
            );
            shed.start_attempt("openai", "m", "chat", false).fail(
                "UpstreamError",
                "429",
                Some(429),
            );
            shed.start_attempt("openai", "m2", "chat", false)
                .succeed(None, Some(&response));
            shed.finish(Some(&response), None);
        }
        // One more, abandoned (the client went away): its root still counts.
        drop(telemetry.start_invocation("unified/chat", None, None, &json!({})));
        let s = telemetry.stats();
        assert_eq!(
            (s.dropped_traces, s.dropped_spans, s.queued),
            (11, 31, 2),
            "{s:?}"
        );
        let metrics = crate::gateway::metrics::GatewayMetrics::default().encode(s);
        assert!(
            metrics.contains("mlflow_gateway_traces_dropped_total 11"),
            "{metrics}"
        );
        assert!(metrics.contains("mlflow_gateway_spans_dropped_total 31"));
    }

    /// The SDK shuts its provider down when the last clone goes; that must not block a runtime
    /// thread, even on a current-thread runtime where the export task cannot run meanwhile.
    #[tokio::test]
    async fn dropping_without_shutdown_does_not_block() {
        let recorder = Recorder::default();
        *recorder.mode.lock().unwrap() = Mode::Hang;
        let telemetry = Telemetry::build(settings(true, 100), recorder, None);
        let invocation = telemetry.start_invocation("unified/chat", None, None, &json!({}));
        let attempt = invocation.start_attempt("openai", "m", "chat", false);
        invocation.finish(None, None);
        let started = std::time::Instant::now();
        drop(telemetry);
        drop(attempt); // the last reference to the provider
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn disabled_is_a_no_op() {
        let telemetry = Telemetry::disabled();
        let inv = telemetry.start_invocation("unified/chat", None, None, &json!({}));
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
            MlflowConfig::new(Url::parse("http://127.0.0.1:1").unwrap()),
            "1",
            "ep",
            "uid",
        );
        assert!(matches!(
            Telemetry::new(config),
            Err(TelemetryError::NoRuntime)
        ));
    }

    #[test]
    fn trace_info_body() {
        let poster = TraceInfoPoster {
            http: MlflowHttp {
                fast: None,
                client: reqwest::Client::new(),
                timeout: Duration::from_secs(1),
                experiment_id: HeaderValue::from_static("7"),
                authorization: None,
            },
            uri: "http://127.0.0.1:1/api/3.0/mlflow/traces".parse().unwrap(),
            experiment_id: "7".into(),
            endpoint_id: "uid-1".into(),
            trace_name: "gateway/chat".into(),
        };
        let job = TraceInfoJob {
            trace_id: TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_millis(1250),
            error: true,
            request_type: Some("unified/chat".into()),
            caller: None,
        };
        let body: serde_json::Value = serde_json::from_str(&poster.body(&job)).unwrap();
        let info = &body["trace"]["trace_info"];
        assert_eq!(info["trace_id"], "tr-4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(info["state"], "ERROR");
        assert_eq!(info["execution_duration"], "0.250000000s");
        assert_eq!(info["trace_metadata"][META_ENDPOINT_ID], "uid-1");
        assert_eq!(info["trace_metadata"][META_REQUEST_TYPE], "unified/chat");
        assert!(info["trace_metadata"].get(META_CALLER).is_none());
        assert_eq!(info["trace_metadata"][META_SCHEMA_VERSION], "3");
        assert_eq!(info["request_time"], "1970-01-01T00:00:01.000000000Z");
        let quoted = TraceInfoJob {
            caller: Some("a \"quoted\" caller\\".into()),
            error: false,
            ..job
        };
        let body: serde_json::Value = serde_json::from_str(&poster.body(&quoted)).unwrap();
        let info = &body["trace"]["trace_info"];
        assert_eq!(info["trace_metadata"][META_CALLER], "a \"quoted\" caller\\");
        assert_eq!(info["state"], "OK");
        assert_eq!(info.as_object().unwrap().len(), 7);
        assert_eq!(info["tags"][TAG_TRACE_NAME], "gateway/chat");
        assert_eq!(
            info["trace_location"]["mlflow_experiment"]["experiment_id"],
            "7"
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

    /// A local tracking server that records, in order, what reaches it: `info <trace id>` for a
    /// StartTraceV3 request, `spans <status>` for an OTLP batch. It refuses the first
    /// `refuse_spans` batches with 503 and holds the first `slow_infos` info requests for 2 s.
    async fn recording_server(
        refuse_spans: usize,
        slow_infos: usize,
    ) -> (Url, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let left = Arc::new((AtomicUsize::new(refuse_spans), AtomicUsize::new(slow_infos)));
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
                    "{}"
                }),
            )
            .route(
                "/v1/traces",
                axum::routing::post(move || async move {
                    let refuse =
                        span_left
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

    async fn one_traced_invocation(uri: Url) -> (Telemetry, String) {
        let mut config = TelemetryConfig::new(MlflowConfig::new(uri), "7", "chat", "uid-1");
        config.export_timeout = Duration::from_millis(500);
        let telemetry = Telemetry::new(config).unwrap();
        let invocation = telemetry.start_invocation("unified/chat", None, None, &json!({}));
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
        let (uri, log) = recording_server(0, 0).await;
        let (telemetry, trace_id) = one_traced_invocation(uri).await;
        assert_eq!(
            *log.lock().unwrap(),
            [format!("info {trace_id}"), "spans 200".to_string()]
        );
        let s = telemetry.stats();
        assert_eq!(
            (s.exported_spans, s.exported_traces, s.failed_traces),
            (2, 1, 0),
            "{s:?}"
        );
    }

    /// A batch refused after its trace info was stored is sent again: no trace is left with an
    /// info and no spans.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_batch_after_its_infos_gets_a_second_try() {
        let (uri, log) = recording_server(1, 0).await;
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
        let (uri, log) = recording_server(0, 1).await;
        let (telemetry, trace_id) = one_traced_invocation(uri).await;
        assert_eq!(
            *log.lock().unwrap(),
            [
                format!("info {trace_id}"),
                "spans 200".to_string(),
                format!("info {trace_id}")
            ]
        );
        let s = telemetry.stats();
        assert_eq!(
            (s.exported_spans, s.exported_traces, s.failed_traces),
            (2, 1, 0),
            "{s:?}"
        );
    }

    /// The hot path's cost, and the whole pipeline's CPU per invocation (span creation, OTLP
    /// protobuf encoding and HTTP export to a local sink that answers 200 at once). Run with
    /// `cargo test --release --lib telemetry::tests::hot_path_cost -- --ignored --nocapture`.
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
            MlflowConfig::new(Url::parse(&format!("http://{addr}")).unwrap()),
            "1",
            "chat",
            "uid",
        );
        config.max_queue_spans = 1 << 16;
        let settings = Settings::from_config(&config).unwrap();
        let http = MlflowHttp::new(&config.mlflow, "1", config.export_timeout).unwrap();
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
            let inv = telemetry.start_invocation(
                request_type::UNIFIED_CHAT,
                Some("bench"),
                None,
                &request,
            );
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
}
