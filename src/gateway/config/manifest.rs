//! The one translation from Kubernetes to the gateway: a `GatewayEndpoint` manifest (the same
//! YAML a user applies, read from the pods' ConfigMap), API keys from `GATEWAY_API_KEY_<NAME>` and
//! MLflow settings from MLflow's own variables become a [`GatewayConfig`].
//!
//! It repeats the checks the API server makes at admission, for manifests that never went through
//! one, using the provider facts of [`Provider`]; a test checks the CRD's CEL rules against them.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use kube::ResourceExt;

use super::{
    EndpointConfig, GatewayConfig, ModelConfig, ModelSettings, Operation, Provider, RoutingConfig,
};
use crate::api::{self, AccessSpec, EndpointType, GatewayEndpoint, Model};
use crate::gateway::access::{AccessConfig, ServiceAccountPolicy};
use crate::gateway::tracing::{ExportMode, TelemetryConfig};

/// The trace queue's directory (unset: in memory only).
pub const ENV_QUEUE_DIR: &str = "GATEWAY_TRACE_QUEUE_DIR";
/// Bytes the trace queue holds at most (default 256 MiB).
pub const ENV_QUEUE_MAX_BYTES: &str = "GATEWAY_TRACE_QUEUE_MAX_BYTES";
/// `info-then-spans`, `spans-only` or `adaptive`.
pub const ENV_EXPORT_MODE: &str = "GATEWAY_TRACE_EXPORT_MODE";
use crate::mlflow::MlflowConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read endpoint manifest {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("endpoint manifest {path} is not a valid GatewayEndpoint: {message}")]
    Manifest { path: String, message: String },
    #[error("endpoint manifest {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{0}")]
    Env(String),
    #[error("model {model}: {message}")]
    Provider { model: String, message: String },
}

/// Reads and checks the manifest at `path`; `env` looks up variables (the process environment in
/// production, a map in tests).
pub fn load(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<GatewayConfig, ConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: p.clone(),
        source,
    })?;
    let resource: GatewayEndpoint =
        serde_yaml::from_str(&text).map_err(|e| ConfigError::Manifest {
            path: p.clone(),
            message: e.to_string(),
        })?;
    from_resource(&resource, &p, env)
}

