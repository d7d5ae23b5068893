//! Where the tracking server is and how to reach it: one validated [`MlflowConfig`].
//!
//! Every rule is enforced once, in [`MlflowConfigBuilder::build`] (the only way to make one): an
//! `http(s)://` URI with a host and no credentials in it, a token usable in a header, insecure TLS
//! or a CA bundle but not both (the bundle read and parsed here, once), a usable User-Agent. The
//! fields are private, so whatever holds an `MlflowConfig` (the experiments client, the trace
//! export) can trust it without checking again. [`TlsTrust::from_settings`] is the TLS rule on its
//! own, for other settings that name the same two things (the gateway pods' CA bundle).
//!
//! [`MlflowConfig::from_lookup`] reads MLflow's own environment variables, so an operator or a
//! gateway pod is configured like any other MLflow client.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

/// What every request to the tracking server calls itself.
pub const DEFAULT_USER_AGENT: &str =
    concat!(env!("CARGO_PKG_NAME"), "/", env!("CARGO_PKG_VERSION"));

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
    /// `insecure`, `cert_path`: the two settings, as the user named them.
    #[error("{insecure}=true and {cert_path} are exclusive: unset one of them")]
    InsecureTlsWithCertPath {
        insecure: &'static str,
        cert_path: &'static str,
    },
    /// `variable`: the setting that named the file.
    #[error("{variable} {}: {reason}", path.display())]
    CaBundle {
        variable: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the User-Agent {value:?} is not usable in an HTTP header")]
    InvalidUserAgent { value: String },
    #[error("cannot build the HTTP client for the MLflow tracking server: {reason}")]
    HttpClient { reason: String },
}

// ---------------------------------------------------------------------------------------------
// TLS

/// The names of the two TLS settings, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct TlsSettingNames {
    pub insecure: &'static str,
    pub cert_path: &'static str,
}

/// MLflow's own variables.
pub const MLFLOW_TLS_SETTINGS: TlsSettingNames = TlsSettingNames {
    insecure: ENV_INSECURE_TLS,
    cert_path: ENV_SERVER_CERT_PATH,
};

/// A PEM CA bundle, read and parsed: its text (to hand on, e.g. into a ConfigMap) and its
/// certificates (at least one).
#[derive(Clone)]
pub struct CaBundle {
    pub path: PathBuf,
    pub pem: String,
    pub certs: Arc<[reqwest::Certificate]>,
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("path", &self.path)
            .field("certificates", &self.certs.len())
            .finish()
    }
}

/// How the tracking server's certificate is checked.
#[derive(Clone, Debug, Default)]
pub enum TlsTrust {
    /// The built-in (webpki) roots.
    #[default]
    PublicRoots,
    /// A CA bundle, trusted in addition to the built-in roots.
    CaBundle(CaBundle),
    /// No verification at all (testing only).
    Insecure,
}

impl TlsTrust {
    /// The TLS rule, the one place it is checked: insecure TLS or a CA bundle, not both. The
    /// bundle is read and parsed here. `names`: the settings that gave these, for the messages.
    pub fn from_settings(
        insecure: bool,
        cert_path: Option<&Path>,
        names: TlsSettingNames,
    ) -> Result<Self, ConfigError> {
        match (insecure, cert_path) {
            (true, Some(_)) => Err(ConfigError::InsecureTlsWithCertPath {
                insecure: names.insecure,
                cert_path: names.cert_path,
            }),
            (true, None) => Ok(TlsTrust::Insecure),
            (false, Some(path)) => Ok(TlsTrust::CaBundle(read_ca_bundle(names.cert_path, path)?)),
            (false, None) => Ok(TlsTrust::PublicRoots),
        }
    }

    pub fn is_insecure(&self) -> bool {
        matches!(self, TlsTrust::Insecure)
    }

    pub fn ca_bundle(&self) -> Option<&CaBundle> {
        match self {
            TlsTrust::CaBundle(bundle) => Some(bundle),
            _ => None,
        }
    }
}

/// Reads a PEM CA bundle named by the setting `variable` (at least one certificate).
pub fn read_ca_bundle(variable: &'static str, path: &Path) -> Result<CaBundle, ConfigError> {
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
    Ok(CaBundle {
        path: path.to_path_buf(),
        pem,
        certs: certs.into(),
    })
}

// ---------------------------------------------------------------------------------------------
// The configuration

/// Where the tracking server is and how to talk to it; valid by construction
/// ([`MlflowConfig::builder`] … [`MlflowConfigBuilder::build`]).
#[derive(Clone)]
pub struct MlflowConfig {
    tracking_uri: Url,
    auth: Auth,
    tls: TlsTrust,
    request_timeout: Duration,
    max_retries: u32,
    user_agent: String,
}

