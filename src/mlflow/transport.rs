//! The one way to the tracking server, under both the experiments API and the trace export (OTLP
//! and trace-info posts): URLs under the tracking URI (its path prefix kept), the credentials (a
//! sensitive header, never printed), TLS as the configuration says, the User-Agent, one
//! reading of transport failures, and one retry policy.
//!
//! Which client sends: the neutral hyper client ([`crate::http_client`]) when the tracking server
//! is verified against the public roots, the common case. It takes the request as built (no URL
//! parsed again per request), which was measured to matter on the trace export's path, and it
//! already hands proxied destinations to reqwest. A CA bundle or insecure TLS goes through a
//! reqwest client built for it: reqwest already does both, and the neutral client stays with one
//! TLS setup for the providers' hot path rather than growing a hand-written certificate verifier.
//! Redirects are never followed by either (a redirect would turn a POST into a GET and may drop
//! credentials).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::header::{AUTHORIZATION, USER_AGENT};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use url::Url;

use super::config::{Auth, ConfigError, MlflowConfig, TlsTrust};
use crate::http_client::UpstreamClient;

/// Connections and credentials for one tracking server. Cheap to share behind an `Arc`.
pub struct Transport {
    base: Url,
    client: Client,
    /// Marked sensitive: never printed by `Debug`.
    authorization: Option<HeaderValue>,
    user_agent: HeaderValue,
    timeout: Duration,
    retry: RetryPolicy,
}

enum Client {
    /// Public roots: the neutral pooled client.
    Pooled(Arc<UpstreamClient>),
    /// A CA bundle or insecure TLS.
    Custom(reqwest::Client),
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("base", &self.base.as_str())
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "client",
                &match self.client {
                    Client::Pooled(_) => "pooled",
                    Client::Custom(_) => "custom TLS",
                },
            )
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

/// The answer to one request: its status, headers and whole body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// No answer came (connection failed, or not within the timeout). The reason holds the server's
/// origin at most, never a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoAnswer {
    pub reason: String,
}

impl fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl Transport {
    /// The transport `config` describes; each request (connect and whole answer) is given
    /// `timeout`.
    pub fn new(config: &MlflowConfig, timeout: Duration) -> Result<Self, ConfigError> {
        let authorization = match config.auth() {
            Auth::None => None,
            Auth::Basic { username, password } => {
                use base64::Engine as _;
                let token = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{password}"));
                Some(sensitive_header(&format!("Basic {token}"))?)
            }
            Auth::Bearer { token } => Some(sensitive_header(&format!("Bearer {token}"))?),
        };
        let user_agent = HeaderValue::from_str(config.user_agent()).map_err(|_| {
            ConfigError::InvalidUserAgent {
                value: config.user_agent().to_string(),
            }
        })?;
        let client = match config.tls() {
            TlsTrust::PublicRoots => {
                Client::Pooled(Arc::new(UpstreamClient::new().map_err(|e| {
                    ConfigError::HttpClient {
                        reason: e.to_string(),
                    }
                })?))
            }
            tls => Client::Custom(custom_tls_client(tls, timeout)?),
        };
        let mut base = config.tracking_uri().clone();
        base.set_query(None);
        base.set_fragment(None);
        Ok(Transport {
            base,
            client,
            authorization,
            user_agent,
            timeout,
            retry: RetryPolicy::new(config.max_retries()),
        })
    }

    /// `<tracking uri>/<path>`, keeping any path prefix of the tracking URI.
    pub fn url(&self, path: &str) -> Url {
        endpoint_url(&self.base, path)
    }

