//! The export pipeline: spans from the SDK through [`GateProcessor`] (admits a span only while
//! the queue has room) into the SDK's tokio `BatchSpanProcessor`, whose exporter is
//! [`CountingExporter`] around the OTLP/HTTP exporter. `CountingExporter` posts a batch's trace
//! infos first, then the batch (a second try when an info was stored, so that no trace keeps an
//! info without spans), counts what was exported or failed, and releases the gate, also when the
//! batch processor abandons an export at its timeout. The pipeline runs on a thread of its own
//! ([`ExportThread`]).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::SpanId;
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{SpanData, SpanExporter, SpanProcessor};

use super::counters::Counters;
use super::trace_info::{InfoStage, TraceInfoJob, TraceInfoPoster, post_infos};
use crate::mlflow::RetryPolicy;

/// How long the batch processor waits for more spans before exporting a partial batch.
pub(super) const SCHEDULED_DELAY: Duration = Duration::from_secs(1);

/// How long the batch processor lets one export take: the trace-info stage (at most
/// `export_timeout`), then the span batch, and its second try, each within `export_timeout`.
pub(super) fn batch_export_limit(export_timeout: Duration, retry: RetryPolicy) -> Duration {
    export_timeout.saturating_mul(3) + retry.delay(0)
}

#[derive(Debug)]
pub(super) struct GateProcessor {
    pub(super) bsp: Arc<BatchSpanProcessor<Tokio>>,
    pub(super) counters: Arc<Counters>,
    pub(super) closed: Arc<AtomicBool>,
    /// Ended (dropped) once the batch processor has shut down.
    pub(super) export_thread: std::sync::Mutex<Option<ExportThread>>,
}

/// The export pipeline's thread: a current-thread tokio runtime that runs until this is dropped.
#[derive(Debug)]
pub(super) struct ExportThread {
    pub(super) handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ExportThread {
    /// None (the export then runs on the caller's runtime) if the thread cannot be started.
    pub(super) fn start() -> Option<Self> {
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

/// Around the OTLP exporter: posts the trace info of every root span in a batch, then the batch
/// (tried twice when an info was stored); counts exported and failed spans and traces; releases
/// the gate.
pub(super) struct CountingExporter<E> {
    pub(super) inner: E,
    pub(super) counters: Arc<Counters>,
    /// Posts the trace infos of a batch before its spans; None in tests of the span pipeline
    /// (every trace then counts as stored).
    pub(super) poster: Option<Arc<TraceInfoPoster>>,
    /// How long a batch's trace infos may take before its spans are sent.
    pub(super) info_budget: Duration,
    /// The infos the stage had no time for, posted after their spans by [`trace_info_worker`].
    pub(super) late_infos: tokio::sync::mpsc::Sender<TraceInfoJob>,
    pub(super) experiment_id: String,
    /// The MLflow transport's retry policy: the pause before a batch's second try.
    pub(super) retry: RetryPolicy,
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
pub(super) struct ExportGuard<'a> {
    pub(super) counters: &'a Counters,
    pub(super) experiment_id: &'a str,
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
pub(super) fn span_size(span: &SpanData) -> usize {
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
    crate::text::clip(&text, 500).to_string()
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
            tokio::time::sleep(self.retry.delay(0)).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_export_counts_as_failed() {
        let c = Counters::new(2, 1000);
        // An export abandoned at the timeout (its future dropped) counts as failed.
        assert!(c.try_admit(10));
        drop(ExportGuard {
            counters: &c,
            experiment_id: "1",
            spans: 1,
            bytes: 10,
            settled: false,
        });
        assert_eq!((c.stats().queued, c.stats().failed_spans), (0, 1));
    }
}
