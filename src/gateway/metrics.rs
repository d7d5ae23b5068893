//! The gateway's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::tracing::ExportStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamError {
    pub provider: &'static str,
    /// connect, timeout, status_429, status_5xx, status_4xx, bad_response, stream
    pub kind: &'static str,
}

/// A refused request: why (`reason`) and the HTTP status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refused {
    pub reason: &'static str,
    pub status: u16,
}

/// An admitted caller's request: the caller's name and the HTTP status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallerStatus {
    pub caller: String,
    pub status: u16,
}

/// Why a trace was dropped: `queue_full` or `rejected`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropReason {
    pub reason: &'static str,
}

/// A trace export request: `kind` otlp or trace_info, `result` ok or error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExportRequest {
    pub kind: &'static str,
    pub result: &'static str,
}

/// Distinct caller names the metrics keep; later ones count as `other` (a namespace-wide grant
/// admits ServiceAccounts no one listed).
pub const MAX_CALLER_LABELS: usize = 100;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    pub direction: &'static str,
}

pub struct GatewayMetrics {
    pub requests: Family<RouteStatus, Counter>,
    pub duration: Family<RouteLabel, Histogram>,
    pub upstream_errors: Family<UpstreamError, Counter>,
    pub tokens: Family<Direction, Counter>,
    /// The two series of `tokens`, looked up once.
    tokens_in: Counter,
    tokens_out: Counter,
    pub fallbacks: Counter,
    pub access_refused: Family<Refused, Counter>,
    pub caller_requests: Family<CallerStatus, Counter>,
    callers_seen: std::sync::Mutex<std::collections::HashSet<String>>,
    trace_queue_bytes: Gauge,
    trace_queue_traces: Gauge,
    trace_queue_oldest_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    traces_delivered: Counter,
    traces_dropped: Family<DropReason, Counter>,
    trace_export_requests: Family<ExportRequest, Counter>,
    spans_exported: Counter,
    spans_dropped: Counter,
    spans_failed: Counter,
    registry: Registry,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        let tokens = Family::<Direction, Counter>::default();
        let tokens_in = tokens
            .get_or_create(&Direction { direction: "input" })
            .clone();
        let tokens_out = tokens
            .get_or_create(&Direction {
                direction: "output",
            })
            .clone();
        let m = GatewayMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 18))
            }),
            upstream_errors: Family::default(),
            tokens,
            tokens_in,
            tokens_out,
            fallbacks: Counter::default(),
            access_refused: Family::default(),
            caller_requests: Family::default(),
            callers_seen: Default::default(),
            trace_queue_bytes: Gauge::default(),
            trace_queue_traces: Gauge::default(),
            trace_queue_oldest_age: Gauge::default(),
            traces_delivered: Counter::default(),
            traces_dropped: Family::default(),
            trace_export_requests: Family::default(),
            spans_exported: Counter::default(),
            spans_dropped: Counter::default(),
            spans_failed: Counter::default(),
            registry: Registry::default(),
        };
        let mut r = Registry::with_prefix("mlflow_gateway");
        r.register(
            "requests",
            "Requests served, by route and HTTP status",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time to answer a request (to the last byte for streams), by route",
            m.duration.clone(),
        );
        r.register(
            "upstream_errors",
            "Failed attempts at a provider, by provider and kind",
            m.upstream_errors.clone(),
        );
        r.register(
            "tokens",
            "Tokens reported by providers, by direction (input, output)",
            m.tokens.clone(),
        );
        r.register(
            "fallbacks",
            "Attempts beyond the first (fallbacks taken)",
            m.fallbacks.clone(),
        );
        r.register(
            "access_refused",
            "Requests refused by the access check, by reason (not_declared, missing_credential, malformed_credential, invalid_credential, not_admitted, review_failed) and HTTP status",
            m.access_refused.clone(),
        );
        r.register(
            "caller_requests",
            "Requests of admitted callers, by caller (apikey:<name> or system:serviceaccount:<ns>:<name>; at most 100 names, then other) and HTTP status",
            m.caller_requests.clone(),
        );
        r.register(
            "trace_queue_bytes",
            "Bytes of the traces waiting in the export queue (memory and disk)",
            m.trace_queue_bytes.clone(),
        );
        r.register(
            "trace_queue_traces",
            "Traces waiting in the export queue",
            m.trace_queue_traces.clone(),
        );
        r.register(
            "trace_queue_oldest_age_seconds",
            "Age of the oldest trace waiting in the export queue (0 when empty)",
            m.trace_queue_oldest_age.clone(),
        );
        r.register(
            "traces_delivered",
            "Traces MLflow stored (its answer 2xx to their spans)",
            m.traces_delivered.clone(),
        );
        r.register(
            "traces_dropped",
            "Traces dropped whole, by reason: queue_full (the queue's byte bound), rejected (MLflow refused the trace alone with a 4xx)",
            m.traces_dropped.clone(),
        );
        r.register(
            "trace_export_requests",
            "Requests to MLflow by the trace export, by kind (otlp, trace_info) and result (ok, error)",
            m.trace_export_requests.clone(),
        );
        r.register(
            "spans_exported",
            "Spans exported to MLflow",
            m.spans_exported.clone(),
        );
        r.register(
            "spans_dropped",
            "Spans dropped because the export queue was full",
            m.spans_dropped.clone(),
        );
        r.register(
            "spans_export_failed",
            "Spans MLflow did not accept (unreachable, error answers)",
            m.spans_failed.clone(),
        );
        GatewayMetrics { registry: r, ..m }
    }
}

