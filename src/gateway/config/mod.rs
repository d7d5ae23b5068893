//! What the gateway runs from, in its own terms: the endpoint, its models (each with a
//! [`ProviderConfig`] carrying exactly what that provider needs) and routing, and tracing.
//!
//! Nothing here knows Kubernetes: [`manifest`] is the one place that turns a `GatewayEndpoint`
//! (the file the pods read from their ConfigMap) into a [`GatewayConfig`], and the providers,
//! routing and request handling read only these types. Each provider fact (which providers have
//! embeddings, need a key or a deployment, their public API bases) is written once, on
//! [`Provider`]; the CRD's CEL rules repeat some of them for `kubectl apply`, and a test of
//! [`manifest`] checks that both say the same.

pub mod manifest;

use std::fmt;

use url::Url;

pub use manifest::{ConfigError, load};

use crate::gateway::tracing::TelemetryConfig;

/// Everything the gateway process needs, read once at start.
pub struct GatewayConfig {
    pub endpoint: EndpointConfig,
    pub routing: RoutingConfig,
    /// None when `usageTracking: false`.
    pub tracing: Option<TelemetryConfig>,
    /// Who may call (`spec.access`).
    pub access: crate::gateway::access::AccessConfig,
}

/// The endpoint the gateway serves.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// The endpoint's name in routes and in the trace name `gateway/<name>`.
    pub name: String,
    /// MLflow's endpoint id (the resource's uid, or its name when it has none).
    pub id: String,
    /// The one API operation the endpoint serves (its endpoint type).
    pub operation: Operation,
}

/// Which models a request goes to.
#[derive(Debug)]
pub struct RoutingConfig {
    /// The primary pool, each with its weight (only models with weight > 0).
    pub models: Vec<(ModelConfig, u32)>,
    /// Tried in this order after the chosen model fails.
    pub fallbacks: Vec<ModelConfig>,
    /// Attempts per request in all.
    pub max_attempts: usize,
}

/// The OpenAI API operations the gateway serves; an endpoint serves one of them (its type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completions,
    /// `/v1/embeddings`
    Embeddings,
}

impl Operation {
    pub const ALL: [Operation; 3] = [
        Operation::Chat,
        Operation::Completions,
        Operation::Embeddings,
    ];

    /// MLflow's endpoint type serving this operation (`endpointType` in the manifest).
    pub fn endpoint_type(self) -> &'static str {
        match self {
            Operation::Chat => "llm/v1/chat",
            Operation::Completions => "llm/v1/completions",
            Operation::Embeddings => "llm/v1/embeddings",
        }
    }

    /// The gateway's route of the operation (OpenAI's path).
    pub fn path(self) -> &'static str {
        match self {
            Operation::Chat => "/v1/chat/completions",
            Operation::Completions => "/v1/completions",
            Operation::Embeddings => "/v1/embeddings",
        }
    }

    /// The operation in a message: "does not support chat completions".
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Chat => "chat completions",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
        }
    }
}

/// The LLM providers, in MLflow's names, with what the gateway must know of each before it can
/// call it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    pub const ALL: [Provider; 11] = [
        Provider::Openai,
        Provider::Azure,
        Provider::Anthropic,
        Provider::Gemini,
        Provider::Mistral,
        Provider::Groq,
        Provider::Deepseek,
        Provider::Xai,
        Provider::Openrouter,
        Provider::Togetherai,
        Provider::Ollama,
    ];

    /// MLflow's name ("openai", "anthropic", ...), as in the manifest and in traces.
    pub fn name(self) -> &'static str {
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

    /// The provider's public API, used when a model sets no `apiBase`; None: `apiBase` is
    /// required (azure: each resource has its own).
    pub fn default_api_base(self) -> Option<&'static str> {
        Some(match self {
            Provider::Openai => "https://api.openai.com/v1",
            Provider::Anthropic => "https://api.anthropic.com",
            Provider::Gemini => "https://generativelanguage.googleapis.com",
            Provider::Mistral => "https://api.mistral.ai/v1",
            Provider::Groq => "https://api.groq.com/openai/v1",
            Provider::Deepseek => "https://api.deepseek.com/v1",
            Provider::Xai => "https://api.x.ai/v1",
            Provider::Openrouter => "https://openrouter.ai/api/v1",
            Provider::Togetherai => "https://api.together.xyz/v1",
            Provider::Ollama => "http://localhost:11434/v1",
            Provider::Azure => return None,
        })
    }

    /// Whether a model of this provider needs an API key (a local ollama has none).
    pub fn needs_api_key(self) -> bool {
        self != Provider::Ollama
    }

    /// Whether a model names a deployment (azure, whose URL names it) and must.
    pub fn needs_deployment(self) -> bool {
        self == Provider::Azure
    }

    /// Whether the provider has an API for `op` (anthropic has no embeddings).
    pub fn serves(self, op: Operation) -> bool {
        !(self == Provider::Anthropic && op == Operation::Embeddings)
    }
}

