//! The gateway process against local fake providers (each speaking its documented wire format)
//! and a real MLflow server: responses, routing, errors, and the traces read back from MLflow.

use crate::support;

use std::time::Duration;

use mlflow_gateway_operator::mlflow::{MlflowClient, MlflowConfig};
use serde_json::{Value, json};
use support::fake_llm::FakeLlm;
use support::{GatewayProcess, Mlflow};

const KEY: &str = "sk-test-key-that-must-never-leak-42";

fn tracking(ml: &Mlflow) -> MlflowClient {
    MlflowClient::new(&MlflowConfig::new(ml.uri.parse().unwrap()).unwrap()).unwrap()
}

async fn experiment(ml: &Mlflow, prefix: &str) -> String {
    support::new_experiment(&tracking(ml), &format!("{prefix}-{}", support::suffix())).await
}

/// One model line of a manifest, pointed at a fake.
fn model(name: &str, provider: &str, fake: &FakeLlm, extra: &str) -> String {
    let base = match provider {
        "openai" | "mistral" | "groq" => format!("{}/v1", fake.url),
        _ => fake.url.clone(),
    };
    let azure = if provider == "azure" {
        ", deployment: dep-1"
    } else {
        ""
    };
    format!(
        "    - {{name: {name}, provider: {provider}, model: {provider}-model, apiBase: \"{base}\"{azure}, apiKeySecretRef: {{name: keys, key: k}}{extra}}}\n"
    )
}

/// An endpoint open to every caller (access is the `callers` module's subject).
fn manifest(endpoint_type: &str, models: &str, rest: &str) -> String {
    format!(
        "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {{name: chat, namespace: team-a, uid: 0a1b2c3d-uid}}\nspec:\n  access: {{open: true}}\n  endpointType: {endpoint_type}\n  models:\n{models}{rest}"
    )
}

fn env<'a>(ml: &'a Mlflow, exp: &'a str, names: &[&str]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = names
        .iter()
        .map(|n| {
            (
                mlflow_gateway_operator::api::api_key_env(n),
                KEY.to_string(),
            )
        })
        .collect();
    v.push(("MLFLOW_TRACKING_URI".into(), ml.uri.clone()));
    v.push(("MLFLOW_EXPERIMENT_ID".into(), exp.to_string()));
    // These tests read the gateway metadata as trace metadata (trace_delivery:: covers the modes).
    v.push(("GATEWAY_TRACE_EXPORT_MODE".into(), "info-then-spans".into()));
    v
}

async fn start(manifest: &str, env: &[(String, String)]) -> GatewayProcess {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    GatewayProcess::start(manifest, &pairs).await
}

fn chat_body(text: &str) -> Value {
    json!({"model": "chat", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": text}
    ]})
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("user-agent", "test-suite/1.0")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Reads an MLflow trace back through the REST API, waiting until it is complete.
async fn read_trace(ml: &Mlflow, trace_id: &str, spans: usize) -> Value {
    let client = reqwest::Client::new();
    support::eventually(
        30,
        &format!("trace {trace_id} with {spans} spans"),
        || async {
            let v: Value = client
                .get(format!("{}/api/3.0/mlflow/traces/get", ml.uri))
                .query(&[("trace_id", trace_id)])
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let trace = v.get("trace")?;
            let n = trace.get("spans")?.as_array()?.len();
            let state = trace.pointer("/trace_info/state")?.as_str()?;
            // The trace info (metadata) and the spans land in separate requests.
            let meta = trace.pointer("/trace_info/trace_metadata/mlflow.gateway.requestType");
            (n >= spans && state != "IN_PROGRESS" && meta.is_some()).then(|| trace.clone())
        },
    )
    .await
}

fn trace_id_of(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-mlflow-trace-id")
        .expect("x-mlflow-trace-id header")
        .to_str()
        .unwrap()
        .to_string()
}

fn spans(trace: &Value) -> Vec<Value> {
    trace["spans"].as_array().unwrap().clone()
}

/// An OTLP `AnyValue` (as MLflow's REST API returns span attributes) as plain JSON.
fn any_value(v: &Value) -> Value {
    if let Some(s) = v.get("string_value") {
        return s.clone();
    }
    if let Some(i) = v.get("int_value") {
        return i
            .as_str()
            .and_then(|s| s.parse::<i64>().ok())
            .map_or(i.clone(), Value::from);
    }
    for k in ["double_value", "bool_value"] {
        if let Some(x) = v.get(k) {
            return x.clone();
        }
    }
    if let Some(a) = v.pointer("/array_value/values").and_then(Value::as_array) {
        return Value::Array(a.iter().map(any_value).collect());
    }
    if let Some(kv) = v.pointer("/kvlist_value/values").and_then(Value::as_array) {
        return Value::Object(
            kv.iter()
                .map(|e| {
                    (
                        e["key"].as_str().unwrap_or("").to_string(),
                        any_value(&e["value"]),
                    )
                })
                .collect(),
        );
    }
    Value::Null
}

