//! What `spec.access` needs from Kubernetes, and no more: API-key Secrets mounted (one item each,
//! optional, so a removed Secret is a revoked key and the kubelet's updates rotate keys without a
//! restart), and for ServiceAccount callers a ServiceAccount of the endpoint's own whose token the
//! pods use for TokenReview, bound to the chart's ClusterRole that allows only `create
//! tokenreviews`. TokenReview is cluster-scoped, so the grant is a ClusterRoleBinding, which
//! cannot be owned by a namespaced endpoint: it is labelled with the endpoint and deleted by the
//! finalizer's cleanup (and when the declaration goes). The operator can bind that one role only
//! (RBAC `bind` with its resourceName), so it cannot escalate through this.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, EnvVar, KeyToPath, SecretVolumeSource, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use tracing::info;

use super::render;
use crate::api::{AccessSpec, GatewayEndpoint};
use crate::controller::context::{Context, FIELD_MANAGER};
use crate::controller::error::Error;

/// Where the pods find API keys: `<dir>/<key name>/key` (the gateway's `GATEWAY_CALLER_KEYS_DIR`).
pub const CALLER_KEYS_DIR: &str = "/var/run/mlflow-gateway/caller-keys";
/// The file of each key in its directory (the gateway reads this name).
pub const KEY_FILE: &str = "key";
/// On the ClusterRoleBinding: the namespace and uid of its endpoint (it cannot have an owner).
pub const LABEL_ENDPOINT_NAMESPACE: &str = "mlflow-gateway.dev/endpoint-namespace";
pub const ANNOTATION_ENDPOINT_UID: &str = "mlflow-gateway.dev/endpoint-uid";
/// On the endpoint's ConfigMap while it has a NetworkPolicy: the cached ConfigMap tells the
/// operator, without a read, that a policy no longer declared is to be deleted.
pub const LABEL_NETWORK_POLICY: &str = "mlflow-gateway.dev/network-policy";

fn access(ep: &GatewayEndpoint) -> Option<&AccessSpec> {
    ep.spec.access.as_ref().filter(|a| !a.open)
}

/// The pods' ServiceAccount when they review callers' tokens: `<endpoint>-gateway`.
pub fn service_account_name(ep: &GatewayEndpoint) -> Option<String> {
    access(ep)
        .and_then(|a| a.service_accounts.as_ref())
        .map(|_| format!("{}-gateway", ep.name_any()))
}

/// `mlflow-gateway-tokenreview:<namespace>:<endpoint>`.
pub fn binding_name(ep: &GatewayEndpoint) -> String {
    format!(
        "mlflow-gateway-tokenreview:{}:{}",
        ep.namespace().unwrap_or_default(),
        ep.name_any()
    )
}

fn key_volume(i: usize) -> String {
    format!("caller-key-{i}")
}

pub fn environment(ep: &GatewayEndpoint) -> Vec<EnvVar> {
    match access(ep) {
        Some(a) if !a.api_keys.is_empty() => vec![EnvVar {
            name: "GATEWAY_CALLER_KEYS_DIR".into(),
            value: Some(CALLER_KEYS_DIR.into()),
            ..Default::default()
        }],
        _ => vec![],
    }
}

pub fn volumes(ep: &GatewayEndpoint) -> Vec<Volume> {
    let Some(a) = access(ep) else { return vec![] };
    a.api_keys
        .iter()
        .enumerate()
        .map(|(i, k)| Volume {
            name: key_volume(i),
            secret: Some(SecretVolumeSource {
                secret_name: Some(k.secret_ref.name.clone()),
                items: Some(vec![KeyToPath {
                    key: k.secret_ref.key.clone(),
                    path: KEY_FILE.into(),
                    mode: None,
                }]),
                // A missing Secret or key is a caller without a key (refused), not a pod that
                // cannot start.
                optional: Some(true),
                default_mode: Some(0o440),
            }),
            ..Default::default()
        })
        .collect()
}

