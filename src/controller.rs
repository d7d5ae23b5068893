//! The reconciler: makes each `GatewayEndpoint`'s experiment exist (see [`crate::experiment`]) and
//! tells the truth about it in status conditions and Events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::api::{ExperimentDeletionPolicy, GatewayEndpoint, GatewayEndpointStatus};
use crate::experiment::{self, Change, Declared, EndpointIdentity, Outcome};
use crate::metrics::Metrics;
use crate::mlflow::{ErrorCode, MlflowClient, MlflowError};

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "mlflow-gateway-operator";
/// Held on every endpoint until its experiment has been dealt with per `experimentDeletionPolicy`.
pub const FINALIZER: &str = "mlflow-gateway.dev/experiment";

pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_EXPERIMENT_READY: &str = "ExperimentReady";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Mlflow(#[from] MlflowError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    InvalidResource(String),
}

impl Error {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Mlflow(e) => e.label(),
            Error::Kube(_) => "kubernetes",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.label(),
                _ => "finalizer",
            },
            Error::InvalidResource(_) => "invalid_resource",
        }
    }
}

/// Operator-wide settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Base URL of the MLflow UI, for `status.experimentUrl`.
    pub ui_url: url::Url,
    /// How often a quiet endpoint is re-checked for drift in MLflow.
    pub resync: Duration,
    /// Endpoints reconciled at once.
    pub concurrency: u16,
    /// Watch this namespace only (default: all).
    pub namespace: Option<String>,
    /// The longest wait between retries of a failing endpoint.
    pub max_backoff: Duration,
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub tracking: MlflowClient,
    pub recorder: Recorder,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per endpoint, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<GatewayEndpoint>, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        tracking: MlflowClient,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            tracking,
            settings,
            metrics,
            failures: Mutex::default(),
        }
    }

    fn failure_count(&self, key: &ObjectRef<GatewayEndpoint>, failed: bool) -> u32 {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failed {
            let n = map.entry(key.clone()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        } else {
            map.remove(key);
            0
        }
    }
}

