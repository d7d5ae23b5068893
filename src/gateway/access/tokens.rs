//! ServiceAccount tokens, checked by the API server (TokenReview with the endpoint's audience)
//! and cached under the token's hash for a bounded time, in a bounded map.
//!
//! Why TokenReview rather than verifying the JWT against the API server's OIDC keys: the API
//! server also checks that the object the token is bound to (its pod or Secret) still exists, so
//! a token dies with its pod, not only at its expiry; it needs one cluster-scoped grant
//! (`create tokenreviews`) and no key fetching or JWT library here. Its cost, a request to the API
//! server per new token, is paid once per token per TTL (see the README for the figures).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use super::Refusal;

/// Entries the cache holds at most; beyond, expired ones go, then all (a burst of new tokens
/// costs reviews, never memory).
const MAX_ENTRIES: usize = 10_000;
/// How long a refusal is remembered (a client retrying a bad token costs no review).
const NEGATIVE_TTL: Duration = Duration::from_secs(10);

/// A reviewed ServiceAccount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

type Digest = [u8; 32];

struct Entry {
    until: Instant,
    result: Result<ServiceAccount, Refusal>,
}

pub struct TokenReviewer {
    client: kube::Client,
    ttl: Duration,
    cache: Mutex<HashMap<Digest, Entry>>,
}

/// Whether a credential has the shape of a JWT (three base64url parts): API keys that do not
/// are never sent to the API server.
pub fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The token's `exp` claim (unverified: it only shortens how long a review is trusted).
pub fn expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(exp))
}

/// How long a review of a token expiring at `exp` may be trusted: `ttl`, cut at the expiry.
pub fn trust_for(ttl: Duration, exp: Option<SystemTime>, now: SystemTime) -> Duration {
    match exp {
        Some(exp) => ttl.min(exp.duration_since(now).unwrap_or_default()),
        None => ttl,
    }
}

/// The namespace and name of a `system:serviceaccount:<ns>:<name>` username.
pub fn service_account_of(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then_some((ns, name))
}

impl TokenReviewer {
    pub fn new(client: kube::Client, ttl: Duration) -> Self {
        TokenReviewer {
            client,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The ServiceAccount of a token issued for `audience`, or why not.
    pub async fn review(&self, token: &str, audience: &str) -> Result<ServiceAccount, Refusal> {
        let key: Digest = {
            let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
            let mut out = [0u8; 32];
            out.copy_from_slice(d.as_ref());
            out
        };
        let now = Instant::now();
        if let Some(e) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .filter(|e| e.until > now)
        {
            return e.result.clone();
        }
        let result = self.ask(token, audience).await;
        let trust = match &result {
            Ok(_) => trust_for(self.ttl, expiry(token), SystemTime::now()),
            // The API server could not answer: not the token's fault, not remembered.
            Err(r) if r.reason == "review_failed" => return result,
            Err(_) => NEGATIVE_TTL.min(self.ttl),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_ENTRIES {
            cache.retain(|_, e| e.until > now);
            if cache.len() >= MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(
            key,
            Entry {
                until: now + trust,
                result: result.clone(),
            },
        );
        result
    }

    async fn ask(&self, token: &str, audience: &str) -> Result<ServiceAccount, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![audience.to_string()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                ::tracing::warn!(error = %crate::error_chain(&e), "TokenReview failed");
                Refusal {
                    status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    reason: "review_failed",
                    message: "the gateway could not check the token with the Kubernetes API server; try again".into(),
                }
            })?;
        let status = answer.status.unwrap_or_default();
        let invalid = || {
            Refusal::unauthenticated(
                "invalid_credential",
                "the token is not valid for this endpoint: expired, revoked (its pod or Secret is gone), or not issued for its audience",
            )
        };
        if status.authenticated != Some(true)
            || !status
                .audiences
                .as_ref()
                .is_some_and(|a| a.iter().any(|x| x == audience))
        {
            return Err(invalid());
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, name)) = service_account_of(&username) else {
            return Err(Refusal::forbidden(
                "not_admitted",
                "only ServiceAccount tokens are accepted here",
            ));
        };
        Ok(ServiceAccount {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: user.uid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: serde_json::Value) -> String {
        let e = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            e(br#"{"alg":"RS256"}"#),
            e(claims.to_string().as_bytes()),
            e(b"sig")
        )
    }

    #[test]
    fn a_review_is_trusted_at_most_until_the_token_expires() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ttl = Duration::from_secs(60);
        let soon = jwt(serde_json::json!({"exp": 1_000_010}));
        assert!(looks_like_jwt(&soon));
        assert_eq!(trust_for(ttl, expiry(&soon), now), Duration::from_secs(10));
        let expired = jwt(serde_json::json!({"exp": 999_000}));
        assert_eq!(trust_for(ttl, expiry(&expired), now), Duration::ZERO);
        let later = jwt(serde_json::json!({"exp": 2_000_000}));
        assert_eq!(trust_for(ttl, expiry(&later), now), ttl);
        assert_eq!(trust_for(ttl, expiry("not-a-jwt"), now), ttl);
    }

    #[test]
    fn api_keys_do_not_look_like_tokens() {
        assert!(!looks_like_jwt("sk-abcdef"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a..c"));
        assert!(!looks_like_jwt("a.b.c d"));
    }

    #[test]
    fn service_account_usernames() {
        assert_eq!(
            service_account_of("system:serviceaccount:team-a:agent"),
            Some(("team-a", "agent"))
        );
        assert_eq!(service_account_of("system:serviceaccount:team-a"), None);
        assert_eq!(service_account_of("admin"), None);
    }
}
