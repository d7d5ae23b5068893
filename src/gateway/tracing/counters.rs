//! The export's accounting behind [`ExportStats`] and the gateway's trace metrics: traces and
//! spans delivered, dropped (queue full) and rejected, and the export requests by kind and
//! result. Logs a warning at the start of a streak of drops or failures, not per trace.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Export figures since `Telemetry::new` (the queue's as of now).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Traces waiting in the queue (a gauge).
    pub queued: u64,
    /// Bytes of the records waiting in the queue (a gauge).
    pub queue_bytes: u64,
    /// Age of the oldest trace waiting (a gauge).
    pub oldest_age: Option<Duration>,
    /// Spans stored by MLflow.
    pub exported_spans: u64,
    /// Spans of traces dropped because the queue was full.
    pub dropped_spans: u64,
    /// Traces dropped whole because the queue was full (at their start: nothing was built for
    /// them; or at their end: their record did not fit).
    pub dropped_traces: u64,
    /// Spans of traces MLflow refused for good (a 4xx answer to the trace alone).
    pub failed_spans: u64,
    /// Traces MLflow refused for good, dropped (`traces_dropped_total{reason="rejected"}`).
    pub rejected_traces: u64,
    /// Traces stored with the gateway metadata (their trace info, or their tags).
    pub exported_traces: u64,
    /// Traces whose spans were stored but whose trace info could not be.
    pub failed_traces: u64,
    /// OTLP requests answered 2xx, and the others (no answer, error status).
    pub otlp_ok: u64,
    pub otlp_error: u64,
    /// Trace-info (StartTraceV3) requests answered 2xx, and the others.
    pub info_ok: u64,
    pub info_error: u64,
}

impl ExportStats {
    /// Traces whose spans MLflow stored (`traces_delivered_total`).
    pub fn delivered_traces(&self) -> u64 {
        self.exported_traces + self.failed_traces
    }
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) exported_spans: AtomicU64,
    pub(super) dropped_spans: AtomicU64,
    pub(super) dropped_traces: AtomicU64,
    pub(super) failed_spans: AtomicU64,
    pub(super) rejected_traces: AtomicU64,
    pub(super) exported_traces: AtomicU64,
    pub(super) failed_traces: AtomicU64,
    pub(super) otlp_ok: AtomicU64,
    pub(super) otlp_error: AtomicU64,
    pub(super) info_ok: AtomicU64,
    pub(super) info_error: AtomicU64,
    /// Records pushed into the queue, and records settled (delivered or rejected): `flush` waits
    /// for the second to reach the first.
    pub(super) pushed: AtomicU64,
    pub(super) settled: AtomicU64,
    /// Pauses before sending a request again (MLflow down or failing).
    pub(super) retries: AtomicU64,
    /// Log state: a warning at the start of a streak, not per trace.
    dropping: AtomicBool,
    pub(super) export_failing: AtomicBool,
    pub(super) trace_info_failing: AtomicBool,
}

impl Counters {
    pub(super) fn stats(&self) -> ExportStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExportStats {
            queued: 0,
            queue_bytes: 0,
            oldest_age: None,
            exported_spans: get(&self.exported_spans),
            dropped_spans: get(&self.dropped_spans),
            dropped_traces: get(&self.dropped_traces),
            failed_spans: get(&self.failed_spans),
            rejected_traces: get(&self.rejected_traces),
            exported_traces: get(&self.exported_traces),
            failed_traces: get(&self.failed_traces),
            otlp_ok: get(&self.otlp_ok),
            otlp_error: get(&self.otlp_error),
            info_ok: get(&self.info_ok),
            info_error: get(&self.info_error),
        }
    }

    /// Counts a trace of `spans` spans dropped because the queue was full.
    pub(super) fn drop_trace(&self, spans: u64) {
        self.dropped_traces.fetch_add(1, Ordering::Relaxed);
        self.dropped_spans.fetch_add(spans, Ordering::Relaxed);
        if !self.dropping.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "trace queue full: dropping traces (is the MLflow tracking server slow or down? see GATEWAY_TRACE_QUEUE_MAX_BYTES)"
            );
        }
    }

    /// Spans counted as dropped (an attempt of a trace dropped at its start).
    pub(super) fn drop_spans(&self, n: u64) {
        self.dropped_spans.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn pushed(&self) {
        self.pushed.fetch_add(1, Ordering::Relaxed);
        if self.dropping.load(Ordering::Relaxed) && self.dropping.swap(false, Ordering::Relaxed) {
            tracing::info!(
                dropped_traces = self.dropped_traces.load(Ordering::Relaxed),
                "trace queue has room again"
            );
        }
    }

    /// A trace whose spans MLflow stored; `with_metadata`: its info or tags too.
    pub(super) fn delivered(&self, spans: u32, with_metadata: bool) {
        self.exported_spans
            .fetch_add(u64::from(spans), Ordering::Relaxed);
        let c = if with_metadata {
            &self.exported_traces
        } else {
            &self.failed_traces
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A trace MLflow refused for good.
    pub(super) fn rejected(&self, spans: u32) {
        self.failed_spans
            .fetch_add(u64::from(spans), Ordering::Relaxed);
        self.rejected_traces.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn settled(&self, n: usize) {
        self.settled.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// An OTLP request's result.
    pub(super) fn otlp(&self, ok: bool, experiment_id: &str, reason: &str) {
        if ok {
            self.otlp_ok.fetch_add(1, Ordering::Relaxed);
            if self.export_failing.swap(false, Ordering::Relaxed) {
                tracing::info!(experiment_id, "trace export to MLflow works again");
            }
            return;
        }
        self.otlp_error.fetch_add(1, Ordering::Relaxed);
        if self.export_failing.swap(true, Ordering::Relaxed) {
            tracing::debug!(experiment_id, %reason, "trace export failed");
        } else {
            tracing::warn!(
                experiment_id,
                %reason,
                "trace export to MLflow failed; traces wait in the queue and are tried again (further failures are logged at debug level)"
            );
        }
    }
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.stats().fmt(f)
    }
}