impl fmt::Debug for MlflowConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MlflowConfig")
            .field("tracking_uri", &self.tracking_uri.as_str())
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("request_timeout", &self.request_timeout)
            .field("max_retries", &self.max_retries)
            .field("user_agent", &self.user_agent)
            .finish()
    }
}

/// The settings of an [`MlflowConfig`] before they are checked.
#[derive(Clone)]
pub struct MlflowConfigBuilder {
    tracking_uri: Url,
    auth: Auth,
    insecure_tls: bool,
    server_cert_path: Option<PathBuf>,
    request_timeout: Duration,
    max_retries: u32,
    user_agent: String,
}

impl MlflowConfig {
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_MAX_RETRIES: u32 = 3;

    /// Defaults: no authentication, verified TLS, 10 s timeout, 3 retries.
    pub fn builder(tracking_uri: Url) -> MlflowConfigBuilder {
        MlflowConfigBuilder {
            tracking_uri,
            auth: Auth::None,
            insecure_tls: false,
            server_cert_path: None,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            max_retries: Self::DEFAULT_MAX_RETRIES,
            user_agent: DEFAULT_USER_AGENT.to_string(),
        }
    }

    /// The defaults of [`MlflowConfig::builder`] for `tracking_uri`.
    pub fn new(tracking_uri: Url) -> Result<Self, ConfigError> {
        Self::builder(tracking_uri).build()
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
        let mut builder = Self::builder(tracking_uri)
            .auth(auth)
            .insecure_tls(insecure_tls);
        if let Some(path) = var(ENV_SERVER_CERT_PATH) {
            builder = builder.server_cert_path(path);
        }
        builder.build()
    }

    /// Base URL of the tracking server, e.g. `http://127.0.0.1:5000` or `https://host/mlflow`.
    pub fn tracking_uri(&self) -> &Url {
        &self.tracking_uri
    }

    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    pub fn tls(&self) -> &TlsTrust {
        &self.tls
    }

    /// Per-request timeout of the experiments API (connect + answer).
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Extra attempts after a transient failure (the transport's retry policy).
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    pub fn user_agent(&self) -> &str {
        &self.user_agent
    }
}

impl MlflowConfigBuilder {
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// Accept any server certificate (MLFLOW_TRACKING_INSECURE_TLS). Testing only.
    pub fn insecure_tls(mut self, insecure: bool) -> Self {
        self.insecure_tls = insecure;
        self
    }

