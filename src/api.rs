//! The `GatewayEndpoint` custom resource: `gatewayendpoints.mlflow-gateway.dev/v1alpha1`.
//!
//! Everything that can be checked without I/O is in the schema (types, bounds, patterns) or in a
//! CEL rule, so a bad manifest is rejected at `kubectl apply` with a message that says what to fix.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// An endpoint's name names its Service: a DNS-1035 label (also what every derived name needs).
pub const NAME_PATTERN: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";
pub const MAX_NAME: usize = 63;

pub const GROUP: &str = "mlflow-gateway.dev";
pub const VERSION: &str = "v1alpha1";

/// Declares an LLM gateway endpoint: the models it routes to, and its MLflow experiment, into which
/// every invocation is traced.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mlflow-gateway.dev",
    version = "v1alpha1",
    kind = "GatewayEndpoint",
    plural = "gatewayendpoints",
    shortname = "gwe",
    category = "mlflow",
    doc = "A traced LLM gateway endpoint: its models and routing, and the MLflow experiment every invocation is traced into.",
    namespaced,
    validation = Rule::new(format!("self.metadata.name.matches(r'{NAME_PATTERN}') && size(self.metadata.name) <= {MAX_NAME}"))
        .message("metadata.name must be at most 63 characters of lower-case letters, digits and '-', starting with a letter and not ending with '-' (a DNS-1035 label): it names the endpoint's Service, ConfigMap and Deployment"),
    status = "GatewayEndpointStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Experiment","type":"string","jsonPath":".status.experimentId"}"#,
    printcolumn = r#"{"name":"Experiment Name","type":"string","jsonPath":".status.experimentName","priority":1}"#,
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.url"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.readyReplicas","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("!has(self.experimentId) || !has(self.experimentName)")
        .message("set either experimentId (use an existing experiment) or experimentName (name of the experiment the operator manages), not both"),
    validation = Rule::new("!has(self.experimentId) || self.usageTracking")
        .message("experimentId is set but usageTracking is false: remove experimentId, or set usageTracking: true"),
    validation = Rule::new("self.models.exists(m, !has(m.weight) || m.weight > 0)")
        .message("at least one model needs a weight above 0: weights split traffic between models, and all of them are 0"),
    validation = Rule::new("!has(self.fallbacks) || self.fallbacks.all(f, !has(f.weight))")
        .message("weight applies to models only: fallbacks are tried in their listed order, remove weight from each fallback"),
    validation = Rule::new("self.models.all(m, self.models.filter(x, x.name.upperAscii().replace('-', '_').replace('.', '_') == m.name.upperAscii().replace('-', '_').replace('.', '_')).size() == 1) && (!has(self.fallbacks) || self.fallbacks.all(f, self.fallbacks.filter(x, x.name.upperAscii().replace('-', '_').replace('.', '_') == f.name.upperAscii().replace('-', '_').replace('.', '_')).size() == 1 && !self.models.exists(m, m.name.upperAscii().replace('-', '_').replace('.', '_') == f.name.upperAscii().replace('-', '_').replace('.', '_'))))")
        .message("model names must be unique across models and fallbacks (compared ignoring case, with '-' and '.' the same as '_', because each name becomes the variable GATEWAY_API_KEY_<NAME>)"),
    validation = Rule::new("!has(self.endpointType) || self.endpointType != 'llm/v1/embeddings' || (self.models.all(m, m.provider != 'anthropic') && (!has(self.fallbacks) || self.fallbacks.all(f, f.provider != 'anthropic')))")
        .message("endpointType llm/v1/embeddings needs models with an embeddings API: provider anthropic has none")
)]
#[serde(rename_all = "camelCase")]
pub struct GatewayEndpointSpec {
    /// The API this endpoint serves: llm/v1/chat (default), llm/v1/completions or llm/v1/embeddings.
    #[serde(default)]
    pub endpoint_type: EndpointType,

    /// The primary models. Each request goes to one of them, chosen at random in proportion to
    /// `weight` (a traffic split). At least one.
    #[schemars(length(min = 1, max = 16))]
    pub models: Vec<Model>,

