use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::Method;
use clap::{Parser, Subcommand, ValueEnum};
use kube::CustomResourceExt;

use k8s_openapi::api::core::v1::ResourceRequirements;
use mlflow_gateway_operator::api::GatewayEndpoint;
use mlflow_gateway_operator::controller::{self, Context, Settings};
use mlflow_gateway_operator::deploy::{self, GatewayDefaults};
use mlflow_gateway_operator::gateway;
use mlflow_gateway_operator::gateway::tracing::Telemetry;
use mlflow_gateway_operator::leader;
use mlflow_gateway_operator::metrics::{self, Metrics};
use mlflow_gateway_operator::mlflow::{self, MlflowClient, MlflowConfig};

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
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Base URL of the MLflow UI for status.experimentUrl (default: MLFLOW_TRACKING_URI).
    #[arg(long, env = "MLFLOW_UI_URL")]
    mlflow_ui_url: Option<url::Url>,
    /// Seconds between drift checks of a quiet endpoint (a check that finds no drift writes nothing).
    #[arg(long, env = "RESYNC_PERIOD_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    resync_period_seconds: u64,
    /// Endpoints reconciled at once.
    #[arg(long, env = "CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Longest wait, in seconds, between retries of an endpoint that keeps failing.
    #[arg(long, env = "MAX_BACKOFF_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    max_backoff_seconds: u64,
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Image of the gateway pods (the operator's own image: the same binary).
    #[arg(long, env = "GATEWAY_IMAGE", default_value = DEFAULT_GATEWAY_IMAGE)]
    gateway_image: String,
    /// Tracking URI the gateway pods send traces to (default: MLFLOW_TRACKING_URI), e.g. the
    /// tracking server's in-cluster Service when the operator reaches it another way.
    #[arg(long, env = "GATEWAY_MLFLOW_TRACKING_URI")]
    gateway_tracking_uri: Option<url::Url>,
    /// Skip TLS verification of the tracking server in the gateway pods.
    #[arg(long, env = "GATEWAY_MLFLOW_TRACKING_INSECURE_TLS", default_value_t = false, action = clap::ArgAction::Set)]
    gateway_insecure_tls: bool,
    /// A PEM CA bundle the gateway pods trust for the tracking server (e.g. the same file as
    /// MLFLOW_TRACKING_SERVER_CERT_PATH). Read at start and put in each endpoint's ConfigMap,
    /// with MLFLOW_TRACKING_SERVER_CERT_PATH set in its pods. Not with
    /// GATEWAY_MLFLOW_TRACKING_INSECURE_TLS.
    #[arg(long, env = "GATEWAY_MLFLOW_TRACKING_SERVER_CERT_PATH")]
    gateway_ca_bundle: Option<std::path::PathBuf>,
    /// A Secret in the operator's namespace (POD_NAMESPACE) holding the trace-writing MLflow
    /// credential of the gateway pods: keys `username` and `password`, or `token`. The operator
    /// mirrors it into each endpoint's namespace, for endpoints without
    /// spec.tracing.credentialsSecretRef. Never the operator's own credential.
    #[arg(long, env = "GATEWAY_MLFLOW_CREDENTIALS_SECRET")]
    gateway_credentials_secret: Option<String>,
    /// Default requests and limits of the gateway container, as JSON, e.g.
    /// '{"requests":{"cpu":"100m","memory":"64Mi"},"limits":{"memory":"256Mi"}}'.
    #[arg(long, env = "GATEWAY_RESOURCES", value_parser = parse_resources)]
    gateway_resources: Option<ResourceRequirements>,
    /// The namespace the operator runs in (from the downward API in the Helm chart).
    #[arg(long, env = "POD_NAMESPACE")]
    operator_namespace: Option<String>,
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

/// The image this build of the operator is published as.
const DEFAULT_GATEWAY_IMAGE: &str = concat!(
    "ghcr.io/mlflow-gateway-operator/mlflow-gateway-operator:",
    env!("CARGO_PKG_VERSION")
);

fn parse_resources(s: &str) -> Result<ResourceRequirements, String> {
    serde_json::from_str(s).map_err(|e| format!("not a ResourceRequirements JSON object: {e}"))
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
    let loaded = gateway::config::load(&args.endpoint, &|k| std::env::var(k).ok())?;
    let telemetry = match loaded.telemetry {
        Some(config) => Telemetry::new(config).context("trace export to MLflow")?,
        None => Telemetry::disabled(),
    };
    let settings = gateway::ServerSettings {
        listen: args.listen,
        max_body_bytes: args.max_body_bytes,
        attempt_timeout: Duration::from_secs(args.attempt_timeout_seconds),
    };
    let gw = Arc::new(gateway::Gateway {
        endpoint: loaded.endpoint,
        http: gateway::http_client().context("HTTP client for providers")?,
        telemetry,
        metrics: Default::default(),
        attempt_timeout: settings.attempt_timeout,
    });
    gateway::serve(gw, &settings)
        .await
        .with_context(|| format!("serving on {}", args.listen))
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    let mlflow = MlflowConfig::from_env().context("MLflow tracking server configuration")?;
    let ui_url = args
        .mlflow_ui_url
        .unwrap_or_else(|| mlflow.tracking_uri().clone());
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
    let elector = leader_elector(&args.leader, args.operator_namespace.as_deref(), &config)?;
    let client = kube::client::ClientBuilder::try_from(config)
        .context("Kubernetes client")?
        .with_layer(&count_writes)
        .build();
    if args.gateway_credentials_secret.is_some() && args.operator_namespace.is_none() {
        anyhow::bail!(
            "GATEWAY_MLFLOW_CREDENTIALS_SECRET is set, but not the namespace it is in: set POD_NAMESPACE"
        );
    }
    let mut gateway_tracking_uri = args
        .gateway_tracking_uri
        .unwrap_or_else(|| mlflow.tracking_uri().clone());
    // Credentials in the URI would land in every Deployment: never copy them.
    let _ = gateway_tracking_uri.set_username("");
    let _ = gateway_tracking_uri.set_password(None);
    let gateway_tls = mlflow::TlsTrust::from_settings(
        args.gateway_insecure_tls,
        args.gateway_ca_bundle.as_deref(),
        mlflow::TlsSettingNames {
            insecure: "GATEWAY_MLFLOW_TRACKING_INSECURE_TLS",
            cert_path: "GATEWAY_MLFLOW_TRACKING_SERVER_CERT_PATH",
        },
    )?;
    let gateway_ca_bundle = gateway_tls.ca_bundle().map(|bundle| bundle.pem.clone());
    let settings = Settings {
        gateway: GatewayDefaults {
            image: args.gateway_image,
            tracking_uri: gateway_tracking_uri
                .as_str()
                .trim_end_matches('/')
                .to_string(),
            insecure_tls: args.gateway_insecure_tls,
            ca_bundle: gateway_ca_bundle,
            resources: args
                .gateway_resources
                .unwrap_or_else(deploy::default_resources),
        },
        gateway_credentials_secret: args.gateway_credentials_secret,
        operator_namespace: args.operator_namespace,
        ui_url,
        resync: Duration::from_secs(args.resync_period_seconds),
        concurrency: args.concurrency,
        namespace: args.namespace,
        max_backoff: Duration::from_secs(args.max_backoff_seconds),
    };
    let server = metrics::serve(args.metrics_addr, metrics.clone());
    tracing::info!(
        tracking_uri = %mlflow.tracking_uri(),
        namespace = settings.namespace.as_deref().unwrap_or("<all>"),
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
    tracing::info!(%lease, identity = %elector.config().identity, "waiting to become the leader");
    tokio::select! {
        () = elector.acquire() => {}
        () = shutdown_signal() => {
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

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
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
