//! Azure OpenAI: `{apiBase}/openai/deployments/{deployment}/{chat/completions|completions|
//! embeddings}?api-version={apiVersion}` with the header `api-key: <key>`.
//!
//! Bodies and responses are OpenAI's. As in MLflow, `model` is removed from the body: the
//! deployment in the URL names the model. An `apiBase` that already ends in `/openai` is not
//! doubled.

use serde_json::{Map, Value};
use url::Url;

use super::{
    Body, ModelConfig, Operation, Prepared, ProviderError, join_url, last_path_segment, openai,
};
use crate::gateway::config::AzureConfig;

pub(crate) fn prepare<'a>(
    up: &ModelConfig,
    azure: &AzureConfig,
    op: Operation,
    body: &'a Map<String, Value>,
) -> Result<Prepared<'a>, ProviderError> {
    let set = openai::check_body(op, body, true)?
        .map(|options| vec![("stream_options", options)])
        .unwrap_or_default();
    let mut headers = Vec::new();
    if let Some(key) = up.key_header("")? {
        headers.push(("api-key", key));
    }
    Ok(Prepared {
        url: url(azure, op),
        headers,
        body: Body::Patched {
            base: body,
            set,
            remove: &["model"],
        },
    })
}

/// The deployment URL of `op`.
pub fn url(azure: &AzureConfig, op: Operation) -> Url {
    let mut segments = Vec::with_capacity(5);
    if last_path_segment(&azure.api_base) != Some("openai") {
        segments.push("openai");
    }
    segments.extend(["deployments", azure.deployment.as_str()]);
    segments.extend(openai::path(op));
    let mut url = join_url(&azure.api_base, &segments);
    url.query_pairs_mut()
        .append_pair("api-version", &azure.api_version);
    url
}
