//! A provider gone wrong, for the gateway's limit tests: an OpenAI-compatible chat API on
//! 127.0.0.1 whose answer is chosen by the text of the request's last message (which a gateway
//! passes through), so one server and one gateway can play every fault:
//!
//! - `huge-answer`: a 200 chat.completion whose content never seems to end (`size` bytes in all,
//!   sent in 1 MiB pieces, no `Content-Length`).
//! - `endless-line`: a 200 event stream of one `data:` line of `size` bytes and no line break.
//! - `silent-after-first`: a 200 event stream with one chunk, then silence (the connection is
//!   held open).
//! - any other model: a normal small answer (streamed when the request asks `stream: true`).
//!
//! Kept apart from [`crate::fake_llm`], whose answers follow the providers' documented formats:
//! these follow none on purpose. Pieces are one shared buffer, so the fake itself stays small.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use serde_json::{Value, json};

const PIECE: usize = 1 << 20;

/// A running hostile provider; stops when dropped.
pub struct HostileLlm {
    /// `http://127.0.0.1:PORT`, no trailing slash (the API base is `<url>/v1`).
    pub url: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for HostileLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl HostileLlm {
    /// Starts on a free loopback port; `size`: bytes of the huge answer and of the endless line.
    pub async fn start(size: usize) -> HostileLlm {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind the hostile LLM's port");
        let addr = listener.local_addr().expect("hostile LLM address");
        let app = Router::new()
            .route("/v1/chat/completions", post(answer))
            .with_state(size);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HostileLlm {
            url: format!("http://{addr}"),
            server,
        }
    }
}

/// `size` bytes in all: `head`, then filler pieces, then `tail`.
fn endless(head: &'static [u8], tail: &'static [u8], size: usize) -> Body {
    let piece = Bytes::from(vec![b'a'; PIECE]);
    let fill = size.saturating_sub(head.len() + tail.len());
    let pieces = (0..fill.div_ceil(PIECE)).map(move |i| {
        let n = PIECE.min(fill - i * PIECE);
        Ok::<_, std::io::Error>(piece.slice(..n))
    });
    let stream = futures::stream::iter(
        std::iter::once(Ok(Bytes::from_static(head)))
            .chain(pieces)
            .chain(std::iter::once(Ok(Bytes::from_static(tail)))),
    );
    Body::from_stream(stream)
}

fn chunk(content: &str) -> String {
    let v = json!({"id": "chatcmpl-h", "object": "chat.completion.chunk", "created": 0,
        "model": "h", "choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": null}]});
    format!("data: {v}\n\n")
}

async fn answer(State(size): State<usize>, body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = req.get("model").and_then(Value::as_str).unwrap_or("");
    let said = req
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let sse = [(header::CONTENT_TYPE, "text/event-stream")];
    match said {
        "huge-answer" => (
            [(header::CONTENT_TYPE, "application/json")],
            endless(
                br#"{"id":"chatcmpl-h","object":"chat.completion","created":0,"model":"h","choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":""#,
                br#""}}]}"#,
                size,
            ),
        )
            .into_response(),
        "endless-line" => (sse, endless(b"data: ", b"\n\n", size)).into_response(),
        "silent-after-first" => {
            let first = futures::stream::once(async { Ok::<_, std::io::Error>(chunk("first")) });
            (sse, Body::from_stream(first.chain(futures::stream::pending()))).into_response()
        }
        _ if stream => {
            let events = format!("{}{}data: [DONE]\n\n", chunk("fine"), chunk(" answer"));
            (sse, events).into_response()
        }
        _ => axum::Json(json!({
            "id": "chatcmpl-h", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "fine answer"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        }))
        .into_response(),
    }
}
