//! One reconcile of one endpoint, shaped as kube-rs/controller-rs shapes it: the finalizer, then
//! `apply` or `cleanup`. Each step is a function that returns what it decided
//! ([`experiment_step`], [`decide`]); the async functions around them only fetch, write and publish.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tracing::{info, warn};

use super::backoff::{backoff, jitter};
use super::conditions::{self, ConditionState, ConditionType, Reason};
use super::context::{Context, FIELD_MANAGER};
use super::credential::{self, CredentialStep};
use super::error::Error;
use super::events::{change_event, cleanup_event, publish_all, warn_on_entering};
use super::experiment::{self, Declared, EndpointIdentity, Outcome};
use super::tenancy::{self, NamespacePolicy};
use super::verified::{ExperimentFields, Verified};
use super::workload::{self, GatewayState};
use super::workspaces::{deployed_workspace, ensure_in_workspace, namespace_policy, workspace_of};
use crate::api::{ExperimentDeletionPolicy, GatewayEndpoint, GatewayEndpointStatus};
use crate::mlflow::MlflowError;

/// Held on every endpoint until its experiment has been dealt with per `experimentDeletionPolicy`.
pub const FINALIZER: &str = "mlflow-gateway.dev/experiment";

/// Finalizer -> `apply` or `cleanup`; counts the reconcile, and forgets past failures on
/// success.
pub async fn reconcile(ep: Arc<GatewayEndpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = ep
        .namespace()
        .ok_or_else(|| Error::InvalidResource("GatewayEndpoint without a namespace".into()))?;
    let api: Api<GatewayEndpoint> = Api::namespaced(ctx.client.clone(), &ns);
    let key = ObjectRef::from_obj(ep.as_ref());
    let started = std::time::Instant::now();
    let result = finalizer(&api, FINALIZER, ep, |event| async {
        match event {
            Finalizer::Apply(ep) => apply(&ep, &ctx).await,
            Finalizer::Cleanup(ep) => cleanup(&ep, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconciled(started.elapsed(), result.as_ref().err().map(Error::label));
    if result.is_ok() {
        ctx.failures.reset(&key);
    }
    result
}

/// Exponential backoff per endpoint, up to the configured maximum.
pub fn error_policy(ep: Arc<GatewayEndpoint>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(ep.as_ref());
    let delay = backoff(ctx.failures.record(&key), ctx.settings.max_backoff());
    warn!(endpoint = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn identity(ep: &GatewayEndpoint) -> Result<EndpointIdentity, Error> {
    Ok(EndpointIdentity {
        namespace: ep
            .namespace()
            .ok_or_else(|| Error::InvalidResource("GatewayEndpoint without a namespace".into()))?,
        name: ep.name_any(),
        uid: ep
            .uid()
            .ok_or_else(|| Error::InvalidResource("GatewayEndpoint without a uid".into()))?,
    })
}

/// What the spec declares about the experiment; `policy`: what its Namespace says (an
/// experiment shared with it).
pub fn declared(ep: &GatewayEndpoint, id: &EndpointIdentity, policy: &NamespacePolicy) -> Declared {
    let spec = &ep.spec;
    if !spec.usage_tracking {
        Declared::Disabled
    } else if let Some(id) = &spec.experiment_id {
        Declared::UserExperiment {
            id: id.clone(),
            shared: policy.shares(id),
        }
    } else {
        Declared::Managed {
            name: spec
                .experiment_name
                .clone()
                .unwrap_or_else(|| id.default_experiment_name()),
        }
    }
}

/// What the experiment step decided: `ExperimentReady`, the experiment fields of status, its
/// Events (what changed in MLflow; a Warning on entering a failure), and the tracking-server
/// failure to retry with backoff.
pub struct ExperimentStep {
    pub condition: ConditionState,
    pub fields: ExperimentFields,
    pub events: Vec<Event>,
    pub failure: Option<MlflowError>,
}

impl ExperimentStep {
    /// The step as last verified: nothing changed, nothing failed (so no Event either).
    fn from_verified(v: Verified) -> Self {
        ExperimentStep {
            condition: v.condition,
            fields: v.fields,
            events: Vec::new(),
            failure: None,
        }
    }

    /// What to remember: the experiment is as declared exactly when `ExperimentReady` is true
    /// (a blocked experiment or a failure is checked again next time). `scope`: what else it was
    /// verified for (workspace, sharing).
    fn verified(&self, generation: Option<i64>, scope: String) -> Option<Verified> {
        self.condition.status.then(|| Verified {
            generation,
            scope,
            fields: self.fields.clone(),
            condition: self.condition.clone(),
        })
    }
}

/// `ExperimentReady`, the experiment fields and the Events from what [`experiment::ensure`]
/// found. `current` is the status before this reconcile: while the experiment cannot be reached,
/// the pods still trace where it says; and a failure already there is no new Warning.
pub fn experiment_step(
    outcome: Result<Outcome, MlflowError>,
    declared: &Declared,
    current: &GatewayEndpointStatus,
    ui_url: &url::Url,
) -> ExperimentStep {
    let mut step = experiment_outcome(outcome, declared, current, ui_url);
    step.events.extend(warn_on_entering(
        current,
        &step.condition,
        "EnsureExperiment",
    ));
    step
}

fn experiment_outcome(
    outcome: Result<Outcome, MlflowError>,
    declared: &Declared,
    current: &GatewayEndpointStatus,
    ui_url: &url::Url,
) -> ExperimentStep {
    let condition = |status, reason, message| {
        ConditionState::new(ConditionType::ExperimentReady, status, reason, message)
    };
    let kept = || ExperimentFields {
        id: current.experiment_id.clone(),
        name: current.experiment_name.clone(),
        url: current.experiment_url.clone(),
    };
    match outcome {
        Ok(Outcome::Disabled) => ExperimentStep {
            condition: condition(
                true,
                Reason::UsageTrackingDisabled,
                "usageTracking is false: no experiment, and the gateway exports no traces".into(),
            ),
            fields: ExperimentFields::default(),
            events: Vec::new(),
            failure: None,
        },
        Ok(Outcome::Ready {
            experiment,
            changes,
        }) => {
            let events = changes
                .iter()
                .map(|c| change_event(c, &experiment.experiment_id, &experiment.name))
                .collect();
            let user = matches!(declared, Declared::UserExperiment { .. });
            let (reason, how) = if user {
                (
                    Reason::ExistingExperiment,
                    "the experiment given by experimentId",
                )
            } else {
                (Reason::ExperimentActive, "managed by the operator")
            };
            ExperimentStep {
                condition: condition(
                    true,
                    reason,
                    format!(
                        "traces go to experiment {} ({}), {how}",
                        experiment.experiment_id, experiment.name
                    ),
                ),
                fields: ExperimentFields {
                    url: Some(experiment_url(ui_url, &experiment.experiment_id)),
                    id: Some(experiment.experiment_id),
                    name: Some(experiment.name),
                },
                events,
                failure: None,
            }
        }
        Ok(Outcome::Blocked {
            reason,
            message,
            experiment_id,
        }) => ExperimentStep {
            condition: condition(false, reason.into(), message),
            // Still tracing into the current experiment (a rename that could not be made).
            fields: if experiment_id.is_some() && experiment_id == current.experiment_id {
                kept()
            } else {
                ExperimentFields::default()
            },
            events: Vec::new(),
            failure: None,
        },
        Err(e) => ExperimentStep {
            condition: condition(
                false,
                Reason::tracking_error(&e),
                format!("{e}; retrying with backoff"),
            ),
            // Keep what was known: the pods still trace there.
            fields: kept(),
            events: Vec::new(),
            failure: Some(e),
        },
    }
}

/// What a reconcile decided from its steps: the status to write, the Events to publish (the
/// experiment's, then the gateway's), and the failure that makes the controller retry with backoff.
pub struct Decision {
    pub status: GatewayEndpointStatus,
    pub events: Vec<Event>,
    pub failure: Option<Error>,
}

/// The status, Events and failure of one reconcile, from the experiment and gateway steps.
pub fn decide(
    generation: Option<i64>,
    current: &GatewayEndpointStatus,
    experiment: ExperimentStep,
    credential: CredentialStep,
    gateway: GatewayState,
) -> Decision {
    let mut events = experiment.events;
    events.extend(credential.events);
    events.extend(warn_on_entering(
        current,
        &gateway.secrets,
        "ResolveSecrets",
    ));
    // Pods on their way (DeploymentPending, WaitingForExperiment, a rollout) are no Warning; a name
    // held by someone else's object, an object the API server refused and a stuck rollout are.
    if matches!(
        gateway.available.reason,
        Reason::NameConflict | Reason::ApplyFailed
    ) {
        events.extend(warn_on_entering(
            current,
            &gateway.available,
            "ApplyGateway",
        ));
    }
    if gateway.available.reason == Reason::CrashLoopBackOff {
        events.extend(warn_on_entering(current, &gateway.available, "RollOut"));
    }
    if gateway.progressing.reason == Reason::ProgressDeadlineExceeded {
        events.extend(warn_on_entering(current, &gateway.progressing, "RollOut"));
    }
    events.extend(gateway.events);
    let ready = conditions::ready(
        &[&experiment.condition, &gateway.secrets, &gateway.available],
        &gateway.url,
        &gateway.available.message,
        &experiment.condition.message,
    );
    let status = GatewayEndpointStatus {
        observed_generation: generation,
        experiment_id: experiment.fields.id,
        experiment_name: experiment.fields.name,
        experiment_url: experiment.fields.url,
        url: Some(gateway.url),
        replicas: gateway.replicas,
        ready_replicas: gateway.ready_replicas,
        conditions: conditions::merge_conditions(
            &current.conditions,
            &[
                experiment.condition,
                gateway.secrets,
                gateway.available,
                gateway.progressing,
                credential.condition,
                ready,
            ],
            generation,
        ),
    };
    // The experiment's failure first: it is why the pods may be waiting.
    let failure = experiment
        .failure
        .map(Error::from)
        .or(credential.failure)
        .or(gateway.refused);
    Decision {
        status,
        events,
        failure,
    }
}

async fn apply(ep: &GatewayEndpoint, ctx: &Context) -> Result<Action, Error> {
    // Owned objects are compared with the caches: wait until the first list filled them.
    ctx.wait_stores_ready().await;
    let id = identity(ep)?;
    let policy = namespace_policy(ctx, &id.namespace);
    let declared = declared(ep, &id, &policy);
    let current = ep.status.clone().unwrap_or_default();
    let generation = ep.metadata.generation;

    let workspace = workspace_of(ctx, &id.namespace, &policy, ep.spec.usage_tracking).await;
    let (experiment, workspace) = match workspace {
        Err(outcome) => {
            ctx.verified.forget(&id.uid);
            let step = experiment_step(outcome, &declared, &current, ctx.settings.ui_url());
            // While the server cannot be probed, the pods keep the workspace they have.
            (step, deployed_workspace(ctx, ep))
        }
        Ok(workspace) => {
            // A reconcile that a pod or Secret change triggered moments after the experiment was
            // verified for this generation (and workspace and sharing) skips the MLflow round trip.
            let scope = format!("{workspace:?}|{declared:?}");
            match ctx
                .verified
                .recent(&id.uid, generation)
                .filter(|v| v.scope == scope)
            {
                Some(v) => (ExperimentStep::from_verified(v), workspace),
                None => {
                    let known = current.experiment_id.as_deref();
                    let outcome =
                        ensure_in_workspace(ctx, workspace.as_deref(), &id, &declared, known).await;
                    let mut step =
                        experiment_step(outcome, &declared, &current, ctx.settings.ui_url());
                    // Say which workspace: `traces go to experiment 3 (name) in MLflow workspace w, ...`.
                    if let (Some(w), Some(eid), Some(name)) =
                        (&workspace, &step.fields.id, &step.fields.name)
                        && step.condition.status
                    {
                        let head = format!("traces go to experiment {eid} ({name})");
                        if let Some(rest) = step.condition.message.strip_prefix(&head) {
                            step.condition.message =
                                format!("{head} in MLflow workspace {w}{rest}");
                        }
                    }
                    ctx.verified
                        .record(&id.uid, step.verified(generation, scope));
                    (step, workspace)
                }
            }
        }
    };
    // The pods' trace credential: their own MLflow user on that experiment, or the fallback.
    // Grants land in the workspace their request names, so they go through the workspace's client.
    let scoped = ctx.tracking.in_workspace(workspace.clone());
    let credential = credential::ensure(
        ep,
        ctx,
        &scoped,
        &current,
        experiment.fields.id.as_deref(),
        experiment.failure.is_some(),
    )
    .await;
    // The pods trace into the experiment in status (kept while MLflow is unreachable).
    let gateway = match workload::ensure_gateway(
        ep,
        ctx,
        experiment.fields.id.as_deref(),
        workspace.as_deref(),
        ep.spec.usage_tracking,
        &credential.managed,
    )
    .await
    {
        Ok(g) => g,
        Err(e) => {
            // Events already decided (an experiment created, say) are still published.
            publish_all(ctx, ep, &experiment.events).await;
            publish_all(ctx, ep, &credential.events).await;
            return Err(e);
        }
    };
    let decision = decide(generation, &current, experiment, credential, gateway);
    if decision.status != current {
        patch_status(ctx, ep, &decision.status).await?;
    }
    publish_all(ctx, ep, &decision.events).await;
    match decision.failure {
        Some(e) => Err(e),
        None => Ok(Action::requeue(jitter(
            recheck_after(&decision.status, ctx.settings.resync()),
            ep.uid().as_deref(),
        ))),
    }
}

/// Pods that exist but do not serve change nothing the operator watches when they crash: look at
/// them again soon (at most every 15 s), not only at the next resync.
fn recheck_after(
    status: &GatewayEndpointStatus,
    resync: std::time::Duration,
) -> std::time::Duration {
    let unavailable = status
        .condition(ConditionType::Available.as_str())
        .is_some_and(|c| {
            c.status == "False"
                && [
                    Reason::CrashLoopBackOff.as_str(),
                    Reason::MinimumReplicasUnavailable.as_str(),
                ]
                .contains(&c.reason.as_str())
        });
    if unavailable {
        resync.min(std::time::Duration::from_secs(15))
    } else {
        resync
    }
}

/// The experiment the cleanup may delete: the name of the operator's own, under
/// `experimentDeletionPolicy: Delete`. Never one given by experimentId; with tracking off there is
/// none.
fn to_delete(ep: &GatewayEndpoint, id: &EndpointIdentity) -> Option<String> {
    if ep.spec.experiment_deletion_policy != ExperimentDeletionPolicy::Delete {
        return None;
    }
    match declared(ep, id, &NamespacePolicy::default()) {
        Declared::Managed { name } => Some(name),
        Declared::Disabled | Declared::UserExperiment { .. } => None,
    }
}

async fn cleanup(ep: &GatewayEndpoint, ctx: &Context) -> Result<Action, Error> {
    let id = identity(ep)?;
    // The endpoint is going: nothing to remember of it.
    ctx.verified.forget(&id.uid);
    // The token-review grant is cluster-scoped: no owner reference takes it away.
    if ctx.settings.gateway().token_review_cluster_role.is_some() {
        workload::callers::delete_binding(ep, ctx).await?;
    }
    // Its MLflow user goes with it (its Secret goes by garbage collection).
    match credential::release(ep, ctx, &ctx.tracking, true).await {
        Ok(Some(note)) => {
            info!(endpoint = %id.owner(), "{note}");
            let event = cleanup_event(EventType::Normal, "TraceCredentialDeleted", &note);
            publish_all(ctx, ep, &[event]).await;
        }
        Ok(None) => {}
        Err(e) => {
            let event = cleanup_event(
                EventType::Warning,
                "TraceCredentialDeletionFailed",
                &format!(
                    "the endpoint's MLflow user could not be deleted: {e}; retrying (an MLflow admin can delete the user by hand, then remove the finalizer {FINALIZER})"
                ),
            );
            publish_all(ctx, ep, &[event]).await;
            return Err(e);
        }
    }
    let Some(name) = to_delete(ep, &id) else {
        return Ok(Action::await_change());
    };
    // A name under another namespace's prefix was never created: nothing to delete.
    if tenancy::refuse_name(&id, &name).is_some() {
        return Ok(Action::await_change());
    }
    let policy = namespace_policy(ctx, &id.namespace);
    let tracking = match workspace_of(ctx, &id.namespace, &policy, true).await {
        Ok(w) => ctx.tracking.in_workspace(w),
        // No valid workspace: the operator never created an experiment for it.
        Err(Ok(_)) => return Ok(Action::await_change()),
        Err(Err(e)) => return Err(deletion_failed(ctx, ep, e).await),
    };
    // The recorded experiment, or (if the status write was lost) the one holding our name.
    let experiment_id = match ep.status.as_ref().and_then(|s| s.experiment_id.clone()) {
        Some(eid) => Some(eid),
        None => match tracking.get_experiment_by_name(&name).await {
            Ok(e) => Some(e.experiment_id),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(deletion_failed(ctx, ep, e).await),
        },
    };
    if let Some(eid) = experiment_id {
        match experiment::delete_owned(&tracking, &id, &eid).await {
            Ok(Some(deleted)) => {
                info!(endpoint = %id.owner(), experiment = %deleted, "experiment deleted");
                let event = cleanup_event(
                    EventType::Normal,
                    "ExperimentDeleted",
                    &format!(
                        "experimentDeletionPolicy is Delete: experiment {deleted} soft-deleted in MLflow (it can be restored there)"
                    ),
                );
                publish_all(ctx, ep, &[event]).await;
            }
            Ok(None) => {}
            Err(e) => return Err(deletion_failed(ctx, ep, e).await),
        }
    }
    Ok(Action::await_change())
}

async fn deletion_failed(ctx: &Context, ep: &GatewayEndpoint, e: MlflowError) -> Error {
    let event = cleanup_event(
        EventType::Warning,
        "ExperimentDeletionFailed",
        &format!(
            "experimentDeletionPolicy is Delete, but the experiment could not be deleted: {e}; retrying (set experimentDeletionPolicy: Retain to let the resource go without it)"
        ),
    );
    publish_all(ctx, ep, &[event]).await;
    e.into()
}

/// `<ui>/#/experiments/<id>/traces`, without any credentials the URL may carry.
pub fn experiment_url(ui: &url::Url, id: &str) -> String {
    let mut base = ui.clone();
    let _ = base.set_username("");
    let _ = base.set_password(None);
    let base = base.as_str().trim_end_matches('/').to_string();
    format!("{base}/#/experiments/{id}/traces")
}

async fn patch_status(
    ctx: &Context,
    ep: &GatewayEndpoint,
    status: &GatewayEndpointStatus,
) -> Result<(), Error> {
    let api: Api<GatewayEndpoint> =
        Api::namespaced(ctx.client.clone(), &ep.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": format!("{}/{}", crate::api::GROUP, crate::api::VERSION),
        "kind": "GatewayEndpoint",
        "status": status,
    });
    api.patch_status(
        &ep.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    ctx.metrics.status_patches.inc();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::experiment::{BlockedReason, Change};
    use crate::mlflow::{ErrorCode, Experiment, LifecycleStage};

    fn ui() -> url::Url {
        url::Url::parse("https://mlflow.example.com/").unwrap()
    }

    fn managed() -> Declared {
        Declared::Managed {
            name: "gateway/team-a/chat".into(),
        }
    }

    fn mlflow_experiment(id: &str, name: &str) -> Experiment {
        Experiment {
            experiment_id: id.into(),
            name: name.into(),
            lifecycle_stage: LifecycleStage::Active,
            tags: Default::default(),
            artifact_location: None,
            creation_time: None,
            last_update_time: None,
        }
    }

    fn recorded(id: &str) -> GatewayEndpointStatus {
        GatewayEndpointStatus {
            experiment_id: Some(id.into()),
            experiment_name: Some("old".into()),
            experiment_url: Some("u".into()),
            ..Default::default()
        }
    }

    fn condition(type_: ConditionType, status: bool, reason: Reason) -> ConditionState {
        ConditionState::new(type_, status, reason, "m".into())
    }

    fn serving() -> GatewayState {
        GatewayState {
            secrets: condition(ConditionType::SecretsReady, true, Reason::SecretsFound),
            available: condition(
                ConditionType::Available,
                true,
                Reason::MinimumReplicasAvailable,
            ),
            progressing: condition(ConditionType::Progressing, false, Reason::RolloutComplete),
            url: "http://chat.team-a.svc:8080".into(),
            replicas: Some(1),
            ready_replicas: Some(1),
            events: Vec::new(),
            refused: None,
        }
    }

    fn credential_step() -> CredentialStep {
        CredentialStep {
            condition: condition(
                ConditionType::TraceCredentialReady,
                true,
                Reason::PerEndpointCredential,
            ),
            managed: credential::Managed::No,
            events: Vec::new(),
            failure: None,
        }
    }

    fn unavailable() -> MlflowError {
        MlflowError::Api {
            call: "experiments/get",
            status: 403,
            code: ErrorCode::PermissionDenied,
            message: String::new(),
        }
    }

    #[test]
    fn experiment_url_drops_credentials() {
        let ui = url::Url::parse("https://user:pw@mlflow.example.com/").unwrap();
        assert_eq!(
            experiment_url(&ui, "42"),
            "https://mlflow.example.com/#/experiments/42/traces"
        );
    }

    #[test]
    fn a_ready_experiment_fills_status_and_says_what_changed() {
        let outcome = Ok(Outcome::Ready {
            experiment: mlflow_experiment("7", "gateway/team-a/chat"),
            changes: vec![Change::Created],
        });
        let step = experiment_step(outcome, &managed(), &Default::default(), &ui());
        assert!(step.condition.status);
        assert_eq!(step.condition.reason, Reason::ExperimentActive);
        assert_eq!(step.fields.id.as_deref(), Some("7"));
        assert_eq!(
            step.fields.url.as_deref(),
            Some("https://mlflow.example.com/#/experiments/7/traces")
        );
        assert_eq!(step.events.len(), 1);
        assert_eq!(step.events[0].reason, "ExperimentCreated");
        assert!(step.failure.is_none());
        assert!(step.verified(Some(2), String::new()).is_some());
        let user = experiment_step(
            Ok(Outcome::Ready {
                experiment: mlflow_experiment("5", "mine"),
                changes: vec![],
            }),
            &Declared::UserExperiment {
                id: "5".into(),
                shared: false,
            },
            &Default::default(),
            &ui(),
        );
        assert_eq!(user.condition.reason, Reason::ExistingExperiment);
    }

    #[test]
    fn an_unreachable_tracking_server_keeps_the_known_experiment_and_fails() {
        let step = experiment_step(Err(unavailable()), &managed(), &recorded("3"), &ui());
        assert!(!step.condition.status);
        assert_eq!(step.condition.reason, Reason::TrackingServerForbidden);
        assert!(step.condition.message.ends_with("; retrying with backoff"));
        assert_eq!(step.fields.id.as_deref(), Some("3"));
        assert!(step.failure.is_some());
        assert!(step.verified(None, String::new()).is_none());
    }

    #[test]
    fn a_blocked_rename_keeps_tracing_into_the_current_experiment_only() {
        let blocked = |in_use: Option<&str>| Outcome::Blocked {
            reason: BlockedReason::ExperimentNameConflict,
            message: "taken".into(),
            experiment_id: in_use.map(str::to_string),
        };
        let step = experiment_step(Ok(blocked(Some("3"))), &managed(), &recorded("3"), &ui());
        assert_eq!(step.condition.reason, Reason::ExperimentNameConflict);
        assert_eq!(step.fields.id.as_deref(), Some("3"));
        assert!(
            step.failure.is_none(),
            "blocked is no retry: it waits for a change"
        );
        let step = experiment_step(Ok(blocked(None)), &managed(), &recorded("3"), &ui());
        assert_eq!(step.fields, ExperimentFields::default());
        let off = experiment_step(
            Ok(Outcome::Disabled),
            &Declared::Disabled,
            &recorded("3"),
            &ui(),
        );
        assert_eq!(off.condition.reason, Reason::UsageTrackingDisabled);
        assert_eq!(off.fields, ExperimentFields::default());
    }

    #[test]
    fn a_serving_endpoint_is_ready_and_resyncs() {
        let step = experiment_step(
            Ok(Outcome::Ready {
                experiment: mlflow_experiment("7", "gateway/team-a/chat"),
                changes: vec![],
            }),
            &managed(),
            &Default::default(),
            &ui(),
        );
        let d = decide(
            Some(4),
            &Default::default(),
            step,
            credential_step(),
            serving(),
        );
        assert!(d.failure.is_none());
        assert!(d.events.is_empty());
        assert_eq!(d.status.observed_generation, Some(4));
        assert_eq!(d.status.experiment_id.as_deref(), Some("7"));
        let ready = d.status.condition("Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Ready")
        );
        assert_eq!(d.status.conditions.len(), 6);
    }

    #[test]
    fn a_name_conflict_fails_with_a_warning_once() {
        let step = experiment_step(
            Ok(Outcome::Disabled),
            &Declared::Disabled,
            &Default::default(),
            &ui(),
        );
        let conflicted = || {
            let mut g = serving();
            g.available = condition(ConditionType::Available, false, Reason::NameConflict);
            g.progressing = condition(ConditionType::Progressing, false, Reason::NameConflict);
            g.refused = Some(Error::NameConflict {
                kind: "Service".into(),
                name: "team-a/chat".into(),
            });
            g
        };
        let d = decide(
            None,
            &Default::default(),
            step,
            credential_step(),
            conflicted(),
        );
        assert!(matches!(d.failure, Some(Error::NameConflict { .. })));
        assert_eq!(d.events.len(), 1);
        assert_eq!(d.events[0].reason, "NameConflict");
        assert_eq!(d.events[0].action, "ApplyGateway");
        let ready = d.status.condition("Ready").unwrap();
        assert_eq!(ready.reason, "NameConflict");
        // The same failure again: no second Warning.
        let step = experiment_step(
            Ok(Outcome::Disabled),
            &Declared::Disabled,
            &Default::default(),
            &ui(),
        );
        let again = decide(None, &d.status, step, credential_step(), conflicted());
        assert!(again.events.is_empty());
    }

    #[test]
    fn a_refused_apply_is_a_condition_a_warning_and_a_retry() {
        let step = experiment_step(
            Ok(Outcome::Disabled),
            &Declared::Disabled,
            &Default::default(),
            &ui(),
        );
        let mut g = serving();
        g.available = condition(ConditionType::Available, false, Reason::ApplyFailed);
        g.progressing = condition(ConditionType::Progressing, false, Reason::ApplyFailed);
        g.refused = Some(Error::ApplyFailed {
            verb: "apply",
            kind: "Service".into(),
            name: "team-a/chat".into(),
            message: "denied".into(),
        });
        let d = decide(None, &Default::default(), step, credential_step(), g);
        assert!(matches!(d.failure, Some(Error::ApplyFailed { .. })));
        assert_eq!(d.events.len(), 1);
        assert_eq!(d.events[0].type_, EventType::Warning);
        assert_eq!(d.events[0].reason, "ApplyFailed");
        assert_eq!(d.events[0].action, "ApplyGateway");
        assert_eq!(d.status.condition("Ready").unwrap().reason, "ApplyFailed");
    }

    #[test]
    fn the_experiment_failure_comes_before_the_gateway_one() {
        let step = experiment_step(Err(unavailable()), &managed(), &recorded("3"), &ui());
        let mut g = serving();
        g.refused = Some(Error::NameConflict {
            kind: "Service".into(),
            name: "team-a/chat".into(),
        });
        let d = decide(None, &Default::default(), step, credential_step(), g);
        assert!(matches!(d.failure, Some(Error::Mlflow(_))));
        let ready = d.status.condition("Ready").unwrap();
        assert_eq!(ready.reason, "TrackingServerForbidden");
        assert!(ready.message.starts_with("ExperimentReady: "));
    }

    #[test]
    fn the_credential_condition_events_and_failure_are_part_of_the_decision() {
        let step = || {
            experiment_step(
                Ok(Outcome::Ready {
                    experiment: mlflow_experiment("7", "gateway/team-a/chat"),
                    changes: vec![],
                }),
                &managed(),
                &Default::default(),
                &ui(),
            )
        };
        let mut failing = credential_step();
        failing.condition = condition(
            ConditionType::TraceCredentialReady,
            false,
            Reason::CredentialUnavailable,
        );
        failing.failure = Some(Error::Mlflow(unavailable()));
        failing.events = vec![Event {
            type_: EventType::Warning,
            reason: "CredentialUnavailable".into(),
            note: None,
            action: "EnsureTraceCredential".into(),
            secondary: None,
        }];
        let mut g = serving();
        g.refused = Some(Error::NameConflict {
            kind: "Service".into(),
            name: "team-a/chat".into(),
        });
        let d = decide(None, &Default::default(), step(), failing, g);
        assert!(
            matches!(d.failure, Some(Error::Mlflow(_))),
            "before the gateway's"
        );
        assert_eq!(d.events[0].reason, "CredentialUnavailable");
        let c = d.status.condition("TraceCredentialReady").unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "CredentialUnavailable")
        );
        let ok = decide(
            None,
            &Default::default(),
            step(),
            credential_step(),
            serving(),
        );
        assert_eq!(
            ok.status.condition("TraceCredentialReady").unwrap().reason,
            "PerEndpointCredential"
        );
        assert!(ok.failure.is_none());
    }

    #[test]
    fn a_stuck_rollout_warns_and_pending_pods_do_not() {
        let step = || {
            experiment_step(
                Ok(Outcome::Disabled),
                &Declared::Disabled,
                &Default::default(),
                &ui(),
            )
        };
        let mut stuck = serving();
        stuck.progressing = condition(
            ConditionType::Progressing,
            false,
            Reason::ProgressDeadlineExceeded,
        );
        let d = decide(None, &Default::default(), step(), credential_step(), stuck);
        assert_eq!(d.events.len(), 1);
        assert_eq!(d.events[0].action, "RollOut");
        assert!(d.failure.is_none());
        let mut pending = serving();
        pending.available = condition(ConditionType::Available, false, Reason::DeploymentPending);
        let d = decide(
            None,
            &Default::default(),
            step(),
            credential_step(),
            pending,
        );
        assert!(d.events.is_empty());
        assert_eq!(
            d.status.condition("Ready").unwrap().reason,
            "DeploymentPending"
        );
    }

    #[test]
    fn only_the_operators_own_experiment_is_deleted() {
        let ep = |extra: &str| -> GatewayEndpoint {
            serde_yaml::from_str(&format!(
                "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {{name: chat, namespace: team-a, uid: u1}}\nspec:\n  models: [{{name: m, provider: openai, model: x}}]\n{extra}"
            ))
            .unwrap()
        };
        let delete = "  experimentDeletionPolicy: Delete\n";
        let id = identity(&ep(delete)).unwrap();
        assert_eq!(
            to_delete(&ep(delete), &id).as_deref(),
            Some("gateway/team-a/chat")
        );
        assert_eq!(to_delete(&ep(""), &id), None);
        assert_eq!(
            to_delete(&ep(&format!("{delete}  experimentId: \"5\"\n")), &id),
            None
        );
        assert_eq!(
            to_delete(&ep(&format!("{delete}  usageTracking: false\n")), &id),
            None
        );
    }

    #[test]
    fn the_experiment_warns_on_entering_a_failure_only() {
        let step = experiment_step(Err(unavailable()), &managed(), &recorded("3"), &ui());
        assert_eq!(step.events.len(), 1);
        assert_eq!(step.events[0].action, "EnsureExperiment");
        assert_eq!(step.events[0].reason, "TrackingServerForbidden");
        let failing = GatewayEndpointStatus {
            conditions: conditions::merge_conditions(&[], &[step.condition], None),
            ..recorded("3")
        };
        let again = experiment_step(Err(unavailable()), &managed(), &failing, &ui());
        assert!(again.events.is_empty());
    }
}
