//! The one binary: `crd` prints the CRD, `controller` runs the operator, `gateway` serves an
//! endpoint. Only flag parsing and wiring live here; each half builds itself from its own
//! validated settings (`controller::Settings`, `gateway::config`).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::Method;
use clap::{Parser, Subcommand, ValueEnum};
use kube::CustomResourceExt;

use mlflow_gateway_operator::api::GatewayEndpoint;
use mlflow_gateway_operator::controller::metrics::{self, Metrics};
use mlflow_gateway_operator::controller::{self, Context, Settings};
use mlflow_gateway_operator::gateway;
use mlflow_gateway_operator::gateway::tracing::Telemetry;
use mlflow_gateway_operator::http_client::UpstreamClient;
use mlflow_gateway_operator::leader;
use mlflow_gateway_operator::mlflow::{MlflowClient, MlflowConfig};

// The gateway's hot path allocates many small JSON values: glibc's malloc was a fifth of its CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Kubernetes operator for traced LLM gateway endpoints, each with its experiment in MLflow.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Print the GatewayEndpoint CustomResourceDefinition as YAML.
    Crd,
    /// Run the controller. The tracking server is configured by MLflow's own variables:
    /// MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (Basic) or
    /// MLFLOW_TRACKING_TOKEN (Bearer), MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH.
    /// Kubernetes: KUBECONFIG, ~/.kube/config, or the in-cluster service account.
    Controller(Box<ControllerArgs>),
    /// Serve one GatewayEndpoint as an OpenAI-compatible LLM gateway that traces every invocation
    /// into the endpoint's MLflow experiment. API keys come from GATEWAY_API_KEY_<MODEL NAME>;
    /// MLflow from MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_ID and the credential variables.
    Gateway(GatewayArgs),
}

#[derive(clap::Args)]
struct GatewayArgs {
    /// The GatewayEndpoint manifest (YAML) to serve: the same file a user applies.
    #[arg(long, env = "GATEWAY_ENDPOINT_FILE")]
    endpoint: std::path::PathBuf,
    /// Address to listen on.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    listen: std::net::SocketAddr,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, env = "GATEWAY_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Seconds one attempt at a provider may take (to the first event, for streams).
    #[arg(long, env = "GATEWAY_ATTEMPT_TIMEOUT_SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    attempt_timeout_seconds: u64,
    /// Invocations in flight, streams included, beyond which requests are answered 503.
    #[arg(long, env = "GATEWAY_MAX_CONCURRENT_REQUESTS", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    max_concurrent_requests: u64,
    /// Bytes of request bodies (with their parsed form) and buffered upstream answers held at
    /// once; beyond, requests are answered 503 (413 for one body larger than it all). Default:
    /// 3/8 of GATEWAY_MEMORY_LIMIT_BYTES, else 96 MiB.
    #[arg(long, env = "GATEWAY_MEMORY_BUDGET_BYTES")]
    memory_budget_bytes: Option<usize>,
    /// The container's memory limit (the Deployment sets it from `limits.memory`).
    #[arg(long, env = "GATEWAY_MEMORY_LIMIT_BYTES")]
    memory_limit_bytes: Option<u64>,
    /// Largest upstream answer, whole or streamed, in bytes (502 beyond).
    #[arg(long, env = "GATEWAY_MAX_ANSWER_BYTES", default_value_t = 32 * 1024 * 1024)]
    max_answer_bytes: usize,
    /// Longest line or event of an upstream event stream, in bytes (502 beyond).
    #[arg(long, env = "GATEWAY_MAX_SSE_LINE_BYTES", default_value_t = 1024 * 1024)]
    max_sse_line_bytes: usize,
    /// Seconds an upstream stream may stay silent after its first event.
    #[arg(long, env = "GATEWAY_STREAM_IDLE_TIMEOUT_SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    stream_idle_timeout_seconds: u64,
    /// Seconds a client has to send its request headers, and then its body (408 for a body).
    #[arg(long, env = "GATEWAY_REQUEST_READ_TIMEOUT_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    request_read_timeout_seconds: u64,
}

