//! What each `GatewayEndpoint` runs as: a ConfigMap holding the endpoint as the gateway reads it, a
//! Deployment of gateway pods, a Service, and (with the operator-wide trace credential) a mirrored
//! Secret. Pure functions, apart from applying so they are unit-tested on their own:
//! [`super::apply`] decides when to apply them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceFieldSelector, ResourceRequirements, SeccompProfile, Secret,
    SecretKeySelector, SecurityContext, Service, ServicePort, ServiceSpec, SleepAction, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::api::{ExportMode, GatewayEndpoint, GatewayPodSpec};

/// `app.kubernetes.io/managed-by` on every object the operator creates; its watches select on it.
pub const MANAGED_BY: &str = "mlflow-gateway-operator";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// The endpoint an object belongs to (its name; the namespace is the object's own).
pub const LABEL_ENDPOINT: &str = "mlflow-gateway.dev/endpoint";
/// On the pod template: a hash of the endpoint config and of the referenced Secrets' versions, so
/// that a change to either rolls the pods.
pub const ANNOTATION_CONFIG_HASH: &str = "mlflow-gateway.dev/config-hash";
/// On each owned object: a hash of what the operator last applied, to tell its own changes from
/// nothing changed without a write.
pub const ANNOTATION_APPLIED: &str = "mlflow-gateway.dev/applied";
/// The ConfigMap key the endpoint manifest is stored under, and where the pods mount it.
pub const CONFIG_KEY: &str = "endpoint.yaml";
/// Key (and file, beside the config) of the CA bundle the pods trust for the tracking server.
pub const CA_BUNDLE_KEY: &str = "mlflow-ca.crt";
pub const CONFIG_DIR: &str = "/etc/mlflow-gateway";
/// The gateway container's port.
pub const CONTAINER_PORT: i32 = 8080;
/// The Service's port unless `spec.gateway.servicePort` says otherwise.
pub const DEFAULT_SERVICE_PORT: i32 = 8080;
/// Seconds a stopping gateway pod is given (SIGTERM to SIGKILL).
pub const TERMINATION_GRACE_SECONDS: i64 = 30;
/// Keys of a trace-credential Secret.
pub const CREDENTIAL_USERNAME: &str = "username";
pub const CREDENTIAL_PASSWORD: &str = "password";
pub const CREDENTIAL_TOKEN: &str = "token";

/// Operator-wide defaults for the gateway pods.
#[derive(Clone, Debug)]
pub struct GatewayDefaults {
    /// Image of the gateway container (the operator's own image: the same binary).
    pub image: String,
    /// Tracking URI the pods send traces to (may differ from the operator's, e.g. a Service name).
    pub tracking_uri: String,
    /// `MLFLOW_TRACKING_INSECURE_TLS=true` in the pods.
    pub insecure_tls: bool,
    /// A PEM CA bundle the pods trust for the tracking server: put in each endpoint's ConfigMap,
    /// beside the config, with `MLFLOW_TRACKING_SERVER_CERT_PATH` naming it. Public, not secret.
    pub ca_bundle: Option<String>,
    /// Requests and limits of the gateway container.
    pub resources: ResourceRequirements,
    /// The ClusterRole bound to endpoints' ServiceAccounts for TokenReview (see
    /// [`super::callers`]); None: ServiceAccount callers cannot be declared.
    pub token_review_cluster_role: Option<String>,
    /// The export mode of endpoints that name none (None: the gateway's own default).
    pub export_mode: Option<ExportMode>,
}

/// Requests 100m CPU and 64Mi memory; limits 1 CPU and 256Mi.
pub fn default_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q("100m")),
            ("memory".to_string(), q("64Mi")),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_string(), q("1")),
            ("memory".to_string(), q("256Mi")),
        ])),
        ..Default::default()
    }
}

/// The credential the pods write traces with: a Secret in the endpoint's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceCredential {
    /// The tracking server needs none (or tracking is off).
    None,
    /// Keys `username` and `password`.
    Basic { secret: String },
    /// Key `token`.
    Bearer { secret: String },
}

