//! Who may call the gateway (`spec.access`): every API route passes through [`guard`], which
//! admits a request by its `Authorization: Bearer` credential (a named API key, or a Kubernetes
//! ServiceAccount token) or refuses it with 401/403 in OpenAI's error shape, counted by reason.
//! An endpoint that declares no access refuses every call: callers are declared, never assumed.
//!
//! The admitted caller's [`Identity`] rides on the request (an extension) to the trace, where it
//! becomes `mlflow.auth.username` / `mlflow.auth.userId` / `mlflow.trace.user`, and to the
//! per-caller metric. No credential is kept or logged: API keys are held as SHA-256 hashes
//! ([`keys`]), tokens are cached under their hash ([`tokens`]).

pub mod keys;
pub mod tokens;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::Shared;
use keys::KeyStore;
use tokens::TokenReviewer;

/// What `spec.access` declares, in the gateway's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessConfig {
    /// No `spec.access`: every call is refused (403).
    Closed,
    /// `open: true`: every call is admitted, anonymously.
    Open,
    /// Callers must present a credential of a declared kind.
    Checked {
        service_accounts: Option<ServiceAccountPolicy>,
        /// Names of the declared API keys (their values are files, see [`keys`]).
        api_keys: Vec<String>,
    },
}

/// Which ServiceAccounts are admitted, and the audience their tokens must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountPolicy {
    pub audience: String,
    pub namespaces: BTreeSet<String>,
    /// `<namespace>/<name>`.
    pub names: BTreeSet<String>,
}

impl ServiceAccountPolicy {
    pub fn admits(&self, namespace: &str, name: &str) -> bool {
        self.namespaces.contains(namespace) || self.names.contains(&format!("{namespace}/{name}"))
    }
}

/// An admitted caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `system:serviceaccount:<ns>:<name>` or `apikey:<name>`: the trace's username, the metric's
    /// caller label.
    pub name: String,
    /// The ServiceAccount's uid (none for API keys).
    pub uid: Option<String>,
}

/// Why a request was refused; `reason` is the metric label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn unauthenticated(reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            reason,
            message: message.into(),
        }
    }

    fn forbidden(reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::FORBIDDEN,
            reason,
            message: message.into(),
        }
    }

    /// The answer in OpenAI's error shape (`code` as OpenAI's own: `invalid_api_key` on 401).
    pub fn response(&self) -> Response {
        let code = match self.status {
            StatusCode::UNAUTHORIZED => "invalid_api_key",
            StatusCode::FORBIDDEN => "permission_denied",
            _ => "service_unavailable",
        };
        let kind = match self.status {
            StatusCode::SERVICE_UNAVAILABLE => "server_error",
            _ => "invalid_request_error",
        };
        let body = json!({
            "error": {"message": self.message, "type": kind, "param": null, "code": code}
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"mlflow-gateway\""),
            );
        }
        resp
    }
}

/// The gateway's access check: the declaration and the two credential checkers.
pub struct Access {
    config: AccessConfig,
    keys: Option<Arc<KeyStore>>,
    reviewer: Option<TokenReviewer>,
}

impl Access {
    pub fn new(
        config: AccessConfig,
        keys: Option<Arc<KeyStore>>,
        reviewer: Option<TokenReviewer>,
    ) -> Self {
        Access {
            config,
            keys,
            reviewer,
        }
    }

