//! The controller's settings: its command-line flags and environment variables ([`Args`]), and
//! [`Settings`], built from them by one constructor that enforces every rule once (no credential
//! copied out of a tracking URI, a credential Secret only with the namespace it is in, the gateway
//! pods' TLS settings consistent and their CA bundle read at start). Its fields are private, so a
//! `Settings` that exists is a valid one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::ResourceRequirements;
use url::Url;

use super::workload::render::{GatewayDefaults, default_resources};
use crate::api::ExportMode;
use crate::mlflow::{self, ConfigError};

/// The image this build of the operator is published as.
pub const DEFAULT_GATEWAY_IMAGE: &str = concat!(
    "ghcr.io/mlflow-gateway-operator/mlflow-gateway-operator:",
    env!("CARGO_PKG_VERSION")
);

/// The variable naming the gateway pods' CA bundle, named in its errors.
const ENV_GATEWAY_CA_BUNDLE: &str = "GATEWAY_MLFLOW_TRACKING_SERVER_CERT_PATH";
const ENV_GATEWAY_INSECURE_TLS: &str = "GATEWAY_MLFLOW_TRACKING_INSECURE_TLS";

/// The controller's flags (each also an environment variable), as given.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Base URL of the MLflow UI for status.experimentUrl (default: MLFLOW_TRACKING_URI).
    #[arg(long, env = "MLFLOW_UI_URL")]
    pub mlflow_ui_url: Option<Url>,
    /// Seconds between drift checks of a quiet endpoint (a check that finds no drift writes nothing).
    #[arg(long, env = "RESYNC_PERIOD_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub resync_period_seconds: u64,
    /// Endpoints reconciled at once.
    #[arg(long, env = "CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Longest wait, in seconds, between retries of an endpoint that keeps failing; also of a
    /// failing watch, which is retried at least every 30 s whatever this says.
    #[arg(long, env = "MAX_BACKOFF_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_backoff_seconds: u64,
    /// Image of the gateway pods (the operator's own image: the same binary).
    #[arg(long, env = "GATEWAY_IMAGE", default_value = DEFAULT_GATEWAY_IMAGE)]
    pub gateway_image: String,
    /// Tracking URI the gateway pods send traces to (default: MLFLOW_TRACKING_URI), e.g. the
    /// tracking server's in-cluster Service when the operator reaches it another way.
    #[arg(long, env = "GATEWAY_MLFLOW_TRACKING_URI")]
    pub gateway_tracking_uri: Option<Url>,
    /// Skip TLS verification of the tracking server in the gateway pods.
    #[arg(long, env = "GATEWAY_MLFLOW_TRACKING_INSECURE_TLS", default_value_t = false, action = clap::ArgAction::Set)]
    pub gateway_insecure_tls: bool,
    /// A PEM CA bundle the gateway pods trust for the tracking server (e.g. the same file as
    /// MLFLOW_TRACKING_SERVER_CERT_PATH). Read at start and put in each endpoint's ConfigMap,
    /// with MLFLOW_TRACKING_SERVER_CERT_PATH set in its pods. Not with
    /// GATEWAY_MLFLOW_TRACKING_INSECURE_TLS.
    #[arg(long, env = "GATEWAY_MLFLOW_TRACKING_SERVER_CERT_PATH")]
    pub gateway_ca_bundle: Option<PathBuf>,
    /// A Secret in the operator's namespace (POD_NAMESPACE) holding the trace-writing MLflow
    /// credential of the gateway pods: keys `username` and `password`, or `token`. The operator
    /// mirrors it into each endpoint's namespace, for endpoints without
    /// spec.tracing.credentialsSecretRef. Never the operator's own credential.
    #[arg(long, env = "GATEWAY_MLFLOW_CREDENTIALS_SECRET")]
    pub gateway_credentials_secret: Option<String>,
    /// How the gateway pods get their trace credential when an endpoint names none: `auto` (an
    /// MLflow user per endpoint when the operator's account is an MLflow admin, else the mirrored
    /// operator-wide credential) or `mirrored` (never manage MLflow users).
    #[arg(
        long,
        env = "GATEWAY_TRACE_CREDENTIALS",
        value_enum,
        default_value = "auto"
    )]
    pub trace_credentials: TraceCredentials,
    /// Default requests and limits of the gateway container, as JSON, e.g.
    /// '{"requests":{"cpu":"100m","memory":"64Mi"},"limits":{"memory":"256Mi"}}'.
    #[arg(long, env = "GATEWAY_RESOURCES", value_parser = parse_resources)]
    pub gateway_resources: Option<ResourceRequirements>,
    /// The ClusterRole granting `create tokenreviews` (the chart's), which the operator binds to
    /// the ServiceAccount of each endpoint with spec.access.serviceAccounts (it holds `bind` on
    /// that role only). Unset: such endpoints are refused with a message saying so.
    #[arg(long, env = "GATEWAY_TOKEN_REVIEW_CLUSTER_ROLE")]
    pub gateway_token_review_cluster_role: Option<String>,
    /// How the gateway pods send traces to MLflow unless an endpoint says (spec.tracing.exportMode):
    /// info-then-spans, spans-only or adaptive. Unset: the gateway's own default.
    #[arg(long, env = "GATEWAY_TRACE_EXPORT_MODE", value_parser = parse_export_mode)]
    pub gateway_trace_export_mode: Option<ExportMode>,
    /// The namespace the operator runs in (from the downward API in the Helm chart).
    #[arg(long, env = "POD_NAMESPACE")]
    pub operator_namespace: Option<String>,
}