    /// The tracking URI (without query or fragment).
    pub fn base(&self) -> &Url {
        &self.base
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn retry(&self) -> RetryPolicy {
        self.retry
    }

    /// Sends one request (no retry) with the credentials and User-Agent, and reads the whole
    /// answer, within the timeout.
    pub async fn send(&self, mut request: Request<Bytes>) -> Result<Answer, NoAnswer> {
        let headers = request.headers_mut();
        headers.insert(USER_AGENT, self.user_agent.clone());
        if let Some(authorization) = &self.authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        let origin = match (request.uri().scheme_str(), request.uri().authority()) {
            (Some(scheme), Some(authority)) => format!(" from {scheme}://{authority}"),
            _ => String::new(),
        };
        let timed_out = || NoAnswer {
            reason: format!("no answer{origin} within {} ms", self.timeout.as_millis()),
        };
        let call = async {
            match &self.client {
                Client::Pooled(client) => {
                    let mut response = client
                        .send(request)
                        .await
                        .map_err(|e| (e.timeout, e.message))?;
                    let status = response.status;
                    let headers = std::mem::take(&mut response.headers);
                    let body = response.bytes().await.map_err(|e| (e.timeout, e.message))?;
                    Ok(Answer {
                        status,
                        headers,
                        body,
                    })
                }
                Client::Custom(client) => {
                    let reason = |e: reqwest::Error| (e.is_timeout(), crate::error_chain(&e));
                    let request: reqwest::Request = request.try_into().map_err(reason)?;
                    let response = client.execute(request).await.map_err(reason)?;
                    let status = response.status();
                    let headers = response.headers().clone();
                    let body = response.bytes().await.map_err(reason)?;
                    Ok(Answer {
                        status,
                        headers,
                        body,
                    })
                }
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) | Ok(Err((true, _))) => Err(timed_out()),
            Ok(Err((false, reason))) => Err(NoAnswer { reason }),
            Ok(Ok(answer)) => Ok(answer),
        }
    }
}

/// `<tracking uri>/<path>`, keeping any path prefix of the tracking URI.
fn endpoint_url(tracking_uri: &Url, path: &str) -> Url {
    let mut url = tracking_uri.clone();
    url.set_query(None);
    url.set_fragment(None);
    let prefix = url.path().trim_end_matches('/').to_string();
    url.set_path(&format!("{prefix}/{path}"));
    url
}

fn sensitive_header(value: &str) -> Result<HeaderValue, ConfigError> {
    let mut header = HeaderValue::from_str(value).map_err(|_| ConfigError::InvalidToken)?;
    header.set_sensitive(true);
    Ok(header)
}

/// reqwest with a CA bundle or without verification, as the configuration says.
fn custom_tls_client(tls: &TlsTrust, timeout: Duration) -> Result<reqwest::Client, ConfigError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none());
    match tls {
        TlsTrust::PublicRoots => {}
        TlsTrust::CaBundle(bundle) => {
            for cert in bundle.certs.iter() {
                builder = builder.add_root_certificate(cert.clone());
            }
        }
        TlsTrust::Insecure => {
            tracing::warn!(
                "MLFLOW_TRACKING_INSECURE_TLS=true: the tracking server's certificate is not verified"
            );
            builder = builder.danger_accept_invalid_certs(true);
        }
    }
    builder.build().map_err(|e| ConfigError::HttpClient {
        reason: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// Retries

/// The one retry policy of requests to the tracking server: up to `max_retries` more attempts
/// after a transient failure, 200 ms apart, doubling, at most 2 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_retries: u32,
}

impl RetryPolicy {
    pub const fn new(max_retries: u32) -> Self {
        RetryPolicy { max_retries }
    }

    pub fn max_retries(self) -> u32 {
        self.max_retries
    }

    /// Attempts at most, the first included.
    pub fn attempts(self) -> u32 {
        self.max_retries.saturating_add(1)
    }

    /// Delay before retry number `retry` (0-based): 200 ms, doubling, at most 2 s.
    pub fn delay(self, retry: u32) -> Duration {
        const FIRST: Duration = Duration::from_millis(200);
        const MAX: Duration = Duration::from_secs(2);
        FIRST.saturating_mul(2u32.saturating_pow(retry)).min(MAX)
    }

    /// All the delays of one request that uses every retry.
    pub fn total_delay(self) -> Duration {
        (0..self.max_retries).map(|r| self.delay(r)).sum()
    }

    /// Runs `attempt` until it succeeds, fails for good (not `transient`), or the retries are
    /// spent; `what` names the request in the debug log of each retry.
    pub async fn run<T, E, F, Fut>(
        self,
        what: &str,
        mut attempt: F,
        transient: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        E: fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut retry = 0;
        loop {
            match attempt().await {
                Err(e) if transient(&e) && retry < self.max_retries => {
                    let delay = self.delay(retry);
                    tracing::debug!(
                        call = what,
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
}

/// HTTP 429, 502, 503, 504: worth trying again (as is no answer at all).
pub fn is_transient_status(status: u16) -> bool {
    matches!(status, 429 | 502 | 503 | 504)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_the_prefix() {
        let url =
            |base: &str, path: &str| endpoint_url(&Url::parse(base).unwrap(), path).to_string();
        assert_eq!(
            url("http://127.0.0.1:5000", "api/2.0/mlflow/experiments/get"),
            "http://127.0.0.1:5000/api/2.0/mlflow/experiments/get"
        );
        assert_eq!(
            url("https://host/mlflow", "api/3.0/mlflow/traces"),
            "https://host/mlflow/api/3.0/mlflow/traces"
        );
        assert_eq!(
            url("https://host/mlflow/?x=1#frag", "v1/traces"),
            "https://host/mlflow/v1/traces"
        );
    }

    #[test]
    fn backoff_doubles_up_to_two_seconds() {
        let policy = RetryPolicy::new(3);
        let ms: Vec<u128> = (0..7).map(|r| policy.delay(r).as_millis()).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(policy.delay(u32::MAX), Duration::from_secs(2));
        assert_eq!(policy.total_delay(), Duration::from_millis(1400));
        assert_eq!(policy.attempts(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_only_transient_failures() {
        let policy = RetryPolicy::new(2);
        let mut calls = 0;
        let result: Result<(), String> = policy
            .run(
                "t",
                || {
                    calls += 1;
                    async { Err("busy".to_string()) }
                },
                |_| true,
            )
            .await;
        assert!(result.is_err());
        assert_eq!(calls, 3);
        let mut calls = 0;
        let result: Result<(), String> = policy
            .run(
                "t",
                || {
                    calls += 1;
                    async { Err("no".to_string()) }
                },
                |_| false,
            )
            .await;
        assert!(result.is_err());
        assert_eq!(calls, 1);
    }

    #[test]
    fn transient_statuses() {
        for status in [429, 502, 503, 504] {
            assert!(is_transient_status(status), "{status}");
        }
        for status in [200, 400, 401, 403, 404, 409, 500, 501] {
            assert!(!is_transient_status(status), "{status}");
        }
    }

    #[tokio::test]
    async fn credentials_are_sensitive_and_redacted() {
        let config = MlflowConfig::builder(Url::parse("http://127.0.0.1:1").unwrap())
            .auth(Auth::Basic {
                username: "writer".into(),
                password: "hunter2-SECRET".into(),
            })
            .build()
            .unwrap();
        let transport = Transport::new(&config, Duration::from_secs(1)).unwrap();
        let shown = format!("{transport:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("d3JpdGVy"),
            "{shown}"
        );
        assert!(transport.authorization.as_ref().unwrap().is_sensitive());
    }

    #[tokio::test]
    async fn a_refused_connection_is_no_answer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let config = MlflowConfig::new(Url::parse(&format!("http://{addr}")).unwrap()).unwrap();
        let transport = Transport::new(&config, Duration::from_secs(1)).unwrap();
        let mut request = Request::new(Bytes::new());
        *request.uri_mut() = transport.url("x").as_str().parse().unwrap();
        let e = transport.send(request).await.unwrap_err();
        assert!(e.reason.to_lowercase().contains("refused"), "{e}");
    }
}
