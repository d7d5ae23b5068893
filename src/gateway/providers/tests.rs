//! Golden tests of the provider layer, with fixtures under `tests/providers/`:
//!
//! - `{chat,completions,embeddings}/<case>.request.json`: an OpenAI request as a client sends
//!   it; `<case>.<provider>.request.json`: the upstream request built for that provider (URL,
//!   headers with the API key shown as `<key>`, body), or the error.
//! - `<provider>/<op>[_<case>].response.json`: a provider's response; `….openai.json`: what the
//!   client gets. (`<op>_<case>.request.json` next to it, if any, is the client's request.)
//! - `<provider>/<op>[_<case>].stream.sse`: a provider's SSE stream; `….stream.openai.jsonl`: the
//!   chunks the client gets (client asked for usage), an error as a last `{"error": ...}` line;
//!   `….stream.aggregated.json`: the aggregated answer.
//!
//! `UPDATE_GOLDEN=1 cargo test --lib providers` rewrites the expected files (review the diff!).
//! `created` values within a day of now (generated, not passed through) compare as 0.
//!
//! Over 800 lines as one cohesive thing: the provider layer's tests, mostly one small test per
//! conversion rule, beside the golden walk over the fixtures.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::*;
use crate::gateway::config::{ModelSettings, Provider, ProviderConfig};

const KEY: &str = "sk-test-KEY-0123456789abcdef";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/providers")
}

fn updating() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1")
}

fn model(provider: Provider, model: &str) -> ModelSettings {
    ModelSettings {
        name: "primary".into(),
        provider,
        model: model.into(),
        api_base: None,
        api_version: None,
        deployment: None,
    }
}

/// The model the golden fixtures use for each provider.
fn upstream(provider: Provider) -> ModelConfig {
    upstream_for(provider, Operation::Chat)
}

/// The model the golden fixtures use for each provider and operation.
fn upstream_for(provider: Provider, op: Operation) -> ModelConfig {
    let mut m = match (provider, op) {
        (Provider::Gemini, Operation::Embeddings) => model(provider, "gemini-embedding-001"),
        (Provider::Mistral, Operation::Embeddings) => model(provider, "mistral-embed"),
        (Provider::Openai | Provider::Azure, Operation::Embeddings) => {
            model(provider, "text-embedding-3-small")
        }
        _ => match provider {
            Provider::Anthropic => model(provider, "claude-sonnet-4-5"),
            Provider::Gemini => model(provider, "gemini-2.5-flash"),
            Provider::Mistral => model(provider, "mistral-small-latest"),
            Provider::Ollama => model(provider, "llama3.2"),
            _ => model(provider, "gpt-4o-mini"),
        },
    };
    if provider == Provider::Azure {
        m.api_base = Some("https://my-resource.openai.azure.com".into());
        m.deployment = Some(if op == Operation::Embeddings {
            "embeddings-prod".into()
        } else {
            "gpt-4o-mini-prod".into()
        });
    }
    ModelConfig::new(&m, Some(KEY.into())).unwrap()
}

fn provider_named(name: &str) -> Provider {
    Provider::ALL
        .into_iter()
        .find(|p| p.name() == name)
        .unwrap_or_else(|| panic!("unknown provider {name}"))
}

fn op_named(name: &str) -> Operation {
    match name.split(['_', '.']).next() {
        Some("chat") => Operation::Chat,
        Some("completions") => Operation::Completions,
        Some("embeddings") => Operation::Embeddings,
        _ => panic!("fixture {name} must start with chat, completions or embeddings"),
    }
}

fn error_json(e: &ProviderError) -> Value {
    let kind = match e {
        ProviderError::InvalidRequest(_) => "InvalidRequest",
        ProviderError::Unsupported(_) => "Unsupported",
        ProviderError::BadUpstreamResponse(_) => "BadUpstreamResponse",
        ProviderError::Config(_) => "Config",
    };
    json!({ "error": kind, "message": e.to_string() })
}