    /// Models tried in this order after the chosen primary model fails (connection error,
    /// timeout, HTTP 429 or 5xx), up to `fallback.maxAttempts` attempts in all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub fallbacks: Vec<Model>,

    /// How fallbacks are tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackPolicy>,

    /// Trace every invocation into the endpoint's MLflow experiment (default true, as in MLflow).
    /// false: the operator creates no experiment and the gateway exports no traces.
    #[serde(default = "default_true")]
    pub usage_tracking: bool,

    /// Use this existing MLflow experiment (its id). The operator checks that it exists and is
    /// active, and never modifies or deletes it. Without it, the operator manages an experiment of
    /// its own, named by `experimentName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub experiment_id: Option<String>,

    /// Name of the experiment the operator creates or adopts (default `gateway/<namespace>/<name>`).
    /// Changing it renames the experiment; its traces stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub experiment_name: Option<String>,

    /// What happens to the operator's experiment when this resource is deleted: Retain (default)
    /// keeps it; Delete soft-deletes it in MLflow (only an experiment the operator created or
    /// adopted, never one given by `experimentId`).
    #[serde(default)]
    pub experiment_deletion_policy: ExperimentDeletionPolicy,

    /// What the traces contain, and how they reach MLflow.
    #[serde(default)]
    pub tracing: TracingSpec,

    /// Number of gateway pods (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: Option<i32>,

    /// How the gateway pods run: image, resources, scheduling, extra labels and annotations.
    /// Everything is optional; the operator's defaults apply to what is left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayPodSpec>,

    /// Who may call the endpoint: Kubernetes ServiceAccounts (projected token as Bearer), named
    /// API keys from Secrets, or anyone (`open: true`). Without it the endpoint refuses every
    /// call (403): callers are declared, never assumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessSpec>,
}

/// Who may call the endpoint. A request passes when it carries a valid credential of any kind
/// declared here.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new("!self.open || (!has(self.serviceAccounts) && (!has(self.apiKeys) || size(self.apiKeys) == 0))")
        .message("open: true admits anyone: remove serviceAccounts and apiKeys, or set open: false"),
    validation = Rule::new("!has(self.apiKeys) || self.apiKeys.all(k, self.apiKeys.filter(x, x.name == k.name).size() == 1)")
        .message("apiKeys names must be unique: each names a caller in traces and metrics"),
    validation = Rule::new("!has(self.networkPolicy) || has(self.serviceAccounts) || (has(self.networkPolicy.from) && size(self.networkPolicy.from) > 0)")
        .message("networkPolicy admits the namespaces of serviceAccounts and the peers of networkPolicy.from: declare at least one, or no one could reach the gateway")
)]
#[serde(rename_all = "camelCase")]
pub struct AccessSpec {
    /// Admit every request without a credential (as before `access` existed). Only alone.
    #[serde(default)]
    pub open: bool,

    /// Kubernetes ServiceAccounts that may call, with a projected token as `Authorization: Bearer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<ServiceAccountAccess>,

    /// Named API keys for callers outside the cluster, as `Authorization: Bearer <key>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub api_keys: Vec<ApiKeyAccess>,

    /// A NetworkPolicy for the gateway pods, from the same declaration: ingress to the gateway
    /// port only from the namespaces of `serviceAccounts` and from `networkPolicy.from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicyAccess>,
}

/// The endpoint's NetworkPolicy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyAccess {
    /// Further sources, as NetworkPolicy peers: e.g. the ingress controller's namespace, through
    /// which API-key callers from outside the cluster arrive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub from: Vec<NetworkPolicyPeer>,
}