/// A span attribute, decoded (JSON strings too, as MLflow decodes them).
fn attr_json(span: &Value, key: &str) -> Option<Value> {
    let entry = span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)?;
    match any_value(&entry["value"]) {
        Value::String(s) => serde_json::from_str(&s).ok().or(Some(Value::String(s))),
        other => Some(other),
    }
}

fn is_root(span: &Value) -> bool {
    span.get("parent_span_id")
        .is_none_or(|p| p.is_null() || p == "")
}

fn root(trace: &Value) -> Value {
    spans(trace).into_iter().find(is_root).expect("a root span")
}

/// The provider spans, in start order.
fn children(trace: &Value) -> Vec<Value> {
    let mut c: Vec<_> = spans(trace).into_iter().filter(|s| !is_root(s)).collect();
    c.sort_by_key(|s| s["start_time_unix_nano"].as_u64().unwrap_or(0));
    c
}

fn assert_gateway_trace(trace: &Value, provider: &str, request_type: &str, usage: (u64, u64)) {
    let info = &trace["trace_info"];
    assert_eq!(info["state"], "OK", "{info}");
    let meta = &info["trace_metadata"];
    assert_eq!(meta["mlflow.gateway.endpointId"], "0a1b2c3d-uid", "{meta}");
    assert_eq!(meta["mlflow.gateway.requestType"], request_type, "{meta}");
    assert_eq!(meta["mlflow.gateway.caller"], "test-suite", "{meta}");
    let r = root(trace);
    assert_eq!(r["name"], "gateway/chat");
    let kids = children(trace);
    let last = kids.last().expect("a provider span");
    assert_eq!(
        last["name"],
        format!("provider/{provider}/{provider}-model")
    );
    assert_eq!(attr_json(last, "mlflow.spanType"), Some(json!("LLM")));
    assert_eq!(
        attr_json(last, "mlflow.llm.provider"),
        Some(json!(provider))
    );
    let u = attr_json(last, "mlflow.chat.tokenUsage").expect("token usage on the provider span");
    assert_eq!(u["input_tokens"], usage.0, "{u}");
    assert_eq!(u["output_tokens"], usage.1, "{u}");
    assert_eq!(u["total_tokens"], usage.0 + usage.1, "{u}");
}

const CHAT_PROVIDERS: &[&str] = &["openai", "azure", "anthropic", "gemini", "mistral"];

#[tokio::test]
async fn chat_through_each_provider_is_answered_and_traced() {
    let ml = support::mlflow();
    for provider in CHAT_PROVIDERS {
        let fake = FakeLlm::start(provider, KEY).await;
        let exp = experiment(ml, "gw-chat").await;
        let m = manifest("llm/v1/chat", &model("main", provider, &fake, ""), "");
        let gw = start(&m, &env(ml, &exp, &["main"])).await;
        let resp = post(
            &format!("{}/v1/chat/completions", gw.url),
            &chat_body("hello there"),
        )
        .await;
        assert_eq!(resp.status(), 200, "{provider}");
        assert!(resp.headers().contains_key("x-mlflow-gateway-duration-ms"));
        assert!(
            resp.headers()
                .contains_key("x-mlflow-gateway-overhead-duration-ms")
        );
        let trace_id = trace_id_of(&resp);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion", "{provider}: {body}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            format!("reply from {provider} to: hello there"),
            "{provider}"
        );
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{provider}");
        let (pt, ct) = (
            body["usage"]["prompt_tokens"].as_u64().unwrap(),
            body["usage"]["completion_tokens"].as_u64().unwrap(),
        );
        let trace = read_trace(ml, &trace_id, 2).await;
        assert_gateway_trace(&trace, provider, "unified/chat", (pt, ct));
        let r = root(&trace);
        let inputs = attr_json(&r, "mlflow.spanInputs").expect("root inputs");
        assert_eq!(
            inputs["messages"][1]["content"], "hello there",
            "{provider}"
        );
        let outputs = attr_json(&r, "mlflow.spanOutputs").expect("root outputs");
        assert_eq!(
            outputs["choices"][0]["message"]["content"],
            body["choices"][0]["message"]["content"]
        );
        let log = gw.log_text();
        assert!(!log.contains(KEY), "the API key must not be logged");
        assert!(
            !trace.to_string().contains(KEY),
            "the API key must not be traced"
        );
    }
}

