//! The reconciler: makes each `GatewayEndpoint`'s experiment exist (see [`crate::experiment`]),
//! runs the endpoint as gateway pods (see [`pods`] and [`crate::deploy`]), and tells the truth
//! about both in status conditions and Events.

pub mod pods;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::api::{ExperimentDeletionPolicy, GatewayEndpoint, GatewayEndpointStatus};
use crate::deploy::{self, GatewayDefaults};
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
    #[error(
        "a {kind} named {name} already exists and is not this endpoint's: rename or delete it, or rename the endpoint"
    )]
    NameConflict { kind: String, name: String },
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
            Error::NameConflict { .. } => "name_conflict",
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
    /// Defaults of the gateway pods.
    pub gateway: GatewayDefaults,
    /// A Secret in the operator's namespace holding the trace-writing credential the gateway pods
    /// use (mirrored into each endpoint's namespace) unless an endpoint names its own.
    pub gateway_credentials_secret: Option<String>,
    /// The namespace the operator runs in.
    pub operator_namespace: Option<String>,
}

/// Caches of the objects the operator owns, filled by its watches.
#[derive(Clone)]
pub struct Stores {
    pub deployments: Store<Deployment>,
    pub config_maps: Store<ConfigMap>,
    pub services: Store<Service>,
}

impl Stores {
    /// Waits until every cache holds its first full list (at once if the watches ended). Awaited
    /// by one task only: many concurrent waiters on one store can miss their wake-up.
    async fn ready(&self) {
        let _ = tokio::join!(
            self.deployments.wait_until_ready(),
            self.config_maps.wait_until_ready(),
            self.services.wait_until_ready()
        );
    }
}

struct Writers {
    deployments: Writer<Deployment>,
    config_maps: Writer<ConfigMap>,
    services: Writer<Service>,
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub tracking: MlflowClient,
    pub recorder: Recorder,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    writers: Mutex<Option<Writers>>,
    /// True once every cache of owned objects is filled.
    stores_ready: tokio::sync::watch::Sender<bool>,
    /// Consecutive failures per endpoint, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<GatewayEndpoint>, u32>>,
    /// When each endpoint's experiment was last found as declared, and for which generation:
    /// reconciles that a pod or Secret change triggers soon after skip the MLflow round trip.
    verified: Mutex<HashMap<ObjectRef<GatewayEndpoint>, Verified>>,
}