/// ServiceAccounts admitted by namespace and/or by name.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new("(has(self.namespaces) && size(self.namespaces) > 0) || (has(self.names) && size(self.names) > 0)")
        .message("serviceAccounts needs namespaces (every ServiceAccount there) or names (<namespace>/<name>), or both")
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountAccess {
    /// The audience callers' tokens must be issued for (default
    /// `mlflow-gateway.dev/<namespace>/<name>` of this endpoint), so that a token for this
    /// endpoint is good nowhere else, and the pod's own API token is refused here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub audience: Option<String>,
    /// Every ServiceAccount of these namespaces may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(
            length(min = 1, max = 63),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
        )
    )]
    pub namespaces: Vec<String>,
    /// These ServiceAccounts may call: `<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(
            length(min = 3, max = 317),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")
        )
    )]
    pub names: Vec<String>,
}

impl ServiceAccountAccess {
    /// The audience tokens must carry, with the default for the endpoint `<namespace>/<name>`.
    pub fn audience_for(&self, namespace: &str, name: &str) -> String {
        self.audience
            .clone()
            .unwrap_or_else(|| format!("{GROUP}/{namespace}/{name}"))
    }
}

/// One named API key: its name identifies the caller (traces, metrics); its value lives in a
/// Secret of the endpoint's namespace, mounted into the pods and re-read, so a changed or
/// removed key takes effect without a restart.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyAccess {
    /// The caller's name (`apikey:<name>` in traces and metrics).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The Secret and key holding the caller's key. Several keys, one per line, are all valid
    /// (to rotate: add the new key, move the caller, remove the old one).
    pub secret_ref: SecretKeyRef,
}

/// Overrides for the endpoint's gateway pods and Service.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPodSpec {
    /// Container image of the gateway (default: the operator's gateway image, the same binary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// CPU and memory requests and limits of the gateway container (default: the operator's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Schedule the pods on nodes with these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Extra labels on the pods (the operator's own labels win on a clash).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
    /// Extra annotations on the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    /// Port of the endpoint's Service (default 8080).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub service_port: Option<i32>,
}

fn default_true() -> bool {
    true
}

/// The API an endpoint serves, in MLflow's names.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum EndpointType {
    /// Chat completions (`/v1/chat/completions`).
    #[default]
    #[serde(rename = "llm/v1/chat")]
    Chat,
    /// Text completions (`/v1/completions`).
    #[serde(rename = "llm/v1/completions")]
    Completions,
    /// Embeddings (`/v1/embeddings`).
    #[serde(rename = "llm/v1/embeddings")]
    Embeddings,
}

impl EndpointType {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointType::Chat => "llm/v1/chat",
            EndpointType::Completions => "llm/v1/completions",
            EndpointType::Embeddings => "llm/v1/embeddings",
        }
    }
}

/// One model an endpoint can send a request to.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.provider != 'azure' || (has(self.apiBase) && has(self.deployment))")
        .message("provider azure needs apiBase (https://<resource>.openai.azure.com) and deployment (the Azure deployment name)"),
    validation = Rule::new("self.provider == 'ollama' || has(self.apiKeySecretRef)")
        .message("apiKeySecretRef is required: name the Secret and key holding this provider's API key"),
    validation = Rule::new("self.provider == 'azure' || !has(self.deployment)")
        .message("deployment applies to provider azure only")
)]
#[serde(rename_all = "camelCase")]
pub struct Model {
    /// Name of this model inside the endpoint, unique across models and fallbacks. It names the
    /// API-key variable of the gateway pods: GATEWAY_API_KEY_<NAME>.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?$")
    )]
    pub name: String,

    /// The provider's API the gateway speaks to this model. Use openai with apiBase for other
    /// OpenAI-compatible servers (vLLM, LocalAI, ...).
    pub provider: Provider,

    /// The provider's model name, e.g. gpt-4o-mini or claude-sonnet-4-5.
    #[schemars(length(min = 1, max = 256))]
    pub model: String,

    /// Share of the traffic this model gets among `models` (relative to the others' weights;
    /// default 1). 0 takes the model out of rotation. Not allowed on fallbacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000000))]
    pub weight: Option<i32>,

    /// The Secret (in the endpoint's namespace) and key holding the provider's API key. The key
    /// reaches the gateway pods as an environment variable, never through a ConfigMap or a trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,

    /// Base URL of the provider's API, for a proxy, a self-hosted server or Azure
    /// (default: the provider's public API): http(s)://HOST[:PORT][/PATH][?QUERY], without
    /// credentials or fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(
        validation = api_base_rule(0),
        validation = api_base_rule(1),
        validation = api_base_rule(2),
        validation = api_base_rule(3),
        validation = api_base_rule(4)
    )]
    pub api_base: Option<String>,

    /// Azure OpenAI: the API version (default 2024-10-21).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub api_version: Option<String>,

    /// Azure OpenAI: the deployment name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub deployment: Option<String>,
}