    /// Starts what `config` needs: the key files' watcher (`GATEWAY_CALLER_KEYS_DIR`, re-read
    /// every `GATEWAY_CALLER_KEYS_RELOAD_SECONDS`, default 5) and the Kubernetes client of the
    /// token reviews (in-cluster, or `KUBECONFIG`; reviews trusted for
    /// `GATEWAY_TOKEN_CACHE_SECONDS`, default 60). Err names what is missing.
    pub async fn start(
        config: AccessConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Access, String> {
        let AccessConfig::Checked {
            service_accounts,
            api_keys,
        } = &config
        else {
            return Ok(Access::new(config, None, None));
        };
        let seconds = |var: &str, default: u64| -> Result<Duration, String> {
            match env(var).filter(|v| !v.is_empty()) {
                None => Ok(Duration::from_secs(default)),
                Some(v) => v
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .map(Duration::from_secs)
                    .ok_or_else(|| format!("{var}={v:?} is not a number of seconds above 0")),
            }
        };
        let keys = if api_keys.is_empty() {
            None
        } else {
            let dir = env("GATEWAY_CALLER_KEYS_DIR").filter(|v| !v.is_empty()).ok_or(
                "spec.access.apiKeys is set but GATEWAY_CALLER_KEYS_DIR (where the keys are mounted) is not",
            )?;
            let every = seconds("GATEWAY_CALLER_KEYS_RELOAD_SECONDS", 5)?;
            Some(keys::watch(dir.into(), api_keys.clone(), every))
        };
        let reviewer = match service_accounts {
            None => None,
            Some(_) => {
                let ttl = seconds("GATEWAY_TOKEN_CACHE_SECONDS", 60)?;
                let client = kube::Client::try_default().await.map_err(|e| {
                    format!(
                        "spec.access.serviceAccounts is set, so tokens are reviewed by the Kubernetes API server, but no client could be made (in-cluster or KUBECONFIG): {}",
                        crate::error_chain(&e)
                    )
                })?;
                Some(TokenReviewer::new(client, ttl))
            }
        };
        Ok(Access::new(config, keys, reviewer))
    }

    /// Admits everyone (for tests and tools that run the gateway without a declaration).
    pub fn open() -> Self {
        Access::new(AccessConfig::Open, None, None)
    }

    pub fn config(&self) -> &AccessConfig {
        &self.config
    }

    /// The caller of a request with this `Authorization` header: Ok(None) when access is open.
    pub async fn check(
        &self,
        authorization: Option<&HeaderValue>,
    ) -> Result<Option<Identity>, Refusal> {
        let service_accounts = match &self.config {
            AccessConfig::Open => return Ok(None),
            AccessConfig::Closed => {
                return Err(Refusal::forbidden(
                    "not_declared",
                    "this endpoint declares no callers: its owner sets spec.access (serviceAccounts, apiKeys, or open: true)",
                ));
            }
            AccessConfig::Checked {
                service_accounts, ..
            } => service_accounts,
        };
        let Some(value) = authorization else {
            return Err(Refusal::unauthenticated(
                "missing_credential",
                "no credential: send Authorization: Bearer <API key or ServiceAccount token>",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Refusal::unauthenticated(
                    "malformed_credential",
                    "the Authorization header must be: Bearer <API key or ServiceAccount token>",
                )
            })?;
        if let Some(name) = self.keys.as_ref().and_then(|k| k.caller(token)) {
            return Ok(Some(Identity {
                name: format!("apikey:{name}"),
                uid: None,
            }));
        }
        if let (Some(policy), Some(reviewer)) = (service_accounts, &self.reviewer)
            && tokens::looks_like_jwt(token)
        {
            let sa = reviewer.review(token, &policy.audience).await?;
            if !policy.admits(&sa.namespace, &sa.name) {
                return Err(Refusal::forbidden(
                    "not_admitted",
                    format!(
                        "ServiceAccount {}/{} may not call this endpoint (spec.access.serviceAccounts lists who may)",
                        sa.namespace, sa.name
                    ),
                ));
            }
            return Ok(Some(Identity {
                name: format!("system:serviceaccount:{}:{}", sa.namespace, sa.name),
                uid: sa.uid,
            }));
        }
        Err(Refusal::unauthenticated(
            "invalid_credential",
            "the credential is not valid for this endpoint (unknown or revoked API key, or a token that is expired or not issued for this endpoint's audience)",
        ))
    }
}

/// The header Anthropic's SDKs send their key in.
const X_API_KEY: &str = "x-api-key";

/// The admitted caller of a request, if any (None when access is open).
pub struct Caller(pub Option<Arc<Identity>>);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Caller(parts.extensions.get::<Arc<Identity>>().cloned()))
    }
}

