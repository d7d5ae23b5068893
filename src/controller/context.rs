//! What every reconcile shares: the clients, the settings, the metrics, the caches of owned
//! objects, and the controller's memory between reconciles (failures for backoff, experiments
//! lately verified). Apart from [`super::run`] so the reconcile steps depend on it, not on the
//! watches.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};

use super::backoff::Failures;
use super::credential::{AccountProbe, EnsuredCredentials};
use super::settings::Settings;
use super::verified::VerifiedExperiments;
use super::workspaces::Workspaces;
use crate::api::GatewayEndpoint;
use crate::controller::metrics::Metrics;
use crate::mlflow::MlflowClient;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "mlflow-gateway-operator";

/// Caches of the objects the operator owns, filled by its watches.
#[derive(Clone)]
pub struct Stores {
    pub deployments: Store<Deployment>,
    pub config_maps: Store<ConfigMap>,
    pub services: Store<Service>,
    /// The watched Namespaces (their annotations: workspace, shared experiments).
    pub namespaces: Store<Namespace>,
}

impl Stores {
    /// Waits until every cache holds its first full list (at once if the watches ended). Awaited
    /// by one task only: many concurrent waiters on one store can miss their wake-up.
    pub(super) async fn ready(&self) {
        let _ = tokio::join!(
            self.deployments.wait_until_ready(),
            self.config_maps.wait_until_ready(),
            self.services.wait_until_ready(),
            self.namespaces.wait_until_ready()
        );
    }
}

/// The writing halves of [`Stores`], taken once by [`super::run`] for its watches.
pub(super) struct Writers {
    pub deployments: Writer<Deployment>,
    pub config_maps: Writer<ConfigMap>,
    pub services: Writer<Service>,
    pub namespaces: Writer<Namespace>,
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
    pub(super) stores_ready: tokio::sync::watch::Sender<bool>,
    /// Consecutive failures per endpoint, for exponential backoff.
    pub(super) failures: Failures<ObjectRef<GatewayEndpoint>>,
    /// Experiments lately found as declared, by endpoint uid.
    pub(super) verified: VerifiedExperiments,
    /// Whether the tracking server has workspaces, and those made sure of.
    pub(super) workspaces: Workspaces,
    /// The operator's MLflow account (may it manage users?), probed at most once per TTL.
    pub(super) account: AccountProbe,
    /// Per-endpoint trace credentials lately found in place in MLflow, by endpoint uid.
    pub(super) credentials: EnsuredCredentials,
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
        let (namespaces, namespaces_writer) = reflector::store();
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            tracking,
            verified: VerifiedExperiments::new(settings.resync() / 2),
            workspaces: Workspaces::new(settings.resync()),
            account: AccountProbe::new(settings.resync() / 2),
            credentials: EnsuredCredentials::new(settings.resync() / 2),
            settings,
            metrics,
            stores: Stores {
                deployments,
                config_maps,
                services,
                namespaces,
            },
            writers: Mutex::new(Some(Writers {
                deployments: deployments_writer,
                config_maps: config_maps_writer,
                services: services_writer,
                namespaces: namespaces_writer,
            })),
            stores_ready: tokio::sync::watch::Sender::new(false),
            failures: Failures::default(),
        }
    }

    /// The writers of the caches: `Some` the first time only.
    pub(super) fn take_writers(&self) -> Option<Writers> {
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Waits until every cache of owned objects holds its first full list.
    pub(super) async fn wait_stores_ready(&self) {
        let mut rx = self.stores_ready.subscribe();
        let _ = rx.wait_for(|ready| *ready).await;
    }
}
