//! The provider layer of the gateway: conversion between the OpenAI API the gateway serves and
//! each upstream provider's own wire format.
//!
//! For one configured model (a [`ModelConfig`], whose [`ProviderConfig`] says which provider and
//! carries what it needs) it builds the upstream HTTP request from the OpenAI-shaped body a client
//! sent (URL, auth headers, converted body), converts a successful response back to the OpenAI
//! shape, converts a streamed response chunk by chunk ([`StreamConverter`]) and extracts a
//! readable message from an error response. These are methods of `ModelConfig` defined here: the
//! gateway's config says what a model is, this layer how to speak to it. No I/O happens here
//! (the gateway sends the requests), and nothing here knows Kubernetes.
//!
//! Bodies are handled with pass-through typing: only the fields a conversion acts on are read;
//! every other field of an OpenAI-compatible request is forwarded unchanged, so parameters this
//! code does not know about still reach the provider.
//!
//! - [`openai`]: OpenAI and the OpenAI-compatible providers (mistral, groq, deepseek, xai,
//!   openrouter, togetherai, ollama; vLLM and others through provider openai with `apiBase`).
//! - [`azure`]: Azure OpenAI (deployment URL, `api-key` header; OpenAI bodies).
//! - [`anthropic`]: the Anthropic Messages API.
//! - [`gemini`]: the Gemini API (generativelanguage.googleapis.com).
//! - [`sse`]: the incremental server-sent-events parser the stream converters use.
//! - `stream`: [`StreamConverter`], a provider's stream as OpenAI chunks, and its aggregate.

pub mod anthropic;
pub mod azure;
pub mod gemini;
pub mod openai;
pub mod sse;
mod stream;

#[cfg(test)]
mod tests;

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, Method, Request, Uri};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use url::Url;

pub use crate::gateway::config::Operation;
use crate::gateway::config::{ModelConfig, ProviderConfig};
pub use stream::StreamConverter;

/// Token usage of one call, as MLflow records it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
}

/// Errors of the provider layer.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The client's request cannot be converted (e.g. missing `messages`): becomes an
    /// OpenAI-style 400.
    #[error("{0}")]
    InvalidRequest(String),
    /// The provider has no such API (e.g. anthropic embeddings): 400.
    #[error("{0}")]
    Unsupported(String),
    /// The upstream answered something we cannot parse: becomes 502.
    #[error("{0}")]
    BadUpstreamResponse(String),
    /// Misconfiguration (bad apiBase URL...): at startup.
    #[error("{0}")]
    Config(String),
}

/// An OpenAI function tool, read for a provider that has its own tool format.
pub(crate) struct FunctionTool<'a> {
    pub name: &'a str,
    pub description: Option<&'a Value>,
    pub parameters: Option<&'a Value>,
}

/// Reads OpenAI `tools`: only function tools, each with a name, can be converted for `provider`.
pub(crate) fn function_tools<'a>(
    tools: &'a [Value],
    provider: &str,
) -> Result<Vec<FunctionTool<'a>>, ProviderError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "function" {
                return Err(invalid(format!(
                    "tools[{i}]: only function tools can be converted for {provider} (got type {kind:?})"
                )));
            }
            let function = tool.get("function").unwrap_or(&Value::Null);
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("tools[{i}]: function.name is required")))?;
            Ok(FunctionTool {
                name,
                description: function.get("description").filter(|d| !d.is_null()),
                parameters: function.get("parameters").filter(|p| !p.is_null()),
            })
        })
        .collect()
}

fn invalid(msg: impl Into<String>) -> ProviderError {
    ProviderError::InvalidRequest(msg.into())
}

fn bad_upstream(msg: impl Into<String>) -> ProviderError {
    ProviderError::BadUpstreamResponse(msg.into())
}

