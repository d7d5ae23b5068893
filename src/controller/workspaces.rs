//! Whether the tracking server has MLflow workspaces, and which workspaces the operator has made
//! sure of: both remembered between reconciles, so a steady state costs no MLflow call. The probe
//! is repeated after a while (a server may be restarted with workspaces turned on or off); if a
//! repeat fails, the last answer stands, so a short outage does not change what the pods send.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::info;

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
                Some((_, enabled)) => Ok(enabled),
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
