//! Gemini (the Gemini API of generativelanguage.googleapis.com): `{apiBase}/v1beta/models/
//! {model}:generateContent`, `:streamGenerateContent?alt=sse` for a stream and
//! `:batchEmbedContents` for embeddings, with the header `x-goog-api-key`. An `apiBase` that
//! already ends with the API version (`/v1beta`, `/v1`) or with `/models` is not doubled.
//!
//! Chat requests are converted as MLflow's Gemini provider converts them:
//! - messages → `contents` (`user`, and `model` for assistant), system and developer messages
//!   → `systemInstruction.parts`; user content parts: text, and `image_url` with a base64 data
//!   URL → `inlineData`;
//! - assistant `tool_calls` → `functionCall` parts, `tool` messages → `functionResponse` parts
//!   (named after the call they answer; the results of one turn's calls share one user turn);
//!   function `tools` → `functionDeclarations` (`parametersJsonSchema`), `tool_choice` →
//!   `toolConfig.functionCallingConfig`;
//! - `generationConfig`: temperature, topP, topK, maxOutputTokens (`max_completion_tokens` or
//!   `max_tokens`), stopSequences, candidateCount (`n`), presencePenalty, frequencyPenalty,
//!   seed, and `response_format` as responseMimeType/responseJsonSchema; a `generationConfig`
//!   the client sent is the starting point;
//! - OpenAI parameters with no Gemini equivalent are dropped; any other field passes through
//!   (`safetySettings`, `cachedContent`, ...).
//!
//! Responses: candidates → choices (text parts joined, thought parts skipped, functionCall parts
//! → tool_calls); finishReason STOP → stop (tool_calls when the candidate called a function),
//! MAX_TOKENS → length, SAFETY, RECITATION and the other blocking reasons → content_filter;
//! usageMetadata → usage, thinking tokens counted as completion tokens (as OpenAI counts
//! reasoning tokens).
//!
//! Over 800 lines as one cohesive thing: the Gemini wire format both ways (requests, answers,
//! streams, embeddings), as each other provider has its one file.

use std::collections::{HashMap, HashSet};

use axum::http::HeaderValue;
use base64::Engine as _;
use serde_json::{Map, Value, json};
use url::Url;

use super::sse::SseEvent;
use super::{
    Body, ChatMessage, ChatRequest, ImageRef, ModelConfig, Operation, Prepared, ProviderError,
    bad_upstream, chat_response_to_completion, completions_to_chat, content_text, image_ref,
    invalid, join_url, last_path_segment, message_of_error_body, now_secs,
};

/// The API version used when `apiBase` names none.
pub const API_VERSION: &str = "v1beta";

/// OpenAI chat parameters with no Gemini equivalent: dropped rather than sent (Gemini rejects
/// unknown fields).
const DROPPED: &[&str] = &[
    "model",
    "stream_options",
    "user",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "store",
    "metadata",
    "service_tier",
    "parallel_tool_calls",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
    "prompt_cache_key",
    "safety_identifier",
];

/// The model id without a `models/` prefix.
fn model_id(up: &ModelConfig) -> &str {
    up.model.strip_prefix("models/").unwrap_or(&up.model)
}

/// `{apiBase}/v1beta/models/{model}:{method}`.
pub fn url(up: &ModelConfig, method: &str, stream: bool) -> Url {
    let target = format!("{}:{method}", model_id(up));
    let mut segments: Vec<&str> = Vec::with_capacity(3);
    match last_path_segment(up.api_base()) {
        Some("models") => {}
        Some("v1beta" | "v1" | "v1alpha") => segments.push("models"),
        _ => segments.extend([API_VERSION, "models"]),
    }
    segments.push(&target);
    let mut url = join_url(up.api_base(), &segments);
    if stream {
        url.query_pairs_mut().append_pair("alt", "sse");
    }
    url
}

fn headers(up: &ModelConfig) -> Result<Vec<(&'static str, HeaderValue)>, ProviderError> {
    Ok(up
        .key_header("")?
        .map(|key| ("x-goog-api-key", key))
        .into_iter()
        .collect())
}