pub fn from_resource(
    resource: &GatewayEndpoint,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<GatewayConfig, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_string(),
        message,
    };
    let spec = &resource.spec;
    let name = resource.name_any();
    if name.is_empty() {
        return Err(invalid("metadata.name is required".into()));
    }
    // The checks the API server makes at admission, for manifests that never went through one.
    if spec.models.is_empty() {
        return Err(invalid("spec.models needs at least one model".into()));
    }
    let mut seen = HashSet::new();
    for m in spec.all_models() {
        if !seen.insert(m.api_key_env()) {
            return Err(invalid(format!(
                "model name {:?} is used twice (names must be unique across models and fallbacks, ignoring case and '-', '.', '_')",
                m.name
            )));
        }
    }
    if spec.models.iter().all(|m| m.weight() == 0) {
        return Err(invalid("at least one model needs a weight above 0".into()));
    }

    let operation = operation(spec.endpoint_type);
    let model_config = |m: &Model| -> Result<ModelConfig, ConfigError> {
        let var = m.api_key_env();
        // Trimmed: a Secret made with `kubectl create secret --from-file` keeps the file's
        // trailing newline. What is left must be a valid header value (checked here, so a bad key
        // stops the gateway at start naming the variable, never failing each request).
        let key = env(&var)
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty());
        if let Some(k) = &key
            && axum::http::HeaderValue::from_str(k).is_err()
        {
            return Err(ConfigError::Env(format!(
                "model {}: the API key in {var} has characters not allowed in an HTTP header (control characters or a line break inside it)",
                m.name
            )));
        }
        let provider = provider(m.provider);
        if key.is_none() && provider.needs_api_key() {
            return Err(ConfigError::Env(format!(
                "model {}: the API key variable {var} is not set (the controller fills it from spec apiKeySecretRef {})",
                m.name,
                m.api_key_secret_ref
                    .as_ref()
                    .map_or_else(|| "<none>".to_string(), |r| format!("{}/{}", r.name, r.key))
            )));
        }
        let settings = ModelSettings {
            name: m.name.clone(),
            provider,
            model: m.model.clone(),
            api_base: m.api_base.clone(),
            api_version: m.api_version.clone(),
            deployment: m.deployment.clone(),
        };
        ModelConfig::new(&settings, key).map_err(|message| ConfigError::Provider {
            model: m.name.clone(),
            message,
        })
    };
    let models = spec
        .models
        .iter()
        .filter(|m| m.weight() > 0)
        .map(|m| Ok((model_config(m)?, m.weight())))
        .collect::<Result<Vec<_>, ConfigError>>()?;
    let fallbacks = spec
        .fallbacks
        .iter()
        .map(model_config)
        .collect::<Result<Vec<_>, _>>()?;
    for m in models.iter().map(|(m, _)| m).chain(fallbacks.iter()) {
        if !m.provider.provider().serves(operation) {
            return Err(invalid(format!(
                "model {} (provider {}) cannot serve {}",
                m.name,
                m.provider_name(),
                operation.endpoint_type()
            )));
        }
    }
    let max_attempts = spec
        .fallback
        .as_ref()
        .and_then(|f| f.max_attempts)
        .map_or(1 + fallbacks.len(), |n| n.max(1) as usize);

    let endpoint = EndpointConfig {
        id: resource.uid().unwrap_or_else(|| name.clone()),
        name,
        operation,
    };
    let routing = RoutingConfig {
        models,
        fallbacks,
        max_attempts,
    };

    let tracing = if spec.usage_tracking {
        let mlflow = MlflowConfig::from_lookup(|k| env(k)).map_err(|e| {
            ConfigError::Env(format!(
                "usageTracking is true, so traces go to MLflow, but: {e} (or set spec.usageTracking: false)"
            ))
        })?;
        let experiment_id = env("MLFLOW_EXPERIMENT_ID")
            .filter(|v| !v.is_empty())
            .or_else(|| resource.status.as_ref().and_then(|s| s.experiment_id.clone()))
            .or_else(|| spec.experiment_id.clone())
            .ok_or_else(|| {
                ConfigError::Env(
                    "usageTracking is true but no experiment is known: set MLFLOW_EXPERIMENT_ID (or spec.experimentId)".into(),
                )
            })?;
        if !experiment_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::Env(format!(
                "MLFLOW_EXPERIMENT_ID {experiment_id:?} is not an experiment id"
            )));
        }
        let workspace = match env(crate::mlflow::ENV_WORKSPACE).filter(|v| !v.is_empty()) {
            None => None,
            Some(w) => match crate::mlflow::invalid_workspace_name(&w) {
                None => Some(w),
                Some(why) => {
                    return Err(ConfigError::Env(format!(
                        "{}: {why}",
                        crate::mlflow::ENV_WORKSPACE
                    )));
                }
            },
        };
        Some(TelemetryConfig {
            mlflow,
            experiment_id,
            workspace,
            endpoint_name: endpoint.name.clone(),
            endpoint_id: endpoint.id.clone(),
            capture_content: spec.tracing.capture_content,
            export_mode: match env(ENV_EXPORT_MODE).filter(|v| !v.trim().is_empty()) {
                None => ExportMode::default(),
                Some(v) => v
                    .parse()
                    .map_err(|e| ConfigError::Env(format!("{ENV_EXPORT_MODE}: {e}")))?,
            },
            queue_dir: env(ENV_QUEUE_DIR)
                .filter(|v| !v.trim().is_empty())
                .map(std::path::PathBuf::from),
            queue_max_bytes: env_number(
                env,
                ENV_QUEUE_MAX_BYTES,
                TelemetryConfig::DEFAULT_QUEUE_MAX_BYTES as usize,
            )? as u64,
            max_export_batch: TelemetryConfig::DEFAULT_MAX_EXPORT_BATCH,
            export_timeout: Duration::from_secs(10),
        })
    } else {
        None
    };
    let access = access(
        spec.access.as_ref(),
        &resource.namespace().unwrap_or_default(),
        &endpoint.name,
    );
    Ok(GatewayConfig {
        endpoint,
        routing,
        tracing,
        access,
    })
}

