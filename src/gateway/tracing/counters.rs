//! The export's accounting: how many spans are in flight (ended, not yet exported or failed) and
//! how much memory they hold, the gate that admits a span only while both are under their
//! limits, and the counters behind [`ExportStats`] and the gateway's trace metrics. Logs a warning
//! at the start of a streak of drops or failures, not per span.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Export counters since `Telemetry::new`.
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

pub(super) struct Counters {
    pub(super) max_in_flight: usize,
    pub(super) max_bytes: usize,
    pub(super) in_flight: AtomicUsize,
    pub(super) in_flight_bytes: AtomicUsize,
    pub(super) exported_spans: AtomicU64,
    pub(super) dropped_spans: AtomicU64,
    pub(super) dropped_traces: AtomicU64,
    pub(super) failed_spans: AtomicU64,
    pub(super) exported_traces: AtomicU64,
    pub(super) failed_traces: AtomicU64,
    /// Log state: a warning at the start of a streak of drops or failures, not per span.
    pub(super) dropping: AtomicBool,
    pub(super) export_failing: AtomicBool,
    pub(super) trace_info_failing: AtomicBool,
    /// Trace-info requests queued or running.
    pub(super) trace_infos_pending: AtomicUsize,
    pub(super) trace_infos_idle: tokio::sync::Notify,
}

impl Counters {
    pub(super) fn new(max_in_flight: usize, max_bytes: usize) -> Self {
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

    pub(super) fn stats(&self) -> ExportStats {
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
    pub(super) fn try_admit(&self, bytes: usize) -> bool {
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

    pub(super) fn drop_spans(&self, n: u64) {
        self.dropped_spans.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether a span would be dropped now (no place left, by count or bytes): a trace started
    /// now is dropped whole, before anything is built for it.
    pub(super) fn queue_full(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) >= self.max_in_flight
            || self.in_flight_bytes.load(Ordering::Relaxed) >= self.max_bytes
    }

    /// Counts a trace dropped at its start (its spans are counted as they would have ended).
    pub(super) fn drop_trace(&self) {
        self.dropped_traces.fetch_add(1, Ordering::Relaxed);
        self.warn_dropping();
    }

    pub(super) fn warn_dropping(&self) {
        if !self.dropping.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                max_queue_spans = self.max_in_flight,
                max_queue_bytes = self.max_bytes,
                "trace export queue full: dropping traces (is the MLflow tracking server slow or down?)"
            );
        }
    }

    /// Frees the places of `n` spans (of `bytes` in all) that were exported or failed.
    pub(super) fn release(&self, n: usize, bytes: usize) {
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

    pub(super) fn exported(&self, n: usize, bytes: usize, experiment_id: &str) {
        self.exported_spans.fetch_add(n as u64, Ordering::Relaxed);
        if self.export_failing.swap(false, Ordering::Relaxed) {
            tracing::info!(experiment_id, "trace export to MLflow works again");
        }
        self.release(n, bytes);
    }

    pub(super) fn failed(&self, n: usize, bytes: usize, experiment_id: &str, reason: &str) {
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
    pub(super) fn traces_settled(&self, n: usize, stored: bool) {
        let counter = if stored {
            &self.exported_traces
        } else {
            &self.failed_traces
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Settles one trace info posted by [`trace_info_worker`].
    pub(super) fn trace_info_done(&self, stored: bool) {
        self.traces_settled(1, stored);
        if self.trace_infos_pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.trace_infos_idle.notify_waiters();
        }
    }

    pub(super) async fn trace_infos_idle(&self) {
        loop {
            let idle = self.trace_infos_idle.notified();
            if self.trace_infos_pending.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.stats().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