pub fn volume_mounts(ep: &GatewayEndpoint) -> Vec<VolumeMount> {
    let Some(a) = access(ep) else { return vec![] };
    a.api_keys
        .iter()
        .enumerate()
        .map(|(i, k)| VolumeMount {
            name: key_volume(i),
            mount_path: format!("{CALLER_KEYS_DIR}/{}", k.name),
            read_only: Some(true),
            ..Default::default()
        })
        .collect()
}

/// The endpoint's own ServiceAccount (no token mounted unless a pod asks for one).
pub fn service_account(ep: &GatewayEndpoint, name: String) -> ServiceAccount {
    ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: ep.namespace(),
            labels: Some(render::labels(ep)),
            owner_references: Some(vec![render::owner_reference(ep)]),
            ..Default::default()
        },
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

/// Binds `cluster_role` (create tokenreviews) to the endpoint's ServiceAccount.
pub fn token_review_binding(
    ep: &GatewayEndpoint,
    service_account: &str,
    cluster_role: &str,
) -> ClusterRoleBinding {
    let mut labels = BTreeMap::from([
        (
            render::LABEL_MANAGED_BY.to_string(),
            render::MANAGED_BY.to_string(),
        ),
        (render::LABEL_ENDPOINT.to_string(), ep.name_any()),
    ]);
    labels.insert(
        LABEL_ENDPOINT_NAMESPACE.into(),
        ep.namespace().unwrap_or_default(),
    );
    ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(binding_name(ep)),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_ENDPOINT_UID.to_string(),
                ep.uid().unwrap_or_default(),
            )])),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: cluster_role.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: service_account.into(),
            namespace: ep.namespace(),
            api_group: None,
        }]),
    }
}

fn is_binding_of(b: &ClusterRoleBinding, ep: &GatewayEndpoint) -> bool {
    ep.uid().is_some_and(|uid| {
        b.annotations()
            .get(ANNOTATION_ENDPOINT_UID)
            .is_some_and(|v| *v == uid)
    })
}

/// Why the endpoint's ServiceAccount callers cannot be served by this install.
pub const NOT_SUPPORTED: &str = "spec.access.serviceAccounts needs the gateway pods to review tokens, which this operator's install does not allow (GATEWAY_TOKEN_REVIEW_CLUSTER_ROLE is unset; Helm value gateway.tokenReview.enabled): use apiKeys, or ask the cluster admin to enable it";

/// The endpoint's NetworkPolicy, when `spec.access.networkPolicy` asks for one: ingress to the
/// gateway port only from the namespaces of the declared ServiceAccounts (a namespace, not an
/// account: NetworkPolicy cannot tell pods apart by account; the token check does) and from
/// `networkPolicy.from`. With no source at all it admits nothing (an empty `from` would admit
/// everyone).
pub fn network_policy(ep: &GatewayEndpoint) -> Option<NetworkPolicy> {
    let access = ep.spec.access.as_ref()?;
    let declared = access.network_policy.as_ref()?;
    let mut namespaces = std::collections::BTreeSet::new();
    if let Some(sa) = &access.service_accounts {
        namespaces.extend(sa.namespaces.iter().cloned());
        namespaces.extend(
            sa.names
                .iter()
                .filter_map(|n| n.split_once('/').map(|(ns, _)| ns.to_string())),
        );
    }
    let mut from = Vec::new();
    if !namespaces.is_empty() {
        from.push(NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "kubernetes.io/metadata.name".into(),
                    operator: "In".into(),
                    values: Some(namespaces.into_iter().collect()),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    from.extend(declared.from.iter().cloned());
    let ingress = if from.is_empty() {
        vec![]
    } else {
        vec![NetworkPolicyIngressRule {
            from: Some(from),
            ports: Some(vec![NetworkPolicyPort {
                port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                end_port: None,
            }]),
        }]
    };
    Some(NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(render::object_name(ep)),
            namespace: ep.namespace(),
            labels: Some(render::labels(ep)),
            owner_references: Some(vec![render::owner_reference(ep)]),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(render::selector_labels(ep)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            egress: None,
        }),
    })
}