/// Whether the operator may manage an MLflow user per endpoint.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TraceCredentials {
    /// Per-endpoint users when the tracking server and the operator's account allow it.
    #[default]
    Auto,
    /// Always the mirrored operator-wide credential (or none).
    Mirrored,
}

fn parse_export_mode(s: &str) -> Result<ExportMode, String> {
    ExportMode::from_env_value(s).ok_or_else(|| {
        format!("{s:?} is not an export mode: info-then-spans, spans-only or adaptive")
    })
}

fn parse_resources(s: &str) -> Result<ResourceRequirements, String> {
    serde_json::from_str(s).map_err(|e| format!("not a ResourceRequirements JSON object: {e}"))
}

/// Settings that cannot be used together, or a file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "GATEWAY_MLFLOW_CREDENTIALS_SECRET is set, but not the namespace it is in: set POD_NAMESPACE"
    )]
    CredentialsWithoutNamespace,
    /// The gateway pods' TLS settings break mlflow's TLS rule, or their CA bundle is unusable.
    #[error(transparent)]
    GatewayTls(#[from] ConfigError),
}

/// A Secret in the operator's namespace, mirrored into endpoints' namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorSecret {
    pub namespace: String,
    pub name: String,
}

/// Operator-wide settings, valid by construction ([`Settings::from_args`]).
#[derive(Clone, Debug)]
pub struct Settings {
    ui_url: Url,
    resync: Duration,
    concurrency: u16,
    namespace: Option<String>,
    max_backoff: Duration,
    gateway: GatewayDefaults,
    gateway_credentials: Option<OperatorSecret>,
    trace_credentials: TraceCredentials,
    operator_namespace: Option<String>,
}

impl Settings {
    /// Checks `args` and fills in what they leave to `tracking_uri` (the operator's own tracking
    /// server): the UI URL and where the gateway pods send traces. Reads the pods' CA bundle.
    pub fn from_args(args: Args, tracking_uri: &Url) -> Result<Settings, SettingsError> {
        let gateway_credentials = match (args.gateway_credentials_secret, &args.operator_namespace)
        {
            (None, _) => None,
            (Some(_), None) => return Err(SettingsError::CredentialsWithoutNamespace),
            (Some(name), Some(namespace)) => Some(OperatorSecret {
                namespace: namespace.clone(),
                name,
            }),
        };
        let ca_bundle =
            gateway_ca_bundle(args.gateway_insecure_tls, args.gateway_ca_bundle.as_deref())?;
        let gateway_tracking_uri = args
            .gateway_tracking_uri
            .unwrap_or_else(|| tracking_uri.clone());
        Ok(Settings {
            ui_url: args.mlflow_ui_url.unwrap_or_else(|| tracking_uri.clone()),
            resync: Duration::from_secs(args.resync_period_seconds),
            concurrency: args.concurrency,
            namespace: args.namespace,
            max_backoff: Duration::from_secs(args.max_backoff_seconds),
            gateway: GatewayDefaults {
                image: args.gateway_image,
                tracking_uri: without_credentials(gateway_tracking_uri),
                insecure_tls: args.gateway_insecure_tls,
                ca_bundle,
                resources: args.gateway_resources.unwrap_or_else(default_resources),
                token_review_cluster_role: args
                    .gateway_token_review_cluster_role
                    .filter(|r| !r.is_empty()),
                export_mode: args.gateway_trace_export_mode,
            },
            gateway_credentials,
            trace_credentials: args.trace_credentials,
            operator_namespace: args.operator_namespace,
        })
    }