/// The Azure OpenAI API version used when a model sets none (the GA version MLflow's docs use).
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";

/// Where and how to reach one model's provider: each variant carries what that provider needs,
/// with the defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProviderConfig {
    /// OpenAI's API, from OpenAI or a compatible provider (`provider`: which one; never azure,
    /// anthropic or gemini).
    OpenAi { provider: Provider, api_base: Url },
    /// Azure OpenAI: OpenAI's API under a deployment of an Azure resource.
    Azure(AzureConfig),
    /// The Anthropic Messages API.
    Anthropic { api_base: Url },
    /// The Gemini API.
    Gemini { api_base: Url },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AzureConfig {
    /// The resource's endpoint, e.g. `https://<resource>.openai.azure.com`.
    pub api_base: Url,
    pub deployment: String,
    pub api_version: String,
}

impl ProviderConfig {
    pub fn provider(&self) -> Provider {
        match self {
            ProviderConfig::OpenAi { provider, .. } => *provider,
            ProviderConfig::Azure(_) => Provider::Azure,
            ProviderConfig::Anthropic { .. } => Provider::Anthropic,
            ProviderConfig::Gemini { .. } => Provider::Gemini,
        }
    }

    pub fn api_base(&self) -> &Url {
        match self {
            ProviderConfig::OpenAi { api_base, .. }
            | ProviderConfig::Anthropic { api_base }
            | ProviderConfig::Gemini { api_base } => api_base,
            ProviderConfig::Azure(azure) => &azure.api_base,
        }
    }
}

/// A model as written, before its provider's defaults apply: what [`ModelConfig::new`] resolves.
#[derive(Clone, Debug)]
pub struct ModelSettings {
    /// The model's name in the endpoint.
    pub name: String,
    pub provider: Provider,
    /// The provider's model id.
    pub model: String,
    pub api_base: Option<String>,
    pub api_version: Option<String>,
    pub deployment: Option<String>,
}

/// One model the endpoint can call. `Debug` does not print the API key. The provider layer
/// (`gateway::providers`) adds the conversions to and from the provider's wire format.
#[derive(Clone)]
pub struct ModelConfig {
    /// The model's name in the endpoint.
    pub name: String,
    /// The provider's model id.
    pub model: String,
    pub provider: ProviderConfig,
    api_key: Option<String>,
}

impl fmt::Debug for ModelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelConfig")
            .field("name", &self.name)
            .field("model", &self.model)
            .field("provider", &self.provider)
            .field(
                "api_key",
                &if self.api_key.is_some() {
                    "<redacted>"
                } else {
                    "<none>"
                },
            )
            .finish()
    }
}

impl ModelConfig {
    /// Resolves a model: its API base (or the provider's default), the provider's settings and
    /// its key (an empty key counts as none). The error says what to fix, naming the model.
    pub fn new(settings: &ModelSettings, api_key: Option<String>) -> Result<Self, String> {
        let name = &settings.name;
        let provider = settings.provider;
        let base = match (&settings.api_base, provider.default_api_base()) {
            (Some(base), _) => base.as_str(),
            (None, Some(default)) => default,
            (None, None) => {
                return Err(format!(
                    "model {name}: provider {} needs apiBase",
                    provider.name()
                ));
            }
        };
        // The CRD's grammar first (a base from the CRD passed it already), so the gateway starts
        // with exactly what `kubectl apply` accepts; a provider's default base is a constant.
        if settings.api_base.is_some()
            && let Some(problem) = crate::api_base::problem(base)
        {
            return Err(format!("model {name}: apiBase {base:?}: {problem}"));
        }
        let api_base = Url::parse(base)
            .map_err(|e| format!("model {name}: apiBase {base:?} is not a valid URL: {e}"))?;
        if !matches!(api_base.scheme(), "http" | "https") || api_base.cannot_be_a_base() {
            return Err(format!(
                "model {name}: apiBase {base:?} must be an http:// or https:// URL"
            ));
        }
        if api_base.fragment().is_some() {
            return Err(format!(
                "model {name}: apiBase {base:?} must not have a #fragment"
            ));
        }
        let deployment = settings.deployment.clone().filter(|d| !d.is_empty());
        if provider.needs_deployment() && deployment.is_none() {
            return Err(format!(
                "model {name}: provider {} needs deployment",
                provider.name()
            ));
        }
        let provider = match (provider, deployment) {
            (Provider::Azure, Some(deployment)) => ProviderConfig::Azure(AzureConfig {
                api_base,
                deployment,
                api_version: settings
                    .api_version
                    .clone()
                    .unwrap_or_else(|| DEFAULT_AZURE_API_VERSION.to_string()),
            }),
            (Provider::Anthropic, _) => ProviderConfig::Anthropic { api_base },
            (Provider::Gemini, _) => ProviderConfig::Gemini { api_base },
            (provider, _) => ProviderConfig::OpenAi { provider, api_base },
        };
        Ok(ModelConfig {
            name: name.clone(),
            model: settings.model.clone(),
            provider,
            api_key: api_key.filter(|k| !k.is_empty()),
        })
    }

