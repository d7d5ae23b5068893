//! Anthropic: the Messages API, `{apiBase}/v1/messages` (an `apiBase` ending in `/v1`, MLflow's
//! convention, is not doubled), headers `x-api-key` and `anthropic-version: 2023-06-01`.
//!
//! Chat requests are converted as MLflow's Anthropic provider converts them:
//! - system (and developer) messages are joined with `\n` into the top-level `system`;
//! - user content: a string, or parts (text; `image_url` with a base64 data URL becomes a base64
//!   image block, an http(s) URL an image block with a `url` source);
//! - assistant `tool_calls` become `tool_use` blocks, `tool` messages `tool_result` blocks in a
//!   user message (consecutive ones share it); function `tools` become Anthropic tools and
//!   `tool_choice` none/auto/required/{function} becomes none/auto/any/{tool};
//!   `parallel_tool_calls: false` sets `disable_parallel_tool_use`;
//! - `max_completion_tokens` or `max_tokens`, default 8192 (MLflow's default); `temperature` is
//!   halved (OpenAI's range is 0..2, Anthropic's 0..1); `temperature` with `top_p` is rejected
//!   (as MLflow does: recent Claude models refuse both); `stop` → `stop_sequences`; `n` must be
//!   1; `user` → `metadata.user_id`; `response_format` json_schema → `output_config.format`,
//!   json_object → an instruction appended to `system` (MLflow's conversions);
//! - OpenAI parameters Anthropic has no equivalent for (`frequency_penalty`, `seed`,
//!   `logprobs`, ...) are dropped; any other field passes through (`top_k`, `thinking`, ...).
//!
//! Completions: `prompt` becomes a single user message; the answer becomes a text_completion.
//! Embeddings: Anthropic has none.

use std::collections::HashMap;

use axum::http::HeaderValue;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use url::Url;

use super::sse::SseEvent;
use super::{
    Body, ChatMessage, ChatRequest, ImageRef, ModelConfig, Operation, Prepared, ProviderError,
    bad_upstream, chat_response_to_completion, completions_to_chat, content_text, image_ref,
    invalid, join_url, last_path_segment, message_of_error_body, now_secs,
};

/// The `anthropic-version` header sent (MLflow's default).
pub const API_VERSION: &str = "2023-06-01";
/// `max_tokens` when the request sets none (MLflow's MLFLOW_AI_GATEWAY_ANTHROPIC_DEFAULT_MAX_TOKENS).
pub const DEFAULT_MAX_TOKENS: u64 = 8192;

/// The instruction MLflow adds to `system` for `response_format: {"type": "json_object"}`:
/// Anthropic has no schema-less JSON mode.
const JSON_OBJECT_INSTRUCTION: &str = "Respond with only a single valid JSON object. Do not include any explanatory text, markdown, or code fences before or after the JSON object.";

/// OpenAI chat parameters with no Anthropic equivalent: dropped rather than sent (Anthropic
/// rejects unknown parameters).
const DROPPED: &[&str] = &[
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "seed",
    "stream_options",
    "store",
    "service_tier",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
    "metadata",
    "prompt_cache_key",
    "safety_identifier",
];

/// `{apiBase}/v1/messages`.
pub fn messages_url(up: &ModelConfig) -> Url {
    if last_path_segment(up.api_base()) == Some("v1") {
        join_url(up.api_base(), &["messages"])
    } else {
        join_url(up.api_base(), &["v1", "messages"])
    }
}

pub(crate) fn headers(up: &ModelConfig) -> Result<Vec<(&'static str, HeaderValue)>, ProviderError> {
    let mut headers = Vec::with_capacity(2);
    if let Some(key) = up.key_header("")? {
        headers.push(("x-api-key", key));
    }
    headers.push(("anthropic-version", HeaderValue::from_static(API_VERSION)));
    Ok(headers)
}

