//! The controller: for each `GatewayEndpoint`, makes its experiment exist in MLflow (the rules in
//! [`experiment`]), runs the endpoint as gateway pods ([`workload`]), and tells the truth about
//! both in status conditions ([`conditions`]) and Events ([`events`]).
//!
//! Laid out as kube-rs/controller-rs is: this module holds the watches and runs the controller;
//! [`reconcile`] is finalizer -> apply/cleanup, each step a function that returns what it decided;
//! [`context`] is what the reconciles share; [`settings`] the validated operator-wide settings.

pub mod backoff;
pub mod conditions;
pub mod context;
pub mod credential;
pub mod error;
pub mod events;
pub mod experiment;
pub mod health;
pub mod metrics;
pub mod reconcile;
pub mod settings;
pub mod tenancy;
pub mod verified;
pub mod workload;
pub mod workspaces;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, warn};

pub use context::{Context, FIELD_MANAGER, Stores};
pub use error::Error;
pub use reconcile::FINALIZER;
pub use settings::{Args, Settings, SettingsError};

use crate::api::GatewayEndpoint;
use crate::controller::backoff::WatchBackoff;
use crate::controller::metrics::Metrics;
use conditions::ConditionType;
use workload::render;

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
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
    let Some(writers) = ctx.take_writers() else {
        warn!("controller::run called twice on one Context");
        return;
    };
    let client = &ctx.client;
    let ns = ctx.settings.namespace();
    let owned = watcher::Config::default()
        .labels(&format!(
            "{}={}",
            render::LABEL_MANAGED_BY,
            render::MANAGED_BY
        ))
        .any_semantic();
    // Cached without managedFields: they are most of an object's size and never read.
    let health = &ctx.metrics.health;
    let mut watches = vec![
        "gatewayendpoints",
        "deployments",
        "configmaps",
        "services",
        "secrets",
    ];
    if operator_secret_watched(&ctx) {
        watches.push("operator secret");
    }
    health.watching(&watches);
    let deployments = watcher(scoped::<Deployment>(client, ns), owned.clone())
        .inspect(observe(&ctx, "deployments"))
        .modify(|o| o.managed_fields_mut().clear())
        .backoff(WatchBackoff::new(ctx.settings.max_backoff()))
        .reflect(writers.deployments)
        .touched_objects();
    let deployments = detached(deployments);
    let config_maps = watcher(scoped::<ConfigMap>(client, ns), owned.clone())
        .inspect(observe(&ctx, "configmaps"))
        .modify(|o| o.managed_fields_mut().clear())
        .backoff(WatchBackoff::new(ctx.settings.max_backoff()))
        .reflect(writers.config_maps)
        .touched_objects();
    let config_maps = detached(config_maps);
    let services = watcher(scoped::<Service>(client, ns), owned.clone())
        .inspect(observe(&ctx, "services"))
        .modify(|o| o.managed_fields_mut().clear())
        .backoff(WatchBackoff::new(ctx.settings.max_backoff()))
        .reflect(writers.services)
        .touched_objects();
    let services = detached(services);
    // The watched Namespaces, for their annotations (MLflow workspace, shared experiments): the
    // one watched namespace by name, or all of them.
    let namespace_config = match ns {
        Some(name) => watcher::Config::default().fields(&format!("metadata.name={name}")),
        None => watcher::Config::default(),
    };
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        namespace_config.any_semantic(),
    )
    .modify(|o| o.managed_fields_mut().clear())
    .backoff(WatchBackoff::new(ctx.settings.max_backoff()))
    .reflect(writers.namespaces)
    .touched_objects();
    let namespaces = detached(namespaces);
    // Secrets in the watched namespaces, plus the operator's own namespace for its credential.
    let secrets = watcher(
        scoped::<PartialObjectMeta<Secret>>(client, ns),
        watcher::Config::default().any_semantic(),
    )
    .inspect(observe(&ctx, "secrets"))
    .backoff(WatchBackoff::new(ctx.settings.max_backoff()))
    .touched_objects();
    let secrets = detached(secrets);
    let operator_secret = match ctx.settings.gateway_credentials() {
        Some(secret) if operator_secret_watched(&ctx) => Some(detached(
            watcher(
                Api::<PartialObjectMeta<Secret>>::namespaced(client.clone(), &secret.namespace),
                watcher::Config::default()
                    .fields(&format!("metadata.name={}", secret.name))
                    .any_semantic(),
            )
            .inspect(observe(&ctx, "operator secret"))
            .backoff(WatchBackoff::new(ctx.settings.max_backoff()))
            .touched_objects(),
        )),
        _ => None,
    };

    let config = ControllerConfig::default().concurrency(ctx.settings.concurrency());
    // Controller::new's own watch and cache, built here so that the watch reports to `health`.
    let (endpoints, writer) = reflector::store();
    let controller = Controller::for_stream(
        detached(
            reflector::reflector(
                writer,
                watcher(
                    scoped::<GatewayEndpoint>(client, ns),
                    watcher::Config::default().any_semantic(),
                )
                .inspect(observe(&ctx, "gatewayendpoints"))
                .backoff(WatchBackoff::new(ctx.settings.max_backoff())),
            )
            .applied_objects(),
        ),
        endpoints.clone(),
    );
    let credential = ctx.settings.gateway_credentials().cloned();
    let map_secret = move |s: PartialObjectMeta<Secret>| {
        let owner = s
            .owner_references()
            .iter()
            .find(|r| r.controller == Some(true) && r.kind == "GatewayEndpoint")
            .map(|r| r.uid.clone());
        workload::secrets::endpoints_reading(
            &endpoints,
            credential
                .as_ref()
                .map(|c| (c.namespace.as_str(), c.name.as_str())),
            &s.namespace().unwrap_or_default(),
            &s.name_any(),
            owner.as_deref(),
        )
    };
    // A Namespace's annotations changed: its endpoints are checked again.
    let endpoints_in = controller.store();
    let ctx_ns = ctx.clone();
    let map_namespace = move |n: Namespace| {
        let name = n.name_any();
        endpoints_in
            .state()
            .iter()
            .filter(|ep| ep.namespace().as_deref() == Some(name.as_str()))
            .map(|ep| {
                if let Some(uid) = ep.uid() {
                    ctx_ns.verified.forget(&uid);
                }
                ObjectRef::from_obj(ep.as_ref())
            })
            .collect::<Vec<_>>()
    };
    let mut controller = controller
        .watches_stream(namespaces, map_namespace)
        .owns_stream(deployments)
        .owns_stream(config_maps)
        .owns_stream(services)
        .watches_stream(secrets, map_secret.clone());
    if let Some(stream) = operator_secret {
        controller = controller.watches_stream(stream, map_secret);
    }
    let tended = tend(controller.store(), ctx.clone());
    let stores = ctx.stores.clone();
    let ready = ctx.stores_ready.clone();
    tokio::spawn(async move {
        stores.ready().await;
        ready.send_replace(true);
    });
    let running = controller
        .with_config(config)
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(endpoint = %obj, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile failed"),
            }
        });
    tokio::select! {
        () = running => {}
        () = tended => {}
    }
}