/// An experiment found as declared: for which generation, when, and what status said of it.
#[derive(Clone)]
struct Verified {
    generation: Option<i64>,
    at: Instant,
    experiment_id: Option<String>,
    experiment_name: Option<String>,
    experiment_url: Option<String>,
    condition: ConditionState,
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
        let (deployments, deployments_writer) = reflector::store();
        let (config_maps, config_maps_writer) = reflector::store();
        let (services, services_writer) = reflector::store();
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            tracking,
            settings,
            metrics,
            stores: Stores {
                deployments,
                config_maps,
                services,
            },
            writers: Mutex::new(Some(Writers {
                deployments: deployments_writer,
                config_maps: config_maps_writer,
                services: services_writer,
            })),
            stores_ready: tokio::sync::watch::Sender::new(false),
            failures: Mutex::default(),
            verified: Mutex::default(),
        }
    }

    async fn wait_stores_ready(&self) {
        let mut rx = self.stores_ready.subscribe();
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// What was found when the experiment was last found as declared, if that was for this
    /// generation less than half a resync period ago. Kept in memory, not read back from the
    /// endpoint: the cached endpoint may not show the operator's own status write yet.
    fn recently_verified(
        &self,
        key: &ObjectRef<GatewayEndpoint>,
        generation: Option<i64>,
    ) -> Option<Verified> {
        let map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|v| v.generation == generation && v.at.elapsed() < self.settings.resync / 2)
            .cloned()
    }

    fn set_verified(&self, key: &ObjectRef<GatewayEndpoint>, verified: Option<Verified>) {
        let mut map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        match verified {
            Some(v) => map.insert(key.clone(), v),
            None => map.remove(key),
        };
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

fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until SIGTERM or Ctrl-C. Watches the endpoints, the objects the operator
/// owns (label `app.kubernetes.io/managed-by=mlflow-gateway-operator`; a change or deletion
/// reconciles the owner) and Secrets (metadata only; a change reconciles the endpoints reading it).
pub async fn run(ctx: Arc<Context>) {
    let Some(writers) = ctx.writers.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        warn!("controller::run called twice on one Context");
        return;
    };
    let client = &ctx.client;
    let ns = &ctx.settings.namespace;
    let owned = watcher::Config::default()
        .labels(&format!(
            "{}={}",
            deploy::LABEL_MANAGED_BY,
            deploy::MANAGED_BY
        ))
        .any_semantic();
    // Cached without managedFields: they are most of an object's size and never read.
    let deployments = watcher(scoped::<Deployment>(client, ns), owned.clone())
        .modify(|o| o.managed_fields_mut().clear())
        .default_backoff()
        .reflect(writers.deployments)
        .touched_objects();
    let config_maps = watcher(scoped::<ConfigMap>(client, ns), owned.clone())
        .modify(|o| o.managed_fields_mut().clear())
        .default_backoff()
        .reflect(writers.config_maps)
        .touched_objects();
    let services = watcher(scoped::<Service>(client, ns), owned.clone())
        .modify(|o| o.managed_fields_mut().clear())
        .default_backoff()
        .reflect(writers.services)
        .touched_objects();
    // Secrets in the watched namespaces, plus the operator's own namespace for its credential.
    let secrets = watcher(
        scoped::<PartialObjectMeta<Secret>>(client, ns),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .touched_objects();
    let operator_secret = match (
        &ctx.settings.gateway_credentials_secret,
        &ctx.settings.operator_namespace,
    ) {
        (Some(name), Some(op_ns)) if ns.as_ref().is_some_and(|w| w != op_ns) => Some(
            watcher(
                Api::<PartialObjectMeta<Secret>>::namespaced(client.clone(), op_ns),
                watcher::Config::default()
                    .fields(&format!("metadata.name={name}"))
                    .any_semantic(),
            )
            .default_backoff()
            .touched_objects(),
        ),
        _ => None,
    };

    let config = ControllerConfig::default().concurrency(ctx.settings.concurrency);
    let controller = Controller::new(
        scoped::<GatewayEndpoint>(client, ns),
        watcher::Config::default().any_semantic(),
    );
    let endpoints = controller.store();
    let credential = ctx
        .settings
        .gateway_credentials_secret
        .clone()
        .zip(ctx.settings.operator_namespace.clone());
    let map_secret = move |s: PartialObjectMeta<Secret>| {
        let owner = s
            .owner_references()
            .iter()
            .find(|r| r.controller == Some(true) && r.kind == "GatewayEndpoint")
            .map(|r| r.uid.clone());
        pods::endpoints_reading(
            &endpoints,
            credential.as_ref().map(|(n, ns)| (ns.as_str(), n.as_str())),
            &s.namespace().unwrap_or_default(),
            &s.name_any(),
            owner.as_deref(),
        )
    };
    let mut controller = controller
        .owns_stream(deployments)
        .owns_stream(config_maps)
        .owns_stream(services)
        .watches_stream(secrets, map_secret.clone());
    if let Some(stream) = operator_secret {
        controller = controller.watches_stream(stream, map_secret);
    }
    let counts = count_endpoints(controller.store(), ctx.metrics.clone());
    let stores = ctx.stores.clone();
    let ready = ctx.stores_ready.clone();
    tokio::spawn(async move {
        stores.ready().await;
        ready.send_replace(true);
    });
    let running = controller
        .with_config(config)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(endpoint = %obj, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile failed"),
            }
        });
    tokio::select! {
        () = running => {}
        () = counts => {}
    }
}