pub(crate) fn prepare(
    up: &ModelConfig,
    op: Operation,
    body: &Map<String, Value>,
) -> Result<Prepared<'static>, ProviderError> {
    let converted = match op {
        Operation::Chat => chat_request(up, body)?,
        Operation::Completions => chat_request(up, &completions_to_chat(body)?)?,
        Operation::Embeddings => {
            return Err(ProviderError::Unsupported(
                "anthropic has no embeddings API".into(),
            ));
        }
    };
    Ok(Prepared {
        url: messages_url(up),
        headers: headers(up)?,
        body: Body::Built(converted),
    })
}

/// An OpenAI chat request as an Anthropic Messages request.
fn chat_request(up: &ModelConfig, body: &Map<String, Value>) -> Result<Value, ProviderError> {
    let mut req = ChatRequest::parse(body)?;
    req.reject_legacy_functions("anthropic")?;
    let mut out = Map::new();
    out.insert("model".into(), json!(up.model));

    let (mut system, messages) = convert_messages(&req.messages)?;
    out.insert("messages".into(), Value::Array(messages));

    let max_tokens = req.take_max_tokens()?.unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max_tokens));

    let temperature = req.take_f64("temperature")?;
    let top_p = req.take_f64("top_p")?;
    if temperature.is_some() && top_p.is_some() {
        return Err(invalid(
            "set either `temperature` or `top_p` for anthropic, not both",
        ));
    }
    if let Some(t) = temperature {
        // OpenAI's temperature is 0..2, Anthropic's 0..1: halved, as MLflow does.
        out.insert("temperature".into(), json!(t * 0.5));
    }
    if let Some(p) = top_p {
        out.insert("top_p".into(), json!(p));
    }
    if let Some(stop) = req.take_stop()? {
        out.insert("stop_sequences".into(), json!(stop));
    }
    if let Some(stream) = req.take_bool("stream")? {
        out.insert("stream".into(), json!(stream));
    }
    if let Some(n) = req.take_u64("n")?
        && n != 1
    {
        return Err(invalid(format!("`n` must be 1 for anthropic (got {n})")));
    }

    convert_tools(&mut req, &mut out)?;

    match req.rest.remove("response_format") {
        None | Some(Value::Null) => {}
        Some(format) => match format.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                system = Some(match system {
                    Some(s) if !s.is_empty() => format!("{s}\n{JSON_OBJECT_INSTRUCTION}"),
                    _ => JSON_OBJECT_INSTRUCTION.to_string(),
                });
            }
            Some("json_schema") => {
                let mut schema = format
                    .pointer("/json_schema/schema")
                    .cloned()
                    .unwrap_or_else(|| json!({}));
                // Anthropic's structured outputs need `additionalProperties: false` on every
                // object; a schema with a free-form object cannot say so, and is then answered
                // in plain text (as MLflow does).
                if enforce_strict_schema(&mut schema) {
                    out.insert(
                        "output_config".into(),
                        json!({"format": {"type": "json_schema", "schema": schema}}),
                    );
                }
            }
            _ => {
                return Err(invalid(
                    "`response_format.type` must be text, json_object or json_schema",
                ));
            }
        },
    }
    if let Some(s) = system.filter(|s| !s.is_empty()) {
        out.insert("system".into(), json!(s));
    }

    match req.rest.remove("user") {
        Some(Value::String(user)) => {
            out.insert("metadata".into(), json!({ "user_id": user }));
        }
        None | Some(Value::Null) => {}
        Some(_) => return Err(invalid("`user` must be a string")),
    }
    for key in DROPPED {
        req.rest.remove(*key);
    }
    req.rest.remove("model");
    for (k, v) in req.rest {
        out.entry(k).or_insert(v);
    }
    Ok(Value::Object(out))
}

