//! The fake LLM providers the gateway's tests run against: each provider surface answers in its
//! documented wire format, rejects bad credentials the provider's way, and the fault controls
//! (injected failures, delays, broken streams) do what they say.

use std::time::{Duration, Instant};

use mgo_dev::fake_llm::{FakeLlm, RECORD_LIMIT, fake_embedding};
use serde_json::{Value, json};

const KEY: &str = "sk-test-0123456789";

/// POSTs `body` with `headers`, returns the status, the response headers and the JSON body.
async fn post(
    fake: &FakeLlm,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut rb = reqwest::Client::new()
        .post(format!("{}{}", fake.url, path))
        .json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let resp = rb.send().await.expect("send to the fake");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("read the body");
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{path} answered {status} with non-JSON ({e}): {text}"));
    (status, headers, json)
}

/// POSTs `body`, expects a 200 with `content_type`, returns the whole body text.
async fn post_stream(
    fake: &FakeLlm,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
    content_type: &str,
) -> String {
    let resp = send(fake, path, headers, body).await;
    assert_eq!(resp.status(), 200, "{path}");
    assert_eq!(resp.headers()["content-type"], content_type, "{path}");
    resp.text().await.expect("read the stream")
}

async fn send(
    fake: &FakeLlm,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> reqwest::Response {
    let mut rb = reqwest::Client::new()
        .post(format!("{}{}", fake.url, path))
        .json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().await.expect("send to the fake")
}

/// Reads a body chunk by chunk; returns what arrived and whether the body ended in an error.
async fn read_until_end(mut resp: reqwest::Response) -> (String, bool) {
    let mut buf = Vec::new();
    let failed = loop {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    (String::from_utf8(buf).expect("UTF-8 stream"), failed)
}

/// SSE events as (event name, data), for LF and CRLF line ends.
fn parse_sse(text: &str) -> Vec<(Option<String>, String)> {
    text.replace("\r\n", "\n")
        .split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut event = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d);
                } else {
                    panic!("unexpected SSE line {line:?} in {text:?}");
                }
            }
            (event, data.join("\n"))
        })
        .collect()
}

fn data_json(events: &[(Option<String>, String)]) -> Vec<Value> {
    events
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("an array of floats")
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

const BEARER: (&str, &str) = ("authorization", "Bearer sk-test-0123456789");

fn anthropic_headers() -> [(&'static str, &'static str); 2] {
    [("x-api-key", KEY), ("anthropic-version", "2023-06-01")]
}

// ---------------------------------------------------------------------------------------------
// OpenAI

#[tokio::test]
async fn openai_chat_completion_echoes_the_model_and_answers_the_last_user_message() {
    let fake = FakeLlm::start("alpha", KEY).await;
    let request = json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "hello there"},
        ],
    });
    let (status, headers, body) = post(
        &fake,
        "/v1/chat/completions",
        &[BEARER, ("X-Trace", "t1")],
        &request,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(body["model"], "gpt-4o-mini");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["role"], "assistant");
    assert_eq!(
        choices[0]["message"]["content"],
        "reply from alpha to: hello there"
    );
    assert_eq!(
        fake.reply_to("hello there"),
        "reply from alpha to: hello there"
    );
    assert_eq!(choices[0]["finish_reason"], "stop");
    // 2 + 2 + 2 + 2 words in; 6 words out.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14})
    );

    let recorded = fake.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(fake.request_count(), 1);
    assert_eq!(recorded[0].method, "POST");
    assert_eq!(recorded[0].path, "/v1/chat/completions");
    assert_eq!(
        recorded[0].header("authorization"),
        Some("Bearer sk-test-0123456789")
    );
    assert_eq!(recorded[0].headers["x-trace"], "t1");
    assert_eq!(recorded[0].body, request);
}

#[tokio::test]
async fn openai_chat_content_parts_are_joined() {
    let fake = FakeLlm::start("alpha", KEY).await;
    let (status, _, body) = post(
        &fake,
        "/v1/chat/completions",
        &[BEARER],
        &json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "look at"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "this"},
        ]}]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "reply from alpha to: look at this"
    );
    assert_eq!(body["usage"]["prompt_tokens"], 3);
}

