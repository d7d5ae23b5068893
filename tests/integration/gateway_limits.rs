//! The gateway process under hostile input (issue #14.2–14.4): bodies whose parse would be
//! huge, an upstream answer without end, an event-stream line without end, a stream gone silent,
//! hundreds of half-sent requests, more requests than slots, keys with a trailing newline. Each is
//! answered with a clear error in OpenAI's shape, the process's peak memory (VmHWM, read from
//! /proc) stays under a pod's default limit, and a normal request is served afterwards. No MLflow
//! (usageTracking: false); the provider is `mgo_dev::hostile_llm` or the fake.

use crate::support;

use std::time::{Duration, Instant};

use mgo_dev::hostile_llm::HostileLlm;
use serde_json::{Value, json};
use support::GatewayProcess;
use support::fake_llm::FakeLlm;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "sk-limits-test-key-0123456789";
/// A pod's default memory limit (the chart's), the floor the issue sets.
const POD_LIMIT: u64 = 256 << 20;
/// What the hostile provider sends: 300 MB.
const HUGE: usize = 300 * 1024 * 1024;

fn manifest(api_base: &str) -> String {
    format!(
        "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {{name: chat, namespace: team-a, uid: 0a1b2c3d-uid}}\nspec:\n  endpointType: llm/v1/chat\n  usageTracking: false\n  models:\n    - {{name: main, provider: openai, model: m, apiBase: \"{api_base}\", apiKeySecretRef: {{name: keys, key: k}}}}\n  access: {{open: true}}\n"
    )
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kb * 1024
}

fn chat(text: &str, stream: bool) -> Value {
    json!({"model": "chat", "stream": stream, "messages": [{"role": "user", "content": text}]})
}

async fn post(gw: &GatewayProcess, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// An error answer: its status and its OpenAI-shaped `error`.
async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    let error = body["error"].clone();
    assert!(error["message"].is_string(), "OpenAI's error shape: {body}");
    assert_eq!(error["code"], status, "{body}");
    (status, error)
}

/// A normal request is answered, and quickly.
async fn served(gw: &GatewayProcess, after: &str) {
    let t0 = Instant::now();
    let resp = post(gw, &chat("hello", false)).await;
    assert_eq!(resp.status(), 200, "a normal request after {after}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "fine answer");
    eprintln!("normal request after {after}: {:?}", t0.elapsed());
}

#[tokio::test]
async fn hostile_inputs_get_clear_errors_memory_stays_bounded_and_normal_requests_are_served() {
    let bad = HostileLlm::start(HUGE).await;
    let env = [
        ("GATEWAY_API_KEY_MAIN", KEY),
        ("GATEWAY_STREAM_IDLE_TIMEOUT_SECONDS", "2"),
        ("GATEWAY_REQUEST_READ_TIMEOUT_SECONDS", "3"),
    ];
    let gw = GatewayProcess::start(&manifest(&format!("{}/v1", bad.url)), &env).await;
    served(&gw, "start").await;

    // Four concurrent 10 MB bodies of tiny JSON values: their trees would not fit.
    let mut big =
        String::from(r#"{"model":"chat","messages":[{"role":"user","content":"hi"}],"pad":["#);
    while big.len() < 10_000_000 - 3 {
        big.push_str("0,");
    }
    big.push_str("0]}");
    let big = big.into_bytes();
    let sends = (0..4).map(|_| {
        let big = big.clone();
        let url = format!("{}/v1/chat/completions", gw.url);
        async move {
            let resp = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(big)
                .send()
                .await
                .unwrap();
            error_of(resp).await
        }
    });
    for (status, error) in futures::future::join_all(sends).await {
        assert_eq!(status, 413, "{error}");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("GATEWAY_MEMORY_BUDGET_BYTES"),
            "{error}"
        );
    }
    served(&gw, "four 10 MB bodies").await;

    // A 300 MB answer: cut at the answer cap.
    let (status, error) = error_of(post(&gw, &chat("huge-answer", false)).await).await;
    assert_eq!(status, 502, "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("GATEWAY_MAX_ANSWER_BYTES"),
        "{error}"
    );
    served(&gw, "a 300 MB answer").await;

    // A 300 MB event-stream line: cut at the line cap, before any event reached the client.
    let (status, error) = error_of(post(&gw, &chat("endless-line", true)).await).await;
    assert_eq!(status, 502, "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("GATEWAY_MAX_SSE_LINE_BYTES"),
        "{error}"
    );
    served(&gw, "a 300 MB event-stream line").await;

    // A stream that goes silent after its first event ends with an error event.
    let resp = post(&gw, &chat("silent-after-first", true)).await;
    assert_eq!(resp.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(30), resp.text())
        .await
        .expect("the silent stream is ended by the gateway")
        .unwrap();
    assert!(text.contains("\"first\""), "{text}");
    assert!(
        text.contains("GATEWAY_STREAM_IDLE_TIMEOUT_SECONDS") && text.contains("\"code\":502"),
        "{text}"
    );

    // 500 half-sent requests held open: half stop inside their headers, half inside their body.
    let addr = gw.url.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for i in 0..500 {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        let part: &[u8] = if i % 2 == 0 {
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Ty"
        } else {
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 2000\r\n\r\n{\"model\":\"chat\",\"messages\":["
        };
        c.write_all(part).await.unwrap();
        held.push(c);
    }
    served(&gw, "500 half-sent requests (held open)").await;
    // The slow clients are let go: 408 for a body, the connection closed for headers.
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), held[1].read_to_end(&mut answer))
        .await
        .expect("a half-sent body is given up")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("GATEWAY_REQUEST_READ_TIMEOUT_SECONDS"),
        "{answer}"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), held[0].read_to_end(&mut rest))
        .await
        .expect("half-sent headers are given up");
    assert!(
        closed.is_err() || !String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"),
        "{rest:?}"
    );
    drop(held);
    served(&gw, "the slow clients were let go").await;

    let peak = peak_rss(gw.pid());
    eprintln!("gateway peak RSS: {} MiB", peak >> 20);
    assert!(
        peak < POD_LIMIT,
        "peak RSS {} MiB is above a pod's 256 MiB",
        peak >> 20
    );
}