/// The middleware of the API routes: admits or refuses, counts refusals by reason and answers by
/// caller.
pub async fn guard(State(g): State<Shared>, mut req: Request, next: Next) -> Response {
    let headers = req.headers();
    // Anthropic's SDKs send their key as `x-api-key`: the same credential, another header.
    let credential = headers.get(header::AUTHORIZATION).cloned().or_else(|| {
        let key = headers.get(X_API_KEY)?.to_str().ok()?;
        HeaderValue::from_str(&format!("Bearer {}", key.trim())).ok()
    });
    match g.access.check(credential.as_ref()).await {
        Ok(identity) => {
            // The credential goes no further than this check.
            req.headers_mut().remove(header::AUTHORIZATION);
            req.headers_mut().remove(X_API_KEY);
            let identity = identity.map(Arc::new);
            if let Some(id) = &identity {
                req.extensions_mut().insert(Arc::clone(id));
            }
            let resp = next.run(req).await;
            if let Some(id) = identity {
                g.metrics.caller_request(&id.name, resp.status().as_u16());
            }
            resp
        }
        Err(refusal) => {
            g.metrics
                .access_refused(refusal.reason, refusal.status.as_u16());
            refusal.response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(keys: Option<Arc<KeyStore>>) -> Access {
        Access::new(
            AccessConfig::Checked {
                service_accounts: None,
                api_keys: vec!["ci".into()],
            },
            keys,
            None,
        )
    }

    #[tokio::test]
    async fn open_admits_anonymously_and_closed_refuses_with_403() {
        assert_eq!(Access::open().check(None).await, Ok(None));
        let closed = Access::new(AccessConfig::Closed, None, None);
        let r = closed.check(None).await.unwrap_err();
        assert_eq!(
            (r.status, r.reason),
            (StatusCode::FORBIDDEN, "not_declared")
        );
        assert!(r.message.contains("spec.access"));
    }

    #[tokio::test]
    async fn keys_admit_by_name_and_refusals_say_why() {
        let store = Arc::new(KeyStore::default());
        store.replace([("ci".to_string(), vec!["sk-good".to_string()])]);
        let access = checked(Some(store));
        let bearer = |v: &str| HeaderValue::from_str(v).unwrap();
        assert_eq!(
            access.check(Some(&bearer("Bearer sk-good"))).await,
            Ok(Some(Identity {
                name: "apikey:ci".into(),
                uid: None
            }))
        );
        let r = access.check(None).await.unwrap_err();
        assert_eq!(
            (r.status, r.reason),
            (StatusCode::UNAUTHORIZED, "missing_credential")
        );
        let r = access.check(Some(&bearer("Basic abc"))).await.unwrap_err();
        assert_eq!(r.reason, "malformed_credential");
        let r = access
            .check(Some(&bearer("Bearer sk-bad")))
            .await
            .unwrap_err();
        assert_eq!(
            (r.status, r.reason),
            (StatusCode::UNAUTHORIZED, "invalid_credential")
        );
        // The refusal never repeats the credential.
        assert!(!r.message.contains("sk-bad"));
    }

    #[test]
    fn refusals_are_in_openais_shape() {
        let r = Refusal::unauthenticated("invalid_credential", "no");
        let resp = r.response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(resp.headers().contains_key(header::WWW_AUTHENTICATE));
    }

    #[test]
    fn service_accounts_are_admitted_by_namespace_or_name() {
        let p = ServiceAccountPolicy {
            audience: "a".into(),
            namespaces: BTreeSet::from(["team-a".to_string()]),
            names: BTreeSet::from(["team-b/agent".to_string()]),
        };
        assert!(p.admits("team-a", "anyone"));
        assert!(p.admits("team-b", "agent"));
        assert!(!p.admits("team-b", "other"));
        assert!(!p.admits("team-c", "agent"));
    }
}
