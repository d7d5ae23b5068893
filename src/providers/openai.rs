//! OpenAI and the OpenAI-compatible providers: mistral, groq, deepseek, xai, openrouter,
//! togetherai and ollama (and any other OpenAI-compatible server, e.g. vLLM, through provider
//! openai with `apiBase`).
//!
//! Requests go to `{apiBase}/chat/completions`, `/completions` or `/embeddings` with
//! `Authorization: Bearer <key>` (no header without a key, e.g. ollama). The body passes through
//! unchanged except `model` (set to the configured model) and, for a streamed call,
//! `stream_options.include_usage: true` so the gateway learns the token usage. Mistral gets no
//! `stream_options` at all: its API rejects parameters it does not know, and it reports usage in
//! its last chunk anyway.
//!
//! Completions: mistral, groq and deepseek have no `/completions` API for chat models (MLflow
//! serves mistral completions through chat too), so for them `prompt` becomes a single user
//! message sent to `/chat/completions`, and the answer is converted back to `text_completion`.

use serde_json::{Map, Value, json};

use super::sse::SseEvent;
use super::{
    Operation, Prepared, ProviderError, Upstream, bad_upstream, chat_response_to_completion,
    completions_to_chat, invalid, join_url, message_of_error_body,
};
use crate::api::Provider;

/// The public API of each OpenAI-compatible provider.
pub fn default_api_base(provider: Provider) -> Option<&'static str> {
    Some(match provider {
        Provider::Openai => "https://api.openai.com/v1",
        Provider::Mistral => "https://api.mistral.ai/v1",
        Provider::Groq => "https://api.groq.com/openai/v1",
        Provider::Deepseek => "https://api.deepseek.com/v1",
        Provider::Xai => "https://api.x.ai/v1",
        Provider::Openrouter => "https://openrouter.ai/api/v1",
        Provider::Togetherai => "https://api.together.xyz/v1",
        Provider::Ollama => "http://localhost:11434/v1",
        Provider::Azure | Provider::Anthropic | Provider::Gemini => return None,
    })
}

/// Whether completions are served through the provider's chat API (it has no `/completions`).
pub fn completions_via_chat(provider: Provider) -> bool {
    matches!(
        provider,
        Provider::Mistral | Provider::Groq | Provider::Deepseek
    )
}

/// Whether the provider accepts `stream_options`.
fn accepts_stream_options(provider: Provider) -> bool {
    provider != Provider::Mistral
}

/// The path segments of `op` under the API base.
pub(crate) fn path(op: Operation) -> &'static [&'static str] {
    match op {
        Operation::Chat => &["chat", "completions"],
        Operation::Completions => &["completions"],
        Operation::Embeddings => &["embeddings"],
    }
}

pub(crate) fn prepare(
    up: &Upstream,
    op: Operation,
    body: &Map<String, Value>,
) -> Result<Prepared, ProviderError> {
    let (op_sent, mut body) = if op == Operation::Completions && completions_via_chat(up.provider) {
        (Operation::Chat, completions_to_chat(body)?)
    } else {
        (op, body.clone())
    };
    body.insert("model".into(), Value::String(up.model.clone()));
    if !accepts_stream_options(up.provider) {
        body.remove("stream_options");
    }
    prepare_body(op_sent, &mut body, accepts_stream_options(up.provider))?;
    let mut headers = Vec::new();
    if let Some(auth) = up.key_header("Bearer ")? {
        headers.push(("authorization", auth));
    }
    Ok(Prepared {
        url: join_url(&up.api_base, path(op_sent)),
        headers,
        body: Value::Object(body),
    })
}

/// Checks the field `op` cannot do without and asks a stream for usage. Shared with Azure.
pub(crate) fn prepare_body(
    op: Operation,
    body: &mut Map<String, Value>,
    stream_options: bool,
) -> Result<(), ProviderError> {
    match op {
        Operation::Chat => {
            if !body.get("messages").is_some_and(Value::is_array) {
                return Err(invalid("`messages` is required and must be a list"));
            }
        }
        Operation::Completions => {
            if body.get("prompt").is_none_or(Value::is_null) {
                return Err(invalid("`prompt` is required"));
            }
        }
        Operation::Embeddings => {
            if body.get("input").is_none_or(Value::is_null) {
                return Err(invalid("`input` is required"));
            }
            return Ok(());
        }
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("`stream` must be true or false")),
    };
    if stream && stream_options {
        let options = body
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if !options.is_object() {
            *options = Value::Object(Map::new());
        }
        if let Some(options) = options.as_object_mut() {
            options.insert("include_usage".into(), Value::Bool(true));
        }
    }
    Ok(())
}

pub(crate) fn parse_response(
    up: &Upstream,
    op: Operation,
    value: Value,
) -> Result<Value, ProviderError> {
    let list = match op {
        Operation::Chat | Operation::Completions => "choices",
        Operation::Embeddings => "data",
    };
    if !value.get(list).is_some_and(Value::is_array) {
        let detail = message_of_error_body(&value)
            .unwrap_or_else(|| super::truncate(&value.to_string(), 200));
        return Err(bad_upstream(format!(
            "{} returned a response without `{list}`: {detail}",
            up.provider_name()
        )));
    }
    if op == Operation::Completions && completions_via_chat(up.provider) {
        return Ok(chat_response_to_completion(value));
    }
    Ok(value)
}

/// An OpenAI-compatible stream: each `data:` is already an OpenAI chunk; `[DONE]` ends it.
#[derive(Debug, Default)]
pub(crate) struct StreamState {
    done: bool,
}

impl StreamState {
    pub fn event(&mut self, event: SseEvent) -> Result<Vec<Value>, ProviderError> {
        let data = event.data.trim();
        if self.done || data.is_empty() {
            return Ok(Vec::new());
        }
        if data == "[DONE]" {
            self.done = true;
            return Ok(Vec::new());
        }
        let chunk: Value = serde_json::from_str(data).map_err(|e| {
            bad_upstream(format!(
                "upstream stream sent an event that is not JSON ({e}): {}",
                super::truncate(data, 200)
            ))
        })?;
        if !chunk.is_object() {
            return Err(bad_upstream(format!(
                "upstream stream sent an event that is not a JSON object: {}",
                super::truncate(data, 200)
            )));
        }
        if event.event.as_deref() == Some("error")
            || (chunk.get("error").is_some() && chunk.get("choices").is_none())
        {
            let message = message_of_error_body(&chunk).unwrap_or_else(|| json!(chunk).to_string());
            return Err(bad_upstream(format!("upstream stream error: {message}")));
        }
        Ok(vec![chunk])
    }
}
