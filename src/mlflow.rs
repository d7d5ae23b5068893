//! A small client for the MLflow tracking server's REST API (experiments only).
//!
//! Configuration comes from MLflow's own environment variables (`MLFLOW_TRACKING_URI`,
//! `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`, `MLFLOW_TRACKING_TOKEN`,
//! `MLFLOW_TRACKING_INSECURE_TLS`, `MLFLOW_TRACKING_SERVER_CERT_PATH`), so an operator deployment
//! is configured like any other MLflow client.
//!
//! Errors are typed by MLflow's `error_code`, never by the HTTP status alone: MLflow answers
//! `RESOURCE_ALREADY_EXISTS`, `INVALID_PARAMETER_VALUE` and `BAD_REQUEST` all with HTTP 400, and
//! `INVALID_STATE` with HTTP 500. Transient failures (connection errors, timeouts, HTTP 429, 502,
//! 503, 504) are retried with exponential backoff; nothing else is.
//!
//! Credentials never appear in `Debug` output, error messages or logs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use url::Url;

/// How requests authenticate to the tracking server.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Auth {
    #[default]
    None,
    /// HTTP Basic, as MLflow's `basic-auth` app expects.
    Basic { username: String, password: String },
    /// `Authorization: Bearer <token>` (e.g. behind an authenticating proxy).
    Bearer { token: String },
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Auth::Bearer { .. } => f
                .debug_struct("Bearer")
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

/// Environment variables read by [`MlflowConfig::from_env`] (MLflow's own names).
pub const ENV_TRACKING_URI: &str = "MLFLOW_TRACKING_URI";
pub const ENV_USERNAME: &str = "MLFLOW_TRACKING_USERNAME";
pub const ENV_PASSWORD: &str = "MLFLOW_TRACKING_PASSWORD";
pub const ENV_TOKEN: &str = "MLFLOW_TRACKING_TOKEN";
pub const ENV_INSECURE_TLS: &str = "MLFLOW_TRACKING_INSECURE_TLS";
pub const ENV_SERVER_CERT_PATH: &str = "MLFLOW_TRACKING_SERVER_CERT_PATH";

/// Where the tracking server is and how to talk to it.
#[derive(Clone)]
pub struct MlflowConfig {
    /// Base URL of the tracking server, e.g. `http://127.0.0.1:5000` or `https://host/mlflow`.
    pub tracking_uri: Url,
    pub auth: Auth,
    /// Accept any server certificate (MLFLOW_TRACKING_INSECURE_TLS). Testing only.
    pub insecure_tls: bool,
    /// Extra CA bundle (PEM) to trust, in addition to the built-in roots.
    pub server_cert_path: Option<PathBuf>,
    /// Per-request timeout (connect + answer).
    pub request_timeout: Duration,
    /// Extra attempts after a transient failure.
    pub max_retries: u32,
}

impl fmt::Debug for MlflowConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MlflowConfig")
            .field("tracking_uri", &redacted_url(&self.tracking_uri))
            .field("auth", &self.auth)
            .field("insecure_tls", &self.insecure_tls)
            .field("server_cert_path", &self.server_cert_path)
            .field("request_timeout", &self.request_timeout)
            .field("max_retries", &self.max_retries)
            .finish()
    }
}

impl MlflowConfig {
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_MAX_RETRIES: u32 = 3;

    /// No authentication, verified TLS, 10 s timeout, 3 retries.
    pub fn new(tracking_uri: Url) -> Self {
        MlflowConfig {
            tracking_uri,
            auth: Auth::None,
            insecure_tls: false,
            server_cert_path: None,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            max_retries: Self::DEFAULT_MAX_RETRIES,
        }
    }

    /// Reads MLflow's own environment variables (see [`MlflowConfig::from_lookup`]).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `get` (a variable that is set but empty counts as unset):
    /// - `MLFLOW_TRACKING_URI` (required): an `http://` or `https://` URL, without credentials.
    /// - `MLFLOW_TRACKING_USERNAME` + `MLFLOW_TRACKING_PASSWORD`: Basic auth (both or neither).
    /// - `MLFLOW_TRACKING_TOKEN`: Bearer auth (not together with a username/password).
    /// - `MLFLOW_TRACKING_INSECURE_TLS`: `true`/`false` (any case).
    /// - `MLFLOW_TRACKING_SERVER_CERT_PATH`: a PEM CA bundle to trust (not with insecure TLS).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        let raw_uri = var(ENV_TRACKING_URI)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .ok_or(ConfigError::MissingTrackingUri)?;
        let tracking_uri = Url::parse(&raw_uri).map_err(|e| ConfigError::InvalidTrackingUri {
            reason: e.to_string(),
        })?;
        validate_tracking_uri(&tracking_uri)?;

        let auth = match (var(ENV_USERNAME), var(ENV_PASSWORD), var(ENV_TOKEN)) {
            (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                return Err(ConfigError::TokenWithBasicAuth);
            }
            (None, None, Some(token)) => Auth::Bearer { token },
            (Some(username), Some(password), None) => Auth::Basic { username, password },
            (Some(_), None, None) => {
                return Err(ConfigError::IncompleteBasicAuth {
                    set: ENV_USERNAME,
                    missing: ENV_PASSWORD,
                });
            }
            (None, Some(_), None) => {
                return Err(ConfigError::IncompleteBasicAuth {
                    set: ENV_PASSWORD,
                    missing: ENV_USERNAME,
                });
            }
            (None, None, None) => Auth::None,
        };

        let insecure_tls = match var(ENV_INSECURE_TLS) {
            None => false,
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                _ => return Err(ConfigError::InvalidInsecureTls { value: v }),
            },
        };
        let server_cert_path = var(ENV_SERVER_CERT_PATH).map(PathBuf::from);
        if insecure_tls && server_cert_path.is_some() {
            return Err(ConfigError::InsecureTlsWithCertPath);
        }

        Ok(MlflowConfig {
            auth,
            insecure_tls,
            server_cert_path,
            ..MlflowConfig::new(tracking_uri)
        })
    }
}

/// A configuration that cannot work; the message names the variable and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "MLFLOW_TRACKING_URI is not set: set it to the tracking server's base URL, e.g. http://mlflow.mlflow.svc:5000"
    )]
    MissingTrackingUri,
    #[error(
        "MLFLOW_TRACKING_URI is not a valid URL ({reason}): set it to the tracking server's base URL, e.g. http://mlflow.mlflow.svc:5000"
    )]
    InvalidTrackingUri { reason: String },
    #[error(
        "MLFLOW_TRACKING_URI uses the scheme '{scheme}': only http:// and https:// tracking servers are supported"
    )]
    UnsupportedScheme { scheme: String },
    #[error(
        "MLFLOW_TRACKING_URI must not contain credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
    )]
    CredentialsInTrackingUri,
    #[error("{set} is set but {missing} is not: Basic auth needs both (or set neither)")]
    IncompleteBasicAuth {
        set: &'static str,
        missing: &'static str,
    },
    #[error(
        "MLFLOW_TRACKING_TOKEN cannot be combined with MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD: set either a token or a username and password"
    )]
    TokenWithBasicAuth,
    #[error(
        "MLFLOW_TRACKING_TOKEN is not usable in an HTTP header (it contains control characters, e.g. a trailing newline): remove them"
    )]
    InvalidToken,
    #[error("MLFLOW_TRACKING_INSECURE_TLS must be 'true' or 'false', not '{value}'")]
    InvalidInsecureTls { value: String },
    #[error(
        "MLFLOW_TRACKING_INSECURE_TLS=true and MLFLOW_TRACKING_SERVER_CERT_PATH are exclusive: unset one of them"
    )]
    InsecureTlsWithCertPath,
    /// `variable`: the setting that named the file.
    #[error("{variable} {}: {reason}", path.display())]
    CaBundle {
        variable: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot build the HTTP client for the MLflow tracking server: {reason}")]
    HttpClient { reason: String },
}