/// The system text and the Anthropic messages.
fn convert_messages(
    messages: &[ChatMessage],
) -> Result<(Option<String>, Vec<Value>), ProviderError> {
    let mut system: Vec<String> = Vec::new();
    let mut out: Vec<Value> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let what = format!("messages[{i}]");
        match m.role.as_str() {
            "system" | "developer" => system.push(content_text(&m.content, &what)?),
            "user" => out.push(json!({
                "role": "user",
                "content": user_content(&m.content, &what)?,
            })),
            "assistant" => out.push(assistant_message(m, &what)?),
            "tool" => {
                let block = tool_result(m, &what)?;
                // Results of parallel calls go together in one user message.
                if let Some(Value::Array(blocks)) = out
                    .last_mut()
                    .filter(|last| last["role"] == "user")
                    .and_then(|last| last.get_mut("content"))
                    && blocks.iter().all(|b| b["type"] == "tool_result")
                {
                    blocks.push(block);
                } else {
                    out.push(json!({"role": "user", "content": [block]}));
                }
            }
            other => {
                return Err(invalid(format!(
                    "{what}: role {other:?} is not supported for anthropic"
                )));
            }
        }
    }
    if out.is_empty() {
        return Err(invalid(
            "anthropic needs at least one user or assistant message besides system messages",
        ));
    }
    let system = (!system.is_empty()).then(|| system.join("\n"));
    Ok((system, out))
}

fn user_content(content: &Option<Value>, what: &str) -> Result<Value, ProviderError> {
    let parts = match content {
        None | Some(Value::Null) => return Ok(json!("")),
        Some(Value::String(s)) => return Ok(json!(s)),
        Some(Value::Array(parts)) => parts,
        Some(_) => {
            return Err(invalid(format!(
                "{what}: content must be a string or a list of content parts"
            )));
        }
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for part in parts {
        let mut block = match part.get("type").and_then(Value::as_str) {
            Some("text") => json!({
                "type": "text",
                "text": part.get("text").and_then(Value::as_str).unwrap_or(""),
            }),
            Some("image_url") => {
                match image_ref(part).map_err(|e| invalid(format!("{what}: {e}")))? {
                    ImageRef::Base64 { mime, data } => json!({
                        "type": "image",
                        "source": {"type": "base64", "media_type": mime, "data": data},
                    }),
                    ImageRef::Url(url) => json!({
                        "type": "image",
                        "source": {"type": "url", "url": url},
                    }),
                }
            }
            other => {
                return Err(invalid(format!(
                    "{what}: content part type {} is not supported for anthropic (text and image_url are)",
                    other.unwrap_or("(none)")
                )));
            }
        };
        // Prompt caching marks survive (an Anthropic extension some OpenAI clients send).
        if let (Some(cache), Some(obj)) = (part.get("cache_control"), block.as_object_mut()) {
            obj.insert("cache_control".into(), cache.clone());
        }
        blocks.push(block);
    }
    Ok(Value::Array(blocks))
}

fn assistant_message(m: &ChatMessage, what: &str) -> Result<Value, ProviderError> {
    let text = content_text(&m.content, what)?;
    let calls = m.tool_calls.as_deref().unwrap_or_default();
    if calls.is_empty() {
        return Ok(json!({"role": "assistant", "content": text}));
    }
    let mut blocks = Vec::with_capacity(calls.len() + 1);
    if !text.is_empty() {
        blocks.push(json!({"type": "text", "text": text}));
    }
    for call in calls {
        if call.kind.as_deref().is_some_and(|k| k != "function") {
            return Err(invalid(format!(
                "{what}: only function tool calls can be converted for anthropic"
            )));
        }
        let arguments = call.function.arguments.as_deref().unwrap_or("").trim();
        let input: Value = if arguments.is_empty() {
            json!({})
        } else {
            serde_json::from_str(arguments).map_err(|e| {
                invalid(format!(
                    "{what}: tool call {} has arguments that are not JSON: {e}",
                    call.id
                ))
            })?
        };
        if !input.is_object() {
            return Err(invalid(format!(
                "{what}: tool call {} arguments must be a JSON object",
                call.id
            )));
        }
        blocks.push(json!({
            "type": "tool_use",
            "id": call.id,
            "name": call.function.name,
            "input": input,
        }));
    }
    Ok(json!({"role": "assistant", "content": blocks}))
}

fn tool_result(m: &ChatMessage, what: &str) -> Result<Value, ProviderError> {
    let id = m
        .tool_call_id
        .as_deref()
        .ok_or_else(|| invalid(format!("{what}: a tool message needs tool_call_id")))?;
    let content = match &m.content {
        None | Some(Value::Null) => json!(""),
        Some(Value::String(s)) => json!(s),
        Some(Value::Array(_)) => {
            json!([{"type": "text", "text": content_text(&m.content, what)?}])
        }
        Some(_) => {
            return Err(invalid(format!(
                "{what}: content must be a string or a list of content parts"
            )));
        }
    };
    Ok(json!({"type": "tool_result", "tool_use_id": id, "content": content}))
}

fn convert_tools(req: &mut ChatRequest, out: &mut Map<String, Value>) -> Result<(), ProviderError> {
    let mut has_tools = false;
    match req.rest.remove("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(tools)) => {
            let mut converted = Vec::with_capacity(tools.len());
            for tool in super::function_tools(&tools, "anthropic")? {
                let mut t = Map::new();
                t.insert("name".into(), json!(tool.name));
                if let Some(d) = tool.description {
                    t.insert("description".into(), d.clone());
                }
                t.insert(
                    "input_schema".into(),
                    tool.parameters
                        .cloned()
                        .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                );
                converted.push(Value::Object(t));
            }
            has_tools = !converted.is_empty();
            out.insert("tools".into(), Value::Array(converted));
        }
        Some(_) => return Err(invalid("`tools` must be a list")),
    }
    let mut choice = match req.rest.remove("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "none" => json!({"type": "none"}),
            "auto" => json!({"type": "auto"}),
            "required" => json!({"type": "any"}),
            other => {
                return Err(invalid(format!(
                    "`tool_choice` {other:?} is not one of none, auto, required"
                )));
            }
        }),
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if v["type"] == "function" => Some(json!({"type": "tool", "name": name})),
            _ => {
                return Err(invalid(
                    "`tool_choice` must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ));
            }
        },
    };
    if req.take_bool("parallel_tool_calls")? == Some(false) && has_tools {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if c["type"] != "none"
            && let Some(obj) = c.as_object_mut()
        {
            obj.insert("disable_parallel_tool_use".into(), json!(true));
        }
    }
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
    Ok(())
}