/// Keeps the `endpoints{ready}` gauge in step with the watched endpoints.
async fn count_endpoints(store: Store<GatewayEndpoint>, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        let mut counts: HashMap<&str, i64> =
            HashMap::from([("true", 0), ("false", 0), ("unknown", 0)]);
        for ep in store.state() {
            let ready = ep
                .status
                .as_ref()
                .and_then(|s| s.condition(CONDITION_READY))
                .map_or("unknown", |c| match c.status.as_str() {
                    "True" => "true",
                    "False" => "false",
                    _ => "unknown",
                });
            *counts.entry(ready).or_default() += 1;
        }
        for (ready, n) in counts {
            metrics
                .endpoints
                .get_or_create(&crate::metrics::ReadyLabels {
                    ready: ready.to_string(),
                })
                .set(n);
        }
    }
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
    // Owned objects are compared with the caches: wait until the first list filled them.
    ctx.wait_stores_ready().await;
    let id = identity(ep)?;
    let key = ObjectRef::from_obj(ep);
    let declared = declared(ep, &id);
    let current = ep.status.clone().unwrap_or_default();
    let generation = ep.metadata.generation;

    let mut status = GatewayEndpointStatus {
        observed_generation: generation,
        ..Default::default()
    };
    let mut events = Vec::new();
    let mut failure = None;
    // A reconcile that a pod or Secret change triggered moments after the experiment was
    // verified for this generation skips the MLflow round trip.
    let experiment_ready = match ctx.recently_verified(&key, generation) {
        Some(v) => {
            status.experiment_id = v.experiment_id;
            status.experiment_name = v.experiment_name;
            status.experiment_url = v.experiment_url;
            v.condition
        }
        None => {
            let known = current.experiment_id.as_deref();
            let outcome = experiment::ensure(&ctx.tracking, &id, &declared, known).await;
            let verified = matches!(outcome, Ok(Outcome::Ready { .. } | Outcome::Disabled));
            let condition = experiment_condition(
                ctx,
                outcome,
                &declared,
                &current,
                &mut status,
                &mut events,
                &mut failure,
            );
            ctx.set_verified(
                &key,
                verified.then(|| Verified {
                    generation,
                    at: Instant::now(),
                    experiment_id: status.experiment_id.clone(),
                    experiment_name: status.experiment_name.clone(),
                    experiment_url: status.experiment_url.clone(),
                    condition: condition.clone(),
                }),
            );
            condition
        }
    };
    // A Warning Event when the endpoint enters a failing state, not on every retry.
    warn_on_entering(&current, &experiment_ready, "EnsureExperiment", &mut events);

    // The pods trace into the experiment in status (kept while MLflow is unreachable).
    let mut gateway = match pods::ensure_gateway(
        ep,
        ctx,
        status.experiment_id.as_deref(),
        ep.spec.usage_tracking,
    )
    .await
    {
        Ok(g) => g,
        Err(e) => {
            // Events already decided (an experiment created, say) are still published.
            publish_all(ctx, ep, &events).await;
            return Err(e);
        }
    };
    if let Some(conflict) = gateway.conflict.take() {
        failure.get_or_insert(conflict);
    }
    warn_on_entering(&current, &gateway.secrets, "ResolveSecrets", &mut events);
    // Pods on their way (DeploymentPending, WaitingForExperiment, a rollout) are no Warning; a name
    // held by someone else's object and a stuck rollout are.
    if gateway.available.reason == "NameConflict" {
        warn_on_entering(&current, &gateway.available, "ApplyGateway", &mut events);
    }
    if gateway.progressing.reason == "ProgressDeadlineExceeded" {
        warn_on_entering(&current, &gateway.progressing, "RollOut", &mut events);
    }
    events.append(&mut gateway.events);
    status.url = Some(gateway.url.clone());
    status.replicas = gateway.replicas;
    status.ready_replicas = gateway.ready_replicas;

    let parts = [&experiment_ready, &gateway.secrets, &gateway.available];
    let ready = match parts.iter().find(|c| !c.status) {
        Some(failing) => ConditionState {
            type_: CONDITION_READY,
            status: false,
            reason: failing.reason.clone(),
            message: format!("{}: {}", failing.type_, failing.message),
        },
        None => ConditionState {
            type_: CONDITION_READY,
            status: true,
            reason: "Ready".into(),
            message: format!(
                "serving at {} ({}); {}",
                gateway.url, gateway.available.message, experiment_ready.message
            ),
        },
    };
    status.conditions = merge_conditions(
        &current.conditions,
        &[
            experiment_ready,
            gateway.secrets,
            gateway.available,
            gateway.progressing,
            ready,
        ],
        generation,
    );

    if status != current {
        patch_status(ctx, ep, &status).await?;
    }
    publish_all(ctx, ep, &events).await;
    match failure {
        Some(e) => Err(e),
        None => Ok(Action::requeue(jitter(ctx.settings.resync, ep))),
    }
}