    /// Extra CA bundle (PEM) to trust, in addition to the built-in roots.
    pub fn server_cert_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.server_cert_path = Some(path.into());
        self
    }

    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// Checks every rule (see the module's comment) and reads the CA bundle.
    pub fn build(self) -> Result<MlflowConfig, ConfigError> {
        validate_tracking_uri(&self.tracking_uri)?;
        if let Auth::Bearer { token } = &self.auth
            && reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).is_err()
        {
            return Err(ConfigError::InvalidToken);
        }
        if reqwest::header::HeaderValue::from_str(&self.user_agent).is_err() {
            return Err(ConfigError::InvalidUserAgent {
                value: self.user_agent,
            });
        }
        let tls = TlsTrust::from_settings(
            self.insecure_tls,
            self.server_cert_path.as_deref(),
            MLFLOW_TLS_SETTINGS,
        )?;
        Ok(MlflowConfig {
            tracking_uri: self.tracking_uri,
            auth: self.auth,
            tls,
            request_timeout: self.request_timeout,
            max_retries: self.max_retries,
            user_agent: self.user_agent,
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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

    /// A CA bundle that parses (the test CA of the e2e tests).
    fn ca_file() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/test-ca.pem")
    }

    #[test]
    fn config_minimal_has_defaults() {
        let c = config(&[URI]).unwrap();
        assert_eq!(c.tracking_uri().as_str(), "http://127.0.0.1:5000/");
        assert_eq!(c.auth(), &Auth::None);
        assert!(matches!(c.tls(), TlsTrust::PublicRoots));
        assert_eq!(c.request_timeout(), Duration::from_secs(10));
        assert_eq!(c.max_retries(), 3);
        assert_eq!(c.user_agent(), DEFAULT_USER_AGENT);
    }

    #[test]
    fn config_basic_auth() {
        let c = config(&[URI, (ENV_USERNAME, "alice"), (ENV_PASSWORD, "s3cret")]).unwrap();
        assert_eq!(
            c.auth(),
            &Auth::Basic {
                username: "alice".into(),
                password: "s3cret".into()
            }
        );
    }

    #[test]
    fn config_bearer_token() {
        let c = config(&[URI, (ENV_TOKEN, "tok")]).unwrap();
        assert_eq!(
            c.auth(),
            &Auth::Bearer {
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
            assert_eq!(c.tls().is_insecure(), want, "{v}");
        }
        let ca = ca_file();
        let path = ca.to_str().unwrap();
        let c = config(&[URI, (ENV_SERVER_CERT_PATH, path)]).unwrap();
        let bundle = c.tls().ca_bundle().expect("a CA bundle");
        assert_eq!(bundle.path, ca);
        assert_eq!(bundle.certs.len(), 1);
        assert!(bundle.pem.contains("BEGIN CERTIFICATE"));
        let c = config(&[
            URI,
            (ENV_SERVER_CERT_PATH, path),
            (ENV_INSECURE_TLS, "false"),
        ])
        .unwrap();
        assert!(!c.tls().is_insecure());
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
        assert_eq!(c.tracking_uri().as_str(), "https://example.com/mlflow");
        assert_eq!(c.auth(), &Auth::None);
        assert!(matches!(c.tls(), TlsTrust::PublicRoots));
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
        assert!(
            matches!(e, ConfigError::InsecureTlsWithCertPath { .. }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "MLFLOW_TRACKING_INSECURE_TLS=true and MLFLOW_TRACKING_SERVER_CERT_PATH are exclusive: unset one of them"
        );
    }

    #[test]
    fn construction_errors() {
        let uri = |s: &str| Url::parse(s).unwrap();

        let e = MlflowConfig::new(uri("ftp://host/")).unwrap_err();
        assert!(matches!(e, ConfigError::UnsupportedScheme { .. }));

        let e = MlflowConfig::new(uri("http://u:pw@host/")).unwrap_err();
        assert!(matches!(e, ConfigError::CredentialsInTrackingUri));

        let e = MlflowConfig::builder(uri("http://host/"))
            .auth(Auth::Bearer {
                token: "tok\n".into(),
            })
            .build()
            .unwrap_err();
        assert!(matches!(e, ConfigError::InvalidToken));
        assert!(!format!("{e} {e:?}").contains("tok\n"));

        let e = MlflowConfig::builder(uri("https://host/"))
            .server_cert_path("/nonexistent/ca.pem")
            .build()
            .unwrap_err();
        assert!(matches!(e, ConfigError::CaBundle { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        assert!(e.to_string().starts_with(ENV_SERVER_CERT_PATH), "{e}");

        let dir = std::env::temp_dir().join(format!("mlflow-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let e = MlflowConfig::builder(uri("https://host/"))
            .server_cert_path(&not_pem)
            .build()
            .unwrap_err();
        assert!(matches!(e, ConfigError::CaBundle { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&dir);

        let e = MlflowConfig::builder(uri("https://host/"))
            .user_agent("bad\nagent")
            .build()
            .unwrap_err();
        assert!(matches!(e, ConfigError::InvalidUserAgent { .. }), "{e}");

        let c = MlflowConfig::builder(uri("https://host/"))
            .insecure_tls(true)
            .build()
            .unwrap();
        assert!(c.tls().is_insecure());
    }

    #[test]
    fn the_tls_rule_names_the_settings_it_was_given() {
        let names = TlsSettingNames {
            insecure: "GATEWAY_MLFLOW_TRACKING_INSECURE_TLS",
            cert_path: "GATEWAY_MLFLOW_TRACKING_SERVER_CERT_PATH",
        };
        let e = TlsTrust::from_settings(true, Some(Path::new("/ca.pem")), names).unwrap_err();
        assert_eq!(
            e.to_string(),
            "GATEWAY_MLFLOW_TRACKING_INSECURE_TLS=true and GATEWAY_MLFLOW_TRACKING_SERVER_CERT_PATH are exclusive: unset one of them"
        );
        let e = TlsTrust::from_settings(false, Some(Path::new("/nonexistent/ca.pem")), names)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("GATEWAY_MLFLOW_TRACKING_SERVER_CERT_PATH /nonexistent/ca.pem: "),
            "{e}"
        );
        assert!(matches!(
            TlsTrust::from_settings(false, None, names),
            Ok(TlsTrust::PublicRoots)
        ));
        assert!(matches!(
            TlsTrust::from_settings(true, None, names),
            Ok(TlsTrust::Insecure)
        ));
        let ca = ca_file();
        let trust = TlsTrust::from_settings(false, Some(&ca), names).unwrap();
        assert!(trust.ca_bundle().is_some());
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

        let uri = Url::parse("http://host:5000").unwrap();
        let c = MlflowConfig::builder(uri.clone())
            .auth(basic)
            .build()
            .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let c = MlflowConfig::builder(uri).auth(bearer).build().unwrap();
        assert!(!format!("{c:?}").contains("tok-abc"));
    }
}