/// A request ready to send: what `build_request` turns into an HTTP request.
pub(crate) struct Prepared<'a> {
    pub url: Url,
    pub headers: Vec<(&'static str, HeaderValue)>,
    pub body: Body<'a>,
}

/// The body of a request to a provider.
pub(crate) enum Body<'a> {
    /// Built for the provider.
    Built(Value),
    /// The client's body with the fields of `set` set (replaced or added) and those of `remove`
    /// left out: serialized from the client's body, which is not copied.
    Patched {
        base: &'a Map<String, Value>,
        set: Vec<(&'static str, Value)>,
        remove: &'static [&'static str],
    },
}

impl serde::Serialize for Body<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        match self {
            Body::Built(value) => value.serialize(serializer),
            Body::Patched { base, set, remove } => {
                let mut map = serializer.serialize_map(None)?;
                for (key, value) in base.iter() {
                    let key = key.as_str();
                    if !remove.contains(&key) && !set.iter().any(|(k, _)| *k == key) {
                        map.serialize_entry(key, value)?;
                    }
                }
                for (key, value) in set {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
        }
    }
}

impl ModelConfig {
    /// Whether the provider has an API for `op` (anthropic has no embeddings).
    pub fn supports(&self, op: Operation) -> bool {
        self.provider.provider().serves(op)
    }

    /// Builds the upstream HTTP request for an OpenAI-shaped request body (`/v1/chat/completions`,
    /// `/v1/completions` or `/v1/embeddings` body as the client sent it). Sets `model` to the
    /// configured model, converts the body to the provider's format, sets URL, auth headers and
    /// content-type. Streaming is taken from the body's `stream` field. A streamed call to an
    /// OpenAI-compatible provider always asks for usage (`stream_options.include_usage: true`):
    /// the [`StreamConverter`] removes it again for a client that did not ask for it.
    pub fn build_request(
        &self,
        op: Operation,
        body: &Value,
    ) -> Result<Request<Bytes>, ProviderError> {
        let prepared = self.prepare(op, body)?;
        self.to_request(prepared)
    }