/// `created` values generated now compare as 0.
fn normalize(v: &mut Value) {
    let now = now_secs();
    match v {
        Value::Object(obj) => {
            for (k, v) in obj.iter_mut() {
                if k == "created"
                    && let Some(c) = v.as_u64()
                    && c.abs_diff(now) < 86_400
                {
                    *v = json!(0);
                } else {
                    normalize(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize),
        _ => {}
    }
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 creates it)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn golden(path: &Path, actual: &Value) {
    if updating() {
        let text = serde_json::to_string_pretty(actual).unwrap() + "\n";
        std::fs::write(path, text).unwrap();
        return;
    }
    let expected = read_json(path);
    assert!(
        *actual == expected,
        "{} differs (UPDATE_GOLDEN=1 rewrites it)\n--- expected\n{}\n--- actual\n{}",
        path.display(),
        serde_json::to_string_pretty(&expected).unwrap(),
        serde_json::to_string_pretty(actual).unwrap()
    );
}

fn golden_lines(path: &Path, actual: &[Value]) {
    if updating() {
        let text: String = actual.iter().map(|v| format!("{v}\n")).collect();
        std::fs::write(path, text).unwrap();
        return;
    }
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 creates it)", path.display()));
    let expected: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect();
    assert!(
        actual == expected.as_slice(),
        "{} differs (UPDATE_GOLDEN=1 rewrites it)\n--- expected\n{}\n--- actual\n{}",
        path.display(),
        expected
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        actual
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    );
}

fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(suffix))
        })
        .collect();
    files.sort();
    files
}

fn file_name(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or_default()
}

/// The upstream request as JSON: url, headers (the key as `<key>`), body; or the error.
fn render_request(up: &ModelConfig, op: Operation, body: &Value) -> Value {
    let request = match up.build_request(op, body) {
        Ok(request) => request,
        Err(e) => return error_json(&e),
    };
    render_built(&request)
}

fn render_built(request: &axum::http::Request<axum::body::Bytes>) -> Value {
    assert_eq!(request.method(), axum::http::Method::POST);
    let url = request.uri().to_string();
    assert!(!url.contains(KEY), "the API key is in the URL");
    let mut headers = serde_json::Map::new();
    for (name, value) in request.headers() {
        let value = value.to_str().unwrap();
        headers.insert(name.to_string(), json!(value.replace(KEY, "<key>")));
    }
    let text = std::str::from_utf8(request.body()).unwrap();
    assert!(!text.contains(KEY), "the API key is in the body");
    json!({
        "url": url,
        "headers": headers,
        "body": serde_json::from_str::<Value>(text).unwrap(),
    })
}

// ---------------------------------------------------------------------------------------------
// Golden: requests

