//! `mlflow-gateway-operator gateway`: an OpenAI-compatible LLM gateway for one `GatewayEndpoint`
//! that traces every invocation into the endpoint's MLflow experiment.

pub mod access;
pub mod config;
mod invoke;
pub mod limits;
pub mod metrics;
pub mod providers;
pub mod routing;
pub mod tracing;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde_json::{Value, json};

use self::tracing::{RequestType, Telemetry};
use access::{Access, Caller};
use config::{EndpointConfig, Operation};
use invoke::Call;
use metrics::GatewayMetrics;
use routing::Routing;

/// Settings of the gateway process beyond the endpoint itself.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    /// Time allowed for one attempt at a provider (to the whole answer; to the first event for
    /// streams).
    pub attempt_timeout: Duration,
}

pub struct Gateway {
    pub endpoint: EndpointConfig,
    pub routing: Routing,
    pub http: crate::http_client::UpstreamClient,
    pub telemetry: Telemetry,
    pub metrics: GatewayMetrics,
    pub attempt_timeout: Duration,
    /// Who may call (`spec.access`).
    pub access: Access,
    /// Requests in flight and the memory budget ([`limits`]).
    pub guard: limits::Guard,
    /// Set on SIGTERM: /readyz fails from then on, so the Service stops sending new requests.
    pub draining: AtomicBool,
    /// Why no model can take a request, found when the gateway starts (each model builds a
    /// minimal request of the endpoint's operation).
    unservable: Option<String>,
}

impl Gateway {
    pub fn new(
        endpoint: EndpointConfig,
        routing: Routing,
        http: crate::http_client::UpstreamClient,
        telemetry: Telemetry,
        attempt_timeout: Duration,
        limits: limits::Limits,
        access: Access,
    ) -> Self {
        let unservable = routing.unservable(endpoint.operation);
        if let Some(why) = &unservable {
            ::tracing::error!(reason = %why, "no model can serve this endpoint; /readyz fails");
        }
        Gateway {
            endpoint,
            routing,
            http,
            telemetry,
            metrics: GatewayMetrics::default(),
            attempt_timeout,
            access,
            guard: limits::Guard::new(limits),
            draining: AtomicBool::new(false),
            unservable,
        }
    }

    /// Why the gateway cannot serve a request now, if it cannot (what /readyz answers).
    pub fn unready(&self) -> Option<String> {
        if self.draining.load(Ordering::Relaxed) {
            return Some("shutting down".into());
        }
        // Not "at capacity": with one replica, a Service left without ready endpoints would
        // refuse everything for longer than the saturation lasts; capacity is answered with 503.
        self.unservable.clone()
    }
}

pub type Shared = Arc<Gateway>;

pub fn router(gateway: Shared) -> Router {
    let max_body_bytes = gateway.guard.limits.max_body_bytes;
    let mut router = Router::<Shared>::new();
    // OpenAI's routes, one per operation (an endpoint answers the others with a 400 naming its own).
    for op in Operation::ALL {
        router = router.route(op.path(), unified_route(op, op.path()));
    }
    router
        .route("/v1/models", get(models))
        .route(
            "/gateway/{endpoint}/mlflow/invocations",
            post(mlflow_invocations),
        )
        .route(
            "/gateway/mlflow/v1/chat/completions",
            named_route(
                Operation::Chat,
                "/gateway/mlflow/v1/chat/completions",
                RequestType::UnifiedChat,
            ),
        )
        .route("/gateway/mlflow/v1/models", get(models))
        .route(
            "/gateway/openai/v1/chat/completions",
            named_route(
                Operation::Chat,
                "/gateway/openai/v1/chat/completions",
                RequestType::PassthroughOpenaiChat,
            ),
        )
        .route(
            "/gateway/openai/v1/embeddings",
            named_route(
                Operation::Embeddings,
                "/gateway/openai/v1/embeddings",
                RequestType::PassthroughOpenaiEmbeddings,
            ),
        )
        .route(
            "/gateway/anthropic/v1/messages",
            post(passthrough_anthropic),
        )
        // Every route above is the API: callers are checked (`spec.access`); probes and metrics
        // below are not.
        .route_layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            access::guard,
        ))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are read within the limits by `JsonBody`; this caps any other extractor.
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(gateway)
}