    pub(crate) fn prepare<'a>(
        &self,
        op: Operation,
        body: &'a Value,
    ) -> Result<Prepared<'a>, ProviderError> {
        if !self.supports(op) {
            return Err(ProviderError::Unsupported(format!(
                "model {} (provider {}) does not support {}",
                self.name,
                self.provider_name(),
                op.as_str()
            )));
        }
        let body = body
            .as_object()
            .ok_or_else(|| invalid("the request body must be a JSON object"))?;
        match &self.provider {
            ProviderConfig::Azure(azure) => azure::prepare(self, azure, op, body),
            ProviderConfig::Anthropic { .. } => anthropic::prepare(self, op, body),
            ProviderConfig::Gemini { .. } => gemini::prepare(self, op, body),
            ProviderConfig::OpenAi { .. } => openai::prepare(self, op, body),
        }
    }

    fn to_request(&self, prepared: Prepared<'_>) -> Result<Request<Bytes>, ProviderError> {
        let uri = Uri::try_from(prepared.url.as_str()).map_err(|e| {
            ProviderError::Config(format!(
                "model {}: {} is not a usable request URL: {e}",
                self.name,
                self.redact(prepared.url.as_str())
            ))
        })?;
        // Serializing a Value cannot fail.
        let body = serde_json::to_vec(&prepared.body).unwrap_or_default();
        let mut request = Request::new(Bytes::from(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.reserve(1 + prepared.headers.len());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in prepared.headers {
            headers.insert(name, value);
        }
        Ok(request)
    }

    /// Converts a successful (2xx) upstream response body to the OpenAI response shape for `op`
    /// (chat.completion / text_completion / list of embeddings), with `usage` in OpenAI form.
    pub fn parse_response(&self, op: Operation, body: &[u8]) -> Result<Value, ProviderError> {
        self.parse_response_for(op, None, body)
    }

    /// [`ModelConfig::parse_response`], knowing the client's request body: a provider whose
    /// response cannot express a request option gets it applied here (Gemini embeddings with
    /// `encoding_format: "base64"`, which OpenAI SDKs request by default).
    pub fn parse_response_for(
        &self,
        op: Operation,
        request: Option<&Value>,
        body: &[u8],
    ) -> Result<Value, ProviderError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            bad_upstream(format!(
                "{} returned a response that is not JSON ({e}): {}",
                self.provider_name(),
                crate::text::truncate(&String::from_utf8_lossy(body), 200)
            ))
        })?;
        match &self.provider {
            ProviderConfig::Anthropic { .. } => anthropic::parse_response(self, op, value),
            ProviderConfig::Gemini { .. } => gemini::parse_response(self, op, request, value),
            ProviderConfig::OpenAi { .. } | ProviderConfig::Azure(_) => {
                openai::parse_response(self, op, value)
            }
        }
    }

    /// Whether a successful (2xx) answer for `op` is already in the OpenAI shape, so that
    /// [`ModelConfig::parse_response_for`] returns it as parsed and the client can be sent the
    /// provider's bytes as they are (OpenAI-compatible providers and Azure, except completions
    /// served through chat).
    pub fn answers_verbatim(&self, op: Operation) -> bool {
        match &self.provider {
            ProviderConfig::Anthropic { .. } | ProviderConfig::Gemini { .. } => false,
            ProviderConfig::Azure(_) => true,
            ProviderConfig::OpenAi { provider, .. } => {
                op != Operation::Completions || !openai::completions_via_chat(*provider)
            }
        }
    }

    /// For an answer that [`ModelConfig::answers_verbatim`]: checks it as
    /// [`ModelConfig::parse_response_for`] would, reading only its list and usage. `None`: look at
    /// it whole with [`ModelConfig::parse_response_for`] (which says what is wrong, if anything).
    pub fn check_verbatim(&self, op: Operation, body: &[u8]) -> Option<openai::Checked> {
        if !self.answers_verbatim(op) {
            return None;
        }
        openai::check(op, body)
    }

    /// Stream conversion for `op` (Chat or Completions). `client_wants_usage`: whether the client
    /// sent `stream_options.include_usage: true`.
    pub fn stream_converter(&self, op: Operation, client_wants_usage: bool) -> StreamConverter {
        StreamConverter::new(self, op, client_wants_usage)
    }

    /// Human-readable message from an upstream error response (status + body): OpenAI's
    /// `{"error":{"message"}}`, Anthropic's `{"type":"error","error":{"type","message"}}`,
    /// Gemini's `{"error":{"code","message","status"}}` and a few other common shapes; else the
    /// body text, truncated; for an empty body the HTTP status. The API key never appears in it.
    pub fn error_message(&self, status: u16, body: &[u8]) -> String {
        let text = String::from_utf8_lossy(body);
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| message_of_error_body(&v))
            .unwrap_or_else(|| {
                let text = text.trim();
                if text.is_empty() {
                    let reason = axum::http::StatusCode::from_u16(status)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("");
                    format!("HTTP {status} {reason}").trim_end().to_string()
                } else {
                    crate::text::truncate(text, 500)
                }
            });
        self.redact(&message)
    }

    /// Anthropic Messages API pass-through (route `/gateway/anthropic/v1/messages`): the body is
    /// Anthropic-shaped and only `model` is replaced. Other providers: `Unsupported`.
    pub fn build_anthropic_passthrough(
        &self,
        body: &Value,
    ) -> Result<Request<Bytes>, ProviderError> {
        if !matches!(self.provider, ProviderConfig::Anthropic { .. }) {
            return Err(ProviderError::Unsupported(format!(
                "model {} (provider {}) does not serve the Anthropic Messages API",
                self.name,
                self.provider_name()
            )));
        }
        let base = body
            .as_object()
            .ok_or_else(|| invalid("the request body must be a JSON object"))?;
        let prepared = Prepared {
            url: anthropic::messages_url(self),
            headers: anthropic::headers(self)?,
            body: Body::Patched {
                base,
                set: vec![("model", Value::String(self.model.clone()))],
                remove: &[],
            },
        };
        self.to_request(prepared)
    }

    /// The API key as a sensitive header value (hidden from `Debug` of headers).
    pub(crate) fn key_header(&self, prefix: &str) -> Result<Option<HeaderValue>, ProviderError> {
        let Some(key) = self.api_key() else {
            return Ok(None);
        };
        let mut value = HeaderValue::from_str(&format!("{prefix}{key}")).map_err(|_| {
            ProviderError::Config(format!(
                "model {}: the API key contains characters not allowed in an HTTP header",
                self.name
            ))
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    /// Replaces any occurrence of the API key in `text` (an upstream might echo it).
    fn redact(&self, text: &str) -> String {
        match self.api_key() {
            Some(key) if key.len() >= 8 && text.contains(key) => text.replace(key, "[REDACTED]"),
            _ => text.to_string(),
        }
    }
}

/// `base` with `segments` appended to its path (a trailing `/` of the base does not double).
pub(crate) fn join_url(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// The last non-empty segment of the URL's path.
pub(crate) fn last_path_segment(url: &Url) -> Option<&str> {
    url.path_segments()?.rev().find(|s| !s.is_empty())
}

/// Usage from an OpenAI-shaped response or chunk (`usage.prompt_tokens`/`completion_tokens`/
/// `total_tokens`, also Groq's `x_groq.usage`), or from an Anthropic-native response or stream
/// event (`usage.input_tokens`/`output_tokens`, `message.usage` of `message_start`; cache tokens
/// are added to the input as MLflow does), or from a Gemini-native response (`usageMetadata`).
pub fn usage_of(v: &Value) -> Option<Usage> {
    // `get` chains, not `pointer`: this runs on every answer, and a pointer is parsed each time.
    let u = [
        v.get("usage"),
        v.get("message").and_then(|m| m.get("usage")),
        v.get("x_groq").and_then(|x| x.get("usage")),
    ]
    .into_iter()
    .flatten()
    .find(|u| u.is_object());
    if let Some(usage) = u.and_then(usage_of_fields) {
        return Some(usage);
    }
    v.get("usageMetadata")
        .filter(|m| m.is_object())
        .map(usage_of_metadata)
}

/// Usage from Gemini's `usageMetadata` object (tool-use prompt tokens count as input, thoughts as
/// output).
pub(crate) fn usage_of_metadata(m: &Value) -> Usage {
    let num = |key: &str| m.get(key).and_then(Value::as_u64);
    let input = num("promptTokenCount").unwrap_or(0) + num("toolUsePromptTokenCount").unwrap_or(0);
    let output = num("candidatesTokenCount").unwrap_or(0) + num("thoughtsTokenCount").unwrap_or(0);
    Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: num("totalTokenCount").unwrap_or(input + output),
    }
}

/// Usage from a `usage` object: OpenAI's `prompt_tokens`/`completion_tokens`/`total_tokens`, or
/// Anthropic's `input_tokens`/`output_tokens` (cache tokens added to the input).
pub(crate) fn usage_of_fields(u: &Value) -> Option<Usage> {
    let num = |key: &str| u.get(key).and_then(Value::as_u64);
    if u.get("prompt_tokens").is_some() || u.get("completion_tokens").is_some() {
        let input = num("prompt_tokens").unwrap_or(0);
        let output = num("completion_tokens").unwrap_or(0);
        return Some(Usage {
            input_tokens: input,
            output_tokens: output,
            total_tokens: num("total_tokens").unwrap_or(input + output),
        });
    }
    if u.get("input_tokens").is_some() || u.get("output_tokens").is_some() {
        let input = num("input_tokens").unwrap_or(0)
            + num("cache_read_input_tokens").unwrap_or(0)
            + num("cache_creation_input_tokens").unwrap_or(0);
        let output = num("output_tokens").unwrap_or(0);
        return Some(Usage {
            input_tokens: input,
            output_tokens: output,
            total_tokens: input + output,
        });
    }
    None
}

/// The message of an error body of any of the common shapes.
fn message_of_error_body(v: &Value) -> Option<String> {
    // Gemini sometimes wraps the error in a list.
    if let Some(first) = v.as_array().and_then(|a| a.first()) {
        return message_of_error_body(first);
    }
    let non_empty = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
    match v.get("error") {
        Some(Value::Object(e)) => {
            let message = e.get("message").and_then(|m| match m {
                Value::String(s) => non_empty(s),
                Value::Null => None,
                other => Some(other.to_string()),
            });
            // OpenAI: type ("invalid_request_error"), Anthropic: type ("overloaded_error"),
            // Gemini: status ("INVALID_ARGUMENT").
            let kind = ["type", "status", "code"]
                .iter()
                .find_map(|k| e.get(*k).and_then(Value::as_str).and_then(non_empty));
            return match (message, kind) {
                (Some(m), Some(k)) => Some(format!("{m} ({k})")),
                (Some(m), None) => Some(m),
                (None, Some(k)) => Some(k),
                (None, None) => Some(Value::Object(e.clone()).to_string()),
            };
        }
        Some(Value::String(s)) => return non_empty(s),
        _ => {}
    }
    for key in ["message", "detail", "msg"] {
        match v.get(key) {
            Some(Value::String(s)) => {
                if let Some(s) = non_empty(s) {
                    return Some(s);
                }
            }
            Some(other @ (Value::Array(_) | Value::Object(_))) => {
                return Some(crate::text::truncate(&other.to_string(), 500));
            }
            _ => {}
        }
    }
    None
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------------
// The OpenAI chat request, typed as far as the conversions to Anthropic and Gemini need it.

/// An OpenAI chat completions request. Only what conversions act on is typed; the rest stays in
/// `rest`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessage {
    pub role: String,
    /// A string, a list of content parts, or null.
    #[serde(default)]
    pub content: Option<Value>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: FunctionCall,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct FunctionCall {
    pub name: String,
    /// JSON text, as OpenAI sends it.
    #[serde(default)]
    pub arguments: Option<String>,
}

impl ChatRequest {
    pub fn parse(body: &Map<String, Value>) -> Result<Self, ProviderError> {
        if !body.contains_key("messages") {
            return Err(invalid("`messages` is required"));
        }
        serde_json::from_value(Value::Object(body.clone()))
            .map_err(|e| invalid(format!("invalid chat request: {e}")))
    }

    /// Removes and returns an optional field, checking its type.
    pub fn take_f64(&mut self, key: &str) -> Result<Option<f64>, ProviderError> {
        match self.rest.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(_) => Err(invalid(format!("`{key}` must be a number"))),
        }
    }

    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>, ProviderError> {
        match self.rest.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(_) => Err(invalid(format!("`{key}` must be a non-negative integer"))),
        }
    }

    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, ProviderError> {
        match self.rest.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(invalid(format!("`{key}` must be true or false"))),
        }
    }

    /// `stop`: a string or a list of strings, as a list.
    pub fn take_stop(&mut self) -> Result<Option<Vec<String>>, ProviderError> {
        match self.rest.remove("stop") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(vec![s])),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s),
                    _ => Err(invalid("`stop` must be a string or a list of strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(invalid("`stop` must be a string or a list of strings")),
        }
    }

    /// `max_completion_tokens`, else `max_tokens`.
    pub fn take_max_tokens(&mut self) -> Result<Option<u64>, ProviderError> {
        let max_completion_tokens = self.take_u64("max_completion_tokens")?;
        let max_tokens = self.take_u64("max_tokens")?;
        Ok(max_completion_tokens.or(max_tokens))
    }

    /// Rejects the deprecated `functions`/`function_call` parameters.
    pub fn reject_legacy_functions(&self, provider: &str) -> Result<(), ProviderError> {
        if self.rest.contains_key("functions") || self.rest.contains_key("function_call") {
            return Err(invalid(format!(
                "`functions` and `function_call` are deprecated and not converted for {provider}: use `tools` and `tool_choice`"
            )));
        }
        Ok(())
    }
}