#[tokio::test]
async fn openai_chat_stream_sends_role_then_content_then_finish_then_usage_then_done() {
    let fake = FakeLlm::start("alpha", KEY).await;
    let text = post_stream(
        &fake,
        "/v1/chat/completions",
        &[BEARER],
        &json!({
            "model": "gpt-4o",
            "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "stream me please"}],
        }),
        "text/event-stream",
    )
    .await;
    let events = parse_sse(&text);
    assert!(events.iter().all(|(name, _)| name.is_none()));
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks = data_json(&events[..events.len() - 1]);
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
        assert_eq!(c["model"], "gpt-4o");
        assert!(c.get("usage").is_some(), "usage: null on every chunk: {c}");
    }
    // First: the role.
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(chunks[0]["usage"], Value::Null);
    // Then content deltas, one per word.
    let n = chunks.len();
    let content: Vec<&str> = chunks[1..n - 2]
        .iter()
        .map(|c| {
            assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
            c["choices"][0]["delta"]["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(content.len(), 7, "{content:?}");
    assert_eq!(content[0], "reply");
    assert_eq!(content[1], " from");
    assert_eq!(content.concat(), "reply from alpha to: stream me please");
    // Then the finish reason with an empty delta.
    assert_eq!(chunks[n - 2]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "stop");
    // Then usage with no choices.
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(
        chunks[n - 1]["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10})
    );
}

#[tokio::test]
async fn openai_chat_stream_without_include_usage_has_no_usage() {
    let fake = FakeLlm::start("alpha", KEY).await;
    let text = post_stream(
        &fake,
        "/v1/chat/completions",
        &[BEARER],
        &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        "text/event-stream",
    )
    .await;
    let events = parse_sse(&text);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks = data_json(&events[..events.len() - 1]);
    // role, 5 words, finish.
    assert_eq!(chunks.len(), 7);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"].as_array().unwrap().len() == 1)
    );
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn openai_completions_answer_each_prompt_and_stream() {
    let fake = FakeLlm::start("beta", KEY).await;
    let (status, _, body) = post(
        &fake,
        "/v1/completions",
        &[BEARER],
        &json!({"model": "gpt-3.5-turbo-instruct", "prompt": "say hi"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["model"], "gpt-3.5-turbo-instruct");
    assert_eq!(body["choices"][0]["text"], "reply from beta to: say hi");
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8})
    );

    let (_, _, body) = post(
        &fake,
        "/v1/completions",
        &[BEARER],
        &json!({"model": "m", "prompt": ["one", "two three"]}),
    )
    .await;
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(choices[1]["text"], "reply from beta to: two three");

    let text = post_stream(
        &fake,
        "/v1/completions",
        &[BEARER],
        &json!({"model": "m", "prompt": "go", "stream": true, "stream_options": {"include_usage": true}}),
        "text/event-stream",
    )
    .await;
    let events = parse_sse(&text);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks = data_json(&events[..events.len() - 1]);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let n = chunks.len();
    let streamed: String = chunks[..n - 1]
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, "reply from beta to: go");
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn openai_embeddings_give_one_vector_per_input() {
    let fake = FakeLlm::start("alpha", KEY).await;
    let (status, _, body) = post(
        &fake,
        "/v1/embeddings",
        &[BEARER],
        &json!({"model": "text-embedding-3-small", "input": "one two"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "text-embedding-3-small");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["object"], "embedding");
    assert_eq!(data[0]["index"], 0);
    assert_eq!(floats(&data[0]["embedding"]), fake_embedding("one two", 8));
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 2, "total_tokens": 2})
    );

    let (_, _, body) = post(
        &fake,
        "/v1/embeddings",
        &[BEARER],
        &json!({"model": "m", "input": ["a", "b c", "a"], "dimensions": 16}),
    )
    .await;
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["embedding"].as_array().unwrap().len(), 16);
    }
    assert_eq!(data[0]["embedding"], data[2]["embedding"]);
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    let norm: f32 = floats(&data[1]["embedding"]).iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-3, "unit vector: {norm}");
    assert_eq!(body["usage"]["prompt_tokens"], 4);

    // Token-id inputs and base64 encoding (what the OpenAI SDKs ask for by default).
    let (_, _, body) = post(
        &fake,
        "/v1/embeddings",
        &[BEARER],
        &json!({"model": "m", "input": [[1, 2, 3], [4]], "encoding_format": "base64"}),
    )
    .await;
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data[0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, fake_embedding("1 2 3", 8));
    assert_eq!(body["usage"]["prompt_tokens"], 4);
}

