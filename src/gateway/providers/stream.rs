//! Streaming: converts one provider's server-sent events into OpenAI chunks as they arrive,
//! keeps the usage, and aggregates the whole answer for the trace.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value, json};

use super::{
    ModelConfig, Operation, ProviderConfig, ProviderError, Usage, anthropic, gemini, openai, sse,
    usage_of,
};

/// A chat.completion.chunk as a text_completion chunk; `None` for a chunk that carries nothing
/// a completions client sees (the role-only first chunk).
fn chat_chunk_to_completion(chunk: Value) -> Option<Value> {
    let mut chunk = chunk;
    let obj = chunk.as_object_mut()?;
    let choices = obj
        .get("choices")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let had_choices = !choices.is_empty();
    let choices: Vec<Value> = choices
        .iter()
        .filter_map(|c| {
            let text = c
                .pointer("/delta/content")
                .and_then(Value::as_str)
                .unwrap_or("");
            let finish = c.get("finish_reason").cloned().unwrap_or(Value::Null);
            (!text.is_empty() || !finish.is_null()).then(|| {
                json!({
                    "text": text,
                    "index": c.get("index").cloned().unwrap_or(json!(0)),
                    "logprobs": null,
                    "finish_reason": finish,
                })
            })
        })
        .collect();
    if had_choices && choices.is_empty() && obj.get("usage").is_none_or(Value::is_null) {
        return None;
    }
    obj.insert("object".into(), json!("text_completion"));
    obj.insert("choices".into(), Value::Array(choices));
    obj.remove("system_fingerprint");
    Some(chunk)
}

/// Converts one provider's SSE stream into OpenAI `chat.completion.chunk` (or text_completion
/// chunk) JSON objects. Stateful: Anthropic and Gemini streams carry ids and usage in early
/// events.
///
/// Usage: the converter always knows the usage when the upstream sent it ([`Self::usage`]); the
/// chunk carrying it (`choices: []`, `usage`, as OpenAI sends it last) reaches the client only
/// when it asked for it (`client_wants_usage`); otherwise `usage` is removed from every chunk.
pub struct StreamConverter {
    op: Operation,
    client_wants_usage: bool,
    /// Convert chat chunks into text_completion chunks (Completions served by a chat API).
    chat_to_completions: bool,
    parser: sse::SseParser,
    inner: Inner,
    aggregate: Aggregate,
    usage: Option<(Usage, Value)>,
    /// An upstream error that arrived after chunks of the same push: reported on the next call.
    pending_error: Option<ProviderError>,
    finished: bool,
}

impl fmt::Debug for StreamConverter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamConverter")
            .field("op", &self.op)
            .field("client_wants_usage", &self.client_wants_usage)
            .field("usage", &self.usage())
            .finish_non_exhaustive()
    }
}

enum Inner {
    OpenAi(openai::StreamState),
    Anthropic(anthropic::StreamState),
    Gemini(gemini::StreamState),
}

impl Inner {
    fn event(&mut self, event: sse::SseEvent) -> Result<Vec<Value>, ProviderError> {
        match self {
            Inner::OpenAi(s) => s.event(event),
            Inner::Anthropic(s) => s.event(event),
            Inner::Gemini(s) => s.event(event),
        }
    }

    fn finish(&mut self) -> Vec<Value> {
        match self {
            Inner::OpenAi(_) => Vec::new(),
            Inner::Anthropic(s) => s.finish(),
            Inner::Gemini(s) => s.finish(),
        }
    }

    /// Usage known before the final usage chunk (a stream cut short).
    fn partial_usage(&self) -> Option<Value> {
        match self {
            Inner::OpenAi(_) => None,
            Inner::Anthropic(s) => s.usage_json(),
            Inner::Gemini(s) => s.usage_json(),
        }
    }
}

impl StreamConverter {
    /// Stream conversion for `op` from `model`'s provider.
    pub(super) fn new(model: &ModelConfig, op: Operation, client_wants_usage: bool) -> Self {
        let (inner, chat_to_completions) = match &model.provider {
            ProviderConfig::Anthropic { .. } => (
                Inner::Anthropic(anthropic::StreamState::new()),
                op == Operation::Completions,
            ),
            ProviderConfig::Gemini { .. } => (
                Inner::Gemini(gemini::StreamState::new(&model.model)),
                op == Operation::Completions,
            ),
            ProviderConfig::Azure(_) => (Inner::OpenAi(openai::StreamState::default()), false),
            ProviderConfig::OpenAi { provider, .. } => (
                Inner::OpenAi(openai::StreamState::default()),
                op == Operation::Completions && openai::completions_via_chat(*provider),
            ),
        };
        StreamConverter {
            op,
            client_wants_usage,
            chat_to_completions,
            parser: sse::SseParser::new(),
            inner,
            aggregate: Aggregate::default(),
            usage: None,
            pending_error: None,
            finished: false,
        }
    }