/// Reads an SSE response: the JSON events and whether it ended with [DONE].
async fn read_sse(resp: reqwest::Response) -> (Vec<Value>, bool) {
    let text = resp.text().await.unwrap();
    let mut events = Vec::new();
    let mut done = false;
    for line in text.lines() {
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                done = true;
            } else {
                events.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    (events, done)
}

#[tokio::test]
async fn streamed_chat_through_each_provider_is_answered_and_traced() {
    let ml = support::mlflow();
    // groq: an OpenAI-compatible provider that honours stream_options (Mistral sends usage its own way).
    for provider in ["openai", "azure", "anthropic", "gemini", "groq"] {
        let fake = FakeLlm::start(provider, KEY).await;
        let exp = experiment(ml, "gw-stream").await;
        let m = manifest("llm/v1/chat", &model("main", provider, &fake, ""), "");
        let gw = start(&m, &env(ml, &exp, &["main"])).await;
        let mut body = chat_body("stream this please");
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let resp = post(&format!("{}/v1/chat/completions", gw.url), &body).await;
        assert_eq!(resp.status(), 200, "{provider}");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let trace_id = trace_id_of(&resp);
        let (events, done) = read_sse(resp).await;
        assert!(done, "{provider}: ends with [DONE]");
        let text: String = events
            .iter()
            .filter_map(|e| {
                e.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
            })
            .collect();
        assert_eq!(
            text,
            format!("reply from {provider} to: stream this please"),
            "{provider}"
        );
        assert!(
            events
                .iter()
                .all(|e| e["object"] == "chat.completion.chunk"),
            "{provider}"
        );
        let usage = events
            .iter()
            .rev()
            .find_map(|e| e.get("usage").filter(|u| !u.is_null()))
            .unwrap_or_else(|| panic!("{provider}: a usage chunk, as include_usage asked"));
        let (pt, ct) = (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap(),
        );
        let trace = read_trace(ml, &trace_id, 2).await;
        assert_gateway_trace(&trace, provider, "unified/chat", (pt, ct));
        let last = children(&trace).pop().unwrap();
        assert_eq!(
            attr_json(&last, "method"),
            Some(json!("chat_stream")),
            "{provider}"
        );
        let outputs = attr_json(&root(&trace), "mlflow.spanOutputs").expect("aggregated outputs");
        assert_eq!(
            outputs["choices"][0]["message"]["content"],
            json!(text),
            "{provider}"
        );

        // Without include_usage the client gets no usage chunk, but the trace still has usage.
        let mut body = chat_body("again");
        body["stream"] = json!(true);
        let resp = post(&format!("{}/v1/chat/completions", gw.url), &body).await;
        let trace_id = trace_id_of(&resp);
        let (events, done) = read_sse(resp).await;
        assert!(done);
        assert!(
            events
                .iter()
                .all(|e| e.get("usage").is_none_or(Value::is_null)),
            "{provider}: no usage chunk unless asked: {events:?}"
        );
        let trace = read_trace(ml, &trace_id, 2).await;
        let last = children(&trace).pop().unwrap();
        assert!(
            attr_json(&last, "mlflow.chat.tokenUsage").is_some(),
            "{provider}"
        );
    }
}

#[tokio::test]
async fn embeddings_through_each_provider_that_has_them() {
    let ml = support::mlflow();
    for provider in ["openai", "azure", "gemini"] {
        let fake = FakeLlm::start(provider, KEY).await;
        let exp = experiment(ml, "gw-embed").await;
        let m = manifest("llm/v1/embeddings", &model("main", provider, &fake, ""), "");
        let gw = start(&m, &env(ml, &exp, &["main"])).await;
        let resp = post(
            &format!("{}/v1/embeddings", gw.url),
            &json!({"model": "chat", "input": ["one text", "two texts here"]}),
        )
        .await;
        assert_eq!(resp.status(), 200, "{provider}");
        let trace_id = trace_id_of(&resp);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["object"], "list", "{provider}: {body}");
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 2, "{provider}");
        assert_eq!(data[1]["index"], 1);
        assert!(data[0]["embedding"].as_array().unwrap().len() > 1);
        let trace = read_trace(ml, &trace_id, 2).await;
        assert_eq!(trace["trace_info"]["state"], "OK");
        assert_eq!(
            trace["trace_info"]["trace_metadata"]["mlflow.gateway.requestType"],
            "unified/embeddings"
        );
        let last = children(&trace).pop().unwrap();
        assert_eq!(
            last["name"],
            format!("provider/{provider}/{provider}-model")
        );
        assert_eq!(attr_json(&last, "method"), Some(json!("embeddings")));
    }
}