pub(crate) fn prepare(
    up: &ModelConfig,
    op: Operation,
    body: &Map<String, Value>,
) -> Result<Prepared<'static>, ProviderError> {
    let (url, body) = match op {
        Operation::Chat | Operation::Completions => {
            let chat;
            let body = if op == Operation::Completions {
                chat = completions_to_chat(body)?;
                &chat
            } else {
                body
            };
            let (converted, stream) = chat_request(body)?;
            let method = if stream {
                "streamGenerateContent"
            } else {
                "generateContent"
            };
            (url(up, method, stream), converted)
        }
        Operation::Embeddings => (
            url(up, "batchEmbedContents", false),
            embed_request(up, body)?,
        ),
    };
    Ok(Prepared {
        url,
        headers: headers(up)?,
        body: Body::Built(body),
    })
}

/// An OpenAI chat request as a GenerateContentRequest, and whether it streams.
fn chat_request(body: &Map<String, Value>) -> Result<(Value, bool), ProviderError> {
    let mut req = ChatRequest::parse(body)?;
    req.reject_legacy_functions("gemini")?;
    let mut out = Map::new();

    let (system, contents) = convert_messages(&req.messages)?;
    out.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({ "parts": system }));
    }

    let mut config = match req.rest.remove("generationConfig") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(c)) => c,
        Some(_) => return Err(invalid("`generationConfig` must be an object")),
    };
    if let Some(t) = req.take_f64("temperature")? {
        config.insert("temperature".into(), json!(t));
    }
    if let Some(p) = req.take_f64("top_p")? {
        config.insert("topP".into(), json!(p));
    }
    if let Some(k) = req.take_u64("top_k")? {
        config.insert("topK".into(), json!(k));
    }
    if let Some(max) = req.take_max_tokens()? {
        config.insert("maxOutputTokens".into(), json!(max));
    }
    if let Some(stop) = req.take_stop()? {
        config.insert("stopSequences".into(), json!(stop));
    }
    if let Some(n) = req.take_u64("n")? {
        config.insert("candidateCount".into(), json!(n));
    }
    if let Some(p) = req.take_f64("presence_penalty")? {
        config.insert("presencePenalty".into(), json!(p));
    }
    if let Some(p) = req.take_f64("frequency_penalty")? {
        config.insert("frequencyPenalty".into(), json!(p));
    }
    match req.rest.remove("seed") {
        None | Some(Value::Null) => {}
        Some(seed @ Value::Number(_)) => {
            config.insert("seed".into(), seed);
        }
        Some(_) => return Err(invalid("`seed` must be an integer")),
    }
    match req.rest.remove("response_format") {
        None | Some(Value::Null) => {}
        Some(format) => match format.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                config.insert("responseMimeType".into(), json!("application/json"));
            }
            Some("json_schema") => {
                config.insert("responseMimeType".into(), json!("application/json"));
                if let Some(schema) = format.pointer("/json_schema/schema") {
                    config.insert("responseJsonSchema".into(), schema.clone());
                }
            }
            _ => {
                return Err(invalid(
                    "`response_format.type` must be text, json_object or json_schema",
                ));
            }
        },
    }
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }

    convert_tools(&mut req, &mut out)?;

    let stream = req.take_bool("stream")?.unwrap_or(false);
    for key in DROPPED {
        req.rest.remove(*key);
    }
    for (k, v) in req.rest {
        out.entry(k).or_insert(v);
    }
    Ok((Value::Object(out), stream))
}