#[derive(clap::Args)]
struct ControllerArgs {
    #[command(flatten)]
    settings: controller::Args,
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    #[command(flatten)]
    leader: LeaderArgs,
}

#[derive(clap::Args)]
struct LeaderArgs {
    /// Compete for a coordination.k8s.io Lease and reconcile only while holding it (for several
    /// replicas). The identity is POD_NAME, else the host name and a random suffix.
    #[arg(long, env = "LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the Lease (default: POD_NAMESPACE, else the kubeconfig's namespace).
    #[arg(long, env = "LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(
        long,
        env = "LEADER_ELECTION_ID",
        default_value = "mlflow-gateway-operator"
    )]
    leader_election_id: String,
    /// Seconds a follower waits, after the Lease last changed, before it takes over.
    #[arg(long, env = "LEADER_ELECTION_LEASE_DURATION_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    leader_election_lease_duration_seconds: u64,
    /// Seconds the leader keeps trying to renew before it stops (and exits non-zero).
    #[arg(long, env = "LEADER_ELECTION_RENEW_DEADLINE_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    leader_election_renew_deadline_seconds: u64,
    /// Seconds between attempts to acquire or renew the Lease.
    #[arg(long, env = "LEADER_ELECTION_RETRY_PERIOD_SECONDS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    leader_election_retry_period_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Crd => {
            print!("{}", serde_yaml::to_string(&GatewayEndpoint::crd())?);
            Ok(())
        }
        Command::Controller(args) => run_controller(*args).await,
        Command::Gateway(args) => run_gateway(args).await,
    }
}

async fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let env = |k: &str| std::env::var(k).ok();
    let config = gateway::config::load(&args.endpoint, &env)?;
    let access = gateway::access::Access::start(config.access, &env)
        .await
        .map_err(|e| anyhow::anyhow!("spec.access: {e}"))?;
    let telemetry = match config.tracing {
        Some(config) => Telemetry::new(config).context("trace export to MLflow")?,
        None => Telemetry::disabled(),
    };
    let settings = gateway::ServerSettings {
        listen: args.listen,
        attempt_timeout: Duration::from_secs(args.attempt_timeout_seconds),
    };
    let limits = gateway::limits::Limits {
        max_concurrent_requests: usize::try_from(args.max_concurrent_requests)
            .unwrap_or(usize::MAX),
        memory_budget_bytes: args
            .memory_budget_bytes
            .unwrap_or_else(|| gateway::limits::budget_for(args.memory_limit_bytes)),
        max_body_bytes: args.max_body_bytes,
        max_answer_bytes: args.max_answer_bytes,
        max_sse_line_bytes: args.max_sse_line_bytes,
        stream_idle_timeout: Duration::from_secs(args.stream_idle_timeout_seconds),
        request_read_timeout: Duration::from_secs(args.request_read_timeout_seconds),
    };
    let gw = Arc::new(gateway::Gateway::new(
        config.endpoint,
        gateway::routing::Routing::new(config.routing),
        UpstreamClient::new().context("HTTP client for providers")?,
        telemetry,
        settings.attempt_timeout,
        limits,
        access,
    ));
    gateway::serve(gw, &settings)
        .await
        .with_context(|| format!("serving on {}", args.listen))
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    let mlflow = MlflowConfig::from_env().context("MLflow tracking server configuration")?;
    let settings = Settings::from_args(args.settings, mlflow.tracking_uri())?;
    let metrics = Arc::new(Metrics::default());
    let tracking = MlflowClient::new(&mlflow)
        .context("MLflow client")?
        .with_observer(metrics.clone());
    let config = kube::Config::infer()
        .await
        .context("Kubernetes client configuration (KUBECONFIG, ~/.kube/config or in-cluster)")?;
    // Counts every mutating request the operator sends to the API server.
    let writes = metrics.kube_writes.clone();
    let count_writes =
        tower::util::MapRequestLayer::new(move |req: axum::http::Request<kube::client::Body>| {
            if !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
                writes.inc();
            }
            req
        });
    let elector = leader_elector(&args.leader, settings.operator_namespace(), &config)?;
    let client = kube::client::ClientBuilder::try_from(config)
        .context("Kubernetes client")?
        .with_layer(&count_writes)
        .build();
    let server = metrics::serve(args.metrics_addr, metrics.clone());
    tracing::info!(
        tracking_uri = %mlflow.tracking_uri(),
        namespace = settings.namespace().unwrap_or("<all>"),
        "starting controller"
    );
    let ctx = Arc::new(Context::new(client, tracking, settings, metrics.clone()));
    tokio::select! {
        led = lead(ctx, elector, &metrics) => led,
        served = server => served.with_context(|| format!("metrics server on {}", args.metrics_addr)),
    }
}