/// Sets `additionalProperties: false` on every object schema, as Anthropic's structured outputs
/// require; false when the schema has an object without `properties` (a free-form map, which
/// cannot be expressed).
fn enforce_strict_schema(schema: &mut Value) -> bool {
    match schema {
        Value::Object(obj) => {
            if obj.get("type").and_then(Value::as_str) == Some("object") {
                if !obj.contains_key("properties") {
                    return false;
                }
                obj.insert("additionalProperties".into(), json!(false));
            }
            obj.values_mut().all(enforce_strict_schema)
        }
        Value::Array(items) => items.iter_mut().all(enforce_strict_schema),
        _ => true,
    }
}

// ---------------------------------------------------------------------------------------------
// Responses

#[derive(Deserialize)]
struct MessagesResponse {
    id: String,
    model: String,
    #[serde(default)]
    content: Vec<Value>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<TokenCounts>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
struct TokenCounts {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

impl TokenCounts {
    fn update(&mut self, other: TokenCounts) {
        self.input_tokens = other.input_tokens.or(self.input_tokens);
        self.output_tokens = other.output_tokens.or(self.output_tokens);
        self.cache_read_input_tokens = other
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
        self.cache_creation_input_tokens = other
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
    }

    /// OpenAI usage. As MLflow does, cache reads and writes count as prompt tokens (Anthropic's
    /// input_tokens excludes them), and cache reads are `prompt_tokens_details.cached_tokens`.
    fn to_openai(self) -> Value {
        let prompt = self.input_tokens.unwrap_or(0)
            + self.cache_read_input_tokens.unwrap_or(0)
            + self.cache_creation_input_tokens.unwrap_or(0);
        let completion = self.output_tokens.unwrap_or(0);
        let mut usage = json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        });
        if let (Some(cached), Some(obj)) = (self.cache_read_input_tokens, usage.as_object_mut()) {
            obj.insert(
                "prompt_tokens_details".into(),
                json!({ "cached_tokens": cached }),
            );
        }
        usage
    }
}