fn validate_tracking_uri(uri: &Url) -> Result<(), ConfigError> {
    if !matches!(uri.scheme(), "http" | "https") {
        return Err(ConfigError::UnsupportedScheme {
            scheme: uri.scheme().to_string(),
        });
    }
    if !uri.username().is_empty() || uri.password().is_some() {
        return Err(ConfigError::CredentialsInTrackingUri);
    }
    if uri.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::InvalidTrackingUri {
            reason: "no host".to_string(),
        });
    }
    Ok(())
}

/// The URL with any password replaced, for Debug output.
fn redacted_url(uri: &Url) -> String {
    let mut u = uri.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("redacted"));
    }
    u.to_string()
}

/// `<tracking_uri>/api/2.0/mlflow/` (any path prefix kept, query and fragment dropped).
fn api_base(tracking_uri: &Url) -> Url {
    let mut base = tracking_uri.clone();
    base.set_query(None);
    base.set_fragment(None);
    let prefix = base.path().trim_end_matches('/').to_string();
    base.set_path(&format!("{prefix}/api/2.0/mlflow/"));
    base
}

// ---------------------------------------------------------------------------------------------
// Model

/// Which experiments a search returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ViewType {
    #[default]
    ActiveOnly,
    DeletedOnly,
    All,
}

impl ViewType {
    pub fn as_str(self) -> &'static str {
        match self {
            ViewType::ActiveOnly => "ACTIVE_ONLY",
            ViewType::DeletedOnly => "DELETED_ONLY",
            ViewType::All => "ALL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleStage {
    Active,
    /// Soft-deleted: restorable, and its name stays taken.
    Deleted,
    Other(String),
}

impl LifecycleStage {
    fn parse(s: &str) -> Self {
        match s {
            "active" => LifecycleStage::Active,
            "deleted" => LifecycleStage::Deleted,
            other => LifecycleStage::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            LifecycleStage::Active => "active",
            LifecycleStage::Deleted => "deleted",
            LifecycleStage::Other(s) => s,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Experiment {
    pub experiment_id: String,
    pub name: String,
    pub lifecycle_stage: LifecycleStage,
    pub tags: BTreeMap<String, String>,
    pub artifact_location: Option<String>,
    /// Milliseconds since the epoch.
    pub creation_time: Option<i64>,
    pub last_update_time: Option<i64>,
}

impl Experiment {
    pub fn is_active(&self) -> bool {
        self.lifecycle_stage == LifecycleStage::Active
    }

    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
}

/// One page of a search.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentPage {
    pub experiments: Vec<Experiment>,
    /// `Some` when more results follow: pass it back as `page_token`.
    pub next_page_token: Option<String>,
}

// Wire format. int64 fields may come as JSON numbers (MLflow's server) or strings (proto3 JSON).

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(i64),
    Str(String),
}

fn de_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => n.to_string(),
        NumOrStr::Str(s) => s,
    })
}

fn de_opt_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match Option::<NumOrStr>::deserialize(d)? {
        None => Ok(None),
        Some(NumOrStr::Num(n)) => Ok(Some(n)),
        Some(NumOrStr::Str(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("not an integer: {s:?}"))),
    }
}

#[derive(Debug, Deserialize)]
struct RawTag {
    key: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawExperiment {
    #[serde(deserialize_with = "de_id")]
    experiment_id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    artifact_location: Option<String>,
    #[serde(default)]
    lifecycle_stage: Option<String>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    creation_time: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    last_update_time: Option<i64>,
    #[serde(default)]
    tags: Option<Vec<RawTag>>,
}

impl From<RawExperiment> for Experiment {
    fn from(raw: RawExperiment) -> Self {
        Experiment {
            experiment_id: raw.experiment_id,
            name: raw.name.unwrap_or_default(),
            lifecycle_stage: LifecycleStage::parse(raw.lifecycle_stage.as_deref().unwrap_or("")),
            tags: raw
                .tags
                .unwrap_or_default()
                .into_iter()
                .map(|t| (t.key, t.value.unwrap_or_default()))
                .collect(),
            artifact_location: raw.artifact_location,
            creation_time: raw.creation_time,
            last_update_time: raw.last_update_time,
        }
    }
}

#[derive(Debug, Deserialize)]
struct CreateResponse {
    #[serde(deserialize_with = "de_id")]
    experiment_id: String,
}

#[derive(Debug, Deserialize)]
struct GetResponse {
    experiment: RawExperiment,
}

#[derive(Debug, Deserialize)]
struct SearchResponse {
    #[serde(default)]
    experiments: Option<Vec<RawExperiment>>,
    #[serde(default)]
    next_page_token: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Errors

/// MLflow's `error_code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    ResourceAlreadyExists,
    ResourceDoesNotExist,
    InvalidParameterValue,
    BadRequest,
    PermissionDenied,
    InvalidState,
    Other(String),
}

impl ErrorCode {
    pub fn parse(code: &str) -> Self {
        match code {
            "RESOURCE_ALREADY_EXISTS" => ErrorCode::ResourceAlreadyExists,
            "RESOURCE_DOES_NOT_EXIST" => ErrorCode::ResourceDoesNotExist,
            "INVALID_PARAMETER_VALUE" => ErrorCode::InvalidParameterValue,
            "BAD_REQUEST" => ErrorCode::BadRequest,
            "PERMISSION_DENIED" => ErrorCode::PermissionDenied,
            "INVALID_STATE" => ErrorCode::InvalidState,
            other => ErrorCode::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::ResourceAlreadyExists => "RESOURCE_ALREADY_EXISTS",
            ErrorCode::ResourceDoesNotExist => "RESOURCE_DOES_NOT_EXIST",
            ErrorCode::InvalidParameterValue => "INVALID_PARAMETER_VALUE",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::InvalidState => "INVALID_STATE",
            ErrorCode::Other(s) => s,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed MLflow call. `call` is the REST call, e.g. `experiments/create`.
#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    /// MLflow answered with an error body, typed by its `error_code`.
    #[error("MLflow {call}: {code} (HTTP {status}): {message}")]
    Api {
        call: &'static str,
        status: u16,
        code: ErrorCode,
        message: String,
    },
    /// HTTP 401: missing or wrong credentials.
    #[error(
        "MLflow {call}: not authenticated (HTTP 401): check MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
    )]
    Unauthenticated { call: &'static str },
    /// The server could not be reached, or did not answer in time (after retries).
    #[error("MLflow {call}: tracking server unavailable: {reason}")]
    Unavailable { call: &'static str, reason: String },
    /// An answer that is not MLflow's (e.g. an HTML error page from a proxy) or cannot be decoded.
    #[error("MLflow {call}: unexpected answer (HTTP {status}): {message}")]
    Protocol {
        call: &'static str,
        status: u16,
        message: String,
    },
}

impl MlflowError {
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            MlflowError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            MlflowError::Api { status, .. } | MlflowError::Protocol { status, .. } => Some(*status),
            MlflowError::Unauthenticated { .. } => Some(401),
            MlflowError::Unavailable { .. } => None,
        }
    }