/// The system instruction parts and the contents.
fn convert_messages(messages: &[ChatMessage]) -> Result<(Vec<Value>, Vec<Value>), ProviderError> {
    let mut system = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    // tool call id → function name: a functionResponse must name its function.
    let mut call_names: HashMap<&str, &str> = HashMap::new();
    for (i, m) in messages.iter().enumerate() {
        let what = format!("messages[{i}]");
        match m.role.as_str() {
            "system" | "developer" => {
                system.push(json!({ "text": content_text(&m.content, &what)? }));
            }
            "user" => contents.push(json!({
                "role": "user",
                "parts": user_parts(&m.content, &what)?,
            })),
            "assistant" => {
                let text = content_text(&m.content, &what)?;
                let mut parts = Vec::new();
                if !text.is_empty() {
                    parts.push(json!({ "text": text }));
                }
                for call in m.tool_calls.as_deref().unwrap_or_default() {
                    if call.kind.as_deref().is_some_and(|k| k != "function") {
                        return Err(invalid(format!(
                            "{what}: only function tool calls can be converted for gemini"
                        )));
                    }
                    call_names.insert(&call.id, &call.function.name);
                    let arguments = call.function.arguments.as_deref().unwrap_or("").trim();
                    let args: Value = if arguments.is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(arguments).map_err(|e| {
                            invalid(format!(
                                "{what}: tool call {} has arguments that are not JSON: {e}",
                                call.id
                            ))
                        })?
                    };
                    let mut part = json!({"functionCall": {
                        "id": call.id,
                        "name": call.function.name,
                        "args": args,
                    }});
                    // Gemini 3 needs the thought signature of a function call sent back.
                    let signature = call.rest.get("thought_signature").or_else(|| {
                        call.rest
                            .get("extra_content")
                            .and_then(|e| e.pointer("/google/thought_signature"))
                    });
                    if let (Some(sig), Some(obj)) = (signature, part.as_object_mut()) {
                        obj.insert("thoughtSignature".into(), sig.clone());
                    }
                    parts.push(part);
                }
                if parts.is_empty() {
                    parts.push(json!({ "text": "" }));
                }
                contents.push(json!({"role": "model", "parts": parts}));
            }
            "tool" => {
                let id = m
                    .tool_call_id
                    .as_deref()
                    .ok_or_else(|| invalid(format!("{what}: a tool message needs tool_call_id")))?;
                let name = call_names.get(id).ok_or_else(|| {
                    invalid(format!(
                        "{what}: tool_call_id {id:?} does not match a tool call of an earlier assistant message"
                    ))
                })?;
                let part = json!({"functionResponse": {
                    "id": id,
                    "name": name,
                    "response": tool_response(&content_text(&m.content, &what)?),
                }});
                // Gemini wants the responses to one turn's calls in a single user turn.
                if let Some(Value::Array(parts)) = contents
                    .last_mut()
                    .filter(|last| last["role"] == "user")
                    .and_then(|last| last.get_mut("parts"))
                    && parts.iter().all(|p| p.get("functionResponse").is_some())
                {
                    parts.push(part);
                } else {
                    contents.push(json!({"role": "user", "parts": [part]}));
                }
            }
            other => {
                return Err(invalid(format!(
                    "{what}: role {other:?} is not supported for gemini"
                )));
            }
        }
    }
    if contents.is_empty() {
        return Err(invalid(
            "gemini needs at least one user or assistant message besides system messages",
        ));
    }
    Ok((system, contents))
}

fn user_parts(content: &Option<Value>, what: &str) -> Result<Vec<Value>, ProviderError> {
    let parts = match content {
        None | Some(Value::Null) => return Ok(vec![json!({ "text": "" })]),
        Some(Value::String(s)) => return Ok(vec![json!({ "text": s })]),
        Some(Value::Array(parts)) => parts,
        Some(_) => {
            return Err(invalid(format!(
                "{what}: content must be a string or a list of content parts"
            )));
        }
    };
    parts
        .iter()
        .map(|part| match part.get("type").and_then(Value::as_str) {
            Some("text") => Ok(json!({
                "text": part.get("text").and_then(Value::as_str).unwrap_or(""),
            })),
            Some("image_url") => match image_ref(part).map_err(|e| invalid(format!("{what}: {e}")))? {
                ImageRef::Base64 { mime, data } => {
                    Ok(json!({"inlineData": {"mimeType": mime, "data": data}}))
                }
                ImageRef::Url(_) => Err(invalid(format!(
                    "{what}: gemini needs images as base64 data URLs (data:<mime type>;base64,...)"
                ))),
            },
            other => Err(invalid(format!(
                "{what}: content part type {} is not supported for gemini (text and image_url are)",
                other.unwrap_or("(none)")
            ))),
        })
        .collect()
}