/// What the Deployment needs beyond the endpoint itself.
#[derive(Clone, Debug)]
pub struct PodInputs {
    /// The experiment traces go to; None when `usageTracking` is false.
    pub experiment_id: Option<String>,
    /// The MLflow workspace of the experiment (`MLFLOW_WORKSPACE` in the pods); None for a
    /// server without workspaces, which must never get the header.
    pub workspace: Option<String>,
    pub credential: TraceCredential,
    /// [`config_hash`] of the config and the Secrets the pods read.
    pub config_hash: String,
}

/// The labels every object of the endpoint carries.
pub fn labels(ep: &GatewayEndpoint) -> BTreeMap<String, String> {
    let mut l = selector_labels(ep);
    l.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
    l.insert(LABEL_COMPONENT.into(), "gateway".into());
    l.insert(LABEL_ENDPOINT.into(), ep.name_any());
    l
}

/// The Deployment's selector and the Service's: fixed for the life of the endpoint.
pub fn selector_labels(ep: &GatewayEndpoint) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), "mlflow-gateway".to_string()),
        (LABEL_INSTANCE.to_string(), ep.name_any()),
    ])
}

/// The owner reference that ties an object to its endpoint (garbage-collected with it).
pub fn owner_reference(ep: &GatewayEndpoint) -> OwnerReference {
    OwnerReference {
        api_version: GatewayEndpoint::api_version(&()).into_owned(),
        kind: GatewayEndpoint::kind(&()).into_owned(),
        name: ep.name_any(),
        uid: ep.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// True when `meta` names this endpoint as its controller.
pub fn is_owned_by(meta: &ObjectMeta, ep: &GatewayEndpoint) -> bool {
    let uid = ep.uid();
    meta.owner_references.as_ref().is_some_and(|refs| {
        refs.iter()
            .any(|r| r.controller == Some(true) && Some(&r.uid) == uid.as_ref())
    })
}

fn metadata(ep: &GatewayEndpoint, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: ep.namespace(),
        labels: Some(labels(ep)),
        owner_references: Some(vec![owner_reference(ep)]),
        ..Default::default()
    }
}

/// Name of the ConfigMap, Deployment and Service: the endpoint's own, so the URL reads
/// `http://<endpoint>.<namespace>.svc:<port>`.
pub fn object_name(ep: &GatewayEndpoint) -> String {
    ep.name_any()
}

/// Name of the Secret mirroring the operator-wide trace credential into the endpoint's namespace.
pub fn credential_secret_name(ep: &GatewayEndpoint) -> String {
    format!("{}-mlflow-credentials", ep.name_any())
}

pub fn service_port(ep: &GatewayEndpoint) -> i32 {
    pod_spec(ep)
        .and_then(|g| g.service_port)
        .unwrap_or(DEFAULT_SERVICE_PORT)
}

fn pod_spec(ep: &GatewayEndpoint) -> Option<&GatewayPodSpec> {
    ep.spec.gateway.as_ref()
}

/// The in-cluster URL of the endpoint's Service.
pub fn url(ep: &GatewayEndpoint) -> String {
    format!(
        "http://{}.{}.svc:{}",
        object_name(ep),
        ep.namespace().unwrap_or_default(),
        service_port(ep)
    )
}

/// The endpoint as `gateway --endpoint` reads it: the manifest with its uid and namespace, without
/// status and without what only concerns the pods (replicas, `gateway`), so that scaling does not
/// roll the pods. Nothing in it is secret: API keys are Secret references.
pub fn endpoint_config(ep: &GatewayEndpoint) -> Result<String, serde_yaml::Error> {
    let mut spec = ep.spec.clone();
    spec.replicas = None;
    spec.gateway = None;
    let manifest = json!({
        "apiVersion": GatewayEndpoint::api_version(&()),
        "kind": GatewayEndpoint::kind(&()),
        "metadata": {
            "name": ep.name_any(),
            "namespace": ep.namespace(),
            "uid": ep.uid(),
        },
        "spec": spec,
    });
    serde_yaml::to_string(&manifest)
}

/// The endpoint's ConfigMap: its config and, if the pods are given one, the CA bundle.
pub fn config_map(ep: &GatewayEndpoint, config: &str, ca_bundle: Option<&str>) -> ConfigMap {
    let mut data = BTreeMap::from([(CONFIG_KEY.to_string(), config.to_string())]);
    if let Some(pem) = ca_bundle {
        data.insert(CA_BUNDLE_KEY.to_string(), pem.to_string());
    }
    let mut metadata = metadata(ep, object_name(ep));
    if super::callers::network_policy(ep).is_some() {
        metadata
            .labels
            .get_or_insert_default()
            .insert(super::callers::LABEL_NETWORK_POLICY.into(), "true".into());
    }
    ConfigMap {
        metadata,
        data: Some(data),
        ..Default::default()
    }
}

pub fn service(ep: &GatewayEndpoint) -> Service {
    Service {
        metadata: metadata(ep, object_name(ep)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(ep)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: service_port(ep),
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The mirror of the operator-wide trace credential: the same keys, owned by the endpoint.
pub fn credential_secret(ep: &GatewayEndpoint, source: &Secret) -> Secret {
    let keep = [CREDENTIAL_USERNAME, CREDENTIAL_PASSWORD, CREDENTIAL_TOKEN];
    let data = source.data.as_ref().map(|d| {
        d.iter()
            .filter(|(k, _)| keep.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    });
    Secret {
        metadata: metadata(ep, credential_secret_name(ep)),
        type_: Some("Opaque".into()),
        data,
        ..Default::default()
    }
}

/// Which credential a Secret's keys make, or None if they make none.
pub fn credential_kind(secret_name: &str, keys: &[&str]) -> Option<TraceCredential> {
    let has = |k: &str| keys.contains(&k);
    if has(CREDENTIAL_TOKEN) {
        Some(TraceCredential::Bearer {
            secret: secret_name.into(),
        })
    } else if has(CREDENTIAL_USERNAME) && has(CREDENTIAL_PASSWORD) {
        Some(TraceCredential::Basic {
            secret: secret_name.into(),
        })
    } else {
        None
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The gateway container's environment: API keys from their Secrets, MLflow settings, and the
/// trace credential from its Secret. No value in it is secret.
pub fn environment(
    ep: &GatewayEndpoint,
    defaults: &GatewayDefaults,
    inputs: &PodInputs,
) -> Vec<EnvVar> {
    let mut env = vec![
        plain_env(
            "GATEWAY_ENDPOINT_FILE",
            &format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        ),
        plain_env("GATEWAY_LISTEN", &format!("0.0.0.0:{CONTAINER_PORT}")),
        plain_env("LOG_FORMAT", "json"),
        // The gateway sizes its memory budget from its container's limit (Downward API).
        EnvVar {
            name: "GATEWAY_MEMORY_LIMIT_BYTES".into(),
            value_from: Some(EnvVarSource {
                resource_field_ref: Some(ResourceFieldSelector {
                    container_name: Some("gateway".into()),
                    resource: "limits.memory".into(),
                    divisor: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    for m in ep.spec.all_models() {
        if let Some(r) = &m.api_key_secret_ref {
            env.push(secret_env(&m.api_key_env(), &r.name, &r.key));
        }
    }
    if let Some(experiment_id) = &inputs.experiment_id {
        env.push(plain_env("MLFLOW_TRACKING_URI", &defaults.tracking_uri));
        env.push(plain_env("MLFLOW_EXPERIMENT_ID", experiment_id));
        if let Some(workspace) = &inputs.workspace {
            env.push(plain_env(crate::mlflow::ENV_WORKSPACE, workspace));
        }
        if defaults.insecure_tls {
            env.push(plain_env("MLFLOW_TRACKING_INSECURE_TLS", "true"));
        }
        if defaults.ca_bundle.is_some() {
            env.push(plain_env(
                crate::mlflow::ENV_SERVER_CERT_PATH,
                &format!("{CONFIG_DIR}/{CA_BUNDLE_KEY}"),
            ));
        }
        match &inputs.credential {
            TraceCredential::None => {}
            TraceCredential::Basic { secret } => {
                env.push(secret_env(
                    "MLFLOW_TRACKING_USERNAME",
                    secret,
                    CREDENTIAL_USERNAME,
                ));
                env.push(secret_env(
                    "MLFLOW_TRACKING_PASSWORD",
                    secret,
                    CREDENTIAL_PASSWORD,
                ));
            }
            TraceCredential::Bearer { secret } => {
                env.push(secret_env(
                    "MLFLOW_TRACKING_TOKEN",
                    secret,
                    CREDENTIAL_TOKEN,
                ));
            }
        }
    }
    env.extend(super::trace_queue::environment(
        ep,
        defaults.export_mode,
        inputs.experiment_id.is_some(),
    ));
    env.extend(super::callers::environment(ep));
    env
}

/// How long a gateway pod keeps serving after it is marked for deletion (see the preStop hook).
pub const PRE_STOP_SLEEP_SECONDS: i64 = 5;

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

pub fn deployment(
    ep: &GatewayEndpoint,
    defaults: &GatewayDefaults,
    inputs: &PodInputs,
) -> Deployment {
    let overrides = pod_spec(ep).cloned().unwrap_or_default();
    // User labels first, so that the operator's (which the selector needs) win on a clash.
    let mut pod_labels = overrides.pod_labels.clone();
    pod_labels.extend(labels(ep));
    let mut pod_annotations = overrides.pod_annotations.clone();
    pod_annotations.insert(ANNOTATION_CONFIG_HASH.into(), inputs.config_hash.clone());
    // Traced pods keep undelivered traces on a volume of their own (see `trace_queue`).
    let traced = inputs.experiment_id.is_some();
    let container = Container {
        name: "gateway".into(),
        image: Some(overrides.image.clone().unwrap_or(defaults.image.clone())),
        args: Some(vec!["gateway".into()]),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: CONTAINER_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        env: Some(environment(ep, defaults, inputs)),
        resources: Some(
            overrides
                .resources
                .clone()
                .unwrap_or(defaults.resources.clone()),
        ),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        // A deleted pod leaves the Service's endpoints at once, but kube-proxy on every node
        // applies that a moment later: until then new connections still arrive. The gateway
        // closes its listener on SIGTERM, so the kubelet holds SIGTERM back this long (the
        // sleep action needs no shell, which the image has none of); a rollout then fails no
        // request. Within terminationGracePeriodSeconds, which also covers the drain.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SLEEP_SECONDS,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(
            [
                VolumeMount {
                    name: "config".into(),
                    mount_path: CONFIG_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                },
                VolumeMount {
                    name: "tmp".into(),
                    mount_path: "/tmp".into(),
                    ..Default::default()
                },
            ]
            .into_iter()
            .chain(super::trace_queue::volume_mount(traced))
            .chain(super::callers::volume_mounts(ep))
            .collect(),
        ),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    // The pods hold an API token only when they review callers' tokens (their own account).
    let reviewer = super::callers::service_account_name(ep);
    let pod = PodSpec {
        containers: vec![container],
        automount_service_account_token: Some(reviewer.is_some()),
        service_account_name: reviewer,
        enable_service_links: Some(false),
        // Long enough for a stopping gateway to write its queue to disk and deliver what MLflow
        // takes meanwhile; what is left stays on the volume for the next container.
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        node_selector: (!overrides.node_selector.is_empty()).then_some(overrides.node_selector),
        tolerations: (!overrides.tolerations.is_empty()).then_some(overrides.tolerations),
        affinity: overrides.affinity,
        volumes: Some(
            [
                Volume {
                    name: "config".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: object_name(ep),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "tmp".into(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        size_limit: Some(Quantity("16Mi".into())),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]
            .into_iter()
            .chain(super::trace_queue::volume(ep, traced))
            .chain(super::callers::volumes(ep))
            .collect(),
        ),
        ..Default::default()
    };
    Deployment {
        metadata: metadata(ep, object_name(ep)),
        spec: Some(DeploymentSpec {
            replicas: Some(ep.spec.replicas.unwrap_or(1)),
            selector: LabelSelector {
                match_labels: Some(selector_labels(ep)),
                ..Default::default()
            },
            // One new pod at a time, and no old pod goes before a new one is ready.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            revision_history_limit: Some(3),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
        ctx.update(&(p.len() as u64).to_le_bytes());
        ctx.update(p);
    }
    ctx.finish()
        .as_ref()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the pods read at start that is not in their template: the endpoint config, the CA
/// bundle, and the versions of the Secrets their variables come from (name -> resourceVersion).
pub fn config_hash(
    config: &str,
    ca_bundle: Option<&str>,
    secret_versions: &BTreeMap<String, String>,
) -> String {
    // Without a CA bundle the parts are odd in number, with one even: no two inputs collide, and
    // the hash of an endpoint without one is what it was before CA bundles existed.
    let mut parts: Vec<&[u8]> = vec![config.as_bytes()];
    if let Some(pem) = ca_bundle {
        parts.push(pem.as_bytes());
    }
    for (name, version) in secret_versions {
        parts.push(name.as_bytes());
        parts.push(version.as_bytes());
    }
    sha256_hex(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(extra: &str) -> GatewayEndpoint {
        let mut ep: GatewayEndpoint = serde_yaml::from_str(&format!(
            r#"
apiVersion: mlflow-gateway.dev/v1alpha1
kind: GatewayEndpoint
metadata: {{name: chat, namespace: team-a, uid: 1234-abcd, generation: 3}}
spec:
  models:
    - {{name: mini, provider: openai, model: gpt-4o-mini, apiKeySecretRef: {{name: llm-keys, key: openai}}}}
  fallbacks:
    - {{name: claude-backup, provider: anthropic, model: claude-x, apiKeySecretRef: {{name: other, key: anthropic}}}}
{extra}
"#
        ))
        .unwrap();
        ep.status = None;
        ep
    }

    fn defaults() -> GatewayDefaults {
        GatewayDefaults {
            image: "example.com/mgo:1".into(),
            tracking_uri: "http://mlflow.mlflow.svc:5000".into(),
            insecure_tls: false,
            ca_bundle: None,
            resources: default_resources(),
            token_review_cluster_role: None,
            export_mode: None,
        }
    }

    fn inputs(credential: TraceCredential) -> PodInputs {
        PodInputs {
            experiment_id: Some("42".into()),
            workspace: None,
            credential,
            config_hash: "h1".into(),
        }
    }

    fn env_map(d: &Deployment) -> BTreeMap<String, EnvVar> {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect()
    }

    #[test]
    fn config_is_the_manifest_with_uid_and_without_pod_settings() {
        let ep = endpoint("  replicas: 3\n  gateway: {image: x/y:z}\n");
        let config = endpoint_config(&ep).unwrap();
        let back: GatewayEndpoint = serde_yaml::from_str(&config).unwrap();
        assert_eq!(back.uid().as_deref(), Some("1234-abcd"));
        assert_eq!(back.namespace().as_deref(), Some("team-a"));
        assert_eq!(back.spec.replicas, None);
        assert_eq!(back.spec.gateway, None);
        assert_eq!(back.spec.models, ep.spec.models);
        assert!(!config.contains("status"));
        // Scaling changes nothing the pods read.
        let scaled = endpoint("  replicas: 5\n");
        assert_eq!(endpoint_config(&scaled).unwrap(), config);
    }

    #[test]
    fn api_keys_come_from_secret_references_and_the_credential_by_kind() {
        let ep = endpoint("");
        let d = deployment(
            &ep,
            &defaults(),
            &inputs(TraceCredential::Basic {
                secret: "creds".into(),
            }),
        );
        let env = env_map(&d);
        let key = env["GATEWAY_API_KEY_MINI"].value_from.as_ref().unwrap();
        let key = key.secret_key_ref.as_ref().unwrap();
        assert_eq!(
            (key.name.as_str(), key.key.as_str()),
            ("llm-keys", "openai")
        );
        assert!(env.contains_key("GATEWAY_API_KEY_CLAUDE_BACKUP"));
        let limit = env["GATEWAY_MEMORY_LIMIT_BYTES"]
            .value_from
            .as_ref()
            .unwrap();
        let limit = limit.resource_field_ref.as_ref().unwrap();
        assert_eq!(
            (limit.container_name.as_deref(), limit.resource.as_str()),
            (Some("gateway"), "limits.memory")
        );
        assert_eq!(env["MLFLOW_EXPERIMENT_ID"].value.as_deref(), Some("42"));
        assert_eq!(
            env["MLFLOW_TRACKING_URI"].value.as_deref(),
            Some("http://mlflow.mlflow.svc:5000")
        );
        assert!(env["MLFLOW_TRACKING_PASSWORD"].value.is_none());
        assert!(!env.contains_key("MLFLOW_TRACKING_TOKEN"));
        for e in env.values() {
            assert!(
                e.value.is_none() || !e.name.contains("KEY") && !e.name.contains("PASSWORD"),
                "{} has a literal value",
                e.name
            );
        }
        let bearer = deployment(
            &ep,
            &defaults(),
            &inputs(TraceCredential::Bearer {
                secret: "creds".into(),
            }),
        );
        assert!(env_map(&bearer).contains_key("MLFLOW_TRACKING_TOKEN"));
    }

    #[test]
    fn the_workspace_reaches_the_pods_only_when_there_is_one() {
        let ep = endpoint("");
        let env = env_map(&deployment(
            &ep,
            &defaults(),
            &inputs(TraceCredential::None),
        ));
        assert!(!env.contains_key("MLFLOW_WORKSPACE"));
        let mut i = inputs(TraceCredential::None);
        i.workspace = Some("team-a".into());
        let env = env_map(&deployment(&ep, &defaults(), &i));
        assert_eq!(env["MLFLOW_WORKSPACE"].value.as_deref(), Some("team-a"));
    }

    #[test]
    fn traced_pods_queue_traces_on_an_emptydir_and_get_time_to_flush_it() {
        let ep = endpoint("  tracing: {queueSize: 64Mi, exportMode: SpansOnly}\n");
        let d = deployment(&ep, &defaults(), &inputs(TraceCredential::None));
        let env = env_map(&d);
        let value = |k: &str| env[k].value.clone().unwrap();
        assert_eq!(
            value("GATEWAY_TRACE_QUEUE_DIR"),
            "/var/lib/mlflow-gateway/trace-queue"
        );
        assert_eq!(value("GATEWAY_TRACE_QUEUE_MAX_BYTES"), "67108864");
        assert_eq!(value("GATEWAY_TRACE_EXPORT_MODE"), "spans-only");
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.termination_grace_period_seconds, Some(30));
        let volume = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "trace-queue")
            .unwrap();
        assert_eq!(
            volume.empty_dir.unwrap().size_limit,
            Some(Quantity("80Mi".into()))
        );
        let mount = pod.containers[0]
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .find(|m| m.name == "trace-queue")
            .unwrap();
        assert_eq!(mount.mount_path, "/var/lib/mlflow-gateway/trace-queue");
        assert_ne!(mount.read_only, Some(true));
        // Without tracking there is nothing to queue: no volume, no variable.
        let off = endpoint("  usageTracking: false\n");
        let mut i = inputs(TraceCredential::None);
        i.experiment_id = None;
        let d = deployment(&off, &defaults(), &i);
        assert!(!env_map(&d).keys().any(|k| k.starts_with("GATEWAY_TRACE_")));
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert!(!pod.volumes.unwrap().iter().any(|v| v.name == "trace-queue"));
    }

    #[test]
    fn tracking_off_sets_no_mlflow_variables() {
        let ep = endpoint("  usageTracking: false\n");
        let mut i = inputs(TraceCredential::None);
        i.experiment_id = None;
        let env = env_map(&deployment(&ep, &defaults(), &i));
        assert!(!env.keys().any(|k| k.starts_with("MLFLOW_")));
    }

    #[test]
    fn pods_are_hardened_and_overrides_apply() {
        let ep = endpoint(
            r#"  replicas: 2
  gateway:
    image: registry.example.com/gw:2
    resources: {requests: {cpu: 250m}}
    nodeSelector: {pool: llm}
    tolerations: [{key: dedicated, operator: Equal, value: llm, effect: NoSchedule}]
    podLabels: {team: a, app.kubernetes.io/instance: hijack}
    podAnnotations: {note: x}
    servicePort: 80
"#,
        );
        let d = deployment(&ep, &defaults(), &inputs(TraceCredential::None));
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.example.com/gw:2"));
        assert_eq!(
            c.resources.as_ref().unwrap().requests.as_ref().unwrap()["cpu"].0,
            "250m"
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some());
        let pre_stop = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
        assert_eq!(pre_stop.sleep.as_ref().unwrap().seconds, 5);
        assert!(pre_stop.exec.is_none(), "the image has no shell");
        assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "llm");
        assert_eq!(pod.tolerations.as_ref().unwrap().len(), 1);
        let meta = spec.template.metadata.as_ref().unwrap();
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "a");
        assert_eq!(labels[LABEL_INSTANCE], "chat");
        let annotations = meta.annotations.as_ref().unwrap();
        assert_eq!(annotations["note"], "x");
        assert_eq!(annotations[ANNOTATION_CONFIG_HASH], "h1");
        assert_eq!(url(&ep), "http://chat.team-a.svc:80");
        assert_eq!(service(&ep).spec.unwrap().ports.unwrap()[0].port, 80);
        // Defaults when nothing is overridden.
        let plain = deployment(&endpoint(""), &defaults(), &inputs(TraceCredential::None));
        let c = &plain.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(c.image.as_deref(), Some("example.com/mgo:1"));
        assert_eq!(c.resources, Some(default_resources()));
    }

    #[test]
    fn every_object_is_owned_by_the_endpoint() {
        let ep = endpoint("");
        let d = deployment(&ep, &defaults(), &inputs(TraceCredential::None));
        let cm = config_map(&ep, "x", None);
        let svc = service(&ep);
        for meta in [&d.metadata, &cm.metadata, &svc.metadata] {
            assert!(is_owned_by(meta, &ep));
            assert_eq!(meta.labels.as_ref().unwrap()[LABEL_MANAGED_BY], MANAGED_BY);
        }
        let r = owner_reference(&ep);
        assert_eq!(r.kind, "GatewayEndpoint");
        assert_eq!(r.api_version, "mlflow-gateway.dev/v1alpha1");
        assert_eq!(r.block_owner_deletion, Some(true));
    }

    #[test]
    fn config_hash_changes_with_config_and_secret_versions_only() {
        let v1 = BTreeMap::from([("llm-keys".to_string(), "100".to_string())]);
        let v2 = BTreeMap::from([("llm-keys".to_string(), "101".to_string())]);
        assert_eq!(config_hash("a", None, &v1), config_hash("a", None, &v1));
        assert_ne!(config_hash("a", None, &v1), config_hash("a", None, &v2));
        assert_ne!(config_hash("a", None, &v1), config_hash("b", None, &v1));
        assert_ne!(
            config_hash("a", Some("CA1"), &v1),
            config_hash("a", Some("CA2"), &v1)
        );
        assert_ne!(config_hash("a", None, &v1), config_hash("a", Some(""), &v1));
    }

    #[test]
    fn a_ca_bundle_goes_beside_the_config_and_the_pods_are_told_where() {
        let ep = endpoint("");
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let cm = config_map(&ep, "x", Some(pem));
        assert_eq!(cm.data.as_ref().unwrap()[CA_BUNDLE_KEY], pem);
        let mut with_ca = defaults();
        with_ca.ca_bundle = Some(pem.to_string());
        let cert_path = |defaults: &GatewayDefaults, experiment: Option<&str>| {
            let mut i = inputs(TraceCredential::None);
            i.experiment_id = experiment.map(str::to_string);
            environment(&ep, defaults, &i)
                .into_iter()
                .find(|e| e.name == "MLFLOW_TRACKING_SERVER_CERT_PATH")
                .and_then(|e| e.value)
        };
        assert_eq!(
            cert_path(&with_ca, Some("7")).as_deref(),
            Some("/etc/mlflow-gateway/mlflow-ca.crt")
        );
        assert_eq!(cert_path(&defaults(), Some("7")), None);
        // No tracking: no MLflow variable at all.
        assert_eq!(cert_path(&with_ca, None), None);
        assert!(
            !config_map(&ep, "x", None)
                .data
                .unwrap()
                .contains_key(CA_BUNDLE_KEY)
        );
    }

    #[test]
    fn credential_kind_needs_a_token_or_both_basic_keys() {
        assert_eq!(
            credential_kind("s", &["token"]),
            Some(TraceCredential::Bearer { secret: "s".into() })
        );
        assert_eq!(
            credential_kind("s", &["username", "password"]),
            Some(TraceCredential::Basic { secret: "s".into() })
        );
        assert_eq!(credential_kind("s", &["username"]), None);
    }

    #[test]
    fn mirrored_credential_keeps_only_credential_keys() {
        use k8s_openapi::ByteString;
        let source = Secret {
            data: Some(BTreeMap::from([
                ("token".to_string(), ByteString(b"t".to_vec())),
                ("admin-password".to_string(), ByteString(b"x".to_vec())),
            ])),
            ..Default::default()
        };
        let ep = endpoint("");
        let s = credential_secret(&ep, &source);
        let data = s.data.unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), vec!["token"]);
        assert_eq!(s.metadata.name.as_deref(), Some("chat-mlflow-credentials"));
    }
}