async fn publish_all(ctx: &Context, ep: &GatewayEndpoint, events: &[Event]) {
    for event in events {
        if let Err(e) = ctx.recorder.publish(event, &ep.object_ref(&())).await {
            warn!(error = %e, reason = %event.reason, "could not publish event");
        }
    }
}

/// A Warning Event when `wanted` is failing and was not failing the same way before.
fn warn_on_entering(
    current: &GatewayEndpointStatus,
    wanted: &ConditionState,
    action: &str,
    events: &mut Vec<Event>,
) {
    let previous = current.condition(wanted.type_);
    if !wanted.status
        && previous.is_none_or(|c| {
            c.status != "False" || c.reason != wanted.reason || c.message != wanted.message
        })
    {
        events.push(Event {
            type_: EventType::Warning,
            reason: wanted.reason.clone(),
            note: Some(truncate(&wanted.message, 1000)),
            action: action.into(),
            secondary: None,
        });
    }
}

/// ExperimentReady from what [`experiment::ensure`] found, filling the experiment fields of
/// `status` and the Events of what changed.
fn experiment_condition(
    ctx: &Context,
    outcome: Result<Outcome, MlflowError>,
    declared: &Declared,
    current: &GatewayEndpointStatus,
    status: &mut GatewayEndpointStatus,
    events: &mut Vec<Event>,
    failure: &mut Option<Error>,
) -> ConditionState {
    match outcome {
        Ok(Outcome::Disabled) => ConditionState {
            type_: CONDITION_EXPERIMENT_READY,
            status: true,
            reason: "UsageTrackingDisabled".into(),
            message: "usageTracking is false: no experiment, and the gateway exports no traces"
                .into(),
        },
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
            let user = declared_is_user(declared);
            let how = if user {
                "the experiment given by experimentId"
            } else {
                "managed by the operator"
            };
            let ready = ConditionState {
                type_: CONDITION_EXPERIMENT_READY,
                status: true,
                reason: if user {
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
            ready
        }
        Ok(Outcome::Blocked {
            reason,
            message,
            experiment_id,
        }) => {
            // Still tracing into the current experiment (a rename that could not be made).
            if experiment_id.is_some() && experiment_id == current.experiment_id {
                status.experiment_id = current.experiment_id.clone();
                status.experiment_name = current.experiment_name.clone();
                status.experiment_url = current.experiment_url.clone();
            }
            ConditionState {
                type_: CONDITION_EXPERIMENT_READY,
                status: false,
                reason: reason.as_str().into(),
                message,
            }
        }
        Err(e) => {
            // Keep what was known: the pods still trace there.
            status.experiment_id = current.experiment_id.clone();
            status.experiment_name = current.experiment_name.clone();
            status.experiment_url = current.experiment_url.clone();
            let c = ConditionState {
                type_: CONDITION_EXPERIMENT_READY,
                status: false,
                reason: tracking_error_reason(&e).into(),
                message: format!("{e}; retrying with backoff"),
            };
            *failure = Some(e.into());
            c
        }
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