/// Time from SIGTERM the gateway takes to end, at most: within the pod's termination grace
/// period (30 s by default), so that the kubelet's SIGKILL does not cut the trace queue's flush.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(27);
/// Of which requests in flight may take this much.
const REQUESTS_GRACE: Duration = Duration::from_secs(20);

/// Read buffer of one connection, and so the largest request head (hyper's default is ~400 KiB;
/// hundreds of slow connections each holding that much would be memory spent on nothing).
const MAX_CONNECTION_BUFFER: usize = 64 * 1024;

/// Serves until SIGTERM or Ctrl-C (then finishes what is in flight), then flushes traces. hyper's
/// server is driven here rather than through `axum::serve`, which has no header read timeout.
pub async fn serve(gateway: Shared, settings: &ServerSettings) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    ::tracing::info!(
        addr = %settings.listen,
        endpoint = %gateway.endpoint.name,
        "gateway listening"
    );
    let app = router(gateway.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(gateway.guard.limits.request_read_timeout)
        .max_buf_size(MAX_CONNECTION_BUFFER);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let signal = crate::shutdown::signal();
    tokio::pin!(signal);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    ::tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut signal => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    let signalled = tokio::time::Instant::now();
    gateway.draining.store(true, Ordering::Relaxed);
    drop(listener);
    if tokio::time::timeout(REQUESTS_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        ::tracing::warn!(
            "requests still in flight after {} s of shutdown; ending them",
            REQUESTS_GRACE.as_secs()
        );
    }
    // The trace queue: written to disk, then delivered for what is left of the grace period
    // (what is not delivered stays on disk for the next start).
    let left = SHUTDOWN_GRACE.saturating_sub(signalled.elapsed());
    gateway
        .telemetry
        .shutdown(left.max(Duration::from_secs(2)))
        .await;
    Ok(())
}

async fn readyz(State(g): State<Shared>) -> Response {
    match g.unready() {
        None => "ok".into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
pub fn openai_error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "error": {"message": message.into(), "type": kind, "param": null, "code": status.as_u16()}
    });
    (status, axum::Json(body)).into_response()
}

/// A JSON request body (parsed, and its text), read within the [`limits`], with body and JSON
/// errors answered in OpenAI's shape (400, 408, 413, 503). It holds the invocation's place among
/// those in flight and the body's memory charge until the invocation ends.
pub struct JsonBody(pub Value, pub Bytes, pub Admitted);

/// What an admitted request holds while it is served.
pub struct Admitted {
    pub slot: limits::Slot,
    pub charge: limits::Charge,
}

impl FromRequest<Shared> for JsonBody {
    type Rejection = Response;

    async fn from_request(req: Request, g: &Shared) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        // A slow client holds memory for what it sent, but no place among the invocations.
        let (bytes, charge) = limits::read_body(&g.guard, &parts.headers, body).await?;
        let slot = g.guard.slot().ok_or_else(|| {
            limits::overloaded("every request slot is taken (GATEWAY_MAX_CONCURRENT_REQUESTS)")
        })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v @ Value::Object(_)) => Ok(JsonBody(v, bytes, Admitted { slot, charge })),
            Ok(_) => Err(openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "request body must be a JSON object",
            )),
            Err(e) => Err(openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("request body is not valid JSON: {e}"),
            )),
        }
    }
}

