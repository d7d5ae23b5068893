//! The endpoint's workload: what it runs as in Kubernetes, in one place. [`render`] says what the
//! ConfigMap, Service, Deployment and mirrored credential are (pure); [`secrets`] checks the
//! Secrets the pods read; [`apply`] makes the cluster hold the rendered objects (server-side apply
//! when [`drift`] says they differ); [`rollout`] reads the Deployment back as conditions. This
//! module runs those steps in order and returns what they found as one [`GatewayState`].

pub mod apply;
pub mod callers;
pub mod crashes;
pub mod drift;
pub mod render;
pub mod rollout;
pub mod secrets;
pub mod trace_queue;

use kube::ResourceExt;
use kube::runtime::events::Event;

use super::conditions::{ConditionState, ConditionType, Reason};
use super::context::Context;
use super::credential::Managed;
use super::error::Error;
use crate::api::GatewayEndpoint;
use secrets::Resolved;

/// What the gateway part of a reconcile found and did.
pub struct GatewayState {
    pub secrets: ConditionState,
    pub available: ConditionState,
    pub progressing: ConditionState,
    pub url: String,
    pub replicas: Option<i32>,
    pub ready_replicas: Option<i32>,
    pub events: Vec<Event>,
    /// An owned object the endpoint could not have (then `available` says why): one of its names
    /// held by someone else's object ([`Error::NameConflict`]), or the API server refused to read
    /// or write it ([`Error::ApplyFailed`]). The reconcile fails with it, so it is retried.
    pub refused: Option<Error>,
}

/// Makes the endpoint's gateway objects match its spec, and reports what the Deployment says.
/// `experiment_id`: where the pods trace (None with tracking on: not known yet, so no pods yet);
/// `workspace`: the MLflow workspace it is in (None for a server without workspaces).
pub async fn ensure_gateway(
    ep: &GatewayEndpoint,
    ctx: &Context,
    experiment_id: Option<&str>,
    workspace: Option<&str>,
    tracking: bool,
    credential: &Managed,
) -> Result<GatewayState, Error> {
    let ns = ep.namespace().unwrap_or_default();
    let resolved = secrets::resolve_secrets(ep, ctx, &ns, tracking, credential).await?;
    let secrets = secrets::secrets_condition(&resolved);
    let blocked = blocked(&resolved, tracking, experiment_id);
    let traced_into = experiment_id.filter(|_| tracking);
    // The pods' ServiceAccount (and its grant) before the pods that use it.
    match callers::ensure(ep, ctx).await {
        Ok(true) => {}
        Ok(false) => return Ok(access_not_supported(ep, secrets)),
        Err(e @ (Error::NameConflict { .. } | Error::ApplyFailed { .. })) => {
            return Ok(refused(ep, secrets, e));
        }
        Err(e) => return Err(e),
    }
    let applied = match apply::apply_objects(
        ep,
        ctx,
        &resolved,
        traced_into,
        workspace.filter(|_| traced_into.is_some()),
        blocked.is_some(),
    )
    .await
    {
        Ok(applied) => applied,
        Err(e @ (Error::NameConflict { .. } | Error::ApplyFailed { .. })) => {
            return Ok(refused(ep, secrets, e));
        }
        Err(e) => return Err(e),
    };
    let unblocked = blocked.is_none();
    let (mut available, progressing) =
        rollout::deployment_conditions(applied.deployment.as_deref(), blocked);
    // Pods that exist but do not serve: the pods may say why (a gateway that exits at start).
    if !available.status
        && unblocked
        && applied.deployment.is_some()
        && let Some(crash) = crashes::find_crash(ctx, ep).await
    {
        available = ConditionState::new(
            ConditionType::Available,
            false,
            Reason::CrashLoopBackOff,
            crash,
        );
    }
    let status = applied
        .deployment
        .as_ref()
        .map(|d| d.status.clone().unwrap_or_default());
    Ok(GatewayState {
        secrets,
        available,
        progressing,
        url: render::url(ep),
        replicas: status.as_ref().map(|s| s.replicas.unwrap_or_default()),
        ready_replicas: status
            .as_ref()
            .map(|s| s.ready_replicas.unwrap_or_default()),
        events: applied.event.into_iter().collect(),
        refused: None,
    })
}