/// Anthropic's stop_reason as an OpenAI finish_reason.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn
        _ => "stop",
    }
}

pub(crate) fn parse_response(
    _up: &ModelConfig,
    op: Operation,
    value: Value,
) -> Result<Value, ProviderError> {
    if value.get("type").and_then(Value::as_str) == Some("error") {
        let message = message_of_error_body(&value).unwrap_or_default();
        return Err(bad_upstream(format!(
            "anthropic returned an error: {message}"
        )));
    }
    let resp: MessagesResponse = serde_json::from_value(value).map_err(|e| {
        bad_upstream(format!(
            "anthropic returned a response that is not a message: {e}"
        ))
    })?;
    let mut text = String::new();
    let mut has_text = false;
    let mut tool_calls = Vec::new();
    for block in &resp.content {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                text.push_str(block.get("text").and_then(Value::as_str).unwrap_or(""));
                has_text = true;
            }
            Some("tool_use") => tool_calls.push(json!({
                "id": block.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {
                    "name": block.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": block.get("input").map_or_else(|| "{}".to_string(), Value::to_string),
                },
            })),
            _ => {} // thinking, redacted_thinking, server tool blocks: no OpenAI equivalent
        }
    }
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    message.insert(
        "content".into(),
        if has_text || tool_calls.is_empty() {
            json!(text)
        } else {
            Value::Null
        },
    );
    if !tool_calls.is_empty() {
        message.insert("tool_calls".into(), Value::Array(tool_calls));
    }
    let chat = json!({
        "id": resp.id,
        "object": "chat.completion",
        "created": now_secs(),
        "model": resp.model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": finish_reason(resp.stop_reason.as_deref().unwrap_or("end_turn")),
        }],
        "usage": resp.usage.unwrap_or_default().to_openai(),
    });
    Ok(match op {
        Operation::Completions => chat_response_to_completion(chat),
        _ => chat,
    })
}

// ---------------------------------------------------------------------------------------------
// Streaming

/// Converts the Messages API event stream (message_start, content_block_start/delta/stop,
/// message_delta, message_stop, ping, error) into chat.completion.chunk objects: a first chunk
/// with `delta.role`, content and tool-call deltas, a chunk with the finish_reason, then a usage
/// chunk (`choices: []`) at message_stop.
pub(crate) struct StreamState {
    id: String,
    model: String,
    created: u64,
    started: bool,
    /// content block index → OpenAI tool call index
    tool_blocks: HashMap<u64, u64>,
    tokens: TokenCounts,
    saw_usage: bool,
    usage_sent: bool,
}

impl StreamState {
    pub fn new() -> Self {
        StreamState {
            id: String::new(),
            model: String::new(),
            created: now_secs(),
            started: false,
            tool_blocks: HashMap::new(),
            tokens: TokenCounts::default(),
            saw_usage: false,
            usage_sent: false,
        }
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    }

    /// The first chunk (`delta.role`), once.
    fn start(&mut self, out: &mut Vec<Value>) {
        if !self.started {
            self.started = true;
            out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
        }
    }

    fn record_usage(&mut self, usage: Option<&Value>) {
        if let Some(counts) = usage.and_then(|u| TokenCounts::deserialize(u).ok()) {
            self.tokens.update(counts);
            self.saw_usage = true;
        }
    }