#[tokio::test]
async fn beyond_its_slots_the_gateway_answers_503_and_serves_again_once_one_frees() {
    let bad = HostileLlm::start(HUGE).await;
    let env = [
        ("GATEWAY_API_KEY_MAIN", KEY),
        ("GATEWAY_MAX_CONCURRENT_REQUESTS", "1"),
        ("GATEWAY_STREAM_IDLE_TIMEOUT_SECONDS", "3"),
    ];
    let gw = GatewayProcess::start(&manifest(&format!("{}/v1", bad.url)), &env).await;
    // The one slot is held by a stream until its provider's silence ends it.
    let holder = post(&gw, &chat("silent-after-first", true)).await;
    assert_eq!(holder.status(), 200);
    let resp = post(&gw, &chat("hello", false)).await;
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let (status, error) = error_of(resp).await;
    assert_eq!(
        (status, error["type"].as_str()),
        (503, Some("server_overloaded"))
    );
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("GATEWAY_MAX_CONCURRENT_REQUESTS"),
        "{error}"
    );
    // Capacity is no reason to leave the Service: /readyz stays 200.
    let readyz = reqwest::get(format!("{}/readyz", gw.url)).await.unwrap();
    assert_eq!(readyz.status(), 200);
    // The stream ends (idle timeout): its slot is free again.
    let _ = holder.text().await;
    served(&gw, "the slot was freed").await;
}

#[tokio::test]
async fn a_key_with_a_trailing_newline_works_and_a_key_broken_inside_stops_the_start() {
    let fake = FakeLlm::start("openai", KEY).await;
    let m = manifest(&format!("{}/v1", fake.url));
    let with_newline = format!("{KEY}\n");
    let gw = GatewayProcess::start(&m, &[("GATEWAY_API_KEY_MAIN", &with_newline)]).await;
    let resp = post(&gw, &chat("hi", false)).await;
    assert_eq!(resp.status(), 200, "the key is trimmed");
    let broken = format!("{KEY}\nsecret-second-line");
    let (code, stderr) = GatewayProcess::refuse(&m, &[("GATEWAY_API_KEY_MAIN", &broken)]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("GATEWAY_API_KEY_MAIN"), "{stderr}");
    assert!(!stderr.contains("secret-second-line"), "{stderr}");
}