/// The `i`th CEL rule of [`crate::api_base::cel_rules`] (the grammar the gateway checks too).
fn api_base_rule(i: usize) -> kube::core::Rule {
    let rules = crate::api_base::cel_rules();
    match rules.get(i) {
        Some((rule, message)) => kube::core::Rule::new(rule.clone()).message(*message),
        None => kube::core::Rule::new("true"),
    }
}

impl Model {
    /// The traffic weight, with the default applied.
    pub fn weight(&self) -> u32 {
        self.weight.map_or(1, |w| w.max(0) as u32)
    }

    /// `GATEWAY_API_KEY_<NAME>`: the variable the gateway reads this model's key from.
    pub fn api_key_env(&self) -> String {
        api_key_env(&self.name)
    }
}

/// `GATEWAY_API_KEY_<NAME>`, NAME upper-cased with every non-alphanumeric character as `_`.
pub fn api_key_env(model_name: &str) -> String {
    let name: String = model_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("GATEWAY_API_KEY_{name}")
}

/// LLM providers, in MLflow's names.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Openai,
    Azure,
    Anthropic,
    Gemini,
    Mistral,
    Groq,
    Deepseek,
    Xai,
    Openrouter,
    Togetherai,
    Ollama,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Azure => "azure",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
            Provider::Mistral => "mistral",
            Provider::Groq => "groq",
            Provider::Deepseek => "deepseek",
            Provider::Xai => "xai",
            Provider::Openrouter => "openrouter",
            Provider::Togetherai => "togetherai",
            Provider::Ollama => "ollama",
        }
    }
}

/// A key of a Secret in the endpoint's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// How fallbacks are tried.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FallbackPolicy {
    /// Attempts per request in all, the first included (default: one per model and fallback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32))]
    pub max_attempts: Option<i32>,
}

/// What happens to the operator's experiment when the resource is deleted.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum ExperimentDeletionPolicy {
    /// Keep the experiment and its traces.
    #[default]
    Retain,
    /// Soft-delete the experiment in MLflow (MLflow can restore it).
    Delete,
}

/// What the traces contain, and how they reach MLflow.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TracingSpec {
    /// Record prompts and responses in traces (default true). false: they never leave the pod;
    /// traces keep timings, token counts, models and status.
    #[serde(default = "default_true")]
    pub capture_content: bool,

    /// A Secret in the endpoint's namespace holding the MLflow credential the gateway pods write
    /// traces with: keys `username` and `password` (Basic), or `token` (Bearer). Without it, the
    /// pods use the operator-wide gateway credential, if the operator has one, or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,

    /// How much each gateway pod keeps of the traces MLflow has not stored yet (slow, failing or
    /// down), on disk in an emptyDir: a size in bytes such as 256Mi (default) or 1Gi, from 1Mi
    /// to 1Ti. Traces wait there and are delivered oldest first; only beyond it are new traces
    /// dropped (whole, counted). The pods' emptyDir is given this plus 16Mi.
    #[serde(default = "default_queue_size")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(
        validation = Rule::new(format!("self.matches(r'{QUEUE_SIZE_PATTERN}')"))
            .message("queueSize must be a size in bytes: a whole or decimal number with an optional suffix Ki, Mi, Gi, Ti (powers of 1024) or k, M, G, T (powers of 1000), such as 256Mi or 1Gi"),
        validation = Rule::new(format!("!self.matches(r'{QUEUE_SIZE_PATTERN}') || (quantity(self).compareTo(quantity('{MIN_QUEUE_SIZE}')) >= 0 && quantity(self).compareTo(quantity('{MAX_QUEUE_SIZE}')) <= 0)"))
            .message("queueSize must be from 1Mi to 1Ti")
    )]
    pub queue_size: String,

    /// How the pods send traces to MLflow (see [`ExportMode`]; the CRD shows the type's text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_mode: Option<ExportMode>,
}

