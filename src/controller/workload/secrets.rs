//! The Secrets an endpoint's gateway pods read: each model's API key and the trace credential,
//! checked before any pod is asked to start (`SecretsReady`), and which endpoints a Secret event
//! concerns. A missing Secret or key is a condition, not an error: the pods stay as they are.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};

use super::render::{self, TraceCredential};
use crate::api::GatewayEndpoint;
use crate::controller::conditions::{ConditionState, ConditionType, Reason};
use crate::controller::context::Context;
use crate::controller::credential::Managed;
use crate::controller::error::Error;
use crate::controller::settings::OperatorSecret;

/// The Secrets the pods read, checked.
pub struct Resolved {
    /// Secret name -> resourceVersion, for the config hash.
    pub versions: BTreeMap<String, String>,
    pub credential: TraceCredential,
    /// The operator-wide credential to mirror into the endpoint's namespace.
    pub mirror: Option<Secret>,
    /// What is missing, one line each, naming the Secret and key, with its condition reason.
    pub problems: Vec<(Reason, String)>,
}

impl Resolved {
    fn problem(&mut self, reason: Reason, message: String) {
        self.problems.push((reason, message));
    }

    /// The condition reason: the first problem's.
    pub fn reason(&self) -> Reason {
        self.problems
            .first()
            .map_or(Reason::SecretsFound, |(r, _)| r.clone())
    }
}

/// Reads every Secret the pods need: each model's API key and the trace credential.
pub async fn resolve_secrets(
    ep: &GatewayEndpoint,
    ctx: &Context,
    ns: &str,
    tracking: bool,
    managed: &Managed,
) -> Result<Resolved, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut wanted: BTreeMap<&str, Vec<(&str, String)>> = BTreeMap::new();
    for m in ep.spec.all_models() {
        if let Some(r) = &m.api_key_secret_ref {
            wanted
                .entry(r.name.as_str())
                .or_default()
                .push((r.key.as_str(), format!("model {}", m.name)));
        }
    }
    let credential_ref = ep
        .spec
        .tracing
        .credentials_secret_ref
        .as_ref()
        .filter(|_| tracking);
    if let Some(r) = credential_ref {
        wanted.entry(r.name.as_str()).or_default();
    }
    let mut resolved = Resolved {
        versions: BTreeMap::new(),
        credential: TraceCredential::None,
        mirror: None,
        problems: Vec::new(),
    };
    let mut found: BTreeMap<&str, Secret> = BTreeMap::new();
    for (name, keys) in &wanted {
        match api.get_opt(name).await? {
            None => {
                let users: Vec<&str> = keys.iter().map(|(_, who)| who.as_str()).collect();
                let users = if users.is_empty() {
                    "tracing.credentialsSecretRef".to_string()
                } else {
                    users.join(", ")
                };
                resolved.problem(
                    Reason::SecretNotFound,
                    format!("Secret {ns}/{name} not found (needed by {users})"),
                );
            }
            Some(secret) => {
                let present = secret_keys(&secret);
                for (key, who) in keys {
                    if !present.contains(key) {
                        resolved.problem(
                            Reason::SecretKeyNotFound,
                            format!("Secret {ns}/{name} has no key {key:?} (needed by {who})"),
                        );
                    }
                }
                resolved.versions.insert(
                    (*name).to_string(),
                    secret.resource_version().unwrap_or_default(),
                );
                found.insert(name, secret);
            }
        }
    }
    if !tracking {
        return Ok(resolved);
    }
    if let Some(r) = credential_ref {
        if let Some(secret) = found.get(r.name.as_str()) {
            let keys: Vec<&str> = secret_keys(secret).into_iter().collect();
            match render::credential_kind(&r.name, &keys) {
                Some(c) => resolved.credential = c,
                None => {
                    resolved.problem(Reason::CredentialsInvalid, format!(
                        "Secret {ns}/{} (tracing.credentialsSecretRef) needs the key token, or the keys username and password",
                        r.name
                    ));
                }
            }
        }
    } else if let Managed::Provided(provided) = managed {
        // The endpoint's own MLflow user, in a Secret the endpoint owns.
        let name = render::credential_secret_name(ep);
        resolved.credential = TraceCredential::Basic {
            secret: name.clone(),
        };
        resolved.versions.insert(name, provided.version.clone());
        resolved.mirror = Some(provided.secret.clone());
    } else if let Managed::Unavailable(message) = managed {
        resolved.problem(Reason::CredentialUnavailable, message.clone());
    } else if matches!(managed, Managed::Pending) {
        // No pods before the experiment is known, so no credential yet either.
    } else if let Some(OperatorSecret {
        namespace: source_ns,
        name: source_name,
    }) = ctx.settings.gateway_credentials()
    {
        // The operator-wide trace credential, mirrored as a Secret the endpoint owns.
        let source: Api<Secret> = Api::namespaced(ctx.client.clone(), source_ns);
        match source.get_opt(source_name).await? {
            None => {
                resolved.problem(Reason::CredentialsInvalid, format!(
                    "the operator's gateway credential Secret {source_ns}/{source_name} not found (ask the operator's administrator)"
                ));
            }
            Some(source) => {
                let mirror = render::credential_secret(ep, &source);
                let keys: Vec<&str> = secret_keys(&mirror).into_iter().collect();
                match render::credential_kind(&render::credential_secret_name(ep), &keys) {
                    Some(c) => {
                        resolved.credential = c;
                        resolved.versions.insert(
                            format!("{source_ns}/{source_name}"),
                            source.resource_version().unwrap_or_default(),
                        );
                        resolved.mirror = Some(mirror);
                    }
                    None => {
                        resolved.problem(Reason::CredentialsInvalid, format!(
                            "the operator's gateway credential Secret {source_ns}/{source_name} needs the key token, or the keys username and password"
                        ));
                    }
                }
            }
        }
    }
    Ok(resolved)
}

