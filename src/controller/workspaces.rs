//! Whether the tracking server has MLflow workspaces, and which workspaces the operator has made
//! sure of: both remembered between reconciles, so a steady state costs no MLflow call. The probe
//! is repeated after a while (a server may be restarted with workspaces turned on or off); if a
//! repeat fails, the last answer stands for another while, so an outage neither changes what the
//! pods send nor costs a probe per reconcile.
//! Also the reconcile's steps that resolve an endpoint's workspace (from its Namespace) and ensure
//! its experiment there.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tracing::info;

use super::context::Context;
use super::experiment::{self, Declared, EndpointIdentity, Outcome};
use super::tenancy::{self, NamespacePolicy};
use super::workload;
use crate::api::GatewayEndpoint;
use crate::mlflow::{MlflowClient, MlflowError};

/// What the operator knows of the server's workspaces.
pub struct Workspaces {
    /// How long a probe's answer holds.
    ttl: Duration,
    probed: Mutex<Option<(Instant, bool)>>,
    /// Workspaces known to exist (made sure of by this process).
    ensured: Mutex<HashSet<String>>,
}

impl Workspaces {
    pub fn new(ttl: Duration) -> Self {
        Workspaces {
            ttl,
            probed: Mutex::default(),
            ensured: Mutex::default(),
        }
    }

    /// The last answer of the probe, however old.
    pub fn last_known(&self) -> Option<bool> {
        self.probed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|(_, enabled)| enabled)
    }

    /// Whether the server has workspaces (`GET /api/3.0/mlflow/server-info`, without a workspace
    /// header). A failed repeat keeps the last answer; a failed first probe is the error.
    pub async fn enabled(&self, client: &MlflowClient) -> Result<bool, MlflowError> {
        let cached = *self.probed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, enabled)) = cached
            && at.elapsed() < self.ttl
        {
            return Ok(enabled);
        }
        match client.server_info().await {
            Ok(info) => {
                let enabled = info.workspaces_enabled;
                if cached.map(|(_, e)| e) != Some(enabled) {
                    info!(workspaces = enabled, "MLflow tracking server probed");
                    // Turned off and on again: what was ensured may be gone.
                    self.ensured
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clear();
                }
                *self.probed.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), enabled));
                Ok(enabled)
            }
            Err(e) => match cached {
                // Kept for another period: an outage is not probed again on every reconcile.
                Some((_, enabled)) => {
                    *self.probed.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((Instant::now(), enabled));
                    Ok(enabled)
                }
                None => Err(e),
            },
        }
    }

    /// Makes workspace `name` exist (created if missing; needs an admin with basic auth). True
    /// when this call created it.
    pub async fn ensure(&self, client: &MlflowClient, name: &str) -> Result<bool, MlflowError> {
        if self
            .ensured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
        {
            return Ok(false);
        }
        let created = client
            .ensure_workspace(
                name,
                "created by mlflow-gateway-operator for the GatewayEndpoints of a Kubernetes namespace",
            )
            .await?;
        if created {
            info!(workspace = name, "MLflow workspace created");
        }
        self.ensured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
        Ok(created)
    }

    /// Forgets that `name` exists (a call in it answered that it does not).
    pub fn forget(&self, name: &str) {
        self.ensured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

/// The Namespace's policy, from the cache of watched Namespaces (the defaults if it is not
/// there).
pub(super) fn namespace_policy(ctx: &Context, namespace: &str) -> NamespacePolicy {
    let ns = ctx.stores.namespaces.get(&ObjectRef::new(namespace));
    NamespacePolicy::from_annotations(ns.as_ref().and_then(|n| n.metadata.annotations.as_ref()))
}

/// The MLflow workspace of the namespace's endpoints: None without tracking or when the server
/// has no workspaces (it must never get the header). Otherwise, what the experiment step shows
/// instead: the probe's failure, or a namespace that names no valid workspace.
pub(super) async fn workspace_of(
    ctx: &Context,
    namespace: &str,
    policy: &NamespacePolicy,
    tracking: bool,
) -> Result<Option<String>, Result<Outcome, MlflowError>> {
    if !tracking {
        return Ok(None);
    }
    match ctx.workspaces.enabled(&ctx.tracking).await {
        Err(e) => Err(Err(e)),
        Ok(false) => Ok(None),
        Ok(true) => match policy.workspace(namespace) {
            Ok(w) => Ok(Some(w)),
            Err(message) => Err(Ok(Outcome::Blocked {
                reason: experiment::BlockedReason::WorkspaceInvalid,
                message,
                experiment_id: None,
            })),
        },
    }
}

/// [`experiment::ensure`] in `workspace`: made to exist first when the operator is to create an
/// experiment there (not for a refused name, nor for a user's experiment, which must already be
/// there).
pub(super) async fn ensure_in_workspace(
    ctx: &Context,
    workspace: Option<&str>,
    id: &EndpointIdentity,
    declared: &Declared,
    known: Option<&str>,
) -> Result<Outcome, MlflowError> {
    let tracking = ctx.tracking.in_workspace(workspace.map(str::to_string));
    if let (Some(w), Declared::Managed { .. }) = (workspace, declared)
        && tenancy::refuse_declared(id, declared).is_none()
    {
        ctx.workspaces.ensure(&ctx.tracking, w).await?;
    }
    let outcome = experiment::ensure(&tracking, id, declared, known).await;
    // "Workspace 'x' not found": deleted behind the operator's back; made sure of again next time.
    if let (Some(w), Err(e)) = (workspace, &outcome)
        && e.is_not_found()
        && e.to_string().contains("Workspace")
    {
        ctx.workspaces.forget(w);
    }
    outcome
}

/// The workspace the endpoint's Deployment gives its pods now, if any.
pub(super) fn deployed_workspace(ctx: &Context, ep: &GatewayEndpoint) -> Option<String> {
    let key = ObjectRef::new(&workload::render::object_name(ep))
        .within(&ep.namespace().unwrap_or_default());
    let deployment = ctx.stores.deployments.get(&key)?;
    deployment
        .spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == crate::mlflow::ENV_WORKSPACE)
        .and_then(|e| e.value.clone())
}