/// The grammar of `spec.tracing.queueSize`: a Kubernetes quantity of bytes, in the forms people
/// write (no exponent, no milli), so that the CRD's rule and [`quantity_bytes`] agree.
pub const QUEUE_SIZE_PATTERN: &str = "^[0-9]{1,13}([.][0-9]{1,9})?(Ki|Mi|Gi|Ti|k|M|G|T)?$";
pub const DEFAULT_QUEUE_SIZE: &str = "256Mi";
const MIN_QUEUE_SIZE: &str = "1Mi";
const MAX_QUEUE_SIZE: &str = "1Ti";

fn default_queue_size() -> String {
    DEFAULT_QUEUE_SIZE.to_string()
}

/// Bytes of a quantity of the [`QUEUE_SIZE_PATTERN`] grammar (a fraction of a byte rounds up);
/// None for any other form.
pub fn quantity_bytes(q: &str) -> Option<u64> {
    const UNITS: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (number, factor) = UNITS
        .iter()
        .find_map(|(suffix, f)| q.strip_suffix(suffix).map(|n| (n, *f)))
        .unwrap_or((q, 1));
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str, max: usize| s.len() <= max && s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole, 13) || !digits(fraction, 9) || number.ends_with('.') {
        return None;
    }
    let whole: u64 = whole.parse().ok()?;
    let mut bytes = whole.checked_mul(factor)?;
    if !fraction.is_empty() {
        let scale = 10u128.pow(fraction.len() as u32);
        let part = u128::from(fraction.parse::<u64>().ok()?) * u128::from(factor);
        bytes = bytes.checked_add(u64::try_from(part.div_ceil(scale)).ok()?)?;
    }
    Some(bytes)
}

/// How the pods send traces to MLflow: InfoThenSpans (one trace-info request per trace, then the
/// spans in batches; the gateway metadata as trace metadata), SpansOnly (the spans in batches
/// only; the gateway metadata as trace tags), or Adaptive (InfoThenSpans while MLflow keeps up,
/// SpansOnly for a backlog). Default: the operator's setting (GATEWAY_TRACE_EXPORT_MODE), else
/// the gateway's own default.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum ExportMode {
    /// One trace-info request (StartTraceV3) per trace with the gateway metadata, then the spans
    /// in batches.
    InfoThenSpans,
    /// The spans in batches only; the gateway metadata rides as trace tags.
    SpansOnly,
    /// InfoThenSpans while MLflow keeps up, SpansOnly for the backlog when it falls behind.
    Adaptive,
}

impl ExportMode {
    /// The value of `GATEWAY_TRACE_EXPORT_MODE`.
    pub fn env_value(self) -> &'static str {
        match self {
            ExportMode::InfoThenSpans => "info-then-spans",
            ExportMode::SpansOnly => "spans-only",
            ExportMode::Adaptive => "adaptive",
        }
    }

    /// From the variable's value (or the CRD's spelling).
    pub fn from_env_value(s: &str) -> Option<ExportMode> {
        [
            ExportMode::InfoThenSpans,
            ExportMode::SpansOnly,
            ExportMode::Adaptive,
        ]
        .into_iter()
        .find(|m| {
            s == m.env_value() || serde_json::to_value(m).is_ok_and(|v| v.as_str() == Some(s))
        })
    }
}

/// A Secret in the endpoint's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

impl Default for TracingSpec {
    fn default() -> Self {
        TracingSpec {
            capture_content: true,
            credentials_secret_ref: None,
            queue_size: default_queue_size(),
            export_mode: None,
        }
    }
}