fn catch_up(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

impl GatewayMetrics {
    /// Renders the metrics, with the trace exporter's figures as of now.
    pub fn encode(&self, stats: ExportStats) -> String {
        self.trace_queue_bytes
            .set(i64::try_from(stats.queue_bytes).unwrap_or(i64::MAX));
        self.trace_queue_traces
            .set(i64::try_from(stats.queued).unwrap_or(i64::MAX));
        self.trace_queue_oldest_age
            .set(stats.oldest_age.map_or(0.0, |age| age.as_secs_f64()));
        catch_up(&self.traces_delivered, stats.delivered_traces());
        for (reason, total) in [
            ("queue_full", stats.dropped_traces),
            ("rejected", stats.rejected_traces),
        ] {
            catch_up(
                &self.traces_dropped.get_or_create(&DropReason { reason }),
                total,
            );
        }
        for (kind, result, total) in [
            ("otlp", "ok", stats.otlp_ok),
            ("otlp", "error", stats.otlp_error),
            ("trace_info", "ok", stats.info_ok),
            ("trace_info", "error", stats.info_error),
        ] {
            let labels = ExportRequest { kind, result };
            catch_up(&self.trace_export_requests.get_or_create(&labels), total);
        }
        catch_up(&self.spans_exported, stats.exported_spans);
        catch_up(&self.spans_dropped, stats.dropped_spans);
        catch_up(&self.spans_failed, stats.failed_spans);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn upstream_error(&self, provider: &'static str, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&UpstreamError { provider, kind })
            .inc();
    }

    pub fn access_refused(&self, reason: &'static str, status: u16) {
        self.access_refused
            .get_or_create(&Refused { reason, status })
            .inc();
    }

    /// Counts a request of `caller`, under its name while fewer than [`MAX_CALLER_LABELS`] names
    /// are known, else under `other`.
    pub fn caller_request(&self, caller: &str, status: u16) {
        let label = {
            let mut seen = self.callers_seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.contains(caller) {
                caller.to_string()
            } else if seen.len() < MAX_CALLER_LABELS {
                seen.insert(caller.to_string());
                caller.to_string()
            } else {
                "other".to_string()
            }
        };
        self.caller_requests
            .get_or_create(&CallerStatus {
                caller: label,
                status,
            })
            .inc();
    }

    pub fn tokens(&self, input: u64, output: u64) {
        self.tokens_in.inc_by(input);
        self.tokens_out.inc_by(output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trace exporter's drops show as counters (moved here from the tracing tests, which
    /// import nothing from the gateway).
    #[test]
    fn export_drops_are_counted() {
        let stats = ExportStats {
            queued: 2,
            dropped_traces: 11,
            dropped_spans: 31,
            ..ExportStats::default()
        };
        let metrics = GatewayMetrics::default().encode(stats);
        assert!(
            metrics.contains(r#"mlflow_gateway_traces_dropped_total{reason="queue_full"} 11"#),
            "{metrics}"
        );
        assert!(metrics.contains("mlflow_gateway_spans_dropped_total 31"));
        assert!(metrics.contains("mlflow_gateway_trace_queue_traces 2"));
        assert!(metrics.contains(r#"mlflow_gateway_traces_dropped_total{reason="rejected"} 0"#));
    }

    #[test]
    fn caller_names_are_bounded() {
        let m = GatewayMetrics::default();
        for i in 0..MAX_CALLER_LABELS + 5 {
            m.caller_request(&format!("apikey:c{i}"), 200);
        }
        m.caller_request("apikey:c0", 200);
        m.access_refused("invalid_credential", 401);
        let text = m.encode(ExportStats::default());
        assert!(text.contains(r#"caller="other",status="200"} 5"#), "{text}");
        assert!(text.contains(r#"caller="apikey:c0",status="200"} 2"#));
        assert!(text.contains(
            r#"mlflow_gateway_access_refused_total{reason="invalid_credential",status="401"} 1"#
        ));
    }
}
