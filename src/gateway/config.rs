//! What the gateway serves: a `GatewayEndpoint` manifest (the same YAML a user applies), API keys
//! from `GATEWAY_API_KEY_<NAME>`, and MLflow settings from MLflow's own variables.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use kube::ResourceExt;

use super::tracing::TelemetryConfig;
use crate::api::{EndpointType, GatewayEndpoint, Model, Provider};
use crate::mlflow::MlflowConfig;
use crate::providers::{ProviderError, Upstream};

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
    #[error("model {model}: {source}")]
    Provider {
        model: String,
        source: ProviderError,
    },
}

/// One endpoint, ready to serve.
pub struct Endpoint {
    /// `metadata.name`: the endpoint's name in routes and in the trace name `gateway/<name>`.
    pub name: String,
    /// `metadata.uid` (MLflow's endpoint id), or the name when the manifest has none.
    pub id: String,
    pub endpoint_type: EndpointType,
    /// The primary pool, with weights (only models with weight > 0).
    pub models: Vec<(Upstream, u32)>,
    pub fallbacks: Vec<Upstream>,
    /// Attempts per request in all.
    pub max_attempts: usize,
}

impl Endpoint {
    pub fn total_weight(&self) -> u64 {
        self.models.iter().map(|(_, w)| u64::from(*w)).sum()
    }
}

/// Everything `gateway` needs, read once at start.
pub struct Loaded {
    pub endpoint: Endpoint,
    /// None when `usageTracking: false`.
    pub telemetry: Option<TelemetryConfig>,
}

/// Reads and checks the manifest at `path`; `env` looks up variables (the process environment in
/// production, a map in tests).
pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Loaded, ConfigError> {
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
) -> Result<Loaded, ConfigError> {
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

    let upstream = |m: &Model| -> Result<Upstream, ConfigError> {
        let var = m.api_key_env();
        let key = env(&var).filter(|k| !k.is_empty());
        if key.is_none() && m.provider != Provider::Ollama {
            return Err(ConfigError::Env(format!(
                "model {}: the API key variable {var} is not set (the controller fills it from spec apiKeySecretRef {})",
                m.name,
                m.api_key_secret_ref
                    .as_ref()
                    .map_or_else(|| "<none>".to_string(), |r| format!("{}/{}", r.name, r.key))
            )));
        }
        Upstream::new(m, key).map_err(|source| ConfigError::Provider {
            model: m.name.clone(),
            source,
        })
    };
    let models = spec
        .models
        .iter()
        .filter(|m| m.weight() > 0)
        .map(|m| Ok((upstream(m)?, m.weight())))
        .collect::<Result<Vec<_>, ConfigError>>()?;
    let fallbacks = spec
        .fallbacks
        .iter()
        .map(upstream)
        .collect::<Result<Vec<_>, _>>()?;
    let op = super::operation(spec.endpoint_type);
    for up in models.iter().map(|(u, _)| u).chain(fallbacks.iter()) {
        if !up.supports(op) {
            return Err(invalid(format!(
                "model {} (provider {}) cannot serve {}",
                up.name,
                up.provider_name(),
                spec.endpoint_type.as_str()
            )));
        }
    }
    let max_attempts = spec
        .fallback
        .as_ref()
        .and_then(|f| f.max_attempts)
        .map_or(1 + fallbacks.len(), |n| n.max(1) as usize);

    let endpoint = Endpoint {
        id: resource.uid().unwrap_or_else(|| name.clone()),
        name,
        endpoint_type: spec.endpoint_type,
        models,
        fallbacks,
        max_attempts,
    };

    let telemetry = if spec.usage_tracking {
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
        Some(TelemetryConfig {
            mlflow,
            experiment_id,
            endpoint_name: endpoint.name.clone(),
            endpoint_id: endpoint.id.clone(),
            capture_content: spec.tracing.capture_content,
            max_queue_spans: env_number(env, "GATEWAY_TRACE_QUEUE_SPANS", 4096)?,
            max_export_batch: 512,
            export_timeout: Duration::from_secs(10),
        })
    } else {
        None
    };
    Ok(Loaded {
        endpoint,
        telemetry,
    })
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
        assert_eq!(ep.models.len(), 1, "weight 0 is out of rotation");
        assert_eq!(ep.models[0].1, 3);
        assert_eq!(ep.fallbacks.len(), 1);
        assert_eq!(ep.max_attempts, 2);
        let t = loaded.telemetry.unwrap();
        assert_eq!(t.experiment_id, "7");
        assert_eq!(t.endpoint_id, "1234-abcd");
        assert!(t.capture_content);
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
    fn usage_tracking_off_needs_no_mlflow() {
        let yaml = format!("{CHAT}  usageTracking: false\n");
        let loaded = from_resource(&resource(&yaml), "f", &env_of(&KEYS[..3])).unwrap();
        assert!(loaded.telemetry.is_none());
    }

    #[test]
    fn duplicate_names_and_bad_numbers_are_rejected() {
        let yaml = CHAT.replace("name: off", "name: MINI");
        let err = from_resource(&resource(&yaml), "f", &env_of(KEYS))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("used twice"), "{err}");
        let env = env_of(&[("GATEWAY_TRACE_QUEUE_SPANS", "lots")]);
        assert!(env_number(&env, "GATEWAY_TRACE_QUEUE_SPANS", 1).is_err());
    }
}
