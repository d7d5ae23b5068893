//! `mlflow-gateway-operator gateway`: an OpenAI-compatible LLM gateway for one `GatewayEndpoint`
//! that traces every invocation into the endpoint's MLflow experiment.

pub mod access;
pub mod config;
mod invoke;
pub mod metrics;
pub mod providers;
pub mod routing;
pub mod tracing;

use std::net::SocketAddr;
use std::sync::Arc;
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
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
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
}

pub type Shared = Arc<Gateway>;

pub fn router(gateway: Shared, max_body_bytes: usize) -> Router {
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
        .route("/readyz", get(|| async { "ok" }))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(gateway)
}

/// Serves until SIGTERM or Ctrl-C, then flushes traces.
pub async fn serve(gateway: Shared, settings: &ServerSettings) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    ::tracing::info!(
        addr = %settings.listen,
        endpoint = %gateway.endpoint.name,
        "gateway listening"
    );
    let app = router(gateway.clone(), settings.max_body_bytes);
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::shutdown::signal())
        .await?;
    gateway.telemetry.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
pub fn openai_error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "error": {"message": message.into(), "type": kind, "param": null, "code": status.as_u16()}
    });
    (status, axum::Json(body)).into_response()
}

/// A JSON request body (parsed, and its text), with body and JSON errors answered in OpenAI's
/// shape (400, 413).
pub struct JsonBody(pub Value, pub Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                openai_error(
                    status,
                    "invalid_request_error",
                    "request body is larger than the gateway accepts (GATEWAY_MAX_BODY_BYTES)",
                )
            } else {
                openai_error(status, "invalid_request_error", rejection.body_text())
            }
        })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v @ Value::Object(_)) => Ok(JsonBody(v, bytes)),
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
