//! `run-gateway`: runs an endpoint's gateway on this machine exactly as its pods run it
//! ([`mgo_dev::declared`]), for the demo (kwok pods run no process) and to debug an endpoint.
//! Replaces itself with the gateway process; nothing secret is printed or written to disk.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use mgo_dev::declared::DeclaredGateway;

/// Runs the gateway of the GatewayEndpoint ENDPOINT in NAMESPACE as its Deployment declares it:
/// the container's arguments and environment (Secret references resolved with your Kubernetes
/// rights), the ConfigMap written to a local directory. Uses KUBECONFIG (or ~/.kube/config).
#[derive(Parser)]
#[command(version)]
struct Args {
    namespace: String,
    endpoint: String,
    /// Address to listen on, e.g. 127.0.0.1:8080.
    listen: std::net::SocketAddr,
    /// The operator binary (it is also the gateway).
    #[arg(default_value = "target/debug/mlflow-gateway-operator")]
    binary: PathBuf,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (KUBECONFIG)")?;
    let config_dir = std::env::temp_dir().join(format!(
        "mgo-run-gateway-{}-{}-{}",
        args.namespace,
        args.endpoint,
        std::process::id()
    ));
    let gateway = DeclaredGateway::read(&client, &args.namespace, &args.endpoint, &config_dir)
        .await
        .with_context(|| format!("the gateway of {}/{}", args.namespace, args.endpoint))?;
    let err = gateway.command(&args.binary, args.listen).exec();
    Err(err).with_context(|| format!("running {}", args.binary.display()))
}