/// `spec.access` in the gateway's terms: none declared is [`AccessConfig::Closed`].
pub fn access(spec: Option<&AccessSpec>, namespace: &str, name: &str) -> AccessConfig {
    let Some(spec) = spec else {
        return AccessConfig::Closed;
    };
    if spec.open {
        return AccessConfig::Open;
    }
    let service_accounts = spec
        .service_accounts
        .as_ref()
        .map(|sa| ServiceAccountPolicy {
            audience: sa.audience_for(namespace, name),
            namespaces: sa.namespaces.iter().cloned().collect(),
            names: sa.names.iter().cloned().collect(),
        });
    if service_accounts.is_none() && spec.api_keys.is_empty() {
        return AccessConfig::Closed;
    }
    AccessConfig::Checked {
        service_accounts,
        api_keys: spec.api_keys.iter().map(|k| k.name.clone()).collect(),
    }
}

/// The operation an endpoint of this type serves.
pub fn operation(endpoint_type: EndpointType) -> Operation {
    match endpoint_type {
        EndpointType::Chat => Operation::Chat,
        EndpointType::Completions => Operation::Completions,
        EndpointType::Embeddings => Operation::Embeddings,
    }
}

/// The gateway's name for a provider of the manifest.
pub fn provider(provider: api::Provider) -> Provider {
    match provider {
        api::Provider::Openai => Provider::Openai,
        api::Provider::Azure => Provider::Azure,
        api::Provider::Anthropic => Provider::Anthropic,
        api::Provider::Gemini => Provider::Gemini,
        api::Provider::Mistral => Provider::Mistral,
        api::Provider::Groq => Provider::Groq,
        api::Provider::Deepseek => Provider::Deepseek,
        api::Provider::Xai => Provider::Xai,
        api::Provider::Openrouter => Provider::Openrouter,
        api::Provider::Togetherai => Provider::Togetherai,
        api::Provider::Ollama => Provider::Ollama,
    }
}