    pub fn is_already_exists(&self) -> bool {
        self.code() == Some(&ErrorCode::ResourceAlreadyExists)
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Some(&ErrorCode::ResourceDoesNotExist)
    }

    /// Connection errors, timeouts, HTTP 429/502/503/504: worth retrying later.
    pub fn is_transient(&self) -> bool {
        match self {
            MlflowError::Unavailable { .. } => true,
            MlflowError::Api { status, .. } | MlflowError::Protocol { status, .. } => {
                is_transient_status(*status)
            }
            MlflowError::Unauthenticated { .. } => false,
        }
    }

    /// A short stable label for metrics and conditions.
    pub fn label(&self) -> &'static str {
        match self {
            MlflowError::Unauthenticated { .. } => "unauthenticated",
            MlflowError::Unavailable { .. } => "unavailable",
            MlflowError::Api { status: 429, .. } | MlflowError::Protocol { status: 429, .. } => {
                "rate_limited"
            }
            MlflowError::Api { code, status, .. } => match code {
                ErrorCode::ResourceAlreadyExists => "already_exists",
                ErrorCode::ResourceDoesNotExist => "not_found",
                ErrorCode::InvalidParameterValue => "invalid_parameter",
                ErrorCode::BadRequest => "bad_request",
                ErrorCode::PermissionDenied => "permission_denied",
                ErrorCode::InvalidState => "invalid_state",
                ErrorCode::Other(_) if is_transient_status(*status) => "unavailable",
                ErrorCode::Other(_) => "api_error",
            },
            MlflowError::Protocol { status, .. } if is_transient_status(*status) => "unavailable",
            MlflowError::Protocol { .. } => "protocol_error",
        }
    }

    pub fn call(&self) -> &'static str {
        match self {
            MlflowError::Api { call, .. }
            | MlflowError::Unauthenticated { call }
            | MlflowError::Unavailable { call, .. }
            | MlflowError::Protocol { call, .. } => call,
        }
    }
}

fn is_transient_status(status: u16) -> bool {
    matches!(status, 429 | 502 | 503 | 504)
}

/// Longest message kept from an answer (MLflow's messages may carry whole SQL statements).
const MAX_MESSAGE_CHARS: usize = 1000;

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// A readable excerpt of a non-MLflow answer: an HTML page's title, else its first words.
fn excerpt(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        return "empty body".to_string();
    }
    let lower = body.to_ascii_lowercase();
    if let (Some(start), Some(end)) = (lower.find("<title>"), lower.find("</title>")) {
        let start = start + "<title>".len();
        if start <= end {
            return format!("HTML page \"{}\"", truncate(body[start..end].trim(), 200));
        }
    }
    let flat = body.split_whitespace().collect::<Vec<_>>().join(" ");
    truncate(&flat, 200)
}

#[derive(Deserialize)]
struct ErrorBody {
    error_code: String,
    #[serde(default)]
    message: Option<String>,
}

/// Types an error answer (status >= 300) by MLflow's `error_code`.
fn classify(call: &'static str, status: u16, body: &str) -> MlflowError {
    if status == 401 {
        return MlflowError::Unauthenticated { call };
    }
    if let Ok(err) = serde_json::from_str::<ErrorBody>(body)
        && !err.error_code.is_empty()
    {
        return MlflowError::Api {
            call,
            status,
            code: ErrorCode::parse(&err.error_code),
            message: truncate(
                err.message.as_deref().unwrap_or("").trim(),
                MAX_MESSAGE_CHARS,
            ),
        };
    }
    match status {
        // MLflow's basic-auth app answers a plain-text "Permission denied".
        403 => MlflowError::Api {
            call,
            status,
            code: ErrorCode::PermissionDenied,
            message: excerpt(body),
        },
        404 => MlflowError::Protocol {
            call,
            status,
            message: format!(
                "{} (no such endpoint: is MLFLOW_TRACKING_URI the tracking server's base URL, including any path prefix?)",
                excerpt(body)
            ),
        },
        _ => MlflowError::Protocol {
            call,
            status,
            message: excerpt(body),
        },
    }
}

/// Decodes a success answer.
fn decode<T: DeserializeOwned>(
    call: &'static str,
    status: u16,
    body: &str,
) -> Result<T, MlflowError> {
    let text = if body.trim().is_empty() { "{}" } else { body };
    serde_json::from_str(text).map_err(|e| {
        let hint = if body.trim_start().starts_with('<') {
            format!(
                "expected JSON, got {} (is MLFLOW_TRACKING_URI the tracking server's base URL, including any path prefix?)",
                excerpt(body)
            )
        } else {
            format!("cannot decode the answer ({e}): {}", excerpt(body))
        };
        MlflowError::Protocol {
            call,
            status,
            message: hint,
        }
    })
}

/// The reason of a transport failure, with its causes (reqwest's own message is generic).
fn transport_reason(err: &reqwest::Error, timeout: Duration) -> String {
    if err.is_timeout() {
        let from = err
            .url()
            .map(|u| format!(" from {}", u.origin().ascii_serialization()))
            .unwrap_or_default();
        return format!("no answer{from} within {} ms", timeout.as_millis());
    }
    crate::error_chain(err)
}

/// Delay before retry number `retry` (0-based): 200 ms, doubling, at most 2 s.
fn backoff(retry: u32) -> Duration {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(2);
    FIRST.saturating_mul(2u32.saturating_pow(retry)).min(MAX)
}

// ---------------------------------------------------------------------------------------------
// Client

/// Sees every HTTP request the client makes (one per attempt), e.g. to feed metrics.
pub trait CallObserver: Send + Sync {
    /// `status` is the HTTP status code (`"200"`), or `"error"` when no answer came.
    fn observe(&self, call: &'static str, status: &str, seconds: f64);
}

enum Request<'a> {
    Get(&'a [(&'a str, &'a str)]),
    Post(serde_json::Value),
}

/// The experiments API of one tracking server. Cheap to clone; clones share the write counter.
#[derive(Clone)]
pub struct MlflowClient {
    http: reqwest::Client,
    tracking_uri: Url,
    api_base: Url,
    auth: Arc<Auth>,
    timeout: Duration,
    max_retries: u32,
    writes: Arc<AtomicU64>,
    observer: Option<Arc<dyn CallObserver>>,
}

impl fmt::Debug for MlflowClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MlflowClient")
            .field("tracking_uri", &redacted_url(&self.tracking_uri))
            .field("auth", &self.auth)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .finish_non_exhaustive()
    }
}