    /// Base URL of the MLflow UI, for `status.experimentUrl`.
    pub fn ui_url(&self) -> &Url {
        &self.ui_url
    }

    /// How often a quiet endpoint is re-checked for drift in MLflow.
    pub fn resync(&self) -> Duration {
        self.resync
    }

    /// Endpoints reconciled at once.
    pub fn concurrency(&self) -> u16 {
        self.concurrency
    }

    /// Watch this namespace only (default: all).
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// The longest wait between retries of a failing endpoint.
    pub fn max_backoff(&self) -> Duration {
        self.max_backoff
    }

    /// Defaults of the gateway pods.
    pub fn gateway(&self) -> &GatewayDefaults {
        &self.gateway
    }

    /// The Secret holding the trace-writing credential the gateway pods use (mirrored into each
    /// endpoint's namespace) unless an endpoint names its own.
    pub fn gateway_credentials(&self) -> Option<&OperatorSecret> {
        self.gateway_credentials.as_ref()
    }

    /// Whether the operator may manage an MLflow user per endpoint.
    pub fn trace_credentials(&self) -> TraceCredentials {
        self.trace_credentials
    }

    /// The namespace the operator runs in.
    pub fn operator_namespace(&self) -> Option<&str> {
        self.operator_namespace.as_deref()
    }
}

/// The URI as the pods get it: credentials in it would land in every Deployment, so never copy
/// them; no trailing slash.
fn without_credentials(mut uri: Url) -> String {
    let _ = uri.set_username("");
    let _ = uri.set_password(None);
    uri.as_str().trim_end_matches('/').to_string()
}