/// The text of a message's content: a string, or the text parts of a list joined (other part
/// types are an error: `what` names the message for it).
pub(crate) fn content_text(content: &Option<Value>, what: &str) -> Result<String, ProviderError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    other => {
                        return Err(invalid(format!(
                            "{what}: content part type {} is not supported here, only text",
                            other.unwrap_or("(none)")
                        )));
                    }
                }
            }
            Ok(text)
        }
        Some(_) => Err(invalid(format!(
            "{what}: content must be a string or a list of content parts"
        ))),
    }
}

/// An `image_url` part's URL, parsed.
pub(crate) enum ImageRef {
    /// `data:<mime>;base64,<data>`
    Base64 { mime: String, data: String },
    /// `http(s)://...`
    Url(String),
}

pub(crate) fn image_ref(part: &Value) -> Result<ImageRef, ProviderError> {
    let url = match part.get("image_url") {
        Some(Value::String(u)) => u.as_str(),
        Some(Value::Object(o)) => o.get("url").and_then(Value::as_str).unwrap_or(""),
        _ => "",
    };
    if let Some(rest) = url.strip_prefix("data:") {
        if let Some((mime, data)) = rest.split_once(";base64,")
            && !mime.is_empty()
            && !mime.contains(';')
        {
            return Ok(ImageRef::Base64 {
                mime: mime.to_string(),
                data: data.to_string(),
            });
        }
        return Err(invalid(
            "image_url: only base64 data URLs (data:<mime type>;base64,<data>) are supported",
        ));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(ImageRef::Url(url.to_string()));
    }
    Err(invalid(
        "image_url.url must be a data: URL or an http(s):// URL",
    ))
}