/// A tool message's content as a functionResponse.response (an object): a JSON object as is,
/// anything else as `{"result": ...}` (MLflow's conversion).
fn tool_response(content: &str) -> Value {
    match serde_json::from_str::<Value>(content) {
        Ok(v @ Value::Object(_)) => v,
        Ok(v) => json!({ "result": v }),
        Err(_) => json!({ "result": content }),
    }
}

fn convert_tools(req: &mut ChatRequest, out: &mut Map<String, Value>) -> Result<(), ProviderError> {
    match req.rest.remove("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(tools)) => {
            let mut declarations = Vec::with_capacity(tools.len());
            for tool in super::function_tools(&tools, "gemini")? {
                let mut d = Map::new();
                d.insert("name".into(), json!(tool.name));
                if let Some(desc) = tool.description {
                    d.insert("description".into(), desc.clone());
                }
                if let Some(params) = tool.parameters {
                    d.insert("parametersJsonSchema".into(), params.clone());
                }
                declarations.push(Value::Object(d));
            }
            if !declarations.is_empty() {
                out.insert(
                    "tools".into(),
                    json!([{ "functionDeclarations": declarations }]),
                );
            }
        }
        Some(_) => return Err(invalid("`tools` must be a list")),
    }
    let config = match req.rest.remove("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "none" => json!({"mode": "NONE"}),
            "auto" => json!({"mode": "AUTO"}),
            "required" => json!({"mode": "ANY"}),
            other => {
                return Err(invalid(format!(
                    "`tool_choice` {other:?} is not one of none, auto, required"
                )));
            }
        }),
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if v["type"] == "function" => {
                Some(json!({"mode": "ANY", "allowedFunctionNames": [name]}))
            }
            _ => {
                return Err(invalid(
                    "`tool_choice` must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ));
            }
        },
    };
    if let Some(c) = config
        && out.contains_key("tools")
    {
        out.insert("toolConfig".into(), json!({ "functionCallingConfig": c }));
    }
    Ok(())
}