/// Applies the endpoint's NetworkPolicy, or deletes the one it had (its ConfigMap, as cached,
/// still carries [`LABEL_NETWORK_POLICY`]) when no longer declared.
pub async fn ensure_network_policy(ep: &GatewayEndpoint, ctx: &Context) -> Result<(), Error> {
    if let Some(policy) = network_policy(ep) {
        super::apply::ensure(ctx, ep, policy, None).await?;
        return Ok(());
    }
    let ns = ep.namespace().unwrap_or_default();
    let had = ctx
        .stores
        .config_maps
        .get(&ObjectRef::<ConfigMap>::new(&render::object_name(ep)).within(&ns))
        .is_some_and(|cm| cm.labels().contains_key(LABEL_NETWORK_POLICY));
    if had {
        let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
        match api.get_opt(&render::object_name(ep)).await? {
            Some(p) if render::is_owned_by(&p.metadata, ep) => {
                match api
                    .delete(&render::object_name(ep), &DeleteParams::default())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                info!(policy = %format!("{ns}/{}", render::object_name(ep)), "deleted the NetworkPolicy no longer declared");
            }
            _ => {}
        }
    }
    Ok(())
}

/// Makes the cluster hold what the endpoint's callers need: its ServiceAccount and the binding
/// (when it declares ServiceAccount callers), or no binding (when it does not). Ok(false): the
/// endpoint declares ServiceAccount callers and this install cannot serve them ([`NOT_SUPPORTED`]).
pub async fn ensure(ep: &GatewayEndpoint, ctx: &Context) -> Result<bool, Error> {
    ensure_network_policy(ep, ctx).await?;
    let role = ctx.settings.gateway().token_review_cluster_role.clone();
    let Some(sa) = service_account_name(ep) else {
        if role.is_some() {
            delete_binding(ep, ctx).await?;
        }
        return Ok(true);
    };
    let Some(role) = role else {
        return Ok(false);
    };
    super::apply::ensure(ctx, ep, service_account(ep, sa.clone()), None).await?;
    let desired = token_review_binding(ep, &sa, &role);
    let api: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
    let name = binding_name(ep);
    if let Some(existing) = api.get_opt(&name).await? {
        if !is_binding_of(&existing, ep) {
            return Err(Error::NameConflict {
                kind: "ClusterRoleBinding".into(),
                name,
            });
        }
        if existing.role_ref == desired.role_ref && existing.subjects == desired.subjects {
            return Ok(true);
        }
        if existing.role_ref != desired.role_ref {
            // roleRef cannot change: replace the binding.
            api.delete(&name, &DeleteParams::default()).await?;
        }
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&desired),
    )
    .await?;
    info!(binding = %name, service_account = %sa, "bound the token-review role");
    Ok(true)
}