/// An OpenAI completions request as a chat request: `prompt` becomes a single user message;
/// parameters only the completions API has are dropped.
pub(crate) fn completions_to_chat(
    body: &Map<String, Value>,
) -> Result<Map<String, Value>, ProviderError> {
    let mut chat = body.clone();
    let prompt = match chat.remove("prompt") {
        Some(Value::String(s)) => s,
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(_)) => {
            return Err(invalid(
                "`prompt` must be a single string for this provider (lists of prompts and token arrays are not supported)",
            ));
        }
        Some(_) => return Err(invalid("`prompt` must be a string")),
        None => return Err(invalid("`prompt` is required")),
    };
    for key in ["echo", "suffix", "best_of", "logprobs"] {
        chat.remove(key);
    }
    chat.insert(
        "messages".into(),
        json!([{"role": "user", "content": prompt}]),
    );
    Ok(chat)
}

/// A chat.completion response as a text_completion response.
pub(crate) fn chat_response_to_completion(mut chat: Value) -> Value {
    let choices = chat
        .get("choices")
        .and_then(Value::as_array)
        .map(|choices| {
            choices
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    json!({
                        "text": c.pointer("/message/content").and_then(Value::as_str).unwrap_or(""),
                        "index": c.get("index").cloned().unwrap_or(json!(i)),
                        "logprobs": null,
                        "finish_reason": c.get("finish_reason").cloned().unwrap_or(Value::Null),
                    })
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if let Some(obj) = chat.as_object_mut() {
        obj.insert("object".into(), json!("text_completion"));
        obj.insert("choices".into(), Value::Array(choices));
        obj.remove("system_fingerprint");
    }
    chat
}