/// The leader elector, when leader election is on. Its Lease requests go through a client of
/// their own, so `kube_writes_total` keeps counting only what the controller writes.
fn leader_elector(
    args: &LeaderArgs,
    operator_namespace: Option<&str>,
    kube_config: &kube::Config,
) -> anyhow::Result<Option<leader::Elector>> {
    if !args.leader_election {
        return Ok(None);
    }
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let config = leader::Config {
        namespace: args
            .leader_election_namespace
            .clone()
            .or_else(|| operator_namespace.map(str::to_string))
            .unwrap_or_else(|| kube_config.default_namespace.clone()),
        name: args.leader_election_id.clone(),
        identity: env("POD_NAME").unwrap_or_else(leader::default_identity),
        lease_duration: Duration::from_secs(args.leader_election_lease_duration_seconds),
        renew_deadline: Duration::from_secs(args.leader_election_renew_deadline_seconds),
        retry_period: Duration::from_secs(args.leader_election_retry_period_seconds),
    };
    config.validate().map_err(anyhow::Error::msg)?;
    let client = kube::Client::try_from(kube_config.clone())
        .context("Kubernetes client for leader election")?;
    Ok(Some(leader::Elector::new(client, config)))
}

/// Runs the controller: at once without leader election; otherwise once this instance holds the
/// Lease, for as long as it holds it. A leader that loses the Lease stops reconciling at once and
/// the process exits non-zero (it restarts as a follower). On SIGTERM/SIGINT the controller
/// finishes what it is doing, then the Lease is released so a follower takes over at once.
async fn lead(
    ctx: Arc<Context>,
    elector: Option<leader::Elector>,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let Some(mut elector) = elector else {
        metrics.leader.set(1);
        controller::run(ctx).await;
        return Ok(());
    };
    let lease = format!("{}/{}", elector.config().namespace, elector.config().name);
    // A follower is ready: it stands by (its watches start, and count, once it leads).
    metrics.health.standby();
    tracing::info!(%lease, identity = %elector.config().identity, "waiting to become the leader");
    tokio::select! {
        () = elector.acquire() => {}
        () = mlflow_gateway_operator::shutdown::signal() => {
            tracing::info!("shutting down; was not the leader");
            return Ok(());
        }
    }
    metrics.leader.set(1);
    let lost = tokio::select! {
        () = controller::run(ctx) => None,
        lost = elector.hold() => Some(lost),
    };
    metrics.leader.set(0);
    if let Some(lost) = lost {
        anyhow::bail!("lost leadership of {lease}: {lost}; exiting to restart as a follower");
    }
    match tokio::time::timeout(Duration::from_secs(5), elector.release()).await {
        Ok(Ok(true)) => tracing::info!(%lease, "released the leader lease"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %mlflow_gateway_operator::error_chain(&e), "could not release the leader lease; a follower takes over when it expires")
        }
        Err(_) => tracing::warn!(
            "timed out releasing the leader lease; a follower takes over when it expires"
        ),
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