    /// The provider's name as MLflow spells it ("openai", "anthropic", ...).
    pub fn provider_name(&self) -> &'static str {
        self.provider.provider().name()
    }

    pub fn api_base(&self) -> &Url {
        self.provider.api_base()
    }

    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(provider: Provider) -> ModelSettings {
        ModelSettings {
            name: "m".into(),
            provider,
            model: "the-model".into(),
            api_base: None,
            api_version: None,
            deployment: None,
        }
    }

    #[test]
    fn defaults_apply_per_provider() {
        let openai = ModelConfig::new(&settings(Provider::Openai), None).unwrap();
        assert_eq!(openai.api_base().as_str(), "https://api.openai.com/v1");
        assert_eq!(openai.provider_name(), "openai");
        let mut azure = settings(Provider::Azure);
        azure.api_base = Some("https://res.openai.azure.com".into());
        azure.deployment = Some("dep".into());
        let azure = ModelConfig::new(&azure, Some("k".into())).unwrap();
        let ProviderConfig::Azure(a) = &azure.provider else {
            panic!("{azure:?}")
        };
        assert_eq!(a.api_version, "2024-10-21");
        assert_eq!(a.deployment, "dep");
        for provider in Provider::ALL {
            assert_eq!(
                provider.default_api_base().is_some(),
                provider != Provider::Azure,
                "{provider:?}"
            );
        }
    }

    /// The gateway starts with exactly the apiBase values the CRD accepts (the same table the
    /// API-server test applies), and says what is wrong as the CRD does.
    #[test]
    fn api_bases_are_accepted_exactly_as_the_crd_accepts_them() {
        for (base, valid) in crate::api_base::CASES {
            let mut m = settings(Provider::Openai);
            m.api_base = Some(base.to_string());
            let result = ModelConfig::new(&m, None);
            assert_eq!(result.is_ok(), *valid, "{base:?}: {:?}", result.err());
            if let Some(problem) = crate::api_base::problem(base) {
                let err = result.err().unwrap_or_default();
                assert!(err.contains(problem), "{base:?}: {err}");
            }
        }
    }

    #[test]
    fn bad_api_bases_and_a_missing_deployment_are_config_errors() {
        let mut m = settings(Provider::Openai);
        m.api_base = Some("not a url".into());
        assert!(ModelConfig::new(&m, None).is_err());
        m.api_base = Some("ftp://host/v1".into());
        assert!(ModelConfig::new(&m, None).is_err());
        m.api_base = Some("https://host/v1#x".into());
        assert!(ModelConfig::new(&m, None).is_err());

        let mut azure = settings(Provider::Azure);
        let err = ModelConfig::new(&azure, Some("sk-secret-key".into())).unwrap_err();
        assert_eq!(err, "model m: provider azure needs apiBase");
        azure.api_base = Some("https://res.openai.azure.com".into());
        let err = ModelConfig::new(&azure, Some("sk-secret-key".into())).unwrap_err();
        assert_eq!(err, "model m: provider azure needs deployment");
    }

    #[test]
    fn an_empty_key_counts_as_none_and_debug_hides_the_key() {
        let none = ModelConfig::new(&settings(Provider::Ollama), Some(String::new())).unwrap();
        assert_eq!(none.api_key(), None);
        assert!(format!("{none:?}").contains("<none>"));
        let some = ModelConfig::new(&settings(Provider::Openai), Some("sk-secret".into())).unwrap();
        let debug = format!("{some:?}");
        assert!(
            !debug.contains("sk-secret") && debug.contains("<redacted>"),
            "{debug}"
        );
    }

    #[test]
    fn operations_name_their_endpoint_type_and_route() {
        let routes: Vec<_> = Operation::ALL.iter().map(|o| o.path()).collect();
        assert_eq!(
            routes,
            ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
        );
        assert_eq!(Operation::Embeddings.endpoint_type(), "llm/v1/embeddings");
    }
}
