//! Azure OpenAI: `{apiBase}/openai/deployments/{deployment}/{chat/completions|completions|
//! embeddings}?api-version={apiVersion}` with the header `api-key: <key>`.
//!
//! Bodies and responses are OpenAI's. As in MLflow, `model` is removed from the body: the
//! deployment in the URL names the model. An `apiBase` that already ends in `/openai` is not
//! doubled.

use serde_json::{Map, Value};
use url::Url;

use super::{
    Body, Operation, Prepared, ProviderError, Upstream, join_url, last_path_segment, openai,
};

/// The API version used when the model sets none (the GA version MLflow's docs use).
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

pub(crate) fn prepare<'a>(
    up: &Upstream,
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
        url: url(up, op)?,
        headers,
        body: Body::Patched {
            base: body,
            set,
            remove: &["model"],
        },
    })
}

/// The deployment URL of `op`.
pub fn url(up: &Upstream, op: Operation) -> Result<Url, ProviderError> {
    let deployment = up.deployment.as_deref().unwrap_or_default();
    if deployment.is_empty() {
        return Err(ProviderError::Config(format!(
            "model {}: provider azure needs deployment",
            up.name
        )));
    }
    let mut segments = Vec::with_capacity(5);
    if last_path_segment(&up.api_base) != Some("openai") {
        segments.push("openai");
    }
    segments.extend(["deployments", deployment]);
    segments.extend(openai::path(op));
    let mut url = join_url(&up.api_base, &segments);
    let version = up.api_version.as_deref().unwrap_or(DEFAULT_API_VERSION);
    url.query_pairs_mut().append_pair("api-version", version);
    Ok(url)
}