/// An OpenAI embeddings request as a batchEmbedContents request: one request per input text.
/// `dimensions` → outputDimensionality; Gemini fields of an EmbedContentRequest (`taskType`,
/// `title`) are copied into each request.
fn embed_request(up: &ModelConfig, body: &Map<String, Value>) -> Result<Value, ProviderError> {
    let texts: Vec<&str> = match body.get("input") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|i| {
                i.as_str().ok_or_else(|| {
                    invalid("gemini embeddings take text input: a string or a list of strings (not token arrays)")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Array(_)) => return Err(invalid("`input` must not be empty")),
        None | Some(Value::Null) => return Err(invalid("`input` is required")),
        Some(_) => return Err(invalid("`input` must be a string or a list of strings")),
    };
    let mut common = Map::new();
    common.insert("model".into(), json!(format!("models/{}", model_id(up))));
    match body.get("dimensions") {
        None | Some(Value::Null) => {}
        Some(d) if d.as_u64().is_some() => {
            common.insert("outputDimensionality".into(), d.clone());
        }
        Some(_) => return Err(invalid("`dimensions` must be a positive integer")),
    }
    for (k, v) in body {
        if !matches!(
            k.as_str(),
            "input" | "model" | "dimensions" | "encoding_format" | "user"
        ) {
            common.entry(k.clone()).or_insert(v.clone());
        }
    }
    let requests: Vec<Value> = texts
        .into_iter()
        .map(|text| {
            let mut r = common.clone();
            r.insert("content".into(), json!({"parts": [{ "text": text }]}));
            Value::Object(r)
        })
        .collect();
    Ok(json!({ "requests": requests }))
}

// ---------------------------------------------------------------------------------------------
// Responses

/// Gemini's finishReason as an OpenAI finish_reason.
pub fn finish_reason(reason: &str, called_tools: bool) -> String {
    match reason {
        "STOP" if called_tools => "tool_calls".into(),
        "STOP" => "stop".into(),
        "MAX_TOKENS" => "length".into(),
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION" => "content_filter".into(),
        // OTHER, MALFORMED_FUNCTION_CALL, LANGUAGE, ...: lower-cased, as MLflow does
        other => other.to_ascii_lowercase(),
    }
}

/// usageMetadata as OpenAI usage.
fn usage_json(m: &Value) -> Value {
    let num = |k: &str| m.get(k).and_then(Value::as_u64);
    let prompt = num("promptTokenCount").unwrap_or(0) + num("toolUsePromptTokenCount").unwrap_or(0);
    let thoughts = num("thoughtsTokenCount");
    let completion = num("candidatesTokenCount").unwrap_or(0) + thoughts.unwrap_or(0);
    let mut usage = Map::new();
    usage.insert("prompt_tokens".into(), json!(prompt));
    usage.insert("completion_tokens".into(), json!(completion));
    usage.insert(
        "total_tokens".into(),
        json!(num("totalTokenCount").unwrap_or(prompt + completion)),
    );
    if let Some(cached) = num("cachedContentTokenCount") {
        usage.insert(
            "prompt_tokens_details".into(),
            json!({ "cached_tokens": cached }),
        );
    }
    if let Some(thoughts) = thoughts {
        usage.insert(
            "completion_tokens_details".into(),
            json!({ "reasoning_tokens": thoughts }),
        );
    }
    Value::Object(usage)
}

/// A deterministic id for a function call Gemini sent without one.
fn call_id(name: &str, args: &str) -> String {
    // FNV-1a, 64 bits
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(args.bytes())
    {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("call_{hash:016x}")
}

/// The text (thought parts skipped) and the tool calls of a candidate's parts; `first_index`
/// numbers the tool calls (streams continue the count).
fn split_parts(parts: &[Value], first_index: u64, stream: bool) -> (Option<String>, Vec<Value>) {
    let mut text: Option<String> = None;
    let mut calls = Vec::new();
    for part in parts {
        if part.get("thought").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        if let Some(t) = part.get("text").and_then(Value::as_str) {
            text.get_or_insert_with(String::new).push_str(t);
        }
        if let Some(fc) = part.get("functionCall") {
            let name = fc.get("name").and_then(Value::as_str).unwrap_or("");
            let args = fc
                .get("args")
                .map_or_else(|| "{}".to_string(), Value::to_string);
            let id = fc
                .get("id")
                .and_then(Value::as_str)
                .map_or_else(|| call_id(name, &args), str::to_string);
            let mut call = Map::new();
            if stream {
                call.insert("index".into(), json!(first_index + calls.len() as u64));
            }
            call.insert("id".into(), json!(id));
            call.insert("type".into(), json!("function"));
            call.insert("function".into(), json!({"name": name, "arguments": args}));
            if let Some(sig) = part
                .get("thoughtSignature")
                .or_else(|| fc.get("thoughtSignature"))
            {
                call.insert("thought_signature".into(), sig.clone());
            }
            calls.push(Value::Object(call));
        }
    }
    (text, calls)
}

fn check_error(value: &Value) -> Result<(), ProviderError> {
    if value.get("error").is_some() && value.get("candidates").is_none() {
        let message = message_of_error_body(value).unwrap_or_default();
        return Err(bad_upstream(format!("gemini returned an error: {message}")));
    }
    Ok(())
}

pub(crate) fn parse_response(
    up: &ModelConfig,
    op: Operation,
    request: Option<&Value>,
    value: Value,
) -> Result<Value, ProviderError> {
    check_error(&value)?;
    if !value.is_object() {
        return Err(bad_upstream(
            "gemini returned a response that is not an object",
        ));
    }
    match op {
        Operation::Chat => Ok(chat_response(up, &value)),
        Operation::Completions => Ok(chat_response_to_completion(chat_response(up, &value))),
        Operation::Embeddings => embeddings_response(up, request, &value),
    }
}

fn chat_response(up: &ModelConfig, value: &Value) -> Value {
    let created = now_secs();
    let candidates = value
        .get("candidates")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut choices: Vec<Value> = candidates
        .iter()
        .enumerate()
        .map(|(pos, cand)| {
            let parts = cand
                .pointer("/content/parts")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let (text, calls) = split_parts(parts, 0, false);
            let mut message = Map::new();
            message.insert("role".into(), json!("assistant"));
            message.insert(
                "content".into(),
                // No text part (only function calls, or a blocked candidate): null, as OpenAI.
                text.map_or(Value::Null, Value::String),
            );
            let called = !calls.is_empty();
            if called {
                message.insert("tool_calls".into(), Value::Array(calls));
            }
            let reason = cand
                .get("finishReason")
                .and_then(Value::as_str)
                .unwrap_or("STOP");
            json!({
                "index": cand.get("index").and_then(Value::as_u64).unwrap_or(pos as u64),
                "message": message,
                "finish_reason": finish_reason(reason, called),
            })
        })
        .collect();
    if choices.is_empty() && value.pointer("/promptFeedback/blockReason").is_some() {
        // The prompt itself was blocked.
        choices.push(json!({
            "index": 0,
            "message": {"role": "assistant", "content": null},
            "finish_reason": "content_filter",
        }));
    }
    json!({
        "id": value
            .get("responseId")
            .and_then(Value::as_str)
            .map_or_else(|| format!("gemini-{created}"), str::to_string),
        "object": "chat.completion",
        "created": created,
        "model": value.get("modelVersion").and_then(Value::as_str).unwrap_or(&up.model),
        "choices": choices,
        "usage": usage_json(value.get("usageMetadata").unwrap_or(&Value::Null)),
    })
}

/// A batchEmbedContents response as an OpenAI embeddings list. Gemini reports no token usage:
/// it is zeros.
fn embeddings_response(
    up: &ModelConfig,
    request: Option<&Value>,
    value: &Value,
) -> Result<Value, ProviderError> {
    let embeddings = match (value.get("embeddings"), value.get("embedding")) {
        (Some(Value::Array(e)), _) => e.clone(),
        (_, Some(single)) => vec![single.clone()],
        _ => {
            return Err(bad_upstream(
                "gemini returned an embeddings response without `embeddings`",
            ));
        }
    };
    let base64 = request
        .and_then(|r| r.get("encoding_format"))
        .and_then(Value::as_str)
        == Some("base64");
    let data = embeddings
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let values = e
                .get("values")
                .and_then(Value::as_array)
                .ok_or_else(|| bad_upstream("gemini returned an embedding without `values`"))?;
            let embedding = if base64 {
                // OpenAI's base64 encoding: the little-endian float32 values.
                let mut bytes = Vec::with_capacity(values.len() * 4);
                for v in values {
                    let f = v
                        .as_f64()
                        .ok_or_else(|| bad_upstream("gemini returned a non-numeric embedding"))?;
                    bytes.extend_from_slice(&(f as f32).to_le_bytes());
                }
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Value::Array(values.clone())
            };
            Ok(json!({"object": "embedding", "index": i, "embedding": embedding}))
        })
        .collect::<Result<Vec<_>, ProviderError>>()?;
    Ok(json!({
        "object": "list",
        "data": data,
        "model": up.model,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }))
}