    pub fn usage_json(&self) -> Option<Value> {
        self.saw_usage.then(|| self.tokens.to_openai())
    }

    fn usage_chunk(&mut self) -> Option<Value> {
        if self.usage_sent || !self.saw_usage {
            return None;
        }
        self.usage_sent = true;
        Some(json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.tokens.to_openai(),
        }))
    }

    pub fn event(&mut self, event: SseEvent) -> Result<Vec<Value>, ProviderError> {
        let data = event.data.trim();
        if data.is_empty() {
            return Ok(Vec::new());
        }
        let v: Value = serde_json::from_str(data).map_err(|e| {
            bad_upstream(format!(
                "anthropic stream sent an event that is not JSON ({e}): {}",
                crate::text::truncate(data, 200)
            ))
        })?;
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .or(event.event.as_deref())
            .unwrap_or("");
        let mut out = Vec::new();
        match kind {
            "message_start" => {
                let message = v.get("message").unwrap_or(&Value::Null);
                if let Some(id) = message.get("id").and_then(Value::as_str) {
                    self.id = id.to_string();
                }
                if let Some(model) = message.get("model").and_then(Value::as_str) {
                    self.model = model.to_string();
                }
                self.record_usage(message.get("usage"));
                self.start(&mut out);
            }
            "content_block_start" => {
                self.start(&mut out);
                let block = v.get("content_block").unwrap_or(&Value::Null);
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        if let Some(text) = block
                            .get("text")
                            .and_then(Value::as_str)
                            .filter(|t| !t.is_empty())
                        {
                            out.push(self.chunk(json!({ "content": text }), None));
                        }
                    }
                    Some("tool_use") => {
                        let index = self.tool_blocks.len() as u64;
                        let block_index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                        self.tool_blocks.insert(block_index, index);
                        out.push(self.chunk(
                            json!({"tool_calls": [{
                                "index": index,
                                "id": block.get("id").cloned().unwrap_or(Value::Null),
                                "type": "function",
                                "function": {
                                    "name": block.get("name").cloned().unwrap_or(Value::Null),
                                    "arguments": "",
                                },
                            }]}),
                            None,
                        ));
                    }
                    _ => {} // thinking and server tool blocks
                }
            }
            "content_block_delta" => {
                self.start(&mut out);
                let delta = v.get("delta").unwrap_or(&Value::Null);
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        if let Some(text) = delta
                            .get("text")
                            .and_then(Value::as_str)
                            .filter(|t| !t.is_empty())
                        {
                            out.push(self.chunk(json!({ "content": text }), None));
                        }
                    }
                    Some("input_json_delta") => {
                        let block_index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                        let partial = delta
                            .get("partial_json")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        if let Some(index) = self.tool_blocks.get(&block_index)
                            && !partial.is_empty()
                        {
                            out.push(self.chunk(
                                json!({"tool_calls": [{
                                    "index": index,
                                    "function": {"arguments": partial},
                                }]}),
                                None,
                            ));
                        }
                    }
                    _ => {} // thinking_delta, signature_delta, citations_delta
                }
            }
            "message_delta" => {
                self.start(&mut out);
                self.record_usage(v.get("usage"));
                if let Some(stop) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    out.push(self.chunk(json!({}), Some(finish_reason(stop))));
                }
            }
            "message_stop" => out.extend(self.usage_chunk()),
            "error" => {
                let message = message_of_error_body(&v).unwrap_or_else(|| data.to_string());
                return Err(bad_upstream(format!("anthropic stream error: {message}")));
            }
            _ => {} // ping, content_block_stop, unknown events
        }
        Ok(out)
    }

    /// A stream that ended without message_stop still reports its usage.
    pub fn finish(&mut self) -> Vec<Value> {
        self.usage_chunk().into_iter().collect()
    }
}