/// Reads a PEM CA bundle named by the setting `variable`: its text and its certificates (at
/// least one).
pub fn read_ca_bundle(
    variable: &'static str,
    path: &std::path::Path,
) -> Result<(String, Vec<reqwest::Certificate>), ConfigError> {
    let fail = |reason: String| ConfigError::CaBundle {
        variable,
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
        .map_err(|e| fail(format!("not a PEM certificate bundle ({e})")))?;
    if certs.is_empty() {
        return Err(fail("no PEM certificate in the file".to_string()));
    }
    Ok((pem, certs))
}

/// An HTTP client for the tracking server as `config` says (rustls, CA bundle, insecure flag),
/// shared by the REST client and the trace exporter. Redirects are not followed: a redirect would
/// turn POSTs into GETs and may drop credentials.
pub fn tracking_http_client(
    config: &MlflowConfig,
    timeout: Duration,
) -> Result<reqwest::Client, ConfigError> {
    if config.insecure_tls && config.server_cert_path.is_some() {
        return Err(ConfigError::InsecureTlsWithCertPath);
    }
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!(
            env!("CARGO_PKG_NAME"),
            "/",
            env!("CARGO_PKG_VERSION")
        ));
    if let Some(path) = &config.server_cert_path {
        let (_, certs) = read_ca_bundle(ENV_SERVER_CERT_PATH, path)?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if config.insecure_tls {
        tracing::warn!(
            "MLFLOW_TRACKING_INSECURE_TLS=true: the tracking server's certificate is not verified"
        );
        builder = builder.danger_accept_invalid_certs(true);
    }
    builder.build().map_err(|e| ConfigError::HttpClient {
        reason: e.to_string(),
    })
}

impl MlflowClient {
    pub fn new(config: &MlflowConfig) -> Result<Self, ConfigError> {
        validate_tracking_uri(&config.tracking_uri)?;
        if let Auth::Bearer { token } = &config.auth
            && reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).is_err()
        {
            return Err(ConfigError::InvalidToken);
        }
        if config.insecure_tls && config.server_cert_path.is_some() {
            return Err(ConfigError::InsecureTlsWithCertPath);
        }

        let http = tracking_http_client(config, config.request_timeout)?;

        Ok(MlflowClient {
            http,
            tracking_uri: config.tracking_uri.clone(),
            api_base: api_base(&config.tracking_uri),
            auth: Arc::new(config.auth.clone()),
            timeout: config.request_timeout,
            max_retries: config.max_retries,
            writes: Arc::new(AtomicU64::new(0)),
            observer: None,
        })
    }

    /// Reports every request to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn tracking_uri(&self) -> &Url {
        &self.tracking_uri
    }

    /// Requests sent by mutating calls (create, update, delete, restore, set-tag), answered or
    /// not, retries included; shared by all clones of this client.
    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Creates an active experiment; returns its id.
    pub async fn create_experiment(
        &self,
        name: &str,
        tags: &[(String, String)],
    ) -> Result<String, MlflowError> {
        let tags: Vec<_> = tags
            .iter()
            .map(|(key, value)| json!({"key": key, "value": value}))
            .collect();
        let body = json!({"name": name, "tags": tags});
        let r: CreateResponse = self
            .call("experiments/create", true, Request::Post(body))
            .await?;
        Ok(r.experiment_id)
    }

    /// The experiment, active or deleted.
    pub async fn get_experiment(&self, id: &str) -> Result<Experiment, MlflowError> {
        let r: GetResponse = self
            .call(
                "experiments/get",
                false,
                Request::Get(&[("experiment_id", id)]),
            )
            .await?;
        Ok(r.experiment.into())
    }

    /// The experiment of that name, active or deleted (a deleted experiment keeps its name).
    pub async fn get_experiment_by_name(&self, name: &str) -> Result<Experiment, MlflowError> {
        let r: GetResponse = self
            .call(
                "experiments/get-by-name",
                false,
                Request::Get(&[("experiment_name", name)]),
            )
            .await?;
        Ok(r.experiment.into())
    }

    /// Renames an active experiment (`BAD_REQUEST` if the name is taken, `INVALID_STATE` if the
    /// experiment is deleted).
    pub async fn rename_experiment(&self, id: &str, new_name: &str) -> Result<(), MlflowError> {
        let body = json!({"experiment_id": id, "new_name": new_name});
        self.call::<serde::de::IgnoredAny>("experiments/update", true, Request::Post(body))
            .await
            .map(drop)
    }

    /// Soft-deletes an active experiment (`RESOURCE_DOES_NOT_EXIST` if already deleted).
    pub async fn delete_experiment(&self, id: &str) -> Result<(), MlflowError> {
        let body = json!({"experiment_id": id});
        self.call::<serde::de::IgnoredAny>("experiments/delete", true, Request::Post(body))
            .await
            .map(drop)
    }

    /// Restores a deleted experiment (`RESOURCE_DOES_NOT_EXIST` if it is active).
    pub async fn restore_experiment(&self, id: &str) -> Result<(), MlflowError> {
        let body = json!({"experiment_id": id});
        self.call::<serde::de::IgnoredAny>("experiments/restore", true, Request::Post(body))
            .await
            .map(drop)
    }

    /// Sets one tag of an active experiment (`INVALID_PARAMETER_VALUE` if deleted).
    pub async fn set_experiment_tag(
        &self,
        id: &str,
        key: &str,
        value: &str,
    ) -> Result<(), MlflowError> {
        let body = json!({"experiment_id": id, "key": key, "value": value});
        self.call::<serde::de::IgnoredAny>(
            "experiments/set-experiment-tag",
            true,
            Request::Post(body),
        )
        .await
        .map(drop)
    }

    /// One page of experiments matching `filter` (MLflow's filter syntax, e.g.
    /// ``tags.`mlflow.experiment.isGateway` = 'true'``; empty for all). `max_results` must be
    /// between 1 and 50000.
    pub async fn search_experiments(
        &self,
        filter: &str,
        view: ViewType,
        max_results: u32,
        page_token: Option<&str>,
    ) -> Result<ExperimentPage, MlflowError> {
        let mut body = json!({"max_results": max_results, "view_type": view.as_str()});
        if !filter.is_empty() {
            body["filter"] = json!(filter);
        }
        if let Some(token) = page_token.filter(|t| !t.is_empty()) {
            body["page_token"] = json!(token);
        }
        let r: SearchResponse = self
            .call("experiments/search", false, Request::Post(body))
            .await?;
        Ok(ExperimentPage {
            experiments: r
                .experiments
                .unwrap_or_default()
                .into_iter()
                .map(Experiment::from)
                .collect(),
            next_page_token: r.next_page_token.filter(|t| !t.is_empty()),
        })
    }

    /// All experiments matching `filter`, following `next_page_token` to the end.
    pub async fn search_all_experiments(
        &self,
        filter: &str,
        view: ViewType,
    ) -> Result<Vec<Experiment>, MlflowError> {
        self.search_all_experiments_paged(filter, view, 1000).await
    }

    /// As [`MlflowClient::search_all_experiments`], with pages of `page_size`.
    pub async fn search_all_experiments_paged(
        &self,
        filter: &str,
        view: ViewType,
        page_size: u32,
    ) -> Result<Vec<Experiment>, MlflowError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .search_experiments(filter, view, page_size, token.as_deref())
                .await?;
            all.extend(page.experiments);
            match page.next_page_token {
                None => return Ok(all),
                Some(next) if token.as_deref() == Some(next.as_str()) => {
                    return Err(MlflowError::Protocol {
                        call: "experiments/search",
                        status: 200,
                        message: "the server returned the same next_page_token twice".to_string(),
                    });
                }
                Some(next) => token = Some(next),
            }
        }
    }

    /// One REST call, retried while it fails transiently.
    async fn call<T: DeserializeOwned>(
        &self,
        call: &'static str,
        mutating: bool,
        request: Request<'_>,
    ) -> Result<T, MlflowError> {
        let mut url = self.api_base.clone();
        url.set_path(&format!("{}{call}", self.api_base.path()));
        if let Request::Get(query) = &request {
            url.query_pairs_mut().extend_pairs(query.iter());
        }
        let mut retry = 0;
        loop {
            match self.attempt(call, mutating, &url, &request).await {
                Err(e) if e.is_transient() && retry < self.max_retries => {
                    let delay = backoff(retry);
                    tracing::debug!(
                        call,
                        error = %e,
                        retry = retry + 1,
                        delay_ms = delay.as_millis() as u64,
                        "retrying MLflow request"
                    );
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
                result => return result,
            }
        }
    }

    async fn attempt<T: DeserializeOwned>(
        &self,
        call: &'static str,
        mutating: bool,
        url: &Url,
        request: &Request<'_>,
    ) -> Result<T, MlflowError> {
        let builder = match request {
            Request::Get(_) => self.http.get(url.clone()),
            Request::Post(body) => self.http.post(url.clone()).json(body),
        };
        // basic_auth and bearer_auth mark the header sensitive.
        let builder = match self.auth.as_ref() {
            Auth::None => builder,
            Auth::Basic { username, password } => builder.basic_auth(username, Some(password)),
            Auth::Bearer { token } => builder.bearer_auth(token),
        };
        if mutating {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        let start = Instant::now();
        let answer = match builder.send().await {
            Ok(response) => {
                let status = response.status();
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .map(str::to_string);
                response.text().await.map(|body| (status, location, body))
            }
            Err(e) => Err(e),
        };
        let elapsed = start.elapsed();
        let status_label = match &answer {
            Ok((status, _, _)) => status.as_str().to_string(),
            Err(_) => "error".to_string(),
        };
        tracing::debug!(
            call,
            status = %status_label,
            elapsed_ms = elapsed.as_millis() as u64,
            "MLflow request"
        );
        if let Some(observer) = &self.observer {
            observer.observe(call, &status_label, elapsed.as_secs_f64());
        }

        let (status, location, body) = answer.map_err(|e| MlflowError::Unavailable {
            call,
            reason: transport_reason(&e, self.timeout),
        })?;
        let code = status.as_u16();
        if status.is_success() {
            decode(call, code, &body)
        } else if status.is_redirection() {
            Err(MlflowError::Protocol {
                call,
                status: code,
                message: format!(
                    "redirected to {}: set MLFLOW_TRACKING_URI to the tracking server's final address",
                    location.as_deref().unwrap_or("an unknown location")
                ),
            })
        } else {
            Err(classify(call, code, &body))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // -- configuration ----------------------------------------------------------------------

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn config(vars: &[(&str, &str)]) -> Result<MlflowConfig, ConfigError> {
        MlflowConfig::from_lookup(lookup(vars))
    }

    const URI: (&str, &str) = (ENV_TRACKING_URI, "http://127.0.0.1:5000");

    #[test]
    fn config_minimal_has_defaults() {
        let c = config(&[URI]).unwrap();
        assert_eq!(c.tracking_uri.as_str(), "http://127.0.0.1:5000/");
        assert_eq!(c.auth, Auth::None);
        assert!(!c.insecure_tls);
        assert_eq!(c.server_cert_path, None);
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        assert_eq!(c.max_retries, 3);
    }

    #[test]
    fn config_basic_auth() {
        let c = config(&[URI, (ENV_USERNAME, "alice"), (ENV_PASSWORD, "s3cret")]).unwrap();
        assert_eq!(
            c.auth,
            Auth::Basic {
                username: "alice".into(),
                password: "s3cret".into()
            }
        );
    }

    #[test]
    fn config_bearer_token() {
        let c = config(&[URI, (ENV_TOKEN, "tok")]).unwrap();
        assert_eq!(
            c.auth,
            Auth::Bearer {
                token: "tok".into()
            }
        );
    }

    #[test]
    fn config_tls_options() {
        for (v, want) in [
            ("true", true),
            ("TRUE", true),
            ("False", false),
            ("false", false),
        ] {
            let c = config(&[URI, (ENV_INSECURE_TLS, v)]).unwrap();
            assert_eq!(c.insecure_tls, want, "{v}");
        }
        let c = config(&[URI, (ENV_SERVER_CERT_PATH, "/etc/ca.pem")]).unwrap();
        assert_eq!(c.server_cert_path, Some(PathBuf::from("/etc/ca.pem")));
        let c = config(&[
            URI,
            (ENV_SERVER_CERT_PATH, "/etc/ca.pem"),
            (ENV_INSECURE_TLS, "false"),
        ])
        .unwrap();
        assert!(!c.insecure_tls);
    }

    #[test]
    fn config_https_with_prefix_and_empty_vars_as_unset() {
        let c = config(&[
            (ENV_TRACKING_URI, " https://example.com/mlflow "),
            (ENV_USERNAME, ""),
            (ENV_PASSWORD, ""),
            (ENV_TOKEN, ""),
            (ENV_INSECURE_TLS, ""),
            (ENV_SERVER_CERT_PATH, ""),
        ])
        .unwrap();
        assert_eq!(c.tracking_uri.as_str(), "https://example.com/mlflow");
        assert_eq!(c.auth, Auth::None);
        assert!(!c.insecure_tls);
        assert_eq!(c.server_cert_path, None);
    }

    #[test]
    fn config_errors() {
        let err = |vars: &[(&str, &str)]| config(vars).unwrap_err();

        let e = err(&[]);
        assert!(matches!(e, ConfigError::MissingTrackingUri));
        assert!(e.to_string().contains("MLFLOW_TRACKING_URI is not set"));
        assert!(matches!(
            err(&[(ENV_TRACKING_URI, "  ")]),
            ConfigError::MissingTrackingUri
        ));

        let e = err(&[(ENV_TRACKING_URI, "not a url")]);
        assert!(matches!(e, ConfigError::InvalidTrackingUri { .. }), "{e}");
        assert!(e.to_string().contains("MLFLOW_TRACKING_URI"));

        for uri in [
            "file:///tmp/mlruns",
            "databricks://profile",
            "sqlite:///x.db",
        ] {
            let e = err(&[(ENV_TRACKING_URI, uri)]);
            assert!(
                matches!(e, ConfigError::UnsupportedScheme { .. }),
                "{uri}: {e}"
            );
            assert!(e.to_string().contains("http://"), "{e}");
        }

        let e = err(&[(ENV_TRACKING_URI, "http://bob:hunter2@mlflow:5000")]);
        assert!(matches!(e, ConfigError::CredentialsInTrackingUri), "{e}");
        assert!(!e.to_string().contains("hunter2"));

        let e = err(&[URI, (ENV_USERNAME, "alice")]);
        assert!(
            matches!(
                e,
                ConfigError::IncompleteBasicAuth {
                    set: ENV_USERNAME,
                    missing: ENV_PASSWORD
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("MLFLOW_TRACKING_PASSWORD"));

        let e = err(&[URI, (ENV_PASSWORD, "pw-only")]);
        assert!(
            matches!(
                e,
                ConfigError::IncompleteBasicAuth {
                    set: ENV_PASSWORD,
                    missing: ENV_USERNAME
                }
            ),
            "{e}"
        );
        assert!(!e.to_string().contains("pw-only"));

        for vars in [
            &[
                URI,
                (ENV_TOKEN, "tok"),
                (ENV_USERNAME, "u"),
                (ENV_PASSWORD, "p"),
            ][..],
            &[URI, (ENV_TOKEN, "tok"), (ENV_USERNAME, "u")][..],
            &[URI, (ENV_TOKEN, "tok"), (ENV_PASSWORD, "p")][..],
        ] {
            let e = err(vars);
            assert!(matches!(e, ConfigError::TokenWithBasicAuth), "{e}");
            assert!(e.to_string().contains("MLFLOW_TRACKING_TOKEN"));
        }

        let e = err(&[URI, (ENV_INSECURE_TLS, "yes")]);
        assert!(matches!(e, ConfigError::InvalidInsecureTls { .. }), "{e}");
        assert!(e.to_string().contains("MLFLOW_TRACKING_INSECURE_TLS"));
        assert!(e.to_string().contains("'yes'"));

        let e = err(&[
            URI,
            (ENV_INSECURE_TLS, "true"),
            (ENV_SERVER_CERT_PATH, "/ca.pem"),
        ]);
        assert!(matches!(e, ConfigError::InsecureTlsWithCertPath), "{e}");
    }

    #[test]
    fn client_construction_errors() {
        let uri = |s: &str| Url::parse(s).unwrap();

        let e = MlflowClient::new(&MlflowConfig::new(uri("ftp://host/"))).unwrap_err();
        assert!(matches!(e, ConfigError::UnsupportedScheme { .. }));

        let e = MlflowClient::new(&MlflowConfig::new(uri("http://u:pw@host/"))).unwrap_err();
        assert!(matches!(e, ConfigError::CredentialsInTrackingUri));

        let mut c = MlflowConfig::new(uri("http://host/"));
        c.auth = Auth::Bearer {
            token: "tok\n".into(),
        };
        let e = MlflowClient::new(&c).unwrap_err();
        assert!(matches!(e, ConfigError::InvalidToken));
        assert!(!format!("{e} {e:?}").contains("tok\n"));

        let mut c = MlflowConfig::new(uri("https://host/"));
        c.server_cert_path = Some("/nonexistent/ca.pem".into());
        let e = MlflowClient::new(&c).unwrap_err();
        assert!(matches!(e, ConfigError::CaBundle { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");

        let dir = std::env::temp_dir().join(format!("mlflow-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        c.server_cert_path = Some(not_pem);
        let e = MlflowClient::new(&c).unwrap_err();
        assert!(matches!(e, ConfigError::CaBundle { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);

        let mut c = MlflowConfig::new(uri("https://host/"));
        c.insecure_tls = true;
        assert!(MlflowClient::new(&c).is_ok());
    }

    #[test]
    fn debug_redacts_secrets() {
        let basic = Auth::Basic {
            username: "alice".into(),
            password: "hunter2".into(),
        };
        let bearer = Auth::Bearer {
            token: "tok-abc".into(),
        };
        let d = format!("{basic:?} {bearer:?}");
        assert!(d.contains("alice"), "{d}");
        assert!(d.contains("<redacted>"), "{d}");
        assert!(!d.contains("hunter2"), "{d}");
        assert!(!d.contains("tok-abc"), "{d}");

        let mut c = MlflowConfig::new(Url::parse("http://host:5000").unwrap());
        c.auth = basic;
        let d = format!("{c:?} {:?}", MlflowClient::new(&c).unwrap());
        assert!(!d.contains("hunter2"), "{d}");
        c.auth = bearer;
        let d = format!("{c:?} {:?}", MlflowClient::new(&c).unwrap());
        assert!(!d.contains("tok-abc"), "{d}");
    }

    #[test]
    fn api_base_keeps_path_prefix() {
        let base = |s: &str| api_base(&Url::parse(s).unwrap()).to_string();
        assert_eq!(
            base("http://127.0.0.1:5000"),
            "http://127.0.0.1:5000/api/2.0/mlflow/"
        );
        assert_eq!(
            base("https://host/mlflow"),
            "https://host/mlflow/api/2.0/mlflow/"
        );
        assert_eq!(
            base("https://host/mlflow/?x=1#frag"),
            "https://host/mlflow/api/2.0/mlflow/"
        );
    }

    // -- error classification ---------------------------------------------------------------

    fn api(status: u16, code: &str) -> MlflowError {
        classify(
            "experiments/create",
            status,
            &format!(r#"{{"error_code": "{code}", "message": "m"}}"#),
        )
    }

    #[test]
    fn classifies_mlflow_error_bodies_by_code() {
        let e = api(400, "RESOURCE_ALREADY_EXISTS");
        assert!(e.is_already_exists());
        assert!(!e.is_not_found());
        assert_eq!(e.label(), "already_exists");
        assert_eq!(e.call(), "experiments/create");
        assert_eq!(e.status(), Some(400));

        let e = api(404, "RESOURCE_DOES_NOT_EXIST");
        assert!(e.is_not_found());
        assert_eq!(e.label(), "not_found");

        assert_eq!(
            api(400, "INVALID_PARAMETER_VALUE").code(),
            Some(&ErrorCode::InvalidParameterValue)
        );
        assert_eq!(api(400, "BAD_REQUEST").code(), Some(&ErrorCode::BadRequest));
        assert_eq!(api(400, "BAD_REQUEST").label(), "bad_request");
        assert_eq!(
            api(403, "PERMISSION_DENIED").code(),
            Some(&ErrorCode::PermissionDenied)
        );
        let e = api(500, "INVALID_STATE");
        assert_eq!(e.code(), Some(&ErrorCode::InvalidState));
        assert!(!e.is_transient());
        assert_eq!(e.label(), "invalid_state");
        let e = api(500, "INTERNAL_ERROR");
        assert_eq!(e.code(), Some(&ErrorCode::Other("INTERNAL_ERROR".into())));
        assert_eq!(e.label(), "api_error");
        assert!(e.to_string().contains("INTERNAL_ERROR"), "{e}");
    }

    #[test]
    fn classifies_the_real_server_answers() {
        let body = r#"{"error_code": "RESOURCE_ALREADY_EXISTS", "message": "Experiment(name=p1) already exists. Error: (sqlite3.IntegrityError) UNIQUE constraint failed", "sqlstate": "KAM00", "error_class": "RESOURCE_ALREADY_EXISTS"}"#;
        let e = classify("experiments/create", 400, body);
        match &e {
            MlflowError::Api {
                status: 400,
                code: ErrorCode::ResourceAlreadyExists,
                message,
                ..
            } => assert!(message.starts_with("Experiment(name=p1) already exists")),
            other => panic!("{other:?}"),
        }

        // The basic-auth app's 401 and 403 are plain text.
        let e = classify(
            "experiments/get",
            401,
            "You are not authenticated. Please see https://www.mlflow.org/docs/latest/auth/index.html",
        );
        assert!(matches!(
            e,
            MlflowError::Unauthenticated {
                call: "experiments/get"
            }
        ));
        assert_eq!(e.label(), "unauthenticated");
        assert!(!e.is_transient());
        assert!(e.to_string().contains("MLFLOW_TRACKING_USERNAME"), "{e}");
        assert!(e.to_string().contains("MLFLOW_TRACKING_TOKEN"), "{e}");
        let e = classify(
            "experiments/get",
            401,
            r#"{"error_code":"UNAUTHENTICATED"}"#,
        );
        assert!(matches!(e, MlflowError::Unauthenticated { .. }));

        let e = classify("experiments/set-experiment-tag", 403, "Permission denied");
        assert_eq!(e.code(), Some(&ErrorCode::PermissionDenied));
        assert_eq!(e.label(), "permission_denied");
    }

    #[test]
    fn classifies_foreign_answers_as_protocol_errors() {
        let html = "<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>";
        let e = classify("experiments/get", 502, html);
        match &e {
            MlflowError::Protocol {
                status: 502,
                message,
                ..
            } => assert!(message.contains("502 Bad Gateway"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(e.is_transient());
        assert_eq!(e.label(), "unavailable");
        assert_eq!(e.code(), None);

        // A 404 that is not MLflow's: a wrong path prefix, not a missing experiment.
        let e = classify(
            "experiments/get",
            404,
            "<!doctype html><title>404 Not Found</title><h1>Not Found</h1>",
        );
        assert!(matches!(e, MlflowError::Protocol { status: 404, .. }));
        assert!(!e.is_not_found());
        assert!(e.to_string().contains("path prefix"), "{e}");

        let e = classify("experiments/get", 500, "Internal Server Error");
        assert!(matches!(e, MlflowError::Protocol { status: 500, .. }));
        assert!(!e.is_transient());
        assert_eq!(e.label(), "protocol_error");

        let e = classify("experiments/get", 503, "");
        assert!(e.is_transient());
        assert!(e.to_string().contains("empty body"), "{e}");

        // JSON without an error_code is not an MLflow error body.
        let e = classify("experiments/get", 400, r#"{"detail":"nope"}"#);
        assert!(matches!(e, MlflowError::Protocol { status: 400, .. }));

        let e = classify(
            "experiments/get",
            429,
            r#"{"error_code":"REQUEST_LIMIT_EXCEEDED"}"#,
        );
        assert!(e.is_transient());
        assert_eq!(e.label(), "rate_limited");
    }

    #[test]
    fn long_messages_are_truncated() {
        let body = format!(
            r#"{{"error_code":"BAD_REQUEST","message":"{}"}}"#,
            "é".repeat(5000)
        );
        match classify("experiments/update", 400, &body) {
            MlflowError::Api { message, .. } => {
                assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS + 1)
            }
            other => panic!("{other:?}"),
        }
        let e = classify("experiments/get", 502, &"x ".repeat(10_000));
        assert!(e.to_string().len() < 400, "{e}");
    }

    #[test]
    fn transient_errors() {
        let unavailable = MlflowError::Unavailable {
            call: "experiments/get",
            reason: "connection refused".into(),
        };
        assert!(unavailable.is_transient());
        assert_eq!(unavailable.label(), "unavailable");
        assert_eq!(unavailable.status(), None);
        for status in [429, 502, 503, 504] {
            assert!(classify("c", status, "x").is_transient(), "{status}");
            assert!(
                api(status, "TEMPORARILY_UNAVAILABLE").is_transient(),
                "{status}"
            );
        }
        for status in [400, 403, 404, 409, 500, 501] {
            assert!(!classify("c", status, "x").is_transient(), "{status}");
        }
        assert!(!api(400, "RESOURCE_ALREADY_EXISTS").is_transient());
        assert!(!api(500, "INVALID_STATE").is_transient());
        assert!(!classify("c", 401, "").is_transient());
    }

    #[test]
    fn backoff_doubles_up_to_two_seconds() {
        let ms: Vec<u128> = (0..7).map(|r| backoff(r).as_millis()).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(2));
    }

    // -- wire format ------------------------------------------------------------------------

    #[test]
    fn decodes_experiments() {
        let body = r#"{"experiment": {"experiment_id": "1", "name": "p1",
            "artifact_location": "/a/1", "lifecycle_stage": "active",
            "last_update_time": 1795308682310, "creation_time": 1795308681661,
            "tags": [{"key": "a", "value": "b"}, {"key": "empty", "value": ""}],
            "workspace": "default"}}"#;
        let e: Experiment = decode::<GetResponse>("experiments/get", 200, body)
            .unwrap()
            .experiment
            .into();
        assert_eq!(e.experiment_id, "1");
        assert_eq!(e.name, "p1");
        assert!(e.is_active());
        assert_eq!(e.tag("a"), Some("b"));
        assert_eq!(e.tag("empty"), Some(""));
        assert_eq!(e.tag("missing"), None);
        assert_eq!(e.artifact_location.as_deref(), Some("/a/1"));
        assert_eq!(e.creation_time, Some(1795308681661));

        // No tags; ids and times as strings (proto3 JSON); unknown stage.
        let body = r#"{"experiment": {"experiment_id": 7, "name": "x",
            "lifecycle_stage": "deleted", "creation_time": "12"}}"#;
        let e: Experiment = decode::<GetResponse>("experiments/get", 200, body)
            .unwrap()
            .experiment
            .into();
        assert_eq!(e.experiment_id, "7");
        assert!(e.tags.is_empty());
        assert_eq!(e.lifecycle_stage, LifecycleStage::Deleted);
        assert_eq!(e.creation_time, Some(12));
        assert_eq!(e.last_update_time, None);
        let body = r#"{"experiment": {"experiment_id": "7", "lifecycle_stage": "archived"}}"#;
        let e: Experiment = decode::<GetResponse>("experiments/get", 200, body)
            .unwrap()
            .experiment
            .into();
        assert_eq!(
            e.lifecycle_stage,
            LifecycleStage::Other("archived".to_string())
        );
        assert!(!e.is_active());

        // An empty search answers `{}`.
        let r: SearchResponse = decode("experiments/search", 200, "{}").unwrap();
        assert!(r.experiments.is_none() && r.next_page_token.is_none());
    }

    #[test]
    fn html_success_answers_are_protocol_errors() {
        let e = decode::<GetResponse>(
            "experiments/get",
            200,
            "<!doctype html><html><head><title>MLflow</title></head></html>",
        )
        .unwrap_err();
        assert!(matches!(e, MlflowError::Protocol { status: 200, .. }));
        assert!(e.to_string().contains("path prefix"), "{e}");
        assert!(!e.is_transient());
    }

    // -- against a scripted HTTP server -----------------------------------------------------

    /// Answers each connection with the next scripted `(status, body)` (the last one repeats);
    /// `None` means: accept and never answer. Records each request's head.
    struct Scripted {
        uri: Url,
        requests: Arc<Mutex<Vec<String>>>,
    }

    async fn scripted(prefix: &str, answers: Vec<Option<(u16, &'static str)>>) -> Scripted {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let answer = answers[n.min(answers.len() - 1)];
                n += 1;
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        let Ok(k) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if k == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..k]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    seen.lock().unwrap().push(head);
                    let Some((status, body)) = answer else {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    };
                    let response = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(response.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Scripted {
            uri: Url::parse(&format!("http://127.0.0.1:{port}{prefix}")).unwrap(),
            requests,
        }
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(&'static str, String)>>);

    impl CallObserver for Recorder {
        fn observe(&self, call: &'static str, status: &str, seconds: f64) {
            assert!(seconds >= 0.0);
            self.0.lock().unwrap().push((call, status.to_string()));
        }
    }

    const GET_OK: &str =
        r#"{"experiment":{"experiment_id":"1","name":"e","lifecycle_stage":"active"}}"#;

    #[tokio::test]
    async fn retries_transient_answers_then_succeeds() {
        let server = scripted(
            "/mlflow",
            vec![
                Some((503, "<html><title>Service Unavailable</title></html>")),
                Some((
                    429,
                    r#"{"error_code":"REQUEST_LIMIT_EXCEEDED","message":"slow"}"#,
                )),
                Some((200, GET_OK)),
            ],
        )
        .await;
        let mut config = MlflowConfig::new(server.uri.clone());
        config.auth = Auth::Basic {
            username: "alice".into(),
            password: "hunter2".into(),
        };
        let recorder = Arc::new(Recorder::default());
        let client = MlflowClient::new(&config)
            .unwrap()
            .with_observer(recorder.clone());
        let e = client.get_experiment("1").await.unwrap();
        assert_eq!(e.name, "e");
        let seen: Vec<_> = recorder.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                ("experiments/get", "503".to_string()),
                ("experiments/get", "429".to_string()),
                ("experiments/get", "200".to_string())
            ]
        );
        let requests = server.requests.lock().unwrap().clone();
        assert!(
            requests[0].starts_with("GET /mlflow/api/2.0/mlflow/experiments/get?experiment_id=1 "),
            "{}",
            requests[0]
        );
        use base64::Engine as _;
        let expected = format!(
            "authorization: Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:hunter2")
        );
        assert!(requests[0].contains(&expected), "{}", requests[0]);
        assert_eq!(client.write_count(), 0);
    }

    #[tokio::test]
    async fn gives_up_after_max_retries() {
        let server = scripted("", vec![Some((502, "bad gateway"))]).await;
        let mut config = MlflowConfig::new(server.uri.clone());
        config.max_retries = 2;
        config.auth = Auth::Bearer {
            token: "tok-abc".into(),
        };
        let client = MlflowClient::new(&config).unwrap();
        let e = client.delete_experiment("1").await.unwrap_err();
        assert!(
            matches!(e, MlflowError::Protocol { status: 502, .. }),
            "{e}"
        );
        assert!(e.is_transient());
        assert_eq!(server.requests.lock().unwrap().len(), 3);
        assert_eq!(client.write_count(), 3);
        let head = server.requests.lock().unwrap()[0].clone();
        assert!(
            head.starts_with("POST /api/2.0/mlflow/experiments/delete "),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json")
        );
        assert!(head.contains("Bearer tok-abc") || head.contains("bearer tok-abc"));
        assert!(!e.to_string().contains("tok-abc"));
    }

    #[tokio::test]
    async fn does_not_retry_client_errors_or_invalid_state() {
        for (status, body) in [
            (
                400,
                r#"{"error_code":"RESOURCE_ALREADY_EXISTS","message":"taken"}"#,
            ),
            (
                500,
                r#"{"error_code":"INVALID_STATE","message":"Cannot rename"}"#,
            ),
            (401, "You are not authenticated."),
            (
                404,
                r#"{"error_code":"RESOURCE_DOES_NOT_EXIST","message":"no"}"#,
            ),
        ] {
            let server = scripted("", vec![Some((status, body))]).await;
            let client = MlflowClient::new(&MlflowConfig::new(server.uri.clone())).unwrap();
            let clone = client.clone();
            let e = clone
                .create_experiment("x", &[("k".into(), "v".into())])
                .await
                .unwrap_err();
            assert!(!e.is_transient(), "{e}");
            assert_eq!(server.requests.lock().unwrap().len(), 1, "{status}");
            // Clones share the write counter.
            assert_eq!(client.write_count(), 1);
        }
    }

    #[tokio::test]
    async fn timeouts_are_unavailable() {
        let server = scripted("", vec![None]).await;
        let mut config = MlflowConfig::new(server.uri.clone());
        config.request_timeout = Duration::from_millis(300);
        config.max_retries = 1;
        let recorder = Arc::new(Recorder::default());
        let client = MlflowClient::new(&config)
            .unwrap()
            .with_observer(recorder.clone());
        let e = client.get_experiment("1").await.unwrap_err();
        assert!(matches!(e, MlflowError::Unavailable { .. }), "{e}");
        assert!(e.is_transient());
        assert!(e.to_string().contains("300 ms"), "{e}");
        assert_eq!(server.requests.lock().unwrap().len(), 2);
        let seen = recorder.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                ("experiments/get", "error".to_string()),
                ("experiments/get", "error".to_string())
            ]
        );
    }

    #[tokio::test]
    async fn connection_refused_is_unavailable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut config =
            MlflowConfig::new(Url::parse(&format!("http://127.0.0.1:{port}")).unwrap());
        config.max_retries = 0;
        let client = MlflowClient::new(&config).unwrap();
        let e = client.set_experiment_tag("1", "k", "v").await.unwrap_err();
        assert!(matches!(e, MlflowError::Unavailable { .. }), "{e}");
        assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
        assert_eq!(e.call(), "experiments/set-experiment-tag");
        assert_eq!(client.write_count(), 1);
    }

    #[tokio::test]
    async fn redirects_are_reported_not_followed() {
        let server = scripted("", vec![Some((301, ""))]).await;
        let client = MlflowClient::new(&MlflowConfig::new(server.uri.clone())).unwrap();
        let e = client.get_experiment("1").await.unwrap_err();
        assert!(
            matches!(e, MlflowError::Protocol { status: 301, .. }),
            "{e}"
        );
        assert_eq!(server.requests.lock().unwrap().len(), 1);
    }
}