/// What the operator observed and did.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayEndpointStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The MLflow experiment the endpoint traces into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment_id: Option<String>,
    /// That experiment's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment_name: Option<String>,
    /// Where to see the endpoint's traces in the MLflow UI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment_url: Option<String>,
    /// In-cluster URL of the endpoint's gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Gateway pods that exist (from the Deployment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Gateway pods that are ready to serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Conditions: Ready (the summary), ExperimentReady, SecretsReady, Available, Progressing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl GatewayEndpointStatus {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

impl GatewayEndpointSpec {
    /// Every model the endpoint can call: the primary pool, then the fallbacks in order.
    pub fn all_models(&self) -> impl Iterator<Item = &Model> {
        self.models.iter().chain(self.fallbacks.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn api_key_variable_upper_cases_and_replaces_non_alphanumerics() {
        assert_eq!(
            api_key_env("gpt-4o.mini_x"),
            "GATEWAY_API_KEY_GPT_4O_MINI_X"
        );
    }

    #[test]
    fn defaults_apply_when_fields_are_omitted() {
        let spec: GatewayEndpointSpec = serde_json::from_value(serde_json::json!({
            "models": [{"name": "a", "provider": "openai", "model": "gpt-4o-mini",
                        "apiKeySecretRef": {"name": "s", "key": "k"}}]
        }))
        .unwrap();
        assert!(spec.usage_tracking);
        assert!(spec.tracing.capture_content);
        assert_eq!(spec.tracing.queue_size, "256Mi");
        assert_eq!(spec.tracing.export_mode, None);
        assert_eq!(spec.endpoint_type, EndpointType::Chat);
        assert_eq!(
            spec.experiment_deletion_policy,
            ExperimentDeletionPolicy::Retain
        );
        assert_eq!(spec.models[0].weight(), 1);
    }

    #[test]
    fn queue_sizes_are_bytes_in_the_forms_the_crd_admits() {
        let pattern = regex::Regex::new(QUEUE_SIZE_PATTERN).unwrap();
        for (q, bytes) in [
            ("256Mi", 256 << 20),
            ("1Gi", 1 << 30),
            ("1Ti", 1 << 40),
            ("500M", 500_000_000),
            ("2k", 2_000),
            ("1048576", 1_048_576),
            ("1.5Gi", 3 << 29),
            ("0.5Ki", 512),
            // A fraction of a byte rounds up.
            ("1.0000001k", 1_001),
        ] {
            assert!(pattern.is_match(q), "{q}");
            assert_eq!(quantity_bytes(q), Some(bytes), "{q}");
        }
        for q in [
            "", "Mi", "1.Mi", ".5Mi", "1e9", "100m", "-1Mi", "1 Mi", "1mi", "1Pi",
        ] {
            assert!(!pattern.is_match(q), "{q}");
            assert_eq!(quantity_bytes(q), None, "{q}");
        }
        assert_eq!(
            quantity_bytes(DEFAULT_QUEUE_SIZE),
            Some(268_435_456),
            "the gateway's own default"
        );
    }

    #[test]
    fn export_modes_read_as_the_gateway_variable_or_the_crd_names() {
        for (env, mode) in [
            ("info-then-spans", ExportMode::InfoThenSpans),
            ("spans-only", ExportMode::SpansOnly),
            ("adaptive", ExportMode::Adaptive),
        ] {
            assert_eq!(mode.env_value(), env);
            assert_eq!(ExportMode::from_env_value(env), Some(mode));
        }
        assert_eq!(
            ExportMode::from_env_value("SpansOnly"),
            Some(ExportMode::SpansOnly)
        );
        assert_eq!(ExportMode::from_env_value("spans_only"), None);
    }

    #[test]
    fn crd_carries_cel_rules_and_printer_columns() {
        let crd = serde_json::to_string(&GatewayEndpoint::crd()).unwrap();
        assert!(crd.contains("x-kubernetes-validations"));
        assert!(crd.contains("GATEWAY_API_KEY_<NAME>"));
        assert!(crd.contains(r#""name":"Experiment""#));
        assert!(crd.contains(r#""shortNames":["gwe"]"#));
    }
}