/// The gateway pods' TLS settings, under mlflow's one TLS rule (insecure TLS or a CA bundle, not
/// both). The bundle (PEM) is read now, so a bad file stops the operator at start rather than
/// every pod later.
fn gateway_ca_bundle(insecure: bool, path: Option<&Path>) -> Result<Option<String>, SettingsError> {
    let trust = mlflow::TlsTrust::from_settings(
        insecure,
        path,
        mlflow::TlsSettingNames {
            insecure: ENV_GATEWAY_INSECURE_TLS,
            cert_path: ENV_GATEWAY_CA_BUNDLE,
        },
    )?;
    Ok(trust.ca_bundle().map(|bundle| bundle.pem.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(flags: &[&str]) -> Args {
        let argv = std::iter::once("controller").chain(flags.iter().copied());
        Cli::try_parse_from(argv).expect("flags parse").args
    }

    fn tracking() -> Url {
        Url::parse("https://user:secret@mlflow.example.com/").unwrap()
    }

    fn test_ca() -> String {
        format!("{}/tests/fixtures/test-ca.pem", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn defaults_come_from_the_tracking_uri_without_its_credentials() {
        let s = Settings::from_args(args(&[]), &tracking()).unwrap();
        assert_eq!(s.gateway().tracking_uri, "https://mlflow.example.com");
        assert_eq!(s.ui_url(), &tracking());
        assert_eq!(s.resync(), Duration::from_secs(300));
        assert_eq!(s.max_backoff(), Duration::from_secs(300));
        assert_eq!(s.concurrency(), 16);
        assert_eq!(s.namespace(), None);
        assert_eq!(s.gateway().image, DEFAULT_GATEWAY_IMAGE);
        assert_eq!(s.gateway().resources, default_resources());
        assert!(!s.gateway().insecure_tls && s.gateway().ca_bundle.is_none());
        assert_eq!(s.gateway_credentials(), None);
        assert_eq!(s.trace_credentials(), TraceCredentials::Auto);
        let mirrored =
            Settings::from_args(args(&["--trace-credentials", "mirrored"]), &tracking()).unwrap();
        assert_eq!(mirrored.trace_credentials(), TraceCredentials::Mirrored);
    }

    #[test]
    fn the_gateway_tracking_uri_loses_its_credentials_too() {
        let s = Settings::from_args(
            args(&[
                "--gateway-tracking-uri",
                "http://u:p@mlflow.mlflow.svc:5000/",
                "--mlflow-ui-url",
                "https://ui.example.com/",
                "--max-backoff-seconds",
                "1800",
            ]),
            &tracking(),
        )
        .unwrap();
        assert_eq!(s.gateway().tracking_uri, "http://mlflow.mlflow.svc:5000");
        assert_eq!(s.ui_url().as_str(), "https://ui.example.com/");
        assert_eq!(s.max_backoff(), Duration::from_secs(1800));
    }

    #[test]
    fn a_credential_secret_needs_the_operator_namespace() {
        let err = Settings::from_args(
            args(&["--gateway-credentials-secret", "traces"]),
            &tracking(),
        )
        .unwrap_err();
        assert!(matches!(err, SettingsError::CredentialsWithoutNamespace));
        assert!(err.to_string().contains("set POD_NAMESPACE"));
        let s = Settings::from_args(
            args(&[
                "--gateway-credentials-secret",
                "traces",
                "--operator-namespace",
                "ops",
            ]),
            &tracking(),
        )
        .unwrap();
        assert_eq!(
            s.gateway_credentials(),
            Some(&OperatorSecret {
                namespace: "ops".into(),
                name: "traces".into()
            })
        );
        assert_eq!(s.operator_namespace(), Some("ops"));
    }

    #[test]
    fn insecure_tls_and_a_ca_bundle_are_exclusive() {
        let err = Settings::from_args(
            args(&[
                "--gateway-insecure-tls",
                "true",
                "--gateway-ca-bundle",
                &test_ca(),
            ]),
            &tracking(),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            SettingsError::GatewayTls(ConfigError::InsecureTlsWithCertPath { .. })
        ));
        let insecure =
            Settings::from_args(args(&["--gateway-insecure-tls", "true"]), &tracking()).unwrap();
        assert!(insecure.gateway().insecure_tls);
    }

    #[test]
    fn the_ca_bundle_is_read_at_start_and_a_bad_one_names_its_variable() {
        let s =
            Settings::from_args(args(&["--gateway-ca-bundle", &test_ca()]), &tracking()).unwrap();
        let pem = std::fs::read_to_string(test_ca()).unwrap();
        assert_eq!(s.gateway().ca_bundle.as_deref(), Some(pem.as_str()));
        let missing = Settings::from_args(
            args(&["--gateway-ca-bundle", "/nonexistent/ca.pem"]),
            &tracking(),
        )
        .unwrap_err();
        assert!(matches!(
            missing,
            SettingsError::GatewayTls(ConfigError::CaBundle { .. })
        ));
        assert!(
            missing.to_string().contains(ENV_GATEWAY_CA_BUNDLE),
            "{missing}"
        );
    }

    #[test]
    fn the_export_mode_default_is_the_gateways_unless_set() {
        let s = Settings::from_args(args(&[]), &tracking()).unwrap();
        assert_eq!(s.gateway().export_mode, None);
        let s = Settings::from_args(
            args(&["--gateway-trace-export-mode", "spans-only"]),
            &tracking(),
        )
        .unwrap();
        assert_eq!(s.gateway().export_mode, Some(ExportMode::SpansOnly));
        let err = Cli::try_parse_from(["controller", "--gateway-trace-export-mode", "fast"])
            .err()
            .expect("an unknown mode is refused")
            .to_string();
        assert!(
            err.contains("info-then-spans, spans-only or adaptive"),
            "{err}"
        );
    }

    #[test]
    fn resources_are_json() {
        let s = Settings::from_args(
            args(&["--gateway-resources", r#"{"limits":{"memory":"1Gi"}}"#]),
            &tracking(),
        )
        .unwrap();
        assert_eq!(
            s.gateway().resources.limits.as_ref().unwrap()["memory"].0,
            "1Gi"
        );
        assert!(parse_resources("[]").is_err());
    }
}