fn secret_keys(s: &Secret) -> BTreeSet<&str> {
    let data = s.data.iter().flat_map(|d| d.keys());
    let string_data = s.string_data.iter().flat_map(|d| d.keys());
    data.chain(string_data).map(String::as_str).collect()
}

/// SecretsReady from what [`resolve_secrets`] found.
pub fn secrets_condition(resolved: &Resolved) -> ConditionState {
    if resolved.problems.is_empty() {
        let message = if resolved.versions.is_empty() {
            "the pods read no Secret".to_string()
        } else {
            let names: Vec<&str> = resolved.versions.keys().map(String::as_str).collect();
            format!(
                "found every Secret and key the pods read: {}",
                names.join(", ")
            )
        };
        return ConditionState::new(
            ConditionType::SecretsReady,
            true,
            Reason::SecretsFound,
            message,
        );
    }
    let lines: Vec<&str> = resolved.problems.iter().map(|(_, m)| m.as_str()).collect();
    ConditionState::new(
        ConditionType::SecretsReady,
        false,
        resolved.reason(),
        format!(
            "{}; the running pods are left as they are until this is fixed",
            lines.join("; ")
        ),
    )
}

/// The endpoints a Secret event concerns: those whose models or trace credential read it, the
/// owner of a mirrored credential, and (for the operator-wide credential) every endpoint that
/// uses it.
pub fn endpoints_reading(
    endpoints: &Store<GatewayEndpoint>,
    operator_credential: Option<(&str, &str)>,
    secret_ns: &str,
    secret_name: &str,
    owner: Option<&str>,
) -> Vec<ObjectRef<GatewayEndpoint>> {
    let is_operator_credential = operator_credential == Some((secret_ns, secret_name));
    endpoints
        .state()
        .iter()
        .filter(|ep| {
            if is_operator_credential {
                return ep.spec.usage_tracking && ep.spec.tracing.credentials_secret_ref.is_none();
            }
            if ep.namespace().as_deref() != Some(secret_ns) {
                return false;
            }
            owner.is_some_and(|uid| ep.uid().as_deref() == Some(uid))
                || ep.spec.all_models().any(|m| {
                    m.api_key_secret_ref
                        .as_ref()
                        .is_some_and(|r| r.name == secret_name)
                })
                || ep
                    .spec
                    .tracing
                    .credentials_secret_ref
                    .as_ref()
                    .is_some_and(|r| r.name == secret_name)
        })
        .map(|ep| ObjectRef::from_obj(ep.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(problems: Vec<(Reason, String)>) -> Resolved {
        Resolved {
            versions: BTreeMap::from([("llm-keys".to_string(), "7".to_string())]),
            credential: TraceCredential::None,
            mirror: None,
            problems,
        }
    }

    #[test]
    fn secrets_ready_names_the_secrets_or_the_first_problem() {
        let ok = secrets_condition(&resolved(vec![]));
        assert!(ok.status);
        assert_eq!(ok.reason, Reason::SecretsFound);
        assert!(ok.message.ends_with("llm-keys"), "{}", ok.message);
        let bad = secrets_condition(&resolved(vec![
            (Reason::SecretKeyNotFound, "no key".into()),
            (Reason::SecretNotFound, "no secret".into()),
        ]));
        assert!(!bad.status);
        assert_eq!(bad.reason, Reason::SecretKeyNotFound);
        assert_eq!(
            bad.message,
            "no key; no secret; the running pods are left as they are until this is fixed"
        );
    }
}