// ---------------------------------------------------------------------------------------------
// Streaming

/// Converts a `streamGenerateContent?alt=sse` stream (each `data:` a GenerateContentResponse)
/// into chat.completion.chunk objects; the usage chunk (from the last usageMetadata) comes at
/// the end.
pub(crate) struct StreamState {
    id: Option<String>,
    model: String,
    created: u64,
    role_sent: HashSet<u64>,
    /// tool calls so far, per candidate
    tool_calls: HashMap<u64, u64>,
    usage: Option<Value>,
    usage_sent: bool,
}

impl StreamState {
    pub fn new(model: &str) -> Self {
        StreamState {
            id: None,
            model: model.to_string(),
            created: now_secs(),
            role_sent: HashSet::new(),
            tool_calls: HashMap::new(),
            usage: None,
            usage_sent: false,
        }
    }

    fn id(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("gemini-{}", self.created))
    }

    pub fn usage_json(&self) -> Option<Value> {
        self.usage.as_ref().map(usage_json)
    }

    pub fn event(&mut self, event: SseEvent) -> Result<Vec<Value>, ProviderError> {
        let data = event.data.trim();
        if data.is_empty() || data == "[DONE]" {
            return Ok(Vec::new());
        }
        let v: Value = serde_json::from_str(data).map_err(|e| {
            bad_upstream(format!(
                "gemini stream sent an event that is not JSON ({e}): {}",
                crate::text::truncate(data, 200)
            ))
        })?;
        match v {
            // Without alt=sse Gemini streams a JSON list; accept it too.
            Value::Array(items) => {
                let mut out = Vec::new();
                for item in &items {
                    out.extend(self.response(item)?);
                }
                Ok(out)
            }
            v => self.response(&v),
        }
    }

    fn response(&mut self, v: &Value) -> Result<Vec<Value>, ProviderError> {
        check_error(v)?;
        if self.id.is_none()
            && let Some(id) = v.get("responseId").and_then(Value::as_str)
        {
            self.id = Some(id.to_string());
        }
        if let Some(model) = v.get("modelVersion").and_then(Value::as_str) {
            self.model = model.to_string();
        }
        if let Some(u) = v.get("usageMetadata").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let mut choices = Vec::new();
        let candidates = v
            .get("candidates")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (pos, cand) in candidates.iter().enumerate() {
            // A chunk may carry only some candidates: use the API's index.
            let index = cand
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(pos as u64);
            let parts = cand
                .pointer("/content/parts")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let first = self.tool_calls.get(&index).copied().unwrap_or(0);
            let (text, calls) = split_parts(parts, first, true);
            *self.tool_calls.entry(index).or_default() += calls.len() as u64;
            let mut delta = Map::new();
            if self.role_sent.insert(index) {
                delta.insert("role".into(), json!("assistant"));
            }
            match text {
                Some(t) if !t.is_empty() => {
                    delta.insert("content".into(), json!(t));
                }
                _ if delta.contains_key("role") && calls.is_empty() => {
                    delta.insert("content".into(), json!(""));
                }
                _ => {}
            }
            if !calls.is_empty() {
                delta.insert("tool_calls".into(), Value::Array(calls));
            }
            let finish = cand
                .get("finishReason")
                .and_then(Value::as_str)
                .map(|r| finish_reason(r, self.tool_calls.get(&index).copied().unwrap_or(0) > 0));
            if !delta.is_empty() || finish.is_some() {
                choices.push(json!({"index": index, "delta": delta, "finish_reason": finish}));
            }
        }
        if candidates.is_empty() && v.pointer("/promptFeedback/blockReason").is_some() {
            let mut delta = Map::new();
            if self.role_sent.insert(0) {
                delta.insert("role".into(), json!("assistant"));
            }
            choices.push(json!({"index": 0, "delta": delta, "finish_reason": "content_filter"}));
        }
        if choices.is_empty() {
            return Ok(Vec::new());
        }
        Ok(vec![json!({
            "id": self.id(),
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })])
    }

    /// The usage chunk, from the last usageMetadata.
    pub fn finish(&mut self) -> Vec<Value> {
        if self.usage_sent {
            return Vec::new();
        }
        let Some(usage) = self.usage_json() else {
            return Vec::new();
        };
        self.usage_sent = true;
        vec![json!({
            "id": self.id(),
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        })]
    }
}