#[tokio::test]
async fn a_failing_primary_falls_back_with_an_error_span_then_an_ok_span() {
    let ml = support::mlflow();
    let primary = FakeLlm::start("primary", KEY).await;
    let backup = FakeLlm::start("backup", KEY).await;
    primary.fail_always(503);
    let exp = experiment(ml, "gw-fallback").await;
    let models = model("main", "openai", &primary, "");
    let rest = format!(
        "  fallbacks:\n{}",
        model("backup", "anthropic", &backup, "")
    );
    let gw = start(
        &manifest("llm/v1/chat", &models, &rest),
        &env(ml, &exp, &["main", "backup"]),
    )
    .await;
    let resp = post(&format!("{}/v1/chat/completions", gw.url), &chat_body("hi")).await;
    assert_eq!(resp.status(), 200);
    let trace_id = trace_id_of(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "reply from backup to: hi"
    );
    let trace = read_trace(ml, &trace_id, 3).await;
    let kids = children(&trace);
    assert_eq!(kids.len(), 2);
    assert_eq!(kids[0]["name"], "provider/openai/openai-model");
    assert_eq!(
        kids[0]["status"]["code"], "STATUS_CODE_ERROR",
        "{}",
        kids[0]
    );
    assert!(
        kids[0]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "exception"),
        "an exception event: {}",
        kids[0]
    );
    assert_eq!(kids[1]["name"], "provider/anthropic/anthropic-model");
    assert_ne!(kids[1]["status"]["code"], "STATUS_CODE_ERROR");
    assert_eq!(trace["trace_info"]["state"], "OK");
    assert_eq!(gw.metric("mlflow_gateway_fallbacks_total", &[]).await, 1.0);
    assert_eq!(
        gw.metric(
            "mlflow_gateway_upstream_errors_total",
            &["provider=\"openai\"", "kind=\"status_5xx\""]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn client_errors_pass_through_without_fallback_and_total_failure_is_502() {
    let primary = FakeLlm::start("primary", KEY).await;
    let backup = FakeLlm::start("backup", KEY).await;
    let models = model("main", "openai", &primary, "");
    let rest = format!("  fallbacks:\n{}", model("backup", "openai", &backup, ""));
    let m = format!(
        "{}  usageTracking: false\n",
        manifest("llm/v1/chat", &models, &rest)
    );
    let env = [
        ("GATEWAY_API_KEY_MAIN", KEY),
        ("GATEWAY_API_KEY_BACKUP", KEY),
    ];
    let gw = GatewayProcess::start(&m, &env).await;
    let url = format!("{}/v1/chat/completions", gw.url);

    primary.fail_next(1, 400);
    let resp = post(&url, &chat_body("x")).await;
    assert_eq!(resp.status(), 400, "upstream 400 passed through");
    let err: Value = resp.json().await.unwrap();
    assert!(err["error"]["message"].is_string(), "{err}");
    assert_eq!(backup.request_count(), 0, "no fallback on a client error");

    primary.fail_next(1, 429);
    let resp = post(&url, &chat_body("y")).await;
    assert_eq!(resp.status(), 200, "429 falls back");
    assert_eq!(backup.request_count(), 1);

    primary.fail_always(500);
    backup.fail_always(502);
    let resp = post(&url, &chat_body("z")).await;
    assert_eq!(resp.status(), 502);
    let err: Value = resp.json().await.unwrap();
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("all 2 attempts failed") && msg.contains("backup") && msg.contains("502"),
        "{msg}"
    );
}

#[tokio::test]
async fn malformed_requests_get_openai_style_errors() {
    let fake = FakeLlm::start("openai", KEY).await;
    let m = format!(
        "{}  usageTracking: false\n",
        manifest("llm/v1/chat", &model("main", "openai", &fake, ""), "")
    );
    let env = [
        ("GATEWAY_API_KEY_MAIN", KEY),
        ("GATEWAY_MAX_BODY_BYTES", "2048"),
    ];
    let gw = GatewayProcess::start(&m, &env).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gw.url);
    let check = |status: u16| {
        move |r: reqwest::Response| async move {
            assert_eq!(r.status(), status);
            let v: Value = r.json().await.unwrap();
            assert!(
                v["error"]["message"].is_string() && v["error"]["type"].is_string(),
                "{v}"
            );
            v
        }
    };
    check(400)(
        client
            .post(&url)
            .body("{not json")
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    check(413)(
        client
            .post(&url)
            .json(&chat_body(&"x".repeat(5000)))
            .send()
            .await
            .unwrap(),
    )
    .await;
    check(404)(
        client
            .post(format!("{}/v1/nothing", gw.url))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let v = check(400)(
        client
            .post(format!("{}/v1/embeddings", gw.url))
            .json(&json!({"input": "x"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/chat/completions"),
        "{v}"
    );
    assert_eq!(fake.request_count(), 0, "nothing reached the provider");
}

#[tokio::test]
async fn traffic_split_follows_the_weights() {
    let a = FakeLlm::start("a", KEY).await;
    let b = FakeLlm::start("b", KEY).await;
    let models =
        model("a", "openai", &a, ", weight: 80") + &model("b", "openai", &b, ", weight: 20");
    let m = format!(
        "{}  usageTracking: false\n",
        manifest("llm/v1/chat", &models, "")
    );
    let gw = GatewayProcess::start(
        &m,
        &[("GATEWAY_API_KEY_A", KEY), ("GATEWAY_API_KEY_B", KEY)],
    )
    .await;
    let n = 500;
    let url = format!("{}/v1/chat/completions", gw.url);
    for _ in 0..n {
        assert_eq!(post(&url, &chat_body("x")).await.status(), 200);
    }
    let to_a = a.request_count() as f64;
    assert_eq!(a.request_count() + b.request_count(), n);
    // Binomial(500, 0.8): mean 400, sd ~8.9; 5 sd either side.
    assert!(
        (355.0..=445.0).contains(&to_a),
        "{to_a} of {n} went to the 80% model"
    );
}

#[tokio::test]
async fn capture_content_false_keeps_prompts_and_responses_out_of_the_trace() {
    let ml = support::mlflow();
    let fake = FakeLlm::start("openai", KEY).await;
    let exp = experiment(ml, "gw-nocontent").await;
    let m = manifest(
        "llm/v1/chat",
        &model("main", "openai", &fake, ""),
        "  tracing: {captureContent: false}\n",
    );
    let gw = start(&m, &env(ml, &exp, &["main"])).await;
    let secret_prompt = "my-very-private-prompt-7731";
    let resp = post(
        &format!("{}/v1/chat/completions", gw.url),
        &chat_body(secret_prompt),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let trace_id = trace_id_of(&resp);
    let body: Value = resp.json().await.unwrap();
    let answer = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(answer.contains(secret_prompt), "the fake echoes the prompt");
    let trace = read_trace(ml, &trace_id, 2).await;
    let all = trace.to_string();
    assert!(
        !all.contains(secret_prompt),
        "prompt text in the trace: {all}"
    );
    assert!(!all.contains("be brief"), "system prompt in the trace");
    assert!(!all.contains("reply from"), "response text in the trace");
    // Still useful: usage and the model.
    let last = children(&trace).pop().unwrap();
    assert!(attr_json(&last, "mlflow.chat.tokenUsage").is_some());
}

#[tokio::test]
async fn mlflow_down_changes_nothing_for_clients_and_drops_are_counted() {
    let ml = Mlflow::start(false);
    let fake = FakeLlm::start("openai", KEY).await;
    let exp = experiment(&ml, "gw-down").await;
    let m = manifest("llm/v1/chat", &model("main", "openai", &fake, ""), "");
    let mut e = env(&ml, &exp, &["main"]);
    e.push(("GATEWAY_TRACE_QUEUE_MAX_BYTES".into(), "65536".into()));
    let gw = start(&m, &e).await;
    ml.stop();
    let url = format!("{}/v1/chat/completions", gw.url);
    let mut slowest = Duration::ZERO;
    for i in 0..200 {
        let t = std::time::Instant::now();
        let resp = post(&url, &chat_body(&format!("q{i}"))).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(resp.status(), 200);
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a request waited on MLflow: {slowest:?}"
    );
    // Every trace is counted: waiting in the queue, or dropped whole beyond its bound.
    support::eventually(60, "all 200 traces queued or dropped", || async {
        let dropped = gw
            .metric(
                "mlflow_gateway_traces_dropped_total",
                &[r#"reason="queue_full""#],
            )
            .await;
        let queued = gw.metric("mlflow_gateway_trace_queue_traces", &[]).await;
        (dropped > 0.0 && dropped + queued == 200.0).then_some(())
    })
    .await;
    assert!(gw.metric("mlflow_gateway_trace_queue_bytes", &[]).await <= 65536.0);
    assert_eq!(
        gw.metric("mlflow_gateway_spans_exported_total", &[]).await,
        0.0
    );
}

#[tokio::test]
async fn mlflow_gateway_routes_serve_the_endpoint() {
    let ml = support::mlflow();
    let fake = FakeLlm::start("anthropic", KEY).await;
    let exp = experiment(ml, "gw-routes").await;
    let m = manifest("llm/v1/chat", &model("main", "anthropic", &fake, ""), "");
    let gw = start(&m, &env(ml, &exp, &["main"])).await;

    let resp = post(
        &format!("{}/gateway/chat/mlflow/invocations", gw.url),
        &chat_body("inv"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "reply from anthropic to: inv"
    );
    let resp = post(
        &format!("{}/gateway/other/mlflow/invocations", gw.url),
        &chat_body("x"),
    )
    .await;
    assert_eq!(resp.status(), 404);

    let resp = post(
        &format!("{}/gateway/mlflow/v1/chat/completions", gw.url),
        &chat_body("unified"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut wrong = chat_body("x");
    wrong["model"] = json!("not-this-one");
    assert_eq!(
        post(
            &format!("{}/gateway/mlflow/v1/chat/completions", gw.url),
            &wrong
        )
        .await
        .status(),
        404
    );

    let models: Value = reqwest::get(format!("{}/gateway/mlflow/v1/models", gw.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "chat");
    let models: Value = reqwest::get(format!("{}/v1/models", gw.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "chat");

    let resp = post(
        &format!("{}/gateway/openai/v1/chat/completions", gw.url),
        &chat_body("pt"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let trace = read_trace(ml, &trace_id_of(&resp), 2).await;
    assert_eq!(
        trace["trace_info"]["trace_metadata"]["mlflow.gateway.requestType"],
        "passthrough/model/openai-chat"
    );

    // Anthropic's own Messages API, passed through to the anthropic model.
    let native = json!({"model": "chat", "max_tokens": 50, "messages": [{"role": "user", "content": "native"}]});
    let resp = post(
        &format!("{}/gateway/anthropic/v1/messages", gw.url),
        &native,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let trace_id = trace_id_of(&resp);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "message", "Anthropic's shape: {v}");
    assert_eq!(v["content"][0]["text"], "reply from anthropic to: native");
    let trace = read_trace(ml, &trace_id, 2).await;
    assert_eq!(
        trace["trace_info"]["trace_metadata"]["mlflow.gateway.requestType"],
        "passthrough/model/anthropic-messages"
    );
    let last = children(&trace).pop().unwrap();
    let u = attr_json(&last, "mlflow.chat.tokenUsage").expect("usage from the native answer");
    assert_eq!(u["input_tokens"], v["usage"]["input_tokens"]);
}

#[tokio::test]
async fn an_incoming_traceparent_links_the_gateway_trace_to_the_callers() {
    let ml = support::mlflow();
    let fake = FakeLlm::start("openai", KEY).await;
    let exp = experiment(ml, "gw-traceparent").await;
    let m = manifest("llm/v1/chat", &model("main", "openai", &fake, ""), "");
    let gw = start(&m, &env(ml, &exp, &["main"])).await;
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header(
            "traceparent",
            format!("00-{caller_trace}-00f067aa0ba902b7-01"),
        )
        .json(&chat_body("linked"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let trace = read_trace(ml, &trace_id_of(&resp), 2).await;
    assert_eq!(
        trace["trace_info"]["state"], "OK",
        "the gateway's own trace is complete"
    );
    assert!(
        trace.to_string().contains(caller_trace),
        "the caller's trace id is recorded: {trace}"
    );
}

#[tokio::test]
async fn the_gateway_refuses_to_start_with_a_message_naming_what_is_wrong() {
    let fake = FakeLlm::start("openai", KEY).await;
    let m = manifest("llm/v1/chat", &model("main", "openai", &fake, ""), "");
    let (code, err) = GatewayProcess::refuse(
        &m,
        &[
            ("MLFLOW_TRACKING_URI", "http://127.0.0.1:1"),
            ("MLFLOW_EXPERIMENT_ID", "1"),
        ],
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("GATEWAY_API_KEY_MAIN"), "{err}");
    let (_, err) = GatewayProcess::refuse("kind: [oops", &[]);
    assert!(err.contains("not a valid GatewayEndpoint"), "{err}");
    let (_, err) = GatewayProcess::refuse(
        &m,
        &[("GATEWAY_API_KEY_MAIN", KEY), ("MLFLOW_EXPERIMENT_ID", "1")],
    );
    assert!(err.contains("MLFLOW_TRACKING_URI"), "{err}");
    let (_, err) = GatewayProcess::refuse(
        &m,
        &[
            ("GATEWAY_API_KEY_MAIN", KEY),
            ("MLFLOW_TRACKING_URI", "http://127.0.0.1:1"),
            ("MLFLOW_EXPERIMENT_ID", "1"),
            ("GATEWAY_ATTEMPT_TIMEOUT_SECONDS", "soon"),
        ],
    );
    assert!(err.contains("soon"), "{err}");
}

#[tokio::test]
async fn the_official_openai_python_sdk_works_by_changing_only_the_base_url() {
    let ml = support::mlflow();
    let fake = FakeLlm::start("openai", KEY).await;
    let exp = experiment(ml, "gw-sdk").await;
    let m = manifest("llm/v1/chat", &model("main", "openai", &fake, ""), "");
    let gw = start(&m, &env(ml, &exp, &["main"])).await;
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused-by-the-gateway")
r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "from the sdk"}])
print(r.choices[0].message.content)
print(r.usage.total_tokens > 0)
chunks = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "streamed"}],
                                        stream=True, stream_options={"include_usage": True})
text, usage = "", None
for c in chunks:
    if c.choices and c.choices[0].delta.content:
        text += c.choices[0].delta.content
    if c.usage:
        usage = c.usage
print(text)
print(usage is not None and usage.total_tokens > 0)
print([m.id for m in client.models.list()])
"#;
    // Async: the fake provider runs on this test's runtime.
    let out = tokio::process::Command::new(support::python())
        .arg("-c")
        .arg(script)
        .arg(&gw.url)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "reply from openai to: from the sdk",
            "True",
            "reply from openai to: streamed",
            "True",
            "['chat']"
        ]
    );
}

#[tokio::test]
async fn a_stream_falls_back_only_before_its_first_event_reached_the_client() {
    let primary = FakeLlm::start("primary", KEY).await;
    let backup = FakeLlm::start("backup", KEY).await;
    let models = model("main", "openai", &primary, "");
    let rest = format!("  fallbacks:\n{}", model("backup", "openai", &backup, ""));
    let m = format!(
        "{}  usageTracking: false\n",
        manifest("llm/v1/chat", &models, &rest)
    );
    let gw = GatewayProcess::start(
        &m,
        &[
            ("GATEWAY_API_KEY_MAIN", KEY),
            ("GATEWAY_API_KEY_BACKUP", KEY),
        ],
    )
    .await;
    let url = format!("{}/v1/chat/completions", gw.url);
    let mut body = chat_body("one two three four");
    body["stream"] = json!(true);

    // 200, then the connection drops before any event: nothing reached the client, so fall back.
    primary.break_stream_after(0);
    let (events, done) = read_sse(post(&url, &body).await).await;
    assert!(done);
    let text: String = events
        .iter()
        .filter_map(|e| {
            e.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .collect();
    assert_eq!(text, "reply from backup to: one two three four");
    assert_eq!(backup.request_count(), 1);

    // Events already sent: no fallback; the client gets what came and an error event.
    primary.break_stream_after(3);
    let (events, done) = read_sse(post(&url, &body).await).await;
    assert!(!done, "a broken stream does not end with [DONE]");
    assert!(events.len() >= 2, "{events:?}");
    assert!(
        events.last().unwrap()["error"]["message"].is_string(),
        "{events:?}"
    );
    assert_eq!(
        backup.request_count(),
        1,
        "no second model once the client got events"
    );
}

#[tokio::test]
async fn a_slow_model_times_out_per_attempt_and_the_fallback_answers() {
    let slow = FakeLlm::start("slow", KEY).await;
    let backup = FakeLlm::start("backup", KEY).await;
    slow.set_delay(Duration::from_secs(5));
    let models = model("main", "openai", &slow, "");
    let rest = format!("  fallbacks:\n{}", model("backup", "openai", &backup, ""));
    let m = format!(
        "{}  usageTracking: false\n",
        manifest("llm/v1/chat", &models, &rest)
    );
    let gw = GatewayProcess::start(
        &m,
        &[
            ("GATEWAY_API_KEY_MAIN", KEY),
            ("GATEWAY_API_KEY_BACKUP", KEY),
            ("GATEWAY_ATTEMPT_TIMEOUT_SECONDS", "1"),
        ],
    )
    .await;
    let t = std::time::Instant::now();
    let resp = post(
        &format!("{}/v1/chat/completions", gw.url),
        &chat_body("hurry"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "reply from backup to: hurry"
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(
        gw.metric(
            "mlflow_gateway_upstream_errors_total",
            &["kind=\"timeout\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        gw.metric(
            "mlflow_gateway_requests_total",
            &["route=\"/v1/chat/completions\"", "status=\"200\""]
        )
        .await,
        1.0
    );
}

/// A tracking server that answers 500, or takes 10 s, must not show in requests either. (A local
/// server stands in for a broken MLflow here: the failure is what is under test.)
#[tokio::test]
async fn a_tracking_server_answering_500_or_taking_10_s_changes_nothing_for_clients() {
    let fake = FakeLlm::start("openai", KEY).await;
    for broken in ["500", "slow"] {
        let tracking = FakeLlm::start("broken-mlflow", "unused").await;
        match broken {
            "500" => tracking.fail_always(500),
            _ => tracking.set_delay(Duration::from_secs(10)),
        }
        let m = manifest("llm/v1/chat", &model("main", "openai", &fake, ""), "");
        let env = [
            ("GATEWAY_API_KEY_MAIN", KEY),
            ("MLFLOW_TRACKING_URI", tracking.url.as_str()),
            ("MLFLOW_EXPERIMENT_ID", "1"),
        ];
        let gw = GatewayProcess::start(&m, &env).await;
        let url = format!("{}/v1/chat/completions", gw.url);
        let mut slowest = Duration::ZERO;
        for i in 0..100 {
            let t = std::time::Instant::now();
            let resp = post(&url, &chat_body(&format!("q{i}"))).await;
            slowest = slowest.max(t.elapsed());
            assert_eq!(resp.status(), 200, "{broken}");
        }
        assert!(
            slowest < Duration::from_millis(500),
            "{broken}: a request waited: {slowest:?}"
        );
        support::eventually(30, "the tracking server was tried", || async {
            (tracking.request_count() > 0).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn usage_tracking_off_exports_nothing() {
    let fake = FakeLlm::start("openai", KEY).await;
    let tracking = FakeLlm::start("would-be-mlflow", "unused").await;
    let m = format!(
        "{}  usageTracking: false\n",
        manifest("llm/v1/chat", &model("main", "openai", &fake, ""), "")
    );
    let env = [
        ("GATEWAY_API_KEY_MAIN", KEY),
        ("MLFLOW_TRACKING_URI", tracking.url.as_str()),
        ("MLFLOW_EXPERIMENT_ID", "1"),
    ];
    let gw = GatewayProcess::start(&m, &env).await;
    let resp = post(
        &format!("{}/v1/chat/completions", gw.url),
        &chat_body("quiet"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-mlflow-trace-id").is_none());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        tracking.request_count(),
        0,
        "nothing was sent to the tracking server"
    );
    assert_eq!(
        gw.metric("mlflow_gateway_spans_exported_total", &[]).await,
        0.0
    );
}

#[tokio::test]
async fn a_split_model_that_refuses_a_field_leaves_the_request_to_the_other_with_the_failure_traced()
 {
    let ml = support::mlflow();
    let claude = FakeLlm::start("claude", KEY).await;
    let gpt = FakeLlm::start("gpt", KEY).await;
    let exp = experiment(ml, "gw-split-refusal").await;
    // Anthropic almost always drawn; it cannot take `n: 2`, OpenAI can.
    let models = format!(
        "{}{}",
        model("claude", "anthropic", &claude, ", weight: 1000"),
        model("gpt", "openai", &gpt, ", weight: 1")
    );
    let gw = start(
        &manifest("llm/v1/chat", &models, ""),
        &env(ml, &exp, &["claude", "gpt"]),
    )
    .await;
    let mut body = chat_body("two please");
    body["n"] = json!(2);
    let mut refused_first = None;
    for _ in 0..5 {
        let resp = post(&format!("{}/v1/chat/completions", gw.url), &body).await;
        assert_eq!(
            resp.status(),
            200,
            "the same request succeeds whatever the draw"
        );
        let trace_id = trace_id_of(&resp);
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(
            answer["choices"][0]["message"]["content"],
            "reply from gpt to: two please"
        );
        if gw.metric("mlflow_gateway_fallbacks_total", &[]).await >= 1.0 {
            refused_first = Some(trace_id);
            break;
        }
    }
    let trace_id = refused_first.expect("anthropic drawn first at least once in 5 (weight 1000:1)");
    assert_eq!(
        claude.request_count(),
        0,
        "nothing reached the refusing provider"
    );
    let trace = read_trace(ml, &trace_id, 3).await;
    let kids = children(&trace);
    assert_eq!(kids.len(), 2, "{kids:?}");
    assert_eq!(kids[0]["name"], "provider/anthropic/anthropic-model");
    assert_eq!(
        kids[0]["status"]["code"], "STATUS_CODE_ERROR",
        "{}",
        kids[0]
    );
    assert!(
        kids[0]["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("`n` must be 1")),
        "the failed attempt says why: {}",
        kids[0]
    );
    assert_eq!(kids[1]["name"], "provider/openai/openai-model");
    assert_ne!(kids[1]["status"]["code"], "STATUS_CODE_ERROR");
    assert_eq!(trace["trace_info"]["state"], "OK");
    assert_eq!(
        gw.metric(
            "mlflow_gateway_upstream_errors_total",
            &["provider=\"anthropic\"", "kind=\"request\""]
        )
        .await,
        1.0
    );
}