/// Deletes the endpoint's binding, if it has one (finalizer cleanup, or ServiceAccount callers
/// no longer declared).
pub async fn delete_binding(ep: &GatewayEndpoint, ctx: &Context) -> Result<(), Error> {
    let api: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
    let name = binding_name(ep);
    match api.get_opt(&name).await? {
        Some(b) if is_binding_of(&b, ep) => {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            info!(binding = %name, "deleted the token-review binding");
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(access: &str) -> GatewayEndpoint {
        let mut ep: GatewayEndpoint = serde_yaml::from_str(&format!(
            "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {{name: chat, namespace: team-a, uid: u-1}}\nspec:\n  models: [{{name: m, provider: ollama, model: x}}]\n{access}"
        ))
        .unwrap();
        ep.status = None;
        ep
    }

    #[test]
    fn nothing_without_declared_callers() {
        for ep in [endpoint(""), endpoint("  access: {open: true}")] {
            assert_eq!(service_account_name(&ep), None);
            assert!(volumes(&ep).is_empty() && volume_mounts(&ep).is_empty());
            assert!(environment(&ep).is_empty());
        }
    }

    #[test]
    fn api_keys_are_optional_single_item_secret_volumes() {
        let ep =
            endpoint("  access:\n    apiKeys: [{name: ci, secretRef: {name: keys, key: ci-key}}]");
        let v = &volumes(&ep)[0];
        let s = v.secret.as_ref().unwrap();
        assert_eq!(s.secret_name.as_deref(), Some("keys"));
        assert_eq!(s.optional, Some(true));
        assert_eq!(s.items.as_ref().unwrap()[0].key, "ci-key");
        assert_eq!(s.items.as_ref().unwrap()[0].path, KEY_FILE);
        let m = &volume_mounts(&ep)[0];
        assert_eq!(m.mount_path, format!("{CALLER_KEYS_DIR}/ci"));
        assert_eq!(m.name, v.name);
        assert_eq!(environment(&ep)[0].value.as_deref(), Some(CALLER_KEYS_DIR));
        assert_eq!(service_account_name(&ep), None);
    }

    #[test]
    fn the_network_policy_admits_the_declared_namespaces_and_peers_on_the_gateway_port_only() {
        assert!(network_policy(&endpoint("  access: {open: true}")).is_none());
        let ep = endpoint(
            "  access:\n    serviceAccounts: {namespaces: [agents], names: [tools/sum, agents/x]}\n    networkPolicy:\n      from: [{namespaceSelector: {matchLabels: {ingress: \"true\"}}}]",
        );
        let p = network_policy(&ep).unwrap();
        let spec = p.spec.unwrap();
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
        assert_eq!(
            spec.pod_selector.unwrap().match_labels,
            Some(render::selector_labels(&ep))
        );
        let rule = &spec.ingress.unwrap()[0];
        let from = rule.from.as_ref().unwrap();
        let names = from[0]
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_expressions
            .as_ref()
            .unwrap();
        assert_eq!(
            names[0].values,
            Some(vec!["agents".to_string(), "tools".to_string()])
        );
        assert_eq!(
            from[1]
                .namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["ingress"],
            "true"
        );
        assert_eq!(
            rule.ports.as_ref().unwrap()[0].port,
            Some(IntOrString::String("http".into()))
        );
        // No source at all: nothing admitted (never an empty `from`, which admits everyone).
        let none = endpoint(
            "  access:\n    apiKeys: [{name: ci, secretRef: {name: s, key: k}}]\n    networkPolicy: {}",
        );
        assert_eq!(
            network_policy(&none).unwrap().spec.unwrap().ingress,
            Some(vec![])
        );
    }

    #[test]
    fn service_account_callers_get_a_bound_account_of_their_own() {
        let ep = endpoint("  access:\n    serviceAccounts: {namespaces: [team-b]}");
        let sa = service_account_name(&ep).unwrap();
        assert_eq!(sa, "chat-gateway");
        let b = token_review_binding(&ep, &sa, "mgo-gateway-tokenreview");
        assert_eq!(
            b.metadata.name.as_deref(),
            Some("mlflow-gateway-tokenreview:team-a:chat")
        );
        assert_eq!(b.role_ref.name, "mgo-gateway-tokenreview");
        let subject = &b.subjects.as_ref().unwrap()[0];
        assert_eq!(
            (
                subject.kind.as_str(),
                subject.name.as_str(),
                subject.namespace.as_deref()
            ),
            ("ServiceAccount", "chat-gateway", Some("team-a"))
        );
        assert!(is_binding_of(&b, &ep));
        let account = service_account(&ep, sa);
        assert_eq!(account.automount_service_account_token, Some(false));
    }
}