/// Runs the controller until SIGTERM or Ctrl-C.
pub async fn run(ctx: Arc<Context>) {
    let endpoints: Api<GatewayEndpoint> = match &ctx.settings.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let config = ControllerConfig::default().concurrency(ctx.settings.concurrency);
    Controller::new(endpoints, watcher::Config::default().any_semantic())
        .with_config(config)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(endpoint = %obj, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

async fn reconcile(ep: Arc<GatewayEndpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
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
        ctx.failure_count(&key, false);
    }
    result
}

/// Exponential backoff per endpoint: 2 s, 4 s, 8 s, ... up to `max_backoff`, so a broken tracking server
/// or wrong credentials never make a hot loop.
fn error_policy(ep: Arc<GatewayEndpoint>, error: &Error, ctx: Arc<Context>) -> Action {
    let n = ctx.failure_count(&ObjectRef::from_obj(ep.as_ref()), true);
    let delay = backoff(n).min(ctx.settings.max_backoff);
    warn!(endpoint = %ObjectRef::from_obj(ep.as_ref()), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

pub fn backoff(failures: u32) -> Duration {
    let secs = 2u64.saturating_pow(failures.clamp(1, 16)).min(300);
    Duration::from_secs(secs)
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

/// What the spec declares about the experiment.
pub fn declared(ep: &GatewayEndpoint, id: &EndpointIdentity) -> Declared {
    let spec = &ep.spec;
    if !spec.usage_tracking {
        Declared::Disabled
    } else if let Some(id) = &spec.experiment_id {
        Declared::UserExperiment { id: id.clone() }
    } else {
        Declared::Managed {
            name: spec
                .experiment_name
                .clone()
                .unwrap_or_else(|| id.default_experiment_name()),
        }
    }
}

/// One condition as the reconciler decides it; `lastTransitionTime` is filled in on write.
#[derive(Clone, Debug, PartialEq)]
pub struct ConditionState {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

async fn apply(ep: &GatewayEndpoint, ctx: &Context) -> Result<Action, Error> {
    let id = identity(ep)?;
    let declared = declared(ep, &id);
    let current = ep.status.clone().unwrap_or_default();
    let known = current.experiment_id.as_deref();
    let outcome = experiment::ensure(&ctx.tracking, &id, &declared, known).await;

    let mut status = GatewayEndpointStatus {
        observed_generation: ep.metadata.generation,
        url: current.url.clone(),
        ..Default::default()
    };
    let mut events = Vec::new();
    let experiment_ready;
    let mut failure = None;
    match outcome {
        Ok(Outcome::Disabled) => {
            experiment_ready = ConditionState {
                type_: CONDITION_EXPERIMENT_READY,
                status: true,
                reason: "UsageTrackingDisabled".into(),
                message: "usageTracking is false: no experiment, and the gateway exports no traces"
                    .into(),
            };
        }
        Ok(Outcome::Ready {
            experiment,
            changes,
        }) => {
            for change in &changes {
                events.push(change_event(
                    change,
                    &experiment.experiment_id,
                    &experiment.name,
                ));
            }
            let how = if declared_is_user(&declared) {
                "the experiment given by experimentId"
            } else {
                "managed by the operator"
            };
            experiment_ready = ConditionState {
                type_: CONDITION_EXPERIMENT_READY,
                status: true,
                reason: if declared_is_user(&declared) {
                    "ExistingExperiment".into()
                } else {
                    "ExperimentActive".into()
                },
                message: format!(
                    "traces go to experiment {} ({}), {how}",
                    experiment.experiment_id, experiment.name
                ),
            };
            status.experiment_url = Some(experiment_url(
                &ctx.settings.ui_url,
                &experiment.experiment_id,
            ));
            status.experiment_id = Some(experiment.experiment_id);
            status.experiment_name = Some(experiment.name);
        }
        Ok(Outcome::Blocked {
            reason,
            message,
            experiment_id,
        }) => {
            experiment_ready = ConditionState {
                type_: CONDITION_EXPERIMENT_READY,
                status: false,
                reason: reason.as_str().into(),
                message,
            };
            // Still tracing into the current experiment (a rename that could not be made).
            if experiment_id.is_some() && experiment_id == current.experiment_id {
                status.experiment_id = current.experiment_id.clone();
                status.experiment_name = current.experiment_name.clone();
                status.experiment_url = current.experiment_url.clone();
            }
        }
        Err(e) => {
            experiment_ready = ConditionState {
                type_: CONDITION_EXPERIMENT_READY,
                status: false,
                reason: tracking_error_reason(&e).into(),
                message: format!("{e}; retrying with backoff"),
            };
            // Keep what was known: the pods still trace there.
            status.experiment_id = current.experiment_id.clone();
            status.experiment_name = current.experiment_name.clone();
            status.experiment_url = current.experiment_url.clone();
            failure = Some(e);
        }
    }

    let ready = ConditionState {
        type_: CONDITION_READY,
        status: experiment_ready.status,
        reason: if experiment_ready.status {
            "Ready".into()
        } else {
            experiment_ready.reason.clone()
        },
        message: experiment_ready.message.clone(),
    };
    // A Warning Event when the endpoint enters a failing state, not on every retry.
    let previous = current.condition(CONDITION_EXPERIMENT_READY);
    if !experiment_ready.status
        && previous.is_none_or(|c| {
            c.status != "False"
                || c.reason != experiment_ready.reason
                || c.message != experiment_ready.message
        })
    {
        events.push(Event {
            type_: EventType::Warning,
            reason: experiment_ready.reason.clone(),
            note: Some(truncate(&experiment_ready.message, 1000)),
            action: "EnsureExperiment".into(),
            secondary: None,
        });
    }
    status.conditions = merge_conditions(
        &current.conditions,
        &[experiment_ready, ready],
        ep.metadata.generation,
    );

    if status != current {
        patch_status(ctx, ep, &status).await?;
    }
    for event in events {
        if let Err(e) = ctx.recorder.publish(&event, &ep.object_ref(&())).await {
            warn!(error = %e, reason = %event.reason, "could not publish event");
        }
    }
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(Action::requeue(jitter(ctx.settings.resync, ep))),
    }
}

fn declared_is_user(d: &Declared) -> bool {
    matches!(d, Declared::UserExperiment { .. })
}

async fn cleanup(ep: &GatewayEndpoint, ctx: &Context) -> Result<Action, Error> {
    let id = identity(ep)?;
    if ep.spec.experiment_deletion_policy != ExperimentDeletionPolicy::Delete {
        return Ok(Action::await_change());
    }
    let Declared::Managed { name } = declared(ep, &id) else {
        // Never delete an experiment given by experimentId; with tracking off there is none.
        return Ok(Action::await_change());
    };
    // The recorded experiment, or (if the status write was lost) the one holding our name.
    let experiment_id = match ep.status.as_ref().and_then(|s| s.experiment_id.clone()) {
        Some(eid) => Some(eid),
        None => match ctx.tracking.get_experiment_by_name(&name).await {
            Ok(e) => Some(e.experiment_id),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(deletion_failed(ctx, ep, e).await),
        },
    };
    if let Some(eid) = experiment_id {
        match experiment::delete_owned(&ctx.tracking, &id, &eid).await {
            Ok(Some(deleted)) => {
                info!(endpoint = %id.owner(), experiment = %deleted, "experiment deleted");
                publish(
                    ctx,
                    ep,
                    EventType::Normal,
                    "ExperimentDeleted",
                    format!("experimentDeletionPolicy is Delete: experiment {deleted} soft-deleted in MLflow (it can be restored there)"),
                )
                .await;
            }
            Ok(None) => {}
            Err(e) => return Err(deletion_failed(ctx, ep, e).await),
        }
    }
    Ok(Action::await_change())
}

async fn deletion_failed(ctx: &Context, ep: &GatewayEndpoint, e: MlflowError) -> Error {
    publish(
        ctx,
        ep,
        EventType::Warning,
        "ExperimentDeletionFailed",
        format!("experimentDeletionPolicy is Delete, but the experiment could not be deleted: {e}; retrying (set experimentDeletionPolicy: Retain to let the resource go without it)"),
    )
    .await;
    e.into()
}

async fn publish(
    ctx: &Context,
    ep: &GatewayEndpoint,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(&note, 1000)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &ep.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish event");
    }
}

fn change_event(change: &Change, id: &str, name: &str) -> Event {
    let (reason, note) = match change {
        Change::Created => (
            "ExperimentCreated",
            format!("created experiment {id} ({name}) in MLflow"),
        ),
        Change::Adopted => (
            "ExperimentAdopted",
            format!("adopted existing experiment {id} ({name}): its tags name this endpoint"),
        ),
        Change::Restored => (
            "ExperimentRestored",
            format!("experiment {id} ({name}) was deleted in MLflow; restored it"),
        ),
        Change::Renamed { from } => (
            "ExperimentRenamed",
            format!("renamed experiment {id} from {from} to {name}; its traces stay"),
        ),
        Change::Retagged => (
            "ExperimentRetagged",
            format!("restored the gateway tags of experiment {id} ({name})"),
        ),
    };
    Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note),
        action: "EnsureExperiment".into(),
        secondary: None,
    }
}

/// The condition reason for a tracking-server failure.
pub fn tracking_error_reason(e: &MlflowError) -> &'static str {
    match e {
        MlflowError::Unavailable { .. } => "TrackingServerUnavailable",
        MlflowError::Unauthenticated { .. } => "TrackingServerUnauthorized",
        MlflowError::Api {
            code: ErrorCode::PermissionDenied,
            ..
        } => "TrackingServerForbidden",
        _ => "TrackingServerError",
    }
}

