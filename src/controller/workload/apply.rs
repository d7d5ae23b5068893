//! Making the cluster hold the endpoint's rendered objects: each is server-side applied only when
//! [`drift`] finds that it no longer holds what the operator declares (no write in steady state),
//! and an object of the endpoint's name that is someone else's is left alone and reported.

use std::fmt::Debug;
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::info;

use super::drift;
use super::render::{self, PodInputs};
use super::secrets::Resolved;
use crate::api::GatewayEndpoint;
use crate::controller::context::{Context, FIELD_MANAGER};
use crate::controller::error::Error;

/// Applies `desired` unless the object already holds it. An object of that name that is not the
/// endpoint's is left alone and reported. Returns the object as the API server has it (None when
/// unknown), and whether a write was made.
pub(super) async fn ensure<K>(
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
    let desired = drift::stamp(desired)
        .map_err(|e| Error::InvalidResource(format!("cannot render an owned object: {e}")))?;
    let name = desired.name_any();
    let ns = desired.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let from_cache = cached.and_then(|s| s.get(&ObjectRef::new(&name).within(&ns)));
    let existing = match from_cache {
        Some(obj) if render::is_owned_by(obj.meta(), ep) => Some(obj),
        // Not in the cache (which sees only objects with the operator's label): it may not exist,
        // be someone else's, or be ours with its label removed.
        _ => api
            .get_opt(&name)
            .await
            .map_err(|e| refused("read", K::kind(&()).as_ref(), &ns, &name, e))?
            .map(Arc::new),
    };
    if let Some(obj) = &existing {
        if !render::is_owned_by(obj.meta(), ep) {
            return Err(Error::NameConflict {
                kind: K::kind(&()).into_owned(),
                name: format!("{ns}/{name}"),
            });
        }
        let wanted = serde_json::to_value(&desired).map_err(invalid)?;
        let actual = serde_json::to_value(obj.as_ref()).map_err(invalid)?;
        if !drift::drifted(&wanted, &actual) {
            return Ok((existing, false));
        }
    }
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await
        .map_err(|e| refused("apply", K::kind(&()).as_ref(), &ns, &name, e))?;
    ctx.metrics
        .object_applies
        .get_or_create(&crate::controller::metrics::KindLabels {
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

/// The API server's refusal as [`Error::ApplyFailed`] with its message (status shows it); other
/// failures (the API server unreachable) stay Kubernetes errors, retried.
fn refused(verb: &'static str, kind: &str, ns: &str, name: &str, e: kube::Error) -> Error {
    match e {
        kube::Error::Api(status) => Error::ApplyFailed {
            verb,
            kind: kind.to_string(),
            name: format!("{ns}/{name}"),
            message: status.message,
        },
        e => Error::Kube(e),
    }
}

fn invalid(e: serde_json::Error) -> Error {
    Error::InvalidResource(format!("cannot compare an owned object: {e}"))
}

/// What [`apply_objects`] leaves: the endpoint's Deployment as it is now, and the Event of its
/// apply when it was applied.
pub struct Applied {
    pub deployment: Option<Arc<Deployment>>,
    pub event: Option<Event>,
}

/// Applies the ConfigMap, the Service, the mirrored credential and (unless `blocked`) the
/// Deployment, tracing into `experiment_id` (in MLflow workspace `workspace`, if any).
pub async fn apply_objects(
    ep: &GatewayEndpoint,
    ctx: &Context,
    resolved: &Resolved,
    experiment_id: Option<&str>,
    workspace: Option<&str>,
    blocked: bool,
) -> Result<Applied, Error> {
    let config = render::endpoint_config(ep)
        .map_err(|e| Error::InvalidResource(format!("cannot render the endpoint config: {e}")))?;
    ensure(
        ctx,
        ep,
        render::config_map(ep, &config, ctx.settings.gateway().ca_bundle.as_deref()),
        Some(&ctx.stores.config_maps),
    )
    .await?;
    ensure(ctx, ep, render::service(ep), Some(&ctx.stores.services)).await?;
    if let Some(mirror) = resolved.mirror.clone() {
        ensure(ctx, ep, mirror, None).await?;
    }
    if blocked {
        let key =
            ObjectRef::new(&render::object_name(ep)).within(&ep.namespace().unwrap_or_default());
        let deployment = ctx
            .stores
            .deployments
            .get(&key)
            .filter(|d| render::is_owned_by(d.meta(), ep));
        return Ok(Applied {
            deployment,
            event: None,
        });
    }
    let inputs = PodInputs {
        experiment_id: experiment_id.map(str::to_string),
        workspace: workspace.map(str::to_string),
        credential: resolved.credential.clone(),
        config_hash: render::config_hash(
            &config,
            ctx.settings.gateway().ca_bundle.as_deref(),
            &resolved.versions,
        ),
    };
    let desired = render::deployment(ep, ctx.settings.gateway(), &inputs);
    let (current, wrote) = ensure(ctx, ep, desired, Some(&ctx.stores.deployments)).await?;
    let event = wrote.then(|| Event {
        type_: EventType::Normal,
        reason: "DeploymentApplied".into(),
        note: Some(format!(
            "applied Deployment {}/{} (config {})",
            ep.namespace().unwrap_or_default(),
            render::object_name(ep),
            inputs.config_hash
        )),
        action: "ApplyDeployment".into(),
        secondary: None,
    });
    Ok(Applied {
        deployment: current,
        event,
    })
}