#[test]
fn golden_requests() {
    let mut checked = 0;
    for (dir, defaults) in [
        ("chat", &["openai", "anthropic", "gemini"][..]),
        (
            "completions",
            &["openai", "anthropic", "gemini", "mistral"][..],
        ),
        ("embeddings", &["openai", "anthropic", "gemini"][..]),
    ] {
        let dir_path = fixtures().join(dir);
        let op = op_named(dir);
        for input in files_ending(&dir_path, ".request.json") {
            let name = file_name(&input);
            let case = name.trim_end_matches(".request.json");
            if case.contains('.') {
                continue; // an expected file
            }
            let body = read_json(&input);
            let mut providers: Vec<String> = defaults.iter().map(|p| p.to_string()).collect();
            for expected in files_ending(&dir_path, ".request.json") {
                let parts: Vec<&str> = file_name(&expected).split('.').collect();
                if parts.len() == 4 && parts[0] == case && !providers.iter().any(|p| p == parts[1])
                {
                    providers.push(parts[1].to_string());
                }
            }
            for provider in providers {
                let up = upstream_for(provider_named(&provider), op);
                let mut actual = render_request(&up, op, &body);
                normalize(&mut actual);
                golden(
                    &dir_path.join(format!("{case}.{provider}.request.json")),
                    &actual,
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "only {checked} request fixtures");
}

// ---------------------------------------------------------------------------------------------
// Golden: responses

const PROVIDER_DIRS: &[&str] = &["openai", "azure", "mistral", "anthropic", "gemini"];

#[test]
fn golden_responses() {
    let mut checked = 0;
    for provider in PROVIDER_DIRS {
        let dir = fixtures().join(provider);
        for input in files_ending(&dir, ".response.json") {
            let stem = file_name(&input)
                .trim_end_matches(".response.json")
                .to_string();
            let op = op_named(&stem);
            let up = upstream_for(provider_named(provider), op);
            let request_path = dir.join(format!("{stem}.request.json"));
            let request = request_path.exists().then(|| read_json(&request_path));
            let body = std::fs::read(&input).unwrap();
            let parsed = up.parse_response_for(op, request.as_ref(), &body);
            // The verbatim check reads what the whole parse would have: it accepts exactly the
            // answers the parse accepts, with the same usage and list length.
            match (up.check_verbatim(op, &body), &parsed) {
                (Some(check), Ok(v)) => {
                    assert_eq!(check.usage, usage_of(v), "{provider}/{stem}");
                    assert_eq!(
                        Some(check.items),
                        v.get(check.list).and_then(Value::as_array).map(Vec::len),
                        "{provider}/{stem}"
                    );
                }
                (Some(_), Err(e)) => panic!("{provider}/{stem}: checked, but the parse says {e}"),
                (None, Ok(_)) => assert!(!up.answers_verbatim(op), "{provider}/{stem}"),
                (None, Err(_)) => {}
            }
            let mut actual = match parsed {
                Ok(v) => v,
                Err(e) => error_json(&e),
            };
            normalize(&mut actual);
            golden(&dir.join(format!("{stem}.openai.json")), &actual);
            if request.is_none() && actual.get("error").is_none() {
                assert_eq!(
                    usage_of(&actual).is_some(),
                    actual.get("usage").is_some(),
                    "{stem}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} response fixtures");
}

#[test]
fn verbatim_check_leaves_odd_answers_to_the_parse() {
    let up = upstream(Provider::Openai);
    for (op, body) in [
        (Operation::Chat, &b"not json"[..]),
        (Operation::Chat, b"[1]"),
        (Operation::Chat, br#"{"choices": "x"}"#),
        (Operation::Chat, br#"{"choices": null}"#),
        (Operation::Chat, br#"{"error": {"message": "quota"}}"#),
        (Operation::Chat, br#"{"data": []}"#),
        (Operation::Embeddings, br#"{"choices": []}"#),
        (Operation::Chat, br#"{"choices": [], "choices": []}"#),
        (Operation::Chat, br#"{"choices": [], "x_groq": 3}"#),
    ] {
        assert_eq!(
            up.check_verbatim(op, body),
            None,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    for (body, usage) in [
        (&br#"{"choices": [{}, {}], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}"#[..],
         Some((3, 4, 7))),
        (br#"{"choices": [], "x_groq": {"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 9}}}"#,
         Some((1, 2, 9))),
        (br#"{"choices": [], "usage": null, "usageMetadata": {"promptTokenCount": 5}}"#,
         Some((5, 0, 5))),
        (br#"{"choices": [{"message": {"content": "\u00e9"}}], "extra": {"deep": [1, {"a": null}]}}"#,
         None),
    ] {
        let check = up.check_verbatim(Operation::Chat, body).expect("a right answer");
        let parsed = up.parse_response(Operation::Chat, body).unwrap();
        assert_eq!(check.usage, usage_of(&parsed));
        assert_eq!(
            check.usage.map(|u| (u.input_tokens, u.output_tokens, u.total_tokens)),
            usage
        );
        assert_eq!(check.items, parsed["choices"].as_array().unwrap().len());
    }
    // Answers that are converted are never passed on as they are.
    assert_eq!(
        upstream(Provider::Anthropic).check_verbatim(Operation::Chat, br#"{"choices": []}"#),
        None
    );
}

// ---------------------------------------------------------------------------------------------
// Golden: streams

/// Runs a stream through a converter fed `piece` bytes at a time; chunks, then an error line.
fn convert_stream(
    up: &ModelConfig,
    op: Operation,
    wants_usage: bool,
    bytes: &[u8],
    piece: usize,
) -> (Vec<Value>, StreamConverter) {
    let mut conv = up.stream_converter(op, wants_usage);
    let mut out = Vec::new();
    let mut failed = false;
    for chunk in bytes.chunks(piece) {
        match conv.push(chunk) {
            Ok(chunks) => out.extend(chunks),
            Err(e) => {
                out.push(error_json(&e));
                failed = true;
                break;
            }
        }
    }
    if !failed {
        match conv.finish() {
            Ok(chunks) => out.extend(chunks),
            Err(e) => out.push(error_json(&e)),
        }
    }
    out.iter_mut().for_each(normalize);
    (out, conv)
}

#[test]
fn golden_streams() {
    let mut checked = 0;
    for provider in PROVIDER_DIRS {
        let dir = fixtures().join(provider);
        let up = upstream(provider_named(provider));
        for input in files_ending(&dir, ".stream.sse") {
            let stem = file_name(&input)
                .trim_end_matches(".stream.sse")
                .to_string();
            let op = op_named(&stem);
            let bytes = std::fs::read(&input).unwrap();

            let (chunks, conv) = convert_stream(&up, op, true, &bytes, bytes.len().max(1));
            golden_lines(&dir.join(format!("{stem}.stream.openai.jsonl")), &chunks);
            let mut aggregated = conv.aggregated();
            normalize(&mut aggregated);
            golden(
                &dir.join(format!("{stem}.stream.aggregated.json")),
                &aggregated,
            );

            // Split anywhere, the same chunks come out.
            for piece in [1, 2, 3, 7, 64] {
                let (split, split_conv) = convert_stream(&up, op, true, &bytes, piece);
                assert_eq!(split, chunks, "{stem}: fed {piece} bytes at a time");
                assert_eq!(split_conv.usage(), conv.usage(), "{stem}");
            }

            // A client that did not ask for usage gets no usage, but the gateway still knows it.
            let (no_usage, no_usage_conv) = convert_stream(&up, op, false, &bytes, 5);
            let expected: Vec<Value> = chunks
                .iter()
                .filter_map(|c| {
                    let mut c = c.clone();
                    let obj = c.as_object_mut()?;
                    let had_usage = obj.remove("usage").is_some_and(|u| !u.is_null());
                    let no_choices = obj
                        .get("choices")
                        .and_then(Value::as_array)
                        .is_some_and(Vec::is_empty);
                    (!(had_usage && no_choices)).then_some(c)
                })
                .collect();
            assert_eq!(no_usage, expected, "{stem}: without include_usage");
            assert_eq!(no_usage_conv.usage(), conv.usage(), "{stem}");
            if !chunks.iter().any(|c| c.get("error").is_some()) {
                assert!(conv.usage().is_some(), "{stem}: no usage seen");
            }
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} stream fixtures");
}

// ---------------------------------------------------------------------------------------------
// Error messages

#[test]
fn error_messages_from_fixtures() {
    let cases = read_json(&fixtures().join("errors.json"));
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let up = upstream(provider_named(case["provider"].as_str().unwrap()));
        let body = match &case["body"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let status = case["status"].as_u64().unwrap() as u16;
        let message = up.error_message(status, body.as_bytes());
        assert_eq!(message, case["message"].as_str().unwrap(), "{case}");
        assert!(!message.contains(KEY));
    }
}

#[test]
fn error_message_never_contains_the_api_key() {
    let up = upstream(Provider::Openai);
    let body = format!(r#"{{"error":{{"message":"Incorrect API key provided: {KEY}"}}}}"#);
    assert_eq!(
        up.error_message(401, body.as_bytes()),
        "Incorrect API key provided: [REDACTED]"
    );
    let body = format!("forbidden for key {KEY}");
    assert_eq!(
        up.error_message(403, body.as_bytes()),
        "forbidden for key [REDACTED]"
    );
}

#[test]
fn error_message_of_a_long_text_body_is_truncated() {
    let up = upstream(Provider::Openai);
    let message = up.error_message(502, "x".repeat(2000).as_bytes());
    assert_eq!(message.len(), 500);
    assert!(message.ends_with('…'));
}

// ---------------------------------------------------------------------------------------------
// Request building: URLs, headers, keys

fn build(up: &ModelConfig, op: Operation, body: Value) -> axum::http::Request<axum::body::Bytes> {
    up.build_request(op, &body).unwrap()
}

fn chat_body() -> Value {
    json!({"messages": [{"role": "user", "content": "hi"}]})
}

fn url_of(provider: Provider, api_base: Option<&str>, op: Operation, body: Value) -> String {
    let mut m = model(provider, "the-model");
    m.api_base = api_base.map(Into::into);
    if provider == Provider::Azure {
        m.deployment = Some("dep".into());
    }
    let up = ModelConfig::new(&m, Some(KEY.into())).unwrap();
    build(&up, op, body).uri().to_string()
}

#[test]
fn default_urls_of_every_provider() {
    let cases = [
        (
            Provider::Openai,
            "https://api.openai.com/v1/chat/completions",
        ),
        (
            Provider::Mistral,
            "https://api.mistral.ai/v1/chat/completions",
        ),
        (
            Provider::Groq,
            "https://api.groq.com/openai/v1/chat/completions",
        ),
        (
            Provider::Deepseek,
            "https://api.deepseek.com/v1/chat/completions",
        ),
        (Provider::Xai, "https://api.x.ai/v1/chat/completions"),
        (
            Provider::Openrouter,
            "https://openrouter.ai/api/v1/chat/completions",
        ),
        (
            Provider::Togetherai,
            "https://api.together.xyz/v1/chat/completions",
        ),
        (
            Provider::Ollama,
            "http://localhost:11434/v1/chat/completions",
        ),
        (Provider::Anthropic, "https://api.anthropic.com/v1/messages"),
        (
            Provider::Gemini,
            "https://generativelanguage.googleapis.com/v1beta/models/the-model:generateContent",
        ),
    ];
    for (provider, url) in cases {
        assert_eq!(url_of(provider, None, Operation::Chat, chat_body()), url);
    }
}

#[test]
fn urls_of_each_operation() {
    let prompt = json!({"prompt": "hi"});
    let input = json!({"input": "hi"});
    assert_eq!(
        url_of(
            Provider::Openai,
            None,
            Operation::Completions,
            prompt.clone()
        ),
        "https://api.openai.com/v1/completions"
    );
    assert_eq!(
        url_of(Provider::Openai, None, Operation::Embeddings, input.clone()),
        "https://api.openai.com/v1/embeddings"
    );
    // No /completions API: served by chat.
    for provider in [Provider::Mistral, Provider::Groq, Provider::Deepseek] {
        assert!(
            url_of(provider, None, Operation::Completions, prompt.clone())
                .ends_with("/v1/chat/completions")
        );
    }
    assert_eq!(
        url_of(
            Provider::Anthropic,
            None,
            Operation::Completions,
            prompt.clone()
        ),
        "https://api.anthropic.com/v1/messages"
    );
    assert_eq!(
        url_of(Provider::Gemini, None, Operation::Embeddings, input.clone()),
        "https://generativelanguage.googleapis.com/v1beta/models/the-model:batchEmbedContents"
    );
    assert_eq!(
        url_of(
            Provider::Gemini,
            None,
            Operation::Chat,
            json!({"messages": [{"role": "user", "content": "hi"}], "stream": true})
        ),
        "https://generativelanguage.googleapis.com/v1beta/models/the-model:streamGenerateContent?alt=sse"
    );
    let azure = "https://res.openai.azure.com";
    assert_eq!(
        url_of(Provider::Azure, Some(azure), Operation::Chat, chat_body()),
        "https://res.openai.azure.com/openai/deployments/dep/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(
        url_of(Provider::Azure, Some(azure), Operation::Completions, prompt),
        "https://res.openai.azure.com/openai/deployments/dep/completions?api-version=2024-10-21"
    );
    assert_eq!(
        url_of(Provider::Azure, Some(azure), Operation::Embeddings, input),
        "https://res.openai.azure.com/openai/deployments/dep/embeddings?api-version=2024-10-21"
    );
}

#[test]
fn api_base_with_or_without_trailing_slash_and_version() {
    let chat = Operation::Chat;
    for base in ["http://vllm:8000/v1", "http://vllm:8000/v1/"] {
        assert_eq!(
            url_of(Provider::Openai, Some(base), chat, chat_body()),
            "http://vllm:8000/v1/chat/completions"
        );
    }
    assert_eq!(
        url_of(
            Provider::Openai,
            Some("http://proxy/openai/v1?tenant=a"),
            chat,
            chat_body()
        ),
        "http://proxy/openai/v1/chat/completions?tenant=a"
    );
    for base in [
        "https://proxy.example/anthropic",
        "https://proxy.example/anthropic/v1/",
    ] {
        assert_eq!(
            url_of(Provider::Anthropic, Some(base), chat, chat_body()),
            "https://proxy.example/anthropic/v1/messages"
        );
    }
    for base in [
        "https://proxy.example/gemini",
        "https://proxy.example/gemini/v1beta",
        "https://proxy.example/gemini/v1beta/models/",
    ] {
        assert_eq!(
            url_of(Provider::Gemini, Some(base), chat, chat_body()),
            "https://proxy.example/gemini/v1beta/models/the-model:generateContent"
        );
    }
    assert_eq!(
        url_of(
            Provider::Azure,
            Some("https://res.openai.azure.com/openai/"),
            chat,
            chat_body()
        ),
        "https://res.openai.azure.com/openai/deployments/dep/chat/completions?api-version=2024-10-21"
    );
    let mut m = model(Provider::Gemini, "models/gemini-2.5-pro");
    m.api_base = None;
    let up = ModelConfig::new(&m, None).unwrap();
    assert_eq!(
        build(&up, chat, chat_body()).uri().to_string(),
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-pro:generateContent"
    );
}

#[test]
fn azure_api_version_is_configurable() {
    let mut m = model(Provider::Azure, "gpt-4o");
    m.api_base = Some("https://res.openai.azure.com".into());
    m.deployment = Some("dep".into());
    m.api_version = Some("2025-01-01-preview".into());
    let up = ModelConfig::new(&m, Some(KEY.into())).unwrap();
    assert_eq!(
        build(&up, Operation::Chat, chat_body()).uri().to_string(),
        "https://res.openai.azure.com/openai/deployments/dep/chat/completions?api-version=2025-01-01-preview"
    );
}

/// Every header that carries the key, by provider.
#[test]
fn the_api_key_goes_only_into_the_provider_auth_header() {
    let cases = [
        (Provider::Openai, "authorization", format!("Bearer {KEY}")),
        (Provider::Groq, "authorization", format!("Bearer {KEY}")),
        (Provider::Ollama, "authorization", format!("Bearer {KEY}")),
        (Provider::Azure, "api-key", KEY.to_string()),
        (Provider::Anthropic, "x-api-key", KEY.to_string()),
        (Provider::Gemini, "x-goog-api-key", KEY.to_string()),
    ];
    for (provider, header, value) in cases {
        let request = build(&upstream(provider), Operation::Chat, chat_body());
        let carrying: Vec<&str> = request
            .headers()
            .iter()
            .filter(|(_, v)| v.to_str().unwrap().contains(KEY))
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(carrying, [header], "{provider:?}");
        assert_eq!(request.headers()[header], value.as_str());
        assert!(request.headers()[header].is_sensitive());
        assert_eq!(request.headers()["content-type"], "application/json");
        assert!(!request.uri().to_string().contains(KEY));
        assert!(!String::from_utf8_lossy(request.body()).contains(KEY));
        // Debug of the request (e.g. in a log line) hides it too.
        assert!(!format!("{request:?}").contains(KEY), "{provider:?}");
    }
    let anthropic = build(&upstream(Provider::Anthropic), Operation::Chat, chat_body());
    assert_eq!(anthropic.headers()["anthropic-version"], "2023-06-01");
}

#[test]
fn no_auth_header_without_a_key() {
    for provider in [
        Provider::Ollama,
        Provider::Openai,
        Provider::Anthropic,
        Provider::Gemini,
    ] {
        let up = ModelConfig::new(&model(provider, "m"), None).unwrap();
        let request = build(&up, Operation::Chat, chat_body());
        for header in ["authorization", "x-api-key", "x-goog-api-key", "api-key"] {
            assert!(
                !request.headers().contains_key(header),
                "{provider:?} {header}"
            );
        }
    }
    // An empty key (an empty Secret value) counts as none.
    let up = ModelConfig::new(&model(Provider::Ollama, "m"), Some(String::new())).unwrap();
    assert!(
        !build(&up, Operation::Chat, chat_body())
            .headers()
            .contains_key("authorization")
    );
}

#[test]
fn debug_of_upstream_hides_the_key() {
    let up = upstream(Provider::Anthropic);
    let debug = format!("{up:?}");
    assert!(!debug.contains(KEY));
    assert!(debug.contains("<redacted>"));
    assert!(debug.contains("claude-sonnet-4-5"));
    let none = ModelConfig::new(&model(Provider::Ollama, "m"), None).unwrap();
    assert!(format!("{none:?}").contains("<none>"));
}

#[test]
fn upstream_resolution_and_config_errors() {
    let up = upstream(Provider::Openai);
    assert_eq!(up.api_base().as_str(), "https://api.openai.com/v1");
    assert_eq!(up.provider_name(), "openai");
    assert!(matches!(
        upstream(Provider::Azure).provider,
        ProviderConfig::Azure(a) if a.api_version == "2024-10-21"
    ));

    let mut m = model(Provider::Openai, "m");
    m.api_base = Some("not a url".into());
    assert!(ModelConfig::new(&m, None).is_err());
    m.api_base = Some("ftp://host/v1".into());
    assert!(ModelConfig::new(&m, None).is_err());

    let mut azure = model(Provider::Azure, "gpt-4o");
    let err = ModelConfig::new(&azure, Some(KEY.into())).unwrap_err();
    assert!(!err.contains(KEY));
    azure.api_base = Some("https://res.openai.azure.com".into());
    assert!(ModelConfig::new(&azure, None).is_err());

    let bad_key = ModelConfig::new(&model(Provider::Openai, "m"), Some("bad\nkey".into())).unwrap();
    let err = bad_key
        .build_request(Operation::Chat, &chat_body())
        .unwrap_err();
    assert!(matches!(err, ProviderError::Config(_)));
    assert!(!err.to_string().contains("bad\nkey"));
}

#[test]
fn supported_operations() {
    for provider in [
        Provider::Openai,
        Provider::Azure,
        Provider::Gemini,
        Provider::Mistral,
        Provider::Ollama,
    ] {
        let up = upstream(provider);
        assert!(up.supports(Operation::Chat));
        assert!(up.supports(Operation::Completions));
        assert!(up.supports(Operation::Embeddings));
    }
    let anthropic = upstream(Provider::Anthropic);
    assert!(anthropic.supports(Operation::Chat));
    assert!(anthropic.supports(Operation::Completions));
    assert!(!anthropic.supports(Operation::Embeddings));
    let err = anthropic
        .build_request(Operation::Embeddings, &json!({"input": "x"}))
        .unwrap_err();
    assert!(matches!(err, ProviderError::Unsupported(_)));
}

#[test]
fn a_body_that_is_not_an_object_is_invalid() {
    for provider in [Provider::Openai, Provider::Anthropic, Provider::Gemini] {
        let err = upstream(provider)
            .build_request(Operation::Chat, &json!([1]))
            .unwrap_err();
        assert!(
            matches!(err, ProviderError::InvalidRequest(_)),
            "{provider:?}"
        );
    }
}

#[test]
fn anthropic_passthrough_replaces_only_the_model() {
    let body = json!({
        "model": "whatever",
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": true,
        "thinking": {"type": "enabled", "budget_tokens": 2048},
    });
    let up = upstream(Provider::Anthropic);
    let request = up.build_anthropic_passthrough(&body).unwrap();
    let rendered = render_built(&request);
    let mut expected_body = body.clone();
    expected_body["model"] = json!("claude-sonnet-4-5");
    assert_eq!(
        rendered,
        json!({
            "url": "https://api.anthropic.com/v1/messages",
            "headers": {
                "content-type": "application/json",
                "x-api-key": "<key>",
                "anthropic-version": "2023-06-01",
            },
            "body": expected_body,
        })
    );
    for provider in [Provider::Openai, Provider::Gemini, Provider::Azure] {
        let err = upstream(provider)
            .build_anthropic_passthrough(&body)
            .unwrap_err();
        assert!(matches!(err, ProviderError::Unsupported(_)), "{provider:?}");
    }
}

#[test]
fn anthropic_passthrough_stream_usage_via_a_converter() {
    // The gateway forwards an Anthropic-native stream as is; a converter fed the same bytes
    // yields its usage and aggregated answer.
    let bytes = std::fs::read(fixtures().join("anthropic/chat.stream.sse")).unwrap();
    let up = upstream(Provider::Anthropic);
    let mut conv = up.stream_converter(Operation::Chat, false);
    conv.push(&bytes).unwrap();
    conv.finish().unwrap();
    assert_eq!(
        conv.usage(),
        Some(Usage {
            input_tokens: 25,
            output_tokens: 15,
            total_tokens: 40
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Usage

#[test]
fn usage_of_openai_anthropic_and_gemini_shapes() {
    let u = |i, o, t| {
        Some(Usage {
            input_tokens: i,
            output_tokens: o,
            total_tokens: t,
        })
    };
    assert_eq!(
        usage_of(
            &json!({"usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}})
        ),
        u(9, 12, 21)
    );
    // Embeddings: no completion tokens.
    assert_eq!(
        usage_of(&json!({"usage": {"prompt_tokens": 8, "total_tokens": 8}})),
        u(8, 0, 8)
    );
    assert_eq!(usage_of(&json!({"usage": null})), None);
    assert_eq!(usage_of(&json!({"choices": []})), None);
    // Anthropic-native, cache tokens counted as input (as MLflow does).
    assert_eq!(
        usage_of(&json!({"usage": {"input_tokens": 10, "output_tokens": 5,
            "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20}})),
        u(130, 5, 135)
    );
    assert_eq!(
        usage_of(
            &json!({"type": "message_start", "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}})
        ),
        u(25, 1, 26)
    );
    assert_eq!(
        usage_of(&json!({"type": "message_delta", "usage": {"output_tokens": 15}})),
        u(0, 15, 15)
    );
    // Groq puts it under x_groq.
    assert_eq!(
        usage_of(
            &json!({"x_groq": {"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}})
        ),
        u(3, 4, 7)
    );
    // Gemini-native, thinking tokens are output.
    assert_eq!(
        usage_of(
            &json!({"usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 12,
            "thoughtsTokenCount": 30, "totalTokenCount": 50}})
        ),
        u(8, 42, 50)
    );
}

// ---------------------------------------------------------------------------------------------
// Streams: behaviours beyond the golden files

#[test]
fn an_error_after_chunks_of_the_same_push_is_reported_on_the_next_call() {
    let up = upstream(Provider::Anthropic);
    let mut conv = up.stream_converter(Operation::Chat, false);
    let bytes = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"id":"msg_1","model":"claude-sonnet-4-5","usage":{"input_tokens":5,"output_tokens":1}}}"#,
        "\n\n",
        "event: error\n",
        r#"data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        "\n\n"
    );
    let chunks = conv.push(bytes.as_bytes()).unwrap();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let err = conv.push(b"").unwrap_err();
    assert_eq!(
        err.to_string(),
        "anthropic stream error: Overloaded (overloaded_error)"
    );
    assert!(matches!(err, ProviderError::BadUpstreamResponse(_)));
}

#[test]
fn openai_stream_error_event_and_bad_json_are_upstream_errors() {
    let up = upstream(Provider::Openrouter);
    let mut conv = up.stream_converter(Operation::Chat, false);
    let err = conv
        .push(b"data: {\"error\":{\"message\":\"Provider returned error\",\"code\":502}}\n\n")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "upstream stream error: Provider returned error"
    );
    let mut conv = up.stream_converter(Operation::Chat, false);
    assert!(matches!(
        conv.push(b"data: {not json\n\n"),
        Err(ProviderError::BadUpstreamResponse(_))
    ));
}

#[test]
fn openai_keeps_usage_in_a_content_chunk_only_for_a_client_that_asked() {
    // Mistral reports usage in its last content chunk.
    let stream = concat!(
        r#"data: {"id":"a","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
        "\n\ndata: [DONE]\n\n"
    );
    let up = upstream(Provider::Mistral);
    for wants in [false, true] {
        let mut conv = up.stream_converter(Operation::Chat, wants);
        let mut chunks = conv.push(stream.as_bytes()).unwrap();
        chunks.extend(conv.finish().unwrap());
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(chunks[0].get("usage").is_some(), wants);
        assert_eq!(conv.usage().map(|u| u.total_tokens), Some(4));
    }
}

#[test]
fn events_after_done_are_ignored_and_finish_is_idempotent() {
    let up = upstream(Provider::Openai);
    let mut conv = up.stream_converter(Operation::Chat, true);
    let chunks = conv
        .push(b"data: [DONE]\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"late\"}}]}\n\n")
        .unwrap();
    assert!(chunks.is_empty());
    assert!(conv.finish().unwrap().is_empty());
    assert!(conv.finish().unwrap().is_empty());
    assert_eq!(conv.usage(), None);
}

#[test]
fn an_anthropic_stream_cut_short_still_reports_usage() {
    let up = upstream(Provider::Anthropic);
    let mut conv = up.stream_converter(Operation::Chat, true);
    let stream = concat!(
        r#"data: {"type":"message_start","message":{"id":"msg_1","model":"claude-sonnet-4-5","usage":{"input_tokens":5,"output_tokens":1}}}"#,
        "\n\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}"#,
        "\n\n"
    );
    let chunks = conv.push(stream.as_bytes()).unwrap();
    assert_eq!(chunks.len(), 2);
    assert_eq!(conv.usage().map(|u| u.input_tokens), Some(5));
    let tail = conv.finish().unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0]["choices"], json!([]));
    assert_eq!(tail[0]["usage"]["prompt_tokens"], 5);
    assert_eq!(conv.aggregated()["choices"][0]["message"]["content"], "Hel");
}

/// An answer sent to the client as the provider's bytes must be exactly what
/// `parse_response_for` returns: checked on the golden response of every such provider.
#[test]
fn verbatim_answers_are_the_parsed_answers() {
    let answer = serde_json::json!({
        "id": "x", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    });
    let bytes = serde_json::to_vec(&answer).unwrap();
    for provider in [
        Provider::Openai,
        Provider::Azure,
        Provider::Mistral,
        Provider::Groq,
        Provider::Deepseek,
        Provider::Xai,
        Provider::Openrouter,
        Provider::Togetherai,
        Provider::Ollama,
        Provider::Anthropic,
        Provider::Gemini,
    ] {
        for op in [Operation::Chat, Operation::Completions] {
            let up = upstream_for(provider, op);
            if !up.answers_verbatim(op) {
                continue;
            }
            let parsed = up.parse_response_for(op, None, &bytes).unwrap();
            assert_eq!(parsed, answer, "{provider:?} {op:?}");
        }
    }
    let verbatim = |p, op| upstream_for(p, op).answers_verbatim(op);
    assert!(verbatim(Provider::Openai, Operation::Chat));
    assert!(verbatim(Provider::Openai, Operation::Embeddings));
    assert!(!verbatim(Provider::Mistral, Operation::Completions));
    assert!(!verbatim(Provider::Anthropic, Operation::Chat));
    assert!(!verbatim(Provider::Gemini, Operation::Chat));
}