    /// Feed raw bytes as they arrive (they may split events anywhere); returns the OpenAI chunks
    /// now complete, each to be sent to the client as `data: <json>\n\n`.
    ///
    /// An upstream error (an `error` event, or an event that cannot be parsed) is an
    /// `Err(BadUpstreamResponse)`; when it follows chunks in the same bytes, those chunks are
    /// returned first and the error comes from the next `push` or `finish`.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Value>, ProviderError> {
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        let events = self.parser.push(bytes);
        if self.parser.overflowed() {
            return Err(ProviderError::BadUpstreamResponse(
                "an event-stream line or event is longer than the gateway accepts (GATEWAY_MAX_SSE_LINE_BYTES)"
                    .into(),
            ));
        }
        self.process(events)
    }

    /// Bounds the stream's lines and events to `max` bytes ([`sse::SseParser::limit_lines`]).
    pub fn limit_lines(&mut self, max: usize) {
        self.parser.limit_lines(max);
    }

    /// End of upstream stream: remaining chunks (the gateway then sends `data: [DONE]`).
    pub fn finish(&mut self) -> Result<Vec<Value>, ProviderError> {
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        if self.finished {
            return Ok(Vec::new());
        }
        // At most one event is left (the last one, without its blank line): an error cannot
        // follow chunks here.
        let events = self.parser.finish();
        let mut out = self.process(events)?;
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        self.finished = true;
        let tail = self.inner.finish();
        out.extend(self.output(tail));
        Ok(out)
    }

    /// Usage seen so far (from the final chunk / message_delta / usageMetadata).
    pub fn usage(&self) -> Option<Usage> {
        match &self.usage {
            Some((u, _)) => Some(*u),
            None => self
                .inner
                .partial_usage()
                .and_then(|u| usage_of(&json!({ "usage": u }))),
        }
    }

    /// The whole streamed answer aggregated into one response object (for the trace's outputs):
    /// chat.completion-shaped for Chat (id, model, choices[].message{role, content, tool_calls},
    /// finish_reason, usage), text_completion-shaped for Completions.
    pub fn aggregated(&self) -> Value {
        let usage = match &self.usage {
            Some((_, u)) => Some(u.clone()),
            None => self.inner.partial_usage(),
        };
        self.aggregate.to_value(self.op, usage)
    }

    fn process(&mut self, events: Vec<sse::SseEvent>) -> Result<Vec<Value>, ProviderError> {
        let mut out = Vec::new();
        for event in events {
            match self.inner.event(event) {
                Ok(chunks) => out.extend(self.output(chunks)),
                Err(e) if out.is_empty() => return Err(e),
                Err(e) => {
                    self.pending_error = Some(e);
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Records usage and the aggregate from converted chunks, then shapes them for the client.
    fn output(&mut self, chunks: Vec<Value>) -> Vec<Value> {
        let mut out = Vec::with_capacity(chunks.len());
        for mut chunk in chunks {
            if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
                if let Some(usage) = usage_of(&chunk) {
                    self.usage = Some((usage, u.clone()));
                }
            } else if let Some(usage) = usage_of(&chunk) {
                // e.g. Groq's x_groq.usage
                self.usage = Some((
                    usage,
                    json!({
                        "prompt_tokens": usage.input_tokens,
                        "completion_tokens": usage.output_tokens,
                        "total_tokens": usage.total_tokens,
                    }),
                ));
            }
            self.aggregate.add(&chunk);
            if !self.client_wants_usage
                && let Some(obj) = chunk.as_object_mut()
                && obj.remove("usage").is_some_and(|u| !u.is_null())
                && obj
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty)
            {
                continue; // the usage-only chunk the client did not ask for
            }
            if self.chat_to_completions {
                if let Some(c) = chat_chunk_to_completion(chunk) {
                    out.push(c);
                }
            } else {
                out.push(chunk);
            }
        }
        out
    }
}

/// Accumulates streamed chunks (chat or text_completion shaped) into one response.
#[derive(Default)]
struct Aggregate {
    id: Option<Value>,
    model: Option<Value>,
    created: Option<Value>,
    choices: BTreeMap<u64, AggChoice>,
}

#[derive(Default)]
struct AggChoice {
    role: Option<String>,
    content: String,
    has_content: bool,
    finish_reason: Option<Value>,
    tool_calls: BTreeMap<u64, AggToolCall>,
}

#[derive(Default)]
struct AggToolCall {
    id: Option<String>,
    name: String,
    arguments: String,
    extra: Map<String, Value>,
}

impl Aggregate {
    fn add(&mut self, chunk: &Value) {
        for (slot, key) in [
            (&mut self.id, "id"),
            (&mut self.model, "model"),
            (&mut self.created, "created"),
        ] {
            // Azure's first chunk (prompt filter results) has an empty id and model, created 0.
            if slot.is_none()
                && let Some(v) = chunk
                    .get(key)
                    .filter(|v| !v.is_null() && *v != "" && *v != 0)
            {
                *slot = Some(v.clone());
            }
        }
        let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
            return;
        };
        for (pos, c) in choices.iter().enumerate() {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
            let agg = self.choices.entry(index).or_default();
            let delta = c.get("delta");
            if let Some(role) = delta.and_then(|d| d.get("role")).and_then(Value::as_str) {
                agg.role = Some(role.to_string());
            }
            let text = delta
                .and_then(|d| d.get("content"))
                .or_else(|| c.get("text"))
                .and_then(Value::as_str);
            if let Some(text) = text {
                agg.content.push_str(text);
                agg.has_content = true;
            }
            if let Some(f) = c.get("finish_reason").filter(|f| !f.is_null()) {
                agg.finish_reason = Some(f.clone());
            }
            let calls = delta
                .and_then(|d| d.get("tool_calls"))
                .and_then(Value::as_array);
            for (pos, call) in calls.into_iter().flatten().enumerate() {
                let i = call
                    .get("index")
                    .and_then(Value::as_u64)
                    .unwrap_or(pos as u64);
                let t = agg.tool_calls.entry(i).or_default();
                if let Some(id) = call.get("id").and_then(Value::as_str) {
                    t.id = Some(id.to_string());
                }
                if let Some(f) = call.get("function") {
                    if let Some(n) = f.get("name").and_then(Value::as_str) {
                        t.name.push_str(n);
                    }
                    if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                        t.arguments.push_str(a);
                    }
                }
                if let Some(obj) = call.as_object() {
                    for (k, v) in obj {
                        if !matches!(k.as_str(), "index" | "id" | "type" | "function") {
                            t.extra.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
        }
    }

    fn to_value(&self, op: Operation, usage: Option<Value>) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .map(|(index, c)| {
                if op == Operation::Completions {
                    return json!({
                        "index": index,
                        "text": c.content,
                        "finish_reason": c.finish_reason.clone().unwrap_or(Value::Null),
                    });
                }
                let mut message = Map::new();
                message.insert(
                    "role".into(),
                    json!(c.role.as_deref().unwrap_or("assistant")),
                );
                message.insert(
                    "content".into(),
                    if c.content.is_empty() && !(c.tool_calls.is_empty() && c.has_content) {
                        Value::Null
                    } else {
                        json!(c.content)
                    },
                );
                if !c.tool_calls.is_empty() {
                    let calls: Vec<Value> = c
                        .tool_calls
                        .values()
                        .map(|t| {
                            let mut call = Map::new();
                            call.insert("id".into(), json!(t.id.clone().unwrap_or_default()));
                            call.insert("type".into(), json!("function"));
                            call.insert(
                                "function".into(),
                                json!({"name": t.name, "arguments": t.arguments}),
                            );
                            call.extend(t.extra.clone());
                            Value::Object(call)
                        })
                        .collect();
                    message.insert("tool_calls".into(), Value::Array(calls));
                }
                json!({
                    "index": index,
                    "message": message,
                    "finish_reason": c.finish_reason.clone().unwrap_or(Value::Null),
                })
            })
            .collect();
        let mut out = Map::new();
        out.insert("id".into(), self.id.clone().unwrap_or(Value::Null));
        out.insert(
            "object".into(),
            json!(if op == Operation::Completions {
                "text_completion"
            } else {
                "chat.completion"
            }),
        );
        out.insert(
            "created".into(),
            self.created.clone().unwrap_or(Value::Null),
        );
        out.insert("model".into(), self.model.clone().unwrap_or(Value::Null));
        out.insert("choices".into(), Value::Array(choices));
        if let Some(u) = usage {
            out.insert("usage".into(), u);
        }
        Value::Object(out)
    }
}
