//! The endpoint's gateway pods: resolves the Secrets they read, applies the ConfigMap, Service,
//! Deployment (and the mirrored trace credential), and reads back what the Deployment says.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::info;

use super::{ConditionState, Context, Error, FIELD_MANAGER};
use crate::api::GatewayEndpoint;
use crate::deploy::{self, PodInputs, TraceCredential};

pub const CONDITION_SECRETS_READY: &str = "SecretsReady";
pub const CONDITION_AVAILABLE: &str = "Available";
pub const CONDITION_PROGRESSING: &str = "Progressing";

/// What the gateway part of a reconcile found and did.
pub struct GatewayState {
    pub secrets: ConditionState,
    pub available: ConditionState,
    pub progressing: ConditionState,
    pub url: String,
    pub replicas: Option<i32>,
    pub ready_replicas: Option<i32>,
    pub events: Vec<Event>,
    /// An object of one of the endpoint's names that is someone else's (then `available` says so).
    pub conflict: Option<Error>,
}

/// The Secrets the pods read, checked.
struct Resolved {
    /// Secret name -> resourceVersion, for the config hash.
    versions: BTreeMap<String, String>,
    credential: TraceCredential,
    /// The operator-wide credential to mirror into the endpoint's namespace.
    mirror: Option<Secret>,
    /// What is missing, one line each, naming the Secret and key, with its condition reason.
    problems: Vec<(&'static str, String)>,
}

impl Resolved {
    fn problem(&mut self, reason: &'static str, message: String) {
        self.problems.push((reason, message));
    }

    /// The condition reason: the first problem's.
    fn reason(&self) -> &'static str {
        self.problems.first().map_or("SecretsFound", |(r, _)| r)
    }
}

