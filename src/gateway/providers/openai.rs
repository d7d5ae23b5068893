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

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value, json};

use super::sse::SseEvent;
use super::{
    Body, ModelConfig, Operation, Prepared, ProviderError, Usage, bad_upstream,
    chat_response_to_completion, completions_to_chat, invalid, join_url, message_of_error_body,
    usage_of_fields, usage_of_metadata,
};
use crate::gateway::config::Provider;

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

pub(crate) fn prepare<'a>(
    up: &ModelConfig,
    op: Operation,
    body: &'a Map<String, Value>,
) -> Result<Prepared<'a>, ProviderError> {
    let stream_options = accepts_stream_options(up.provider.provider());
    let mut headers = Vec::new();
    if let Some(auth) = up.key_header("Bearer ")? {
        headers.push(("authorization", auth));
    }
    let model = Value::String(up.model.clone());
    if op == Operation::Completions && completions_via_chat(up.provider.provider()) {
        let mut chat = completions_to_chat(body)?;
        chat.insert("model".into(), model);
        if !stream_options {
            chat.remove("stream_options");
        }
        if let Some(options) = check_body(Operation::Chat, &chat, stream_options)? {
            chat.insert("stream_options".into(), options);
        }
        return Ok(Prepared {
            url: join_url(up.api_base(), path(Operation::Chat)),
            headers,
            body: Body::Built(Value::Object(chat)),
        });
    }
    let mut set = vec![("model", model)];
    set.extend(check_body(op, body, stream_options)?.map(|options| ("stream_options", options)));
    Ok(Prepared {
        url: join_url(up.api_base(), path(op)),
        headers,
        body: Body::Patched {
            base: body,
            set,
            // Mistral rejects parameters it does not know.
            remove: if stream_options {
                &[]
            } else {
                &["stream_options"]
            },
        },
    })
}

/// Checks the field `op` cannot do without. For a stream to a provider that takes
/// `stream_options` (`stream_options`), returns the `stream_options` to send: the client's, with
/// `include_usage: true`, so that the gateway learns the usage. Shared with Azure.
pub(crate) fn check_body(
    op: Operation,
    body: &Map<String, Value>,
    stream_options: bool,
) -> Result<Option<Value>, ProviderError> {
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
            return Ok(None);
        }
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("`stream` must be true or false")),
    };
    if !(stream && stream_options) {
        return Ok(None);
    }
    let mut options = match body.get("stream_options") {
        Some(Value::Object(options)) => options.clone(),
        _ => Map::new(),
    };
    options.insert("include_usage".into(), Value::Bool(true));
    Ok(Some(Value::Object(options)))
}

pub(crate) fn parse_response(
    up: &ModelConfig,
    op: Operation,
    value: Value,
) -> Result<Value, ProviderError> {
    let list = match op {
        Operation::Chat | Operation::Completions => "choices",
        Operation::Embeddings => "data",
    };
    if !value.get(list).is_some_and(Value::is_array) {
        let detail = message_of_error_body(&value)
            .unwrap_or_else(|| crate::text::truncate(&value.to_string(), 200));
        return Err(bad_upstream(format!(
            "{} returned a response without `{list}`: {detail}",
            up.provider_name()
        )));
    }
    if op == Operation::Completions && completions_via_chat(up.provider.provider()) {
        return Ok(chat_response_to_completion(value));
    }
    Ok(value)
}

/// What the gateway reads of an OpenAI-shaped answer that it passes on as the provider sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    /// The answer's list: `choices`, or `data` for embeddings.
    pub list: &'static str,
    /// How many items it has.
    pub items: usize,
    pub usage: Option<Usage>,
}

/// The fields of an answer that [`check`] reads; every other value is skipped, not built.
#[derive(Deserialize)]
struct Shape {
    choices: Option<Vec<IgnoredAny>>,
    data: Option<Vec<IgnoredAny>>,
    usage: Option<Value>,
    message: Option<WithUsage>,
    x_groq: Option<WithUsage>,
    #[serde(rename = "usageMetadata")]
    usage_metadata: Option<Value>,
}

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<Value>,
}

/// Checks an answer for `op` as [`parse_response`] does, without building it: `None` when the
/// answer is not plainly right (not JSON, not an object, a duplicate or oddly typed field, no
/// list), for [`parse_response`] to look at whole and say what is wrong.
pub(crate) fn check(op: Operation, body: &[u8]) -> Option<Checked> {
    let shape: Shape = serde_json::from_slice(body).ok()?;
    let (list, items) = match op {
        Operation::Chat | Operation::Completions => ("choices", shape.choices?),
        Operation::Embeddings => ("data", shape.data?),
    };
    // The same order as `usage_of`: `usage`, `message.usage`, `x_groq.usage`, `usageMetadata`.
    let usage = [
        shape.usage,
        shape.message.and_then(|m| m.usage),
        shape.x_groq.and_then(|x| x.usage),
    ]
    .into_iter()
    .flatten()
    .find(Value::is_object)
    .and_then(|u| usage_of_fields(&u))
    .or_else(|| {
        shape
            .usage_metadata
            .filter(Value::is_object)
            .map(|m| usage_of_metadata(&m))
    });
    Some(Checked {
        list,
        items: items.len(),
        usage,
    })
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
                crate::text::truncate(data, 200)
            ))
        })?;
        if !chunk.is_object() {
            return Err(bad_upstream(format!(
                "upstream stream sent an event that is not a JSON object: {}",
                crate::text::truncate(data, 200)
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
