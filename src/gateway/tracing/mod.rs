//! The gateway's MLflow traces: one trace per LLM invocation, in the shape MLflow's own AI gateway
//! writes, exported in the background so that a slow or dead tracking server never fails or slows
//! a request. This file is the trace API request handling calls (start an invocation, its
//! attempts, record outputs and usage) and is longer than 800 lines as one cohesive thing: the
//! pieces it drives live beside it (schema, capture, context, counters, export, trace_info).
//!
//! # Shape
//!
//! ```text
//! gateway/<endpoint>               root, no parent; mlflow.spanInputs = request, mlflow.spanOutputs =
//!  |                               response; endpoint_id, endpoint_name; mlflow.traceTag.mlflow.traceName
//!  |- provider/<provider>/<model>  one per attempt: mlflow.spanType=LLM, mlflow.llm.provider,
//!  '- provider/<provider>/<model>  mlflow.llm.model, method (+ streaming=true), mlflow.chat.tokenUsage;
//!                                  a failed attempt has status ERROR and an "exception" event
//! trace metadata: mlflow.gateway.endpointId, mlflow.gateway.requestType, mlflow.gateway.caller,
//! and for an authenticated caller mlflow.auth.username, mlflow.auth.userId, mlflow.trace.user
//! (written by the trace-info request, see below); mlflow.trace.tokenUsage (summed by the server)
//! trace tag: mlflow.traceName = gateway/<endpoint>
//! ```
//!
//! # Pipeline
//!
//! A trace started while the queue is full is dropped whole at its start: no span is built and
//! nothing is serialized for it; it keeps a trace id, and it and its spans are counted as dropped
//! (`dropped_traces`, `dropped_spans`). Otherwise spans are OpenTelemetry SDK spans. When one
//! ends, [`GateProcessor`](export::GateProcessor) admits it only while fewer
//! than `max_queue_spans` spans are in flight (ended, not yet exported or failed), else it drops
//! and counts it; admitted spans go to the SDK's tokio `BatchSpanProcessor`
//! (`span_processor_with_async_runtime`), whose queue is larger than the gate so that it never
//! drops on its own. Its exporter is [`CountingExporter`](export::CountingExporter) around the
//! OTLP/HTTP protobuf exporter, which posts to `<tracking uri>/v1/traces` through the MLflow
//! transport ([`crate::mlflow::Transport`]: the tracking server's TLS, the User-Agent and the
//! credentials, which live only there, as sensitive header values) with `x-mlflow-experiment-id`.
//! `CountingExporter` counts exported and failed spans and releases the gate, also when the batch
//! processor abandons an export at its timeout.
//!
//! The batch processor's task, its OTLP requests and the trace-info requests run on a
//! current-thread tokio runtime on a thread of its own ([`ExportThread`](export::ExportThread)): encoding and sending
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
//! Order: `CountingExporter` posts the infos of the batch's root spans (a few at a time, within
//! `export_timeout`) *before* the batch. MLflow then creates each trace from its info (marked
//! final: `mlflow.trace.infoFinalized`) and adds the spans to it, filling in the previews and
//! token usage: the same stored trace as the other order (MLflow's Python SDK sends spans first),
//! for about 26 ms of server CPU instead of 45 on this project's benchmark machine, because the
//! other order makes `start_trace` take its `IntegrityError` merge path. An info stored before a
//! batch that is then lost would leave a trace without spans, so such a batch is sent a second
//! time. Infos the stage had no time for, or skipped because one failed on a transient error
//! after its retries (the MLflow transport's one retry policy; the server is struggling), are posted after the spans were stored, as the
//! Python SDK does, on a bounded background queue ([`trace_info::trace_info_worker`]). A root whose children
//! went in an earlier batch also takes the merge path: both orders store the same trace.
//!
//! # Files
//!
//! This file is the trace API that request handling uses ([`Telemetry`], [`Invocation`],
//! [`Attempt`]); [`context`] what a trace takes from the request (caller, `traceparent`);
//! [`schema`] holds the names MLflow reads and [`RequestType`], [`capture`] what
//! of the content goes into spans, [`counters`] the queue's accounting, [`export`] the pipeline,
//! [`trace_info`] the StartTraceV3 client, [`http`] the export's requests (through the MLflow
//! transport). Nothing here imports from the rest of the gateway.

mod capture;
mod context;
mod counters;
mod export;
mod http;
pub mod queue;
mod schema;
#[cfg(test)]
mod tests;
mod trace_info;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::HeaderValue;
use opentelemetry::trace::{
    Link, Span as _, SpanKind, Status, TraceContextExt as _, TraceId, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, StringValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, Sampler, SdkTracer, SdkTracerProvider, SpanExporter, SpanProcessor as _,
};

use crate::mlflow::{ConfigError, MlflowConfig, RetryPolicy, Transport};
use capture::{content_attribute, cut_content, error_message, record_error, summary_of};
use context::clean_caller;
use counters::Counters;
use export::{CountingExporter, ExportThread, GateProcessor, SCHEDULED_DELAY, batch_export_limit};
use http::ExportHttp;
use schema::*;
use trace_info::{TraceInfoPoster, trace_info_worker};