/// A positive whole number from `var`, or `default` when unset.
pub fn env_number(
    env: &dyn Fn(&str) -> Option<String>,
    var: &str,
    default: usize,
) -> Result<usize, ConfigError> {
    match env(var).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| ConfigError::Env(format!("{var}={v:?} is not a positive whole number"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resource(yaml: &str) -> GatewayEndpoint {
        serde_yaml::from_str(yaml).unwrap()
    }

    const CHAT: &str = r#"
apiVersion: mlflow-gateway.dev/v1alpha1
kind: GatewayEndpoint
metadata: {name: chat, namespace: team-a, uid: 1234-abcd}
spec:
  models:
    - {name: mini, provider: openai, model: gpt-4o-mini, weight: 3, apiKeySecretRef: {name: k, key: a}}
    - {name: off, provider: openai, model: gpt-4o, weight: 0, apiKeySecretRef: {name: k, key: a}}
  fallbacks:
    - {name: claude-x, provider: anthropic, model: claude, apiKeySecretRef: {name: k, key: b}}
"#;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const KEYS: &[(&str, &str)] = &[
        ("GATEWAY_API_KEY_MINI", "sk-1"),
        ("GATEWAY_API_KEY_OFF", "sk-2"),
        ("GATEWAY_API_KEY_CLAUDE_X", "sk-3"),
        ("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"),
        ("MLFLOW_EXPERIMENT_ID", "7"),
    ];

    #[test]
    fn loads_models_weights_fallbacks_and_tracing() {
        let loaded = from_resource(&resource(CHAT), "f", &env_of(KEYS)).unwrap();
        let ep = loaded.endpoint;
        assert_eq!((ep.name.as_str(), ep.id.as_str()), ("chat", "1234-abcd"));
        assert_eq!(ep.operation, Operation::Chat);
        let routing = loaded.routing;
        assert_eq!(routing.models.len(), 1, "weight 0 is out of rotation");
        assert_eq!(routing.models[0].1, 3);
        assert_eq!(routing.fallbacks.len(), 1);
        assert_eq!(routing.max_attempts, 2);
        let t = loaded.tracing.unwrap();
        assert_eq!(t.experiment_id, "7");
        assert_eq!(t.endpoint_id, "1234-abcd");
        assert!(t.capture_content);
    }

    #[test]
    fn keys_are_trimmed_and_a_key_that_is_no_header_value_names_its_variable() {
        let pairs = [
            ("GATEWAY_API_KEY_MINI", "sk-1\n"),
            ("GATEWAY_API_KEY_OFF", " sk-2 "),
            ("GATEWAY_API_KEY_CLAUDE_X", "sk-3\r\n"),
            KEYS[3],
            KEYS[4],
        ];
        let env = env_of(&pairs);
        let Ok(config) = from_resource(&resource(CHAT), "f", &env) else {
            panic!("keys with surrounding whitespace are accepted");
        };
        assert_eq!(config.routing.models[0].0.api_key(), Some("sk-1"));
        assert_eq!(config.routing.fallbacks[0].api_key(), Some("sk-3"));
        let pairs = [
            ("GATEWAY_API_KEY_MINI", "sk-1\nsecret-tail"),
            ("GATEWAY_API_KEY_OFF", "sk-2"),
            ("GATEWAY_API_KEY_CLAUDE_X", "sk-3"),
            KEYS[3],
            KEYS[4],
        ];
        let env = env_of(&pairs);
        let err = from_resource(&resource(CHAT), "f", &env)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("GATEWAY_API_KEY_MINI"), "{err}");
        assert!(!err.contains("secret-tail"), "{err}");
    }

    #[test]
    fn a_missing_api_key_names_the_variable() {
        let env = env_of(&KEYS[1..]);
        let err = from_resource(&resource(CHAT), "f", &env)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("GATEWAY_API_KEY_MINI"), "{err}");
    }

    #[test]
    fn tracking_needs_an_experiment_and_a_uri() {
        let no_exp: Vec<_> = KEYS[..4].to_vec();
        let err = from_resource(&resource(CHAT), "f", &env_of(&no_exp))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("MLFLOW_EXPERIMENT_ID"), "{err}");
        let no_uri: Vec<_> = KEYS
            .iter()
            .filter(|(k, _)| *k != "MLFLOW_TRACKING_URI")
            .cloned()
            .collect();
        let err = from_resource(&resource(CHAT), "f", &env_of(&no_uri))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("MLFLOW_TRACKING_URI"), "{err}");
    }

    #[test]
    fn the_workspace_comes_from_mlflow_workspace_and_must_be_a_workspace_name() {
        let loaded = from_resource(&resource(CHAT), "f", &env_of(KEYS)).unwrap();
        assert_eq!(loaded.tracing.unwrap().workspace, None);
        let mut with: Vec<_> = KEYS.to_vec();
        with.push(("MLFLOW_WORKSPACE", "team-a"));
        let loaded = from_resource(&resource(CHAT), "f", &env_of(&with)).unwrap();
        assert_eq!(loaded.tracing.unwrap().workspace.as_deref(), Some("team-a"));
        with.pop();
        with.push(("MLFLOW_WORKSPACE", "Team A"));
        let err = from_resource(&resource(CHAT), "f", &env_of(&with))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("MLFLOW_WORKSPACE"), "{err}");
    }

    #[test]
    fn access_is_closed_unless_declared() {
        let loaded = from_resource(&resource(CHAT), "f", &env_of(KEYS)).unwrap();
        assert_eq!(loaded.access, AccessConfig::Closed);
        let spec = |yaml: &str| -> AccessSpec { serde_yaml::from_str(yaml).unwrap() };
        assert_eq!(
            access(Some(&spec("open: true")), "ns", "chat"),
            AccessConfig::Open
        );
        assert_eq!(
            access(Some(&spec("{}")), "ns", "chat"),
            AccessConfig::Closed
        );
        let checked = access(
            Some(&spec(
                "serviceAccounts: {namespaces: [team-a]}\napiKeys: [{name: ci, secretRef: {name: s, key: k}}]",
            )),
            "ns",
            "chat",
        );
        let AccessConfig::Checked {
            service_accounts: Some(sa),
            api_keys,
        } = checked
        else {
            panic!("{checked:?}");
        };
        assert_eq!(sa.audience, "mlflow-gateway.dev/ns/chat");
        assert!(sa.admits("team-a", "x"));
        assert_eq!(api_keys, vec!["ci".to_string()]);
    }

    #[test]
    fn usage_tracking_off_needs_no_mlflow() {
        let yaml = format!("{CHAT}  usageTracking: false\n");
        let loaded = from_resource(&resource(&yaml), "f", &env_of(&KEYS[..3])).unwrap();
        assert!(loaded.tracing.is_none());
    }

    #[test]
    fn duplicate_names_and_bad_numbers_are_rejected() {
        let yaml = CHAT.replace("name: off", "name: MINI");
        let err = from_resource(&resource(&yaml), "f", &env_of(KEYS))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("used twice"), "{err}");
        let env = env_of(&[(ENV_QUEUE_MAX_BYTES, "lots")]);
        assert!(env_number(&env, ENV_QUEUE_MAX_BYTES, 1).is_err());
        let mut vars = KEYS.to_vec();
        vars.push((ENV_EXPORT_MODE, "sometimes"));
        let err = from_resource(&resource(CHAT), "f", &env_of(&vars))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not an export mode"), "{err}");
    }

    /// Every `rule` of the CRD's CEL validations.
    fn cel_rules() -> Vec<String> {
        fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(map) => {
                    if let Some(rules) = map.get("x-kubernetes-validations") {
                        for r in rules.as_array().into_iter().flatten() {
                            out.push(r["rule"].as_str().unwrap().to_string());
                        }
                    }
                    map.values().for_each(|v| collect(v, out));
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
                _ => {}
            }
        }
        use kube::CustomResourceExt;
        let mut out = Vec::new();
        collect(
            &serde_json::to_value(GatewayEndpoint::crd()).unwrap(),
            &mut out,
        );
        out
    }

    /// The one provider with `fact`: the CEL rules name a single provider for each fact (a list
    /// would need the rules in src/api.rs rewritten with `in [...]`, then this test).
    fn the_one_provider(fact: &str, has: impl Fn(Provider) -> bool) -> &'static str {
        let with: Vec<_> = Provider::ALL.into_iter().filter(|p| has(*p)).collect();
        assert_eq!(
            with.len(),
            1,
            "providers that {fact}: {with:?}; update the CEL rules in src/api.rs and this test"
        );
        with[0].name()
    }

    fn assert_cel_rule(rules: &[String], rule: String) {
        assert!(
            rules.contains(&rule),
            "the CRD has no CEL rule `{rule}`: src/api.rs and the provider facts of gateway::config disagree"
        );
    }

    #[test]
    fn cel_rules_say_what_the_provider_facts_say() {
        let rules = cel_rules();
        let needs_base = the_one_provider("need apiBase", |p| p.default_api_base().is_none());
        let needs_deployment = the_one_provider("need a deployment", Provider::needs_deployment);
        assert_eq!(needs_base, needs_deployment, "one CEL rule checks both");
        assert_cel_rule(
            &rules,
            format!(
                "self.provider != '{needs_base}' || (has(self.apiBase) && has(self.deployment))"
            ),
        );
        assert_cel_rule(
            &rules,
            format!("self.provider == '{needs_deployment}' || !has(self.deployment)"),
        );
        let keyless = the_one_provider("need no API key", |p| !p.needs_api_key());
        assert_cel_rule(
            &rules,
            format!("self.provider == '{keyless}' || has(self.apiKeySecretRef)"),
        );
        for op in [Operation::Chat, Operation::Completions] {
            assert!(Provider::ALL.iter().all(|p| p.serves(op)), "{op:?}");
        }
        let no_embeddings =
            the_one_provider("have no embeddings", |p| !p.serves(Operation::Embeddings));
        let embeddings = Operation::Embeddings.endpoint_type();
        assert_cel_rule(
            &rules,
            format!(
                "!has(self.endpointType) || self.endpointType != '{embeddings}' || (self.models.all(m, m.provider != '{no_embeddings}') && (!has(self.fallbacks) || self.fallbacks.all(f, f.provider != '{no_embeddings}')))"
            ),
        );
    }

    #[test]
    fn the_manifest_and_the_gateway_name_providers_and_endpoint_types_alike() {
        for p in Provider::ALL {
            let in_manifest: api::Provider =
                serde_json::from_value(serde_json::json!(p.name())).unwrap();
            assert_eq!(provider(in_manifest), p);
            assert_eq!(in_manifest.as_str(), p.name());
        }
        for t in [
            EndpointType::Chat,
            EndpointType::Completions,
            EndpointType::Embeddings,
        ] {
            assert_eq!(operation(t).endpoint_type(), t.as_str());
            assert_eq!(serde_json::json!(t), serde_json::json!(t.as_str()));
        }
    }
}