#[tokio::test]
async fn openai_rejects_missing_and_wrong_keys_and_bad_requests() {
    let fake = FakeLlm::start("alpha", KEY).await;
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for route in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] {
        let (status, _, body) = post(&fake, route, &[], &chat).await;
        assert_eq!(status, 401, "{route}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert_eq!(body["error"]["param"], Value::Null);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("API key")
        );
    }
    let (status, _, body) = post(
        &fake,
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-wrong-key-abcdefgh")],
        &chat,
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Incorrect API key provided"),
        "{message}"
    );
    assert!(
        !message.contains("sk-wrong-key-abcdefgh"),
        "key masked: {message}"
    );

    let (status, _, body) = post(
        &fake,
        "/v1/chat/completions",
        &[BEARER],
        &json!({"model": "m"}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "messages");
    assert_eq!(body["error"]["code"], "missing_required_parameter");
    let (status, _, body) = post(
        &fake,
        "/v1/chat/completions",
        &[BEARER],
        &json!({"messages": []}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let (status, _, body) = post(&fake, "/v1/nope", &[BEARER], &chat).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["message"], "Invalid URL (POST /v1/nope)");
    assert_eq!(fake.request_count(), 7);
    assert_eq!(fake.requests()[6].path, "/v1/nope");
}

#[tokio::test]
async fn token_limits_cut_the_reply_with_each_providers_finish_reason() {
    let fake = FakeLlm::start("alpha", KEY).await;
    let (_, _, body) = post(
        &fake,
        "/v1/chat/completions",
        &[BEARER],
        &json!({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(body["choices"][0]["message"]["content"], "reply from");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 2);

    let (_, _, body) = post(
        &fake,
        "/v1/messages",
        &anthropic_headers(),
        &json!({"model": "claude", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(body["content"][0]["text"], "reply from alpha");
    assert_eq!(body["stop_reason"], "max_tokens");
    assert_eq!(body["usage"]["output_tokens"], 3);

    let (_, _, body) = post(
        &fake,
        "/v1beta/models/gemini-2.0-flash:generateContent",
        &[("x-goog-api-key", KEY)],
        &json!({"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 1}}),
    )
    .await;
    assert_eq!(
        body["candidates"][0]["content"]["parts"][0]["text"],
        "reply"
    );
    assert_eq!(body["candidates"][0]["finishReason"], "MAX_TOKENS");
}

// ---------------------------------------------------------------------------------------------
// Azure OpenAI

#[tokio::test]
async fn azure_deployments_answer_with_the_deployment_as_model() {
    let fake = FakeLlm::start("azure", KEY).await;
    let key = [("api-key", KEY)];
    let chat = json!({"messages": [{"role": "user", "content": "hello azure"}]});
    let path = "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21";
    let (status, _, body) = post(&fake, path, &key, &chat).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "my-gpt4o");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "reply from azure to: hello azure"
    );
    assert_eq!(body["usage"]["total_tokens"], 8);
    assert_eq!(fake.last_request().unwrap().path, path);

    let text = post_stream(
        &fake,
        path,
        &key,
        &json!({"stream": true, "messages": [{"role": "user", "content": "x"}]}),
        "text/event-stream",
    )
    .await;
    let events = parse_sse(&text);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    assert_eq!(data_json(&events[..1])[0]["model"], "my-gpt4o");

    let (status, _, body) = post(
        &fake,
        "/openai/deployments/emb/embeddings?api-version=2024-10-21",
        &key,
        &json!({"input": ["a", "b"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "emb");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);

    let (status, _, body) = post(
        &fake,
        "/openai/deployments/instruct/completions?api-version=2024-10-21",
        &key,
        &json!({"prompt": "p"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "instruct");
    assert_eq!(body["choices"][0]["text"], "reply from azure to: p");
}

#[tokio::test]
async fn azure_requires_api_key_and_api_version() {
    let fake = FakeLlm::start("azure", KEY).await;
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
    let path = "/openai/deployments/d/chat/completions?api-version=2024-10-21";
    for headers in [vec![], vec![("api-key", "wrong")], vec![BEARER]] {
        let (status, _, body) = post(&fake, path, &headers, &chat).await;
        assert_eq!(status, 401, "{headers:?}");
        assert_eq!(body["error"]["code"], "401");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Access denied")
        );
    }
    for path in [
        "/openai/deployments/d/chat/completions",
        "/openai/deployments/d/chat/completions?api-version=",
        "/openai/deployments/d/embeddings?other=1",
    ] {
        let (status, _, body) = post(&fake, path, &[("api-key", KEY)], &chat).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(body["error"]["code"], "MissingApiVersionParameter");
    }
}

// ---------------------------------------------------------------------------------------------
// Anthropic

#[tokio::test]
async fn anthropic_messages_answer_a_message() {
    let fake = FakeLlm::start("claude-fake", KEY).await;
    let (status, _, body) = post(
        &fake,
        "/v1/messages",
        &anthropic_headers(),
        &json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "system": "you are terse",
            "messages": [
                {"role": "user", "content": "earlier"},
                {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                {"role": "user", "content": [{"type": "text", "text": "what now"}]},
            ],
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["model"], "claude-sonnet-4-5");
    assert_eq!(
        body["content"],
        json!([{"type": "text", "text": "reply from claude-fake to: what now"}])
    );
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(body["stop_sequence"], Value::Null);
    // 3 system + 1 + 1 + 2 words in; 6 out.
    assert_eq!(body["usage"]["input_tokens"], 7);
    assert_eq!(body["usage"]["output_tokens"], 6);
}

#[tokio::test]
async fn anthropic_stream_follows_the_documented_event_sequence() {
    let fake = FakeLlm::start("claude-fake", KEY).await;
    let text = post_stream(
        &fake,
        "/v1/messages",
        &anthropic_headers(),
        &json!({
            "model": "claude-haiku-4-5",
            "max_tokens": 100,
            "stream": true,
            "messages": [{"role": "user", "content": "tell me"}],
        }),
        "text/event-stream",
    )
    .await;
    let events = parse_sse(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(["content_block_delta"; 6]);
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    let data = data_json(&events);
    for (name, d) in names.iter().zip(&data) {
        assert_eq!(d["type"], *name, "the data's type is the event's name");
    }
    let start = &data[0]["message"];
    assert!(start["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(start["type"], "message");
    assert_eq!(start["role"], "assistant");
    assert_eq!(start["model"], "claude-haiku-4-5");
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(start["usage"]["input_tokens"], 2);
    assert_eq!(start["usage"]["output_tokens"], 1);
    assert_eq!(
        data[1]["content_block"],
        json!({"type": "text", "text": ""})
    );
    let text: String = data[3..9]
        .iter()
        .map(|d| {
            assert_eq!(d["index"], 0);
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, "reply from claude-fake to: tell me");
    assert_eq!(data[9]["index"], 0);
    assert_eq!(
        data[10]["delta"],
        json!({"stop_reason": "end_turn", "stop_sequence": null})
    );
    assert_eq!(data[10]["usage"], json!({"output_tokens": 6}));
}

#[tokio::test]
async fn anthropic_rejects_bad_credentials_and_requests_with_its_error_shape() {
    let fake = FakeLlm::start("claude-fake", KEY).await;
    let good =
        json!({"model": "c", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    type Case<'a> = (Vec<(&'a str, &'a str)>, Value, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![("anthropic-version", "2023-06-01")],
            good.clone(),
            401,
            "authentication_error",
        ),
        (
            vec![("x-api-key", "wrong"), ("anthropic-version", "2023-06-01")],
            good.clone(),
            401,
            "authentication_error",
        ),
        // A bearer token is not an Anthropic API key.
        (
            vec![BEARER, ("anthropic-version", "2023-06-01")],
            good.clone(),
            401,
            "authentication_error",
        ),
        (
            vec![("x-api-key", KEY)],
            good.clone(),
            400,
            "invalid_request_error",
        ),
        (
            anthropic_headers().to_vec(),
            json!({"model": "c", "messages": [{"role": "user", "content": "hi"}]}),
            400,
            "invalid_request_error",
        ),
        (
            anthropic_headers().to_vec(),
            json!({"model": "c", "max_tokens": 10}),
            400,
            "invalid_request_error",
        ),
    ];
    for (headers, body, status, kind) in cases {
        let (got, _, answer) = post(&fake, "/v1/messages", &headers, &body).await;
        assert_eq!(got, status, "{headers:?} {body}: {answer}");
        assert_eq!(answer["type"], "error");
        assert_eq!(answer["error"]["type"], kind);
        assert!(answer["error"]["message"].is_string());
    }
    let (_, _, answer) = post(
        &fake,
        "/v1/messages",
        &anthropic_headers(),
        &json!({"model": "c", "messages": []}),
    )
    .await;
    assert_eq!(answer["error"]["message"], "max_tokens: Field required");
}

// ---------------------------------------------------------------------------------------------
// Gemini

#[tokio::test]
async fn gemini_generate_content_answers_a_candidate() {
    let fake = FakeLlm::start("gem", KEY).await;
    let (status, _, body) = post(
        &fake,
        "/v1beta/models/gemini-2.0-flash:generateContent",
        &[("x-goog-api-key", KEY)],
        &json!({
            "systemInstruction": {"parts": [{"text": "be nice"}]},
            "contents": [
                {"role": "user", "parts": [{"text": "first"}]},
                {"role": "model", "parts": [{"text": "answer"}]},
                {"role": "user", "parts": [{"text": "how"}, {"text": "are you"}]},
            ],
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let candidates = body["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 1);
    assert_eq!(
        candidates[0]["content"],
        json!({"role": "model", "parts": [{"text": "reply from gem to: how are you"}]})
    );
    assert_eq!(candidates[0]["finishReason"], "STOP");
    assert_eq!(candidates[0]["index"], 0);
    assert_eq!(
        body["usageMetadata"],
        json!({"promptTokenCount": 7, "candidatesTokenCount": 7, "totalTokenCount": 14})
    );
    assert_eq!(body["modelVersion"], "gemini-2.0-flash");
}

#[tokio::test]
async fn gemini_stream_sends_sse_chunks_with_usage_last() {
    let fake = FakeLlm::start("gem", KEY).await;
    let request = json!({"contents": [{"parts": [{"text": "stream it"}]}]});
    let text = post_stream(
        &fake,
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
        &[("x-goog-api-key", KEY)],
        &request,
        "text/event-stream",
    )
    .await;
    assert!(
        text.contains("\r\n\r\n"),
        "Gemini ends events with CRLF CRLF"
    );
    let events = parse_sse(&text);
    assert!(events.len() > 1);
    let chunks = data_json(&events);
    let streamed: String = chunks
        .iter()
        .map(|c| {
            assert_eq!(c["candidates"][0]["content"]["role"], "model");
            assert_eq!(c["modelVersion"], "gemini-2.5-pro");
            c["candidates"][0]["content"]["parts"][0]["text"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(streamed, "reply from gem to: stream it");
    let last = chunks.last().unwrap();
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["candidates"][0].get("finishReason").is_none())
    );
    assert_eq!(
        last["usageMetadata"],
        json!({"promptTokenCount": 2, "candidatesTokenCount": 6, "totalTokenCount": 8})
    );

    // Without alt=sse: the same responses as one streamed JSON array.
    let text = post_stream(
        &fake,
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
        &[("x-goog-api-key", KEY)],
        &request,
        "application/json",
    )
    .await;
    let array: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(array.len(), chunks.len());
    assert_eq!(
        array.last().unwrap()["usageMetadata"],
        last["usageMetadata"]
    );
}

#[tokio::test]
async fn gemini_embeddings_and_token_counts() {
    let fake = FakeLlm::start("gem", KEY).await;
    let key = [("x-goog-api-key", KEY)];
    let (status, _, body) = post(
        &fake,
        "/v1beta/models/text-embedding-004:batchEmbedContents",
        &key,
        &json!({"requests": [
            {"model": "models/text-embedding-004", "content": {"parts": [{"text": "alpha"}]}},
            {"model": "models/text-embedding-004", "content": {"parts": [{"text": "beta"}]}, "outputDimensionality": 4},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let embeddings = body["embeddings"].as_array().unwrap();
    assert_eq!(embeddings.len(), 2);
    assert_eq!(floats(&embeddings[0]["values"]), fake_embedding("alpha", 8));
    assert_eq!(floats(&embeddings[1]["values"]), fake_embedding("beta", 4));

    let (status, _, body) = post(
        &fake,
        "/v1beta/models/text-embedding-004:embedContent",
        &key,
        &json!({"content": {"parts": [{"text": "alpha"}]}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        floats(&body["embedding"]["values"]),
        fake_embedding("alpha", 8)
    );

    let (_, _, body) = post(
        &fake,
        "/v1beta/models/gemini-2.0-flash:countTokens",
        &key,
        &json!({"contents": [{"parts": [{"text": "one two three"}]}]}),
    )
    .await;
    assert_eq!(body, json!({"totalTokens": 3}));
}

#[tokio::test]
async fn gemini_rejects_bad_keys_with_its_error_shape() {
    let fake = FakeLlm::start("gem", KEY).await;
    let request = json!({"contents": [{"parts": [{"text": "hi"}]}]});
    let path = "/v1beta/models/gemini-2.0-flash:generateContent";
    let (status, _, body) = post(&fake, path, &[], &request).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], 403);
    assert_eq!(body["error"]["status"], "PERMISSION_DENIED");
    assert!(body["error"]["message"].is_string());

    let (status, _, body) = post(&fake, path, &[("x-goog-api-key", "nope")], &request).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"],
        json!({"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT"})
    );

    // The key may also come as a query parameter.
    let (status, _, _) = post(&fake, &format!("{path}?key={KEY}"), &[], &request).await;
    assert_eq!(status, 200);

    let (status, _, body) = post(&fake, path, &[("x-goog-api-key", KEY)], &json!({})).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");

    let (status, _, body) = post(
        &fake,
        "/v1beta/models/gemini-2.0-flash:doSomething",
        &[("x-goog-api-key", KEY)],
        &request,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["status"], "NOT_FOUND");
}

// ---------------------------------------------------------------------------------------------
// Fault controls

#[tokio::test]
async fn fail_next_answers_n_errors_in_each_providers_shape_then_recovers_by_itself() {
    let fake = FakeLlm::start("f", KEY).await;
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});

    fake.fail_next(2, 503);
    for _ in 0..2 {
        let (status, _, body) = post(&fake, "/v1/chat/completions", &[BEARER], &chat).await;
        assert_eq!(status, 503);
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(body["error"]["param"], Value::Null);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("fake_llm f")
        );
    }
    let (status, _, _) = post(&fake, "/v1/chat/completions", &[BEARER], &chat).await;
    assert_eq!(status, 200);

    // Injected failures come before authentication, and carry retry-after when asked.
    fake.set_retry_after(Some(2));
    fake.fail_next(1, 429);
    let (status, headers, body) = post(&fake, "/v1/chat/completions", &[], &chat).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    fake.set_retry_after(None);

    fake.fail_next(1, 429);
    let (status, headers, body) = post(
        &fake,
        "/openai/deployments/d/chat/completions?api-version=2024-10-21",
        &[("api-key", KEY)],
        &chat,
    )
    .await;
    assert_eq!(status, 429);
    assert!(headers.get("retry-after").is_none());
    assert_eq!(body["error"]["code"], "429");

    fake.fail_next(1, 529);
    let (status, _, body) = post(&fake, "/v1/messages", &anthropic_headers(), &chat).await;
    assert_eq!(status, 529);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "overloaded_error");

    fake.fail_next(1, 429);
    let (status, _, body) = post(
        &fake,
        "/v1beta/models/g:generateContent",
        &[("x-goog-api-key", KEY)],
        &json!({"contents": [{"parts": [{"text": "x"}]}]}),
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], 429);
    assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");

    // Streams fail before any event.
    fake.fail_next(1, 500);
    let resp = send(
        &fake,
        "/v1/chat/completions",
        &[BEARER],
        &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 500);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(fake.request_count(), 8);
}

#[tokio::test]
async fn fail_always_lasts_until_recover() {
    let fake = FakeLlm::start("f", KEY).await;
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    fake.fail_always(500);
    for _ in 0..3 {
        let (status, _, body) = post(&fake, "/v1/chat/completions", &[BEARER], &chat).await;
        assert_eq!(status, 500);
        assert_eq!(body["error"]["type"], "server_error");
    }
    // fail_next comes first, then fail_always again.
    fake.fail_next(1, 429);
    let (status, _, _) = post(&fake, "/v1/chat/completions", &[BEARER], &chat).await;
    assert_eq!(status, 429);
    let (status, _, _) = post(&fake, "/v1/chat/completions", &[BEARER], &chat).await;
    assert_eq!(status, 500);

    fake.recover();
    let (status, _, body) = post(&fake, "/v1/chat/completions", &[BEARER], &chat).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "reply from f to: hi"
    );
    assert_eq!(fake.request_count(), 6);
}

#[tokio::test]
async fn break_stream_after_sends_n_events_then_drops_the_connection() {
    let fake = FakeLlm::start("f", KEY).await;
    let stream_chat =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    fake.break_stream_after(2);

    let resp = send(&fake, "/v1/chat/completions", &[BEARER], &stream_chat).await;
    assert_eq!(resp.status(), 200);
    let (text, failed) = read_until_end(resp).await;
    assert!(
        failed,
        "the body ends in an error, not a clean end: {text:?}"
    );
    let events = parse_sse(&text);
    assert_eq!(events.len(), 2, "{text:?}");
    let chunks = data_json(&events);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "reply");

    let resp = send(
        &fake,
        "/v1/messages",
        &anthropic_headers(),
        &json!({"model": "c", "max_tokens": 9, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let (text, failed) = read_until_end(resp).await;
    assert!(failed);
    let names: Vec<String> = parse_sse(&text)
        .into_iter()
        .filter_map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["message_start", "content_block_start"]);

    fake.break_stream_after(0);
    let resp = send(
        &fake,
        "/v1beta/models/g:streamGenerateContent?alt=sse",
        &[("x-goog-api-key", KEY)],
        &json!({"contents": [{"parts": [{"text": "x"}]}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let (text, failed) = read_until_end(resp).await;
    assert!(failed);
    assert_eq!(text, "");

    // Non-streaming answers are not affected.
    let (status, _, _) = post(
        &fake,
        "/v1/chat/completions",
        &[BEARER],
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 200);

    fake.recover();
    let resp = send(&fake, "/v1/chat/completions", &[BEARER], &stream_chat).await;
    let (text, failed) = read_until_end(resp).await;
    assert!(!failed);
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn set_delay_holds_every_answer() {
    let fake = FakeLlm::start("f", KEY).await;
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    fake.set_delay(Duration::from_millis(400));

    let err = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", fake.url))
        .bearer_auth(KEY)
        .json(&chat)
        .timeout(Duration::from_millis(100))
        .send()
        .await
        .expect_err("the fake answers later than the timeout");
    assert!(err.is_timeout(), "{err}");
    // The request arrived, the answer was late: counted on arrival, which on a busy machine can
    // come after the client gave up.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.request_count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.request_count(), 1);

    let started = Instant::now();
    let (status, _, _) = post(&fake, "/v1/chat/completions", &[BEARER], &chat).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(400));

    // Errors are delayed too.
    fake.fail_next(1, 503);
    let started = Instant::now();
    let (status, _, _) = post(&fake, "/v1/chat/completions", &[BEARER], &chat).await;
    assert_eq!(status, 503);
    assert!(started.elapsed() >= Duration::from_millis(400));

    fake.recover();
    let started = Instant::now();
    let (status, _, _) = post(&fake, "/v1/chat/completions", &[BEARER], &chat).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_millis(400));
}

#[tokio::test]
async fn event_interval_spaces_stream_events() {
    let fake = FakeLlm::start("f", KEY).await;
    fake.set_event_interval(Duration::from_millis(60));
    let started = Instant::now();
    let mut resp = send(
        &fake,
        "/v1/chat/completions",
        &[BEARER],
        &json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let first = resp.chunk().await.unwrap().expect("a first event");
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("\"role\":\"assistant\""));
    let (rest, failed) = read_until_end(resp).await;
    assert!(!failed);
    assert!(rest.ends_with("data: [DONE]\n\n"));
    // role, 5 words, finish, [DONE]: 7 gaps.
    let total = started.elapsed();
    assert!(total >= Duration::from_millis(7 * 60), "{total:?}");
    assert!(
        total - first_at >= Duration::from_millis(6 * 60),
        "{first_at:?} {total:?}"
    );
}

#[tokio::test]
async fn recording_keeps_the_newest_requests_and_can_be_switched_off() {
    let fake = FakeLlm::start("f", KEY).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/embeddings", fake.url);
    for i in 0..RECORD_LIMIT + 5 {
        let resp = client
            .post(&url)
            .bearer_auth(KEY)
            .json(&json!({"model": "m", "input": format!("n{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let recorded = fake.requests();
    assert_eq!(recorded.len(), RECORD_LIMIT);
    assert_eq!(recorded[0].body["input"], "n5");
    assert_eq!(
        recorded.last().unwrap().body["input"],
        format!("n{}", RECORD_LIMIT + 4)
    );
    assert_eq!(fake.request_count(), RECORD_LIMIT + 5);

    fake.clear_requests();
    fake.set_recording(false);
    let resp = client
        .post(&url)
        .bearer_auth(KEY)
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(fake.requests().is_empty());
    assert_eq!(fake.request_count(), RECORD_LIMIT + 6);

    fake.set_recording(true);
    client
        .post(&url)
        .bearer_auth(KEY)
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(fake.last_request().unwrap().body, json!("not json"));
}

#[tokio::test]
async fn dropping_the_fake_stops_its_server() {
    let fake = FakeLlm::start("f", KEY).await;
    let url = format!("{}/v1/chat/completions", fake.url);
    drop(fake);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // A new client each time: no pooled connection.
        match reqwest::Client::new().post(&url).send().await {
            Err(e) if e.is_connect() => break,
            other => {
                assert!(Instant::now() < deadline, "still answering: {other:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn fakes_are_independent() {
    let a = FakeLlm::start("a", "key-a").await;
    let b = FakeLlm::start("b", "key-b").await;
    assert_ne!(a.url, b.url);
    a.fail_always(500);
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
    let (status, _, body) = post(
        &b,
        "/v1/chat/completions",
        &[("authorization", "Bearer key-b")],
        &chat,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "reply from b to: x"
    );
    let (status, _, _) = post(
        &b,
        "/v1/chat/completions",
        &[("authorization", "Bearer key-a")],
        &chat,
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(a.request_count(), 0);
}