/// `<ui>/#/experiments/<id>/traces`, without any credentials the URL may carry.
pub fn experiment_url(ui: &url::Url, id: &str) -> String {
    let mut base = ui.clone();
    let _ = base.set_username("");
    let _ = base.set_password(None);
    let base = base.as_str().trim_end_matches('/').to_string();
    format!("{base}/#/experiments/{id}/traces")
}

/// New conditions, keeping `lastTransitionTime` where the status did not change.
pub fn merge_conditions(
    current: &[Condition],
    wanted: &[ConditionState],
    generation: Option<i64>,
) -> Vec<Condition> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut out: Vec<Condition> = current
        .iter()
        .filter(|c| !wanted.iter().any(|w| w.type_ == c.type_))
        .cloned()
        .collect();
    for w in wanted {
        let status = if w.status { "True" } else { "False" };
        let last = current
            .iter()
            .find(|c| c.type_ == w.type_ && c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        out.push(Condition {
            type_: w.type_.to_string(),
            status: status.to_string(),
            reason: w.reason.clone(),
            message: w.message.clone(),
            last_transition_time: last,
            observed_generation: generation,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
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

/// The resync period, spread by up to +10% per endpoint so that endpoints created together do not
/// resync together.
fn jitter(resync: Duration, ep: &GatewayEndpoint) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ep.uid().hash(&mut h);
    let spread = resync.as_millis() as u64 / 10;
    resync + Duration::from_millis(if spread == 0 { 0 } else { h.finish() % spread })
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(type_: &'static str, status: bool, reason: &str) -> ConditionState {
        ConditionState {
            type_,
            status,
            reason: reason.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn transition_time_is_kept_while_status_is_unchanged() {
        let first = merge_conditions(&[], &[cond("Ready", false, "A")], Some(1));
        std::thread::sleep(Duration::from_millis(1100));
        let second = merge_conditions(&first, &[cond("Ready", false, "B")], Some(2));
        assert_eq!(
            first[0].last_transition_time,
            second[0].last_transition_time
        );
        assert_eq!(second[0].reason, "B");
        assert_eq!(second[0].observed_generation, Some(2));
        let third = merge_conditions(&second, &[cond("Ready", true, "Ready")], Some(2));
        assert_ne!(
            third[0].last_transition_time,
            second[0].last_transition_time
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(30), Duration::from_secs(300));
    }

    #[test]
    fn experiment_url_drops_credentials() {
        let ui = url::Url::parse("https://user:pw@mlflow.example.com/").unwrap();
        assert_eq!(
            experiment_url(&ui, "42"),
            "https://mlflow.example.com/#/experiments/42/traces"
        );
    }
}