/// Reads every Secret the pods need: each model's API key and the trace credential.
async fn resolve_secrets(
    ep: &GatewayEndpoint,
    ctx: &Context,
    ns: &str,
    tracking: bool,
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
                    "SecretNotFound",
                    format!("Secret {ns}/{name} not found (needed by {users})"),
                );
            }
            Some(secret) => {
                let present = secret_keys(&secret);
                for (key, who) in keys {
                    if !present.contains(key) {
                        resolved.problem(
                            "SecretKeyNotFound",
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
            match deploy::credential_kind(&r.name, &keys) {
                Some(c) => resolved.credential = c,
                None => {
                    resolved.problem("CredentialsInvalid", format!(
                        "Secret {ns}/{} (tracing.credentialsSecretRef) needs the key token, or the keys username and password",
                        r.name
                    ));
                }
            }
        }
    } else if let (Some(source_name), Some(source_ns)) = (
        &ctx.settings.gateway_credentials_secret,
        &ctx.settings.operator_namespace,
    ) {
        // The operator-wide trace credential, mirrored as a Secret the endpoint owns.
        let source: Api<Secret> = Api::namespaced(ctx.client.clone(), source_ns);
        match source.get_opt(source_name).await? {
            None => {
                resolved.problem("CredentialsInvalid", format!(
                    "the operator's gateway credential Secret {source_ns}/{source_name} not found (ask the operator's administrator)"
                ));
            }
            Some(source) => {
                let mirror = deploy::credential_secret(ep, &source);
                let keys: Vec<&str> = secret_keys(&mirror).into_iter().collect();
                match deploy::credential_kind(&deploy::credential_secret_name(ep), &keys) {
                    Some(c) => {
                        resolved.credential = c;
                        resolved.versions.insert(
                            format!("{source_ns}/{source_name}"),
                            source.resource_version().unwrap_or_default(),
                        );
                        resolved.mirror = Some(mirror);
                    }
                    None => {
                        resolved.problem("CredentialsInvalid", format!(
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

/// Applies `desired` unless the object already holds it. An object of that name that is not the
/// endpoint's is left alone and reported. Returns the object as the API server has it (None when
/// unknown), and whether a write was made.
async fn ensure<K>(
    ctx: &Context,
    ep: &GatewayEndpoint,
    desired: K,
    cached: Option<&Store<K>>,
) -> Result<(Option<Arc<K>>, bool), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let desired = deploy::stamp(desired)
        .map_err(|e| Error::InvalidResource(format!("cannot render an owned object: {e}")))?;
    let name = desired.name_any();
    let ns = desired.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let from_cache = cached.and_then(|s| s.get(&ObjectRef::new(&name).within(&ns)));
    let existing = match from_cache {
        Some(obj) if deploy::is_owned_by(obj.meta(), ep) => Some(obj),
        // Not in the cache (which sees only objects with the operator's label): it may not exist,
        // be someone else's, or be ours with its label removed.
        _ => api.get_opt(&name).await?.map(Arc::new),
    };
    if let Some(obj) = &existing {
        if !deploy::is_owned_by(obj.meta(), ep) {
            return Err(Error::NameConflict {
                kind: K::kind(&()).into_owned(),
                name: format!("{ns}/{name}"),
            });
        }
        let wanted = serde_json::to_value(&desired).map_err(invalid)?;
        let actual = serde_json::to_value(obj.as_ref()).map_err(invalid)?;
        if !deploy::drifted(&wanted, &actual) {
            return Ok((existing, false));
        }
    }
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await?;
    ctx.metrics
        .object_applies
        .get_or_create(&crate::metrics::KindLabels {
            kind: K::kind(&()).into_owned(),
        })
        .inc();
    info!(
        kind = %K::kind(&()),
        object = %format!("{ns}/{name}"),
        created = existing.is_none(),
        "applied"
    );
    Ok((Some(Arc::new(applied)), true))
}

fn invalid(e: serde_json::Error) -> Error {
    Error::InvalidResource(format!("cannot compare an owned object: {e}"))
}

/// SecretsReady from what [`resolve_secrets`] found.
fn secrets_condition(resolved: &Resolved) -> ConditionState {
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
        return ConditionState {
            type_: CONDITION_SECRETS_READY,
            status: true,
            reason: "SecretsFound".into(),
            message,
        };
    }
    let lines: Vec<&str> = resolved.problems.iter().map(|(_, m)| m.as_str()).collect();
    ConditionState {
        type_: CONDITION_SECRETS_READY,
        status: false,
        reason: resolved.reason().into(),
        message: format!(
            "{}; the running pods are left as they are until this is fixed",
            lines.join("; ")
        ),
    }
}

/// Makes the endpoint's gateway objects match its spec, and reports what the Deployment says.
/// `experiment_id`: where the pods trace (None with tracking on: not known yet, so no pods yet).
pub async fn ensure_gateway(
    ep: &GatewayEndpoint,
    ctx: &Context,
    experiment_id: Option<&str>,
    tracking: bool,
) -> Result<GatewayState, Error> {
    let ns = ep.namespace().unwrap_or_default();
    let resolved = resolve_secrets(ep, ctx, &ns, tracking).await?;
    let secrets = secrets_condition(&resolved);
    let blocked = if !resolved.problems.is_empty() {
        Some((
            resolved.reason(),
            "the Deployment is not changed until the Secrets are fixed".to_string(),
        ))
    } else if tracking && experiment_id.is_none() {
        Some((
            "WaitingForExperiment",
            "the pods start once the endpoint's experiment is known".to_string(),
        ))
    } else {
        None
    };
    let mut events = Vec::new();
    let traced_into = experiment_id.filter(|_| tracking);
    let deployment = match apply_objects(
        ep,
        ctx,
        &resolved,
        traced_into,
        blocked.is_some(),
        &mut events,
    )
    .await
    {
        Ok(d) => d,
        Err(e @ Error::NameConflict { .. }) => {
            let message = e.to_string();
            let condition = |type_| ConditionState {
                type_,
                status: false,
                reason: "NameConflict".into(),
                message: message.clone(),
            };
            return Ok(GatewayState {
                secrets,
                available: condition(CONDITION_AVAILABLE),
                progressing: condition(CONDITION_PROGRESSING),
                url: deploy::url(ep),
                replicas: None,
                ready_replicas: None,
                events,
                conflict: Some(e),
            });
        }
        Err(e) => return Err(e),
    };
    let (available, progressing) = deployment_conditions(deployment.as_deref(), blocked);
    let status = deployment
        .as_ref()
        .map(|d| d.status.clone().unwrap_or_default());
    Ok(GatewayState {
        secrets,
        available,
        progressing,
        url: deploy::url(ep),
        replicas: status.as_ref().map(|s| s.replicas.unwrap_or_default()),
        ready_replicas: status
            .as_ref()
            .map(|s| s.ready_replicas.unwrap_or_default()),
        events,
        conflict: None,
    })
}

/// Applies the ConfigMap, the Service, the mirrored credential and (unless `blocked`) the
/// Deployment, tracing into `experiment_id`. Returns the endpoint's Deployment as it is now.
async fn apply_objects(
    ep: &GatewayEndpoint,
    ctx: &Context,
    resolved: &Resolved,
    experiment_id: Option<&str>,
    blocked: bool,
    events: &mut Vec<Event>,
) -> Result<Option<Arc<Deployment>>, Error> {
    let config = deploy::endpoint_config(ep)
        .map_err(|e| Error::InvalidResource(format!("cannot render the endpoint config: {e}")))?;
    ensure(
        ctx,
        ep,
        deploy::config_map(ep, &config, ctx.settings.gateway.ca_bundle.as_deref()),
        Some(&ctx.stores.config_maps),
    )
    .await?;
    ensure(ctx, ep, deploy::service(ep), Some(&ctx.stores.services)).await?;
    if let Some(mirror) = resolved.mirror.clone() {
        ensure(ctx, ep, mirror, None).await?;
    }
    if blocked {
        let key =
            ObjectRef::new(&deploy::object_name(ep)).within(&ep.namespace().unwrap_or_default());
        return Ok(ctx
            .stores
            .deployments
            .get(&key)
            .filter(|d| deploy::is_owned_by(d.meta(), ep)));
    }
    let inputs = PodInputs {
        experiment_id: experiment_id.map(str::to_string),
        credential: resolved.credential.clone(),
        config_hash: deploy::config_hash(
            &config,
            ctx.settings.gateway.ca_bundle.as_deref(),
            &resolved.versions,
        ),
    };
    let desired = deploy::deployment(ep, &ctx.settings.gateway, &inputs);
    let (current, wrote) = ensure(ctx, ep, desired, Some(&ctx.stores.deployments)).await?;
    if wrote {
        events.push(Event {
            type_: EventType::Normal,
            reason: "DeploymentApplied".into(),
            note: Some(format!(
                "applied Deployment {}/{} (config {})",
                ep.namespace().unwrap_or_default(),
                deploy::object_name(ep),
                inputs.config_hash
            )),
            action: "ApplyDeployment".into(),
            secondary: None,
        });
    }
    Ok(current)
}

/// `Available` and `Progressing` from the Deployment, as kstatus reads a Deployment: the rollout is
/// done when the controller has seen the latest generation and every replica is updated and
/// available.
pub fn deployment_conditions(
    deployment: Option<&Deployment>,
    blocked: Option<(&'static str, String)>,
) -> (ConditionState, ConditionState) {
    let Some(d) = deployment else {
        let (reason, message) = blocked.unwrap_or((
            "DeploymentPending",
            "the Deployment is being created".into(),
        ));
        return (
            ConditionState {
                type_: CONDITION_AVAILABLE,
                status: false,
                reason: reason.into(),
                message: format!("no gateway pods: {message}"),
            },
            ConditionState {
                type_: CONDITION_PROGRESSING,
                status: false,
                reason: reason.into(),
                message,
            },
        );
    };
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = d.status.clone().unwrap_or_default();
    let condition = |t: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t)
            .cloned()
    };
    let ready = status.ready_replicas.unwrap_or(0);
    let available = match condition("Available") {
        Some(c) if c.status == "True" => ConditionState {
            type_: CONDITION_AVAILABLE,
            status: true,
            reason: c
                .reason
                .unwrap_or_else(|| "MinimumReplicasAvailable".into()),
            message: format!("{ready} of {wanted} gateway pods ready"),
        },
        Some(c) => ConditionState {
            type_: CONDITION_AVAILABLE,
            status: false,
            reason: c
                .reason
                .unwrap_or_else(|| "MinimumReplicasUnavailable".into()),
            message: format!(
                "{ready} of {wanted} gateway pods ready: {}",
                c.message.unwrap_or_default()
            ),
        },
        None => ConditionState {
            type_: CONDITION_AVAILABLE,
            status: false,
            reason: "DeploymentPending".into(),
            message: format!("{ready} of {wanted} gateway pods ready"),
        },
    };
    let generation = d.metadata.generation.unwrap_or(0);
    let observed = status.observed_generation.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let available_n = status.available_replicas.unwrap_or(0);
    let done =
        observed >= generation && updated >= wanted && total == updated && available_n >= wanted;
    let deadline = condition("Progressing")
        .filter(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
    let progressing = if let Some(c) = deadline {
        ConditionState {
            type_: CONDITION_PROGRESSING,
            status: false,
            reason: "ProgressDeadlineExceeded".into(),
            message: c.message.unwrap_or_else(|| "the rollout is stuck".into()),
        }
    } else if done {
        ConditionState {
            type_: CONDITION_PROGRESSING,
            status: false,
            reason: "RolloutComplete".into(),
            message: format!("{wanted} of {wanted} gateway pods run the latest config"),
        }
    } else {
        ConditionState {
            type_: CONDITION_PROGRESSING,
            status: true,
            reason: "RollingOut".into(),
            message: format!(
                "{updated} of {wanted} pods updated, {available_n} available{}",
                if observed < generation {
                    " (the Deployment controller has not seen the change yet)"
                } else {
                    ""
                }
            ),
        }
    };
    (available, progressing)
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
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn dep(generation: i64, status: DeploymentStatus) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                ..Default::default()
            }),
            status: Some(status),
        }
    }

    fn cond(t: &str, s: &str, reason: &str) -> DeploymentCondition {
        DeploymentCondition {
            type_: t.into(),
            status: s.into(),
            reason: Some(reason.into()),
            ..Default::default()
        }
    }

    #[test]
    fn rolled_out_deployment_is_available_and_not_progressing() {
        let d = dep(
            2,
            DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(2),
                updated_replicas: Some(2),
                ready_replicas: Some(2),
                available_replicas: Some(2),
                conditions: Some(vec![cond("Available", "True", "MinimumReplicasAvailable")]),
                ..Default::default()
            },
        );
        let (a, p) = deployment_conditions(Some(&d), None);
        assert!(a.status);
        assert!(!p.status);
        assert_eq!(p.reason, "RolloutComplete");
    }

    #[test]
    fn unseen_generation_or_old_pods_mean_rolling_out() {
        let mut s = DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(2),
            updated_replicas: Some(2),
            available_replicas: Some(2),
            conditions: Some(vec![cond("Available", "True", "MinimumReplicasAvailable")]),
            ..Default::default()
        };
        let (a, p) = deployment_conditions(Some(&dep(2, s.clone())), None);
        assert!(a.status, "old pods still serve");
        assert!(p.status);
        assert_eq!(p.reason, "RollingOut");
        s.observed_generation = Some(2);
        s.replicas = Some(3);
        let (_, p) = deployment_conditions(Some(&dep(2, s)), None);
        assert!(p.status, "an old pod is still there");
    }

    #[test]
    fn stuck_rollout_and_missing_deployment_are_reported() {
        let d = dep(
            1,
            DeploymentStatus {
                observed_generation: Some(1),
                conditions: Some(vec![
                    cond("Available", "False", "MinimumReplicasUnavailable"),
                    cond("Progressing", "False", "ProgressDeadlineExceeded"),
                ]),
                ..Default::default()
            },
        );
        let (a, p) = deployment_conditions(Some(&d), None);
        assert!(!a.status);
        assert_eq!(p.reason, "ProgressDeadlineExceeded");
        let (a, _) = deployment_conditions(None, Some(("SecretNotFound", "x".into())));
        assert!(!a.status);
        assert_eq!(a.reason, "SecretNotFound");
    }
}
