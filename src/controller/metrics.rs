//! The controller's Prometheus metrics and its small HTTP server (`/metrics`, `/healthz`,
//! `/readyz`). The gateway has its own (`gateway::metrics`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::mlflow::CallObserver;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub call: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallOnly {
    pub call: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    pub ready: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

pub struct Metrics {
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub mlflow_requests: Family<CallLabels, Counter>,
    pub mlflow_request_duration: Family<CallOnly, Histogram>,
    pub mlflow_writes: Counter,
    pub status_patches: Counter,
    pub kube_writes: Counter,
    pub endpoints: Family<ReadyLabels, Gauge>,
    pub object_applies: Family<KindLabels, Counter>,
    /// 1 while this instance runs the controller (leads), 0 while it waits for the lease.
    pub leader: Gauge,
    /// What `/readyz` answers from: the watches' state.
    pub health: super::health::Health,
    registry: Registry,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mlflow_gateway_operator");
        let m = Metrics {
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: latency_histogram(),
            mlflow_requests: Family::default(),
            mlflow_request_duration: Family::new_with_constructor(latency_histogram),
            mlflow_writes: Counter::default(),
            status_patches: Counter::default(),
            kube_writes: Counter::default(),
            endpoints: Family::default(),
            object_applies: Family::default(),
            leader: Gauge::default(),
            health: Default::default(),
            registry: Registry::default(),
        };
        registry.register("reconciles", "Reconciles run", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by reason",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time per reconcile",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "mlflow_requests",
            "Requests to the MLflow tracking server, by call and HTTP status",
            m.mlflow_requests.clone(),
        );
        registry.register(
            "mlflow_request_duration_seconds",
            "Latency of MLflow requests, by call",
            m.mlflow_request_duration.clone(),
        );
        registry.register(
            "mlflow_writes",
            "Mutating MLflow requests (create, rename, delete, restore, set tag)",
            m.mlflow_writes.clone(),
        );
        registry.register(
            "status_patches",
            "Status writes to the Kubernetes API",
            m.status_patches.clone(),
        );
        registry.register(
            "kube_writes",
            "Mutating requests to the Kubernetes API (create, patch, update, delete)",
            m.kube_writes.clone(),
        );
        registry.register(
            "endpoints",
            "GatewayEndpoints watched, by their Ready condition (true, false, unknown)",
            m.endpoints.clone(),
        );
        registry.register(
            "object_applies",
            "Server-side applies of owned objects (ConfigMap, Deployment, Service, Secret), by kind",
            m.object_applies.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the leader lease and runs the controller, 0 while it waits",
            m.leader.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl CallObserver for Metrics {
    fn observe(&self, call: &'static str, status: &str, seconds: f64) {
        self.mlflow_requests
            .get_or_create(&CallLabels {
                call: call.to_string(),
                status: status.to_string(),
            })
            .inc();
        self.mlflow_request_duration
            .get_or_create(&CallOnly {
                call: call.to_string(),
            })
            .observe(seconds);
        if crate::mlflow::is_write_call(call) {
            self.mlflow_writes.inc();
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, elapsed: Duration, error: Option<&'static str>) {
        self.reconciles.inc();
        self.reconcile_duration.observe(elapsed.as_secs_f64());
        if let Some(reason) = error {
            self.reconcile_errors
                .get_or_create(&ReasonLabels {
                    reason: reason.to_string(),
                })
                .inc();
        }
    }
}

async fn render_metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

/// 200 while every watch is synced and working (or this instance stands by), else 503 saying which
/// watch is not.
async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.health.readiness() {
        Ok(note) => (StatusCode::OK, note),
        Err(problem) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {problem}"),
        ),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, app).await
}