/// Whether the operator's own credential Secret needs a watch of its own (outside the watched
/// namespace).
fn operator_secret_watched(ctx: &Context) -> bool {
    let ns = ctx.settings.namespace();
    ctx.settings
        .gateway_credentials()
        .is_some_and(|secret| ns.is_some_and(|w| w != secret.namespace))
}

/// Reports a watch's events to the readiness state.
/// Runs a watch (its retries, its cache, its readiness report) on a task of its own, and hands
/// what it yields to the controller through a channel. Polled from inside kube-runtime 5.0's
/// applier instead, a watch could go unpolled for tens of seconds: the applier splits its input
/// into Ok and Err halves (`SplitCase`), and a half that peeks the other's item returns Pending
/// without waking anyone. A Role granted late then went unnoticed for over a minute on a loaded
/// machine. 1024 items of slack; beyond, the watch waits for the controller.
fn detached<T: Send + 'static>(
    stream: impl futures::Stream<Item = T> + Send + 'static,
) -> impl futures::Stream<Item = T> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if tx.send(item).await.is_err() {
                break;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

fn observe<K>(
    ctx: &Arc<Context>,
    name: &'static str,
) -> impl Fn(&Result<watcher::Event<K>, watcher::Error>) + use<K> {
    let ctx = ctx.clone();
    move |event| ctx.metrics.health.observe(name, event)
}

/// Keeps the `endpoints{ready}` gauge in step with the watched endpoints, and forgets the
/// failures and verified experiments of endpoints that are gone.
async fn tend(store: Store<GatewayEndpoint>, ctx: Arc<Context>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        let endpoints = store.state();
        count_endpoints(&endpoints, &ctx.metrics);
        // An empty store before the first list forgets nothing that matters: both are caches.
        let uids: HashSet<String> = endpoints.iter().filter_map(|ep| ep.uid()).collect();
        ctx.verified.retain(&uids);
        ctx.credentials.retain(&uids);
        let keys: HashSet<ObjectRef<GatewayEndpoint>> = endpoints
            .iter()
            .map(|ep| ObjectRef::from_obj(ep.as_ref()))
            .collect();
        ctx.failures.retain(&keys);
    }
}

fn count_endpoints(endpoints: &[Arc<GatewayEndpoint>], metrics: &Metrics) {
    let mut counts: HashMap<&str, i64> = HashMap::from([("true", 0), ("false", 0), ("unknown", 0)]);
    for ep in endpoints {
        let ready = ep
            .status
            .as_ref()
            .and_then(|s| s.condition(ConditionType::Ready.as_str()))
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
            .get_or_create(&crate::controller::metrics::ReadyLabels {
                ready: ready.to_string(),
            })
            .set(n);
    }
}