/// Why the Deployment must not change now, if it must not: Secrets missing, or (with tracking on)
/// no experiment known yet.
fn blocked(
    resolved: &Resolved,
    tracking: bool,
    experiment_id: Option<&str>,
) -> Option<(Reason, String)> {
    if !resolved.problems.is_empty() {
        Some((
            resolved.reason(),
            "the Deployment is not changed until the Secrets are fixed".to_string(),
        ))
    } else if tracking && experiment_id.is_none() {
        Some((
            Reason::WaitingForExperiment,
            "the pods start once the endpoint's experiment is known".to_string(),
        ))
    } else {
        None
    }
}

/// The state when an owned object is refused (one of the endpoint's names is held by someone
/// else's object, or the API server refused the object): not available, not progressing, saying
/// whose name it is or what the API server said.
fn refused(ep: &GatewayEndpoint, secrets: ConditionState, error: Error) -> GatewayState {
    let reason = match error {
        Error::NameConflict { .. } => Reason::NameConflict,
        _ => Reason::ApplyFailed,
    };
    let message = crate::text::truncate(&error.to_string(), MAX_MESSAGE);
    let condition = |type_| ConditionState::new(type_, false, reason.clone(), message.clone());
    GatewayState {
        secrets,
        available: condition(ConditionType::Available),
        progressing: condition(ConditionType::Progressing),
        url: render::url(ep),
        replicas: None,
        ready_replicas: None,
        events: Vec::new(),
        refused: Some(error),
    }
}

/// A condition message's bound: the API server's messages can be long (a webhook's, say).
const MAX_MESSAGE: usize = 4096;

/// The state when the endpoint declares ServiceAccount callers this install cannot serve: not
/// available, not progressing (nothing is applied until the declaration or the install changes).
fn access_not_supported(ep: &GatewayEndpoint, secrets: ConditionState) -> GatewayState {
    let condition = |type_| {
        ConditionState::new(
            type_,
            false,
            Reason::AccessNotSupported,
            callers::NOT_SUPPORTED.to_string(),
        )
    };
    GatewayState {
        secrets,
        available: condition(ConditionType::Available),
        progressing: condition(ConditionType::Progressing),
        url: render::url(ep),
        replicas: None,
        ready_replicas: None,
        events: Vec::new(),
        refused: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn resolved(problems: Vec<(Reason, String)>) -> Resolved {
        Resolved {
            versions: BTreeMap::new(),
            credential: render::TraceCredential::None,
            mirror: None,
            problems,
        }
    }

    #[test]
    fn missing_secrets_then_a_missing_experiment_block_the_deployment() {
        let missing = resolved(vec![(Reason::SecretNotFound, "x".into())]);
        assert_eq!(
            blocked(&missing, true, None).map(|b| b.0),
            Some(Reason::SecretNotFound)
        );
        assert_eq!(
            blocked(&resolved(vec![]), true, None).map(|b| b.0),
            Some(Reason::WaitingForExperiment)
        );
        assert_eq!(blocked(&resolved(vec![]), true, Some("7")), None);
        assert_eq!(blocked(&resolved(vec![]), false, None), None);
    }

    #[test]
    fn a_name_conflict_says_whose_name_it_is() {
        let ep: GatewayEndpoint = serde_yaml::from_str(
            "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {name: chat, namespace: team-a, uid: u1}\nspec:\n  models: [{name: m, provider: openai, model: x}]\n",
        )
        .unwrap();
        let secrets = ConditionState::new(
            ConditionType::SecretsReady,
            true,
            Reason::SecretsFound,
            "m".into(),
        );
        let conflict = Error::NameConflict {
            kind: "Service".into(),
            name: "team-a/chat".into(),
        };
        let g = refused(&ep, secrets.clone(), conflict);
        assert_eq!(g.available.reason, Reason::NameConflict);
        assert_eq!(g.progressing.reason, Reason::NameConflict);
        assert!(
            g.available
                .message
                .starts_with("a Service named team-a/chat already exists")
        );
        assert_eq!(g.url, "http://chat.team-a.svc:8080");
        assert!(matches!(g.refused, Some(Error::NameConflict { .. })));
        let g = refused(
            &ep,
            secrets,
            Error::ApplyFailed {
                verb: "apply",
                kind: "ConfigMap".into(),
                name: "team-a/chat".into(),
                message: "exceeded quota: q, requested: count/configmaps=1".into(),
            },
        );
        assert_eq!(g.available.reason, Reason::ApplyFailed);
        assert_eq!(g.progressing.reason, Reason::ApplyFailed);
        assert_eq!(
            g.available.message,
            "could not apply ConfigMap team-a/chat: exceeded quota: q, requested: count/configmaps=1"
        );
        assert!(matches!(g.refused, Some(Error::ApplyFailed { .. })));
    }
}