/// MLflow's unified invocations route: chat, completions or embeddings by the body's shape.
async fn mlflow_invocations(
    State(g): State<Shared>,
    Path(endpoint): Path<String>,
    Caller(caller): Caller,
    headers: HeaderMap,
    body: JsonBody,
) -> Response {
    const ROUTE: &str = "/gateway/{endpoint}/mlflow/invocations";
    if endpoint != g.endpoint.name {
        return unknown_endpoint(&g, ROUTE, &endpoint);
    }
    let op = if body.0.get("messages").is_some() {
        Operation::Chat
    } else if body.0.get("input").is_some() {
        Operation::Embeddings
    } else if body.0.get("prompt").is_some() {
        Operation::Completions
    } else {
        return invoke::reject(
            &g,
            ROUTE,
            StatusCode::BAD_REQUEST,
            "the body needs `messages` (chat), `prompt` (completions) or `input` (embeddings)",
        );
    };
    invoke::run(
        &g,
        Call::unified(op, ROUTE),
        caller.as_deref(),
        &headers,
        body,
    )
    .await
}

/// A route of the OpenAI API for this endpoint.
fn unified_route(op: Operation, route: &'static str) -> MethodRouter<Shared> {
    post(
        move |State(g): State<Shared>,
              Caller(caller): Caller,
              headers: HeaderMap,
              body: JsonBody| async move {
            invoke::run(
                &g,
                Call::unified(op, route),
                caller.as_deref(),
                &headers,
                body,
            )
            .await
        },
    )
}

/// One of MLflow's routes that take the endpoint's name as `model`.
fn named_route(
    op: Operation,
    route: &'static str,
    request_type: RequestType,
) -> MethodRouter<Shared> {
    post(
        move |State(g): State<Shared>,
              Caller(caller): Caller,
              headers: HeaderMap,
              body: JsonBody| async move {
            if let Some(resp) = check_model_is_endpoint(&g, route, &body.0) {
                return resp;
            }
            let call = Call::new(op, route, request_type);
            invoke::run(&g, call, caller.as_deref(), &headers, body).await
        },
    )
}

async fn passthrough_anthropic(
    State(g): State<Shared>,
    Caller(caller): Caller,
    headers: HeaderMap,
    body: JsonBody,
) -> Response {
    const ROUTE: &str = "/gateway/anthropic/v1/messages";
    if let Some(resp) = check_model_is_endpoint(&g, ROUTE, &body.0) {
        return resp;
    }
    invoke::run_anthropic_passthrough(&g, ROUTE, caller.as_deref(), &headers, body).await
}

/// MLflow's routes take the endpoint's name as `model`.
fn check_model_is_endpoint(g: &Gateway, route: &'static str, body: &Value) -> Option<Response> {
    match body.get("model").and_then(Value::as_str) {
        Some(m) if m == g.endpoint.name => None,
        Some(m) => Some(unknown_endpoint(g, route, m)),
        None => Some(invoke::reject(
            g,
            route,
            StatusCode::BAD_REQUEST,
            format!(
                "`model` is required: the endpoint's name, {:?}",
                g.endpoint.name
            ),
        )),
    }
}

fn unknown_endpoint(g: &Gateway, route: &'static str, name: &str) -> Response {
    invoke::reject(
        g,
        route,
        StatusCode::NOT_FOUND,
        format!(
            "endpoint {name:?} is not served here; this gateway serves {:?}",
            g.endpoint.name
        ),
    )
}

async fn models(State(g): State<Shared>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": g.endpoint.name,
            "object": "model",
            "created": 0,
            "owned_by": "mlflow-gateway-operator",
        }]
    }))
    .into_response()
}

async fn render_metrics(State(g): State<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        g.metrics.encode(g.telemetry.stats()),
    )
        .into_response()
}

async fn not_found(State(g): State<Shared>, req: Request) -> Response {
    invoke::reject(
        &g,
        "unknown",
        StatusCode::NOT_FOUND,
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(State(g): State<Shared>, req: Request) -> Response {
    invoke::reject(
        &g,
        "unknown",
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}