pub use capture::MAX_CONTENT_BYTES;
pub use context::{caller_from, caller_from_headers, parse_traceparent};
pub use counters::ExportStats;
pub use schema::{CALLER_HEADER, EXPERIMENT_ID_HEADER, RequestType};

/// Memory the spans in flight may hold at most (an estimate from their text), on top of the
/// `max_queue_spans` count: large bodies and a slow tracking server must not exhaust memory.
pub const MAX_QUEUE_BYTES: usize = 64 << 20;

/// Where and how one endpoint's invocations are traced.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// Tracking server, auth and TLS.
    pub mlflow: MlflowConfig,
    pub experiment_id: String,
    /// The MLflow workspace the experiment is in (`X-MLFLOW-WORKSPACE` on every export request);
    /// `None` for a server without workspaces.
    pub workspace: Option<String>,
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
            workspace: None,
            endpoint_name: endpoint_name.into(),
            endpoint_id: endpoint_id.into(),
            capture_content: true,
            max_queue_spans: Self::DEFAULT_MAX_QUEUE_SPANS,
            max_export_batch: Self::DEFAULT_MAX_EXPORT_BATCH,
            export_timeout: Self::DEFAULT_EXPORT_TIMEOUT,
        }
    }
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
    retry: RetryPolicy,
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
        let otlp = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(http.clone())
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(transport.url("v1/traces").as_str())
            .with_timeout(config.export_timeout)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let info_url = transport.url("api/3.0/mlflow/traces");
        let uri = axum::http::Uri::try_from(info_url.as_str())
            .map_err(|e| TelemetryError::Invalid(format!("tracking URI {info_url}: {e}")))?;
        let poster = TraceInfoPoster {
            http,
            uri,
            experiment_id: config.experiment_id.clone(),
            endpoint_id: crate::text::clip(&config.endpoint_id, MAX_METADATA_BYTES).to_string(),
            trace_name: settings.root_name.clone(),
        };
        tracing::info!(
            experiment_id = %config.experiment_id,
            workspace = config.workspace.as_deref().unwrap_or("-"),
            endpoint = %config.endpoint_name,
            tracking_uri = %config.mlflow.tracking_uri(),
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
        attributes.push(KeyValue::new(META_REQUEST_TYPE, request_type.as_str()));
        if let Some(caller) = caller.and_then(clean_caller) {
            attributes.push(KeyValue::new(META_CALLER, caller));
        }
        if let Some(format) = request_type.message_format() {
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
        let limit = batch_export_limit(inner.export_timeout, inner.retry) + inner.export_timeout;
        let _ = tokio::time::timeout(limit, flushed).await;
        // The trace-info requests: each attempt within the export timeout, and the pauses.
        let infos = inner
            .export_timeout
            .saturating_mul(inner.retry.attempts() + 1)
            + inner.retry.total_delay();
        let _ = tokio::time::timeout(infos, inner.counters.trace_infos_idle()).await;
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
            retry: settings.retry,
        };
        // The SDK queue is larger than the gate (plus room for flush messages): it never drops.
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(settings.max_queue_spans + 64)
            .with_max_export_batch_size(settings.max_export_batch)
            .with_scheduled_delay(SCHEDULED_DELAY)
            .with_max_export_timeout(batch_export_limit(settings.export_timeout, settings.retry))
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
                retry: settings.retry,
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

    /// Records the caller the access check admitted, as MLflow's gateway does under its auth
    /// (trace metadata `mlflow.auth.username`, `mlflow.auth.userId`), and as the trace's user
    /// (`mlflow.trace.user`, the UI's "User"). Values are clipped to what metadata holds.
    pub fn set_authenticated_caller(&mut self, username: &str, user_id: Option<&str>) {
        let Some(inv) = &mut self.inner else { return };
        let Some(username) = clean_caller(username) else {
            return;
        };
        inv.span
            .set_attribute(KeyValue::new(META_AUTH_USERNAME, username.clone()));
        inv.span
            .set_attribute(KeyValue::new(META_TRACE_USER, username));
        if let Some(uid) = user_id.and_then(clean_caller) {
            inv.span
                .set_attribute(KeyValue::new(META_AUTH_USER_ID, uid));
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

/// A [`TelemetryConfig`], checked, as the pipeline uses it.
struct Settings {
    capture_content: bool,
    max_queue_spans: usize,
    max_queue_bytes: usize,
    max_export_batch: usize,
    export_timeout: Duration,
    retry: RetryPolicy,
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
            retry: RetryPolicy::new(config.mlflow.max_retries()),
            experiment_id: config.experiment_id.clone(),
            endpoint_id: config.endpoint_id.clone(),
            endpoint_name: config.endpoint_name.clone(),
            root_name: format!("gateway/{}", config.endpoint_name),
        })
    }
}
