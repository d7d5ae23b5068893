//! Local fake LLM providers for the gateway's tests and the demo (the `fake-llm` command).
//! One file over 800 lines on purpose: one server, one set of deterministic rules and fault
//! controls, applied to four wire formats side by side.
//!
//! [`FakeLlm::start`] runs one axum server on `127.0.0.1:0` that speaks the documented wire
//! formats of four provider APIs, so the gateway can be tested without any outside service:
//!
//! | provider | routes (all `POST`) | credentials |
//! |---|---|---|
//! | OpenAI and OpenAI-compatible | `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` | `Authorization: Bearer <key>` |
//! | Azure OpenAI | `/openai/deployments/{deployment}/chat/completions` (also `/completions`, `/embeddings`), `?api-version=` required | `api-key: <key>` |
//! | Anthropic Messages | `/v1/messages` | `x-api-key: <key>` and `anthropic-version` |
//! | Gemini | `/v1beta/models/{model}:generateContent`, `:streamGenerateContent` (`?alt=sse` for SSE, else a streamed JSON array), `:embedContent`, `:batchEmbedContents`, `:countTokens` | `x-goog-api-key: <key>` or `?key=<key>` |
//!
//! Any other path answers 404 with the error body of the provider the path looks like. Streams:
//! OpenAI and Anthropic SSE events end with `\n\n`; Gemini's with `\r\n\r\n`, as Google sends
//! them, so a gateway's SSE parser must accept both.
//!
//! # Deterministic answers
//!
//! - The reply text is `reply from <name> to: <text>` ([`FakeLlm::reply_to`]), where `<text>` is the
//!   text of the last user message (string content, or its text parts joined with one space); for
//!   `/v1/completions` it is the prompt.
//! - Input tokens are the whitespace-separated words of all input text (system prompts included);
//!   output tokens are the words of the reply.
//! - Streams carry the reply as one content chunk per word, each chunk holding the whitespace
//!   before its word: the chunks concatenate to the reply, and there are as many content chunks as
//!   output tokens.
//! - A token limit (`max_completion_tokens`/`max_tokens` on OpenAI, `max_tokens` on Anthropic,
//!   `generationConfig.maxOutputTokens` on Gemini) below the reply's word count cuts the reply to
//!   that many words and the finish reason becomes `length` / `max_tokens` / `MAX_TOKENS`.
//! - Embeddings are [`fake_embedding`]`(text, dims)`: unit vectors derived from the text, 8
//!   dimensions unless `dimensions` (OpenAI) / `outputDimensionality` (Gemini) asks otherwise;
//!   `encoding_format: "base64"` (OpenAI) answers little-endian `f32`s in base64.
//!
//! # Faults
//!
//! Every request is counted and (while recording is on) recorded first, then waits for the
//! configured delay, then gets an injected failure if one is due, and only then is authenticated,
//! validated and answered.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use serde_json::{Value, json};

/// How many requests [`FakeLlm::requests`] keeps (the newest).
pub const RECORD_LIMIT: usize = 1000;
/// Embedding size when the request does not ask for one.
pub const DEFAULT_EMBEDDING_DIMS: usize = 8;
const MAX_BODY: usize = 64 << 20;
const NONE: u64 = u64::MAX;
const COUNT_MASK: u64 = (1 << 48) - 1;

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query, e.g. `/openai/deployments/d/chat/completions?api-version=2024-10-21`.
    pub path: String,
    /// Lower-case names; repeated headers are joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The parsed JSON body; `Null` when empty, a `String` when the body was not JSON.
    pub body: Value,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// A running fake provider. The server stops accepting connections when this is dropped.
pub struct FakeLlm {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    pub name: String,
    pub api_key: String,
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeLlm {
    /// Starts a fake on a free loopback port. `name` appears in every reply text, `api_key` is the
    /// only credential it accepts (on every provider surface).
    pub async fn start(name: &str, api_key: &str) -> FakeLlm {
        Self::start_on_port(0, name, api_key).await
    }

    /// [`FakeLlm::start`] on `127.0.0.1:port` (0: a free port).
    pub async fn start_on_port(port: u16, name: &str, api_key: &str) -> FakeLlm {
        Self::start_on(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            name,
            api_key,
        )
        .await
    }

    /// [`FakeLlm::start`] on `addr`: loopback, or an address pods reach (the local stack's
    /// bridge, for the demo's real pods).
    pub async fn start_on(addr: std::net::SocketAddr, name: &str, api_key: &str) -> FakeLlm {
        use axum::serve::ListenerExt;
        let inner = Arc::new(Inner {
            name: name.to_string(),
            api_key: api_key.to_string(),
            count: AtomicUsize::new(0),
            fail_next: AtomicU64::new(0),
            fail_always: AtomicU16::new(0),
            delay_ns: AtomicU64::new(0),
            interval_ns: AtomicU64::new(0),
            break_after: AtomicUsize::new(usize::MAX),
            retry_after: AtomicU64::new(NONE),
            recording: AtomicBool::new(true),
            log: Mutex::new(VecDeque::new()),
        });
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind the fake LLM's port");
        let addr = listener.local_addr().expect("fake LLM address");
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = router(inner.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeLlm {
            url: format!("http://{addr}"),
            name: name.to_string(),
            api_key: api_key.to_string(),
            inner,
            server,
        }
    }

    /// The reply text this fake gives to a last user message (or completion prompt) `text`.
    pub fn reply_to(&self, text: &str) -> String {
        reply_text(&self.name, text)
    }

    /// The next `n` requests (any route, any credentials) answer `status` with the error body of
    /// the route's provider. Panics unless `status` is in 400..=599.
    pub fn fail_next(&self, n: usize, status: u16) {
        check_status(status);
        let n = (n as u64).min(COUNT_MASK);
        self.inner
            .fail_next
            .store(((status as u64) << 48) | n, Ordering::SeqCst);
    }

    /// Every request from now on answers `status` (after any `fail_next` ones), until
    /// [`recover`](Self::recover). Panics unless `status` is in 400..=599.
    pub fn fail_always(&self, status: u16) {
        check_status(status);
        self.inner.fail_always.store(status, Ordering::SeqCst);
    }

    /// Back to healthy: clears `fail_next`, `fail_always`, `break_stream_after` and the delay.
    pub fn recover(&self) {
        self.inner.fail_next.store(0, Ordering::SeqCst);
        self.inner.fail_always.store(0, Ordering::SeqCst);
        self.inner.break_after.store(usize::MAX, Ordering::SeqCst);
        self.inner.delay_ns.store(0, Ordering::SeqCst);
    }

    /// Every answer (success or error, streaming or not) waits `d` before its status line.
    pub fn set_delay(&self, d: Duration) {
        self.inner
            .delay_ns
            .store(d.as_nanos().min(NONE as u128 - 1) as u64, Ordering::SeqCst);
    }

    /// Streams wait `d` between consecutive events (default: none), e.g. to check that the
    /// gateway forwards events as they come instead of buffering the whole answer.
    pub fn set_event_interval(&self, d: Duration) {
        self.inner
            .interval_ns
            .store(d.as_nanos().min(NONE as u128 - 1) as u64, Ordering::SeqCst);
    }

    /// From now on (until [`recover`](Self::recover)) streaming answers are 200, send their first
    /// `events` events (an SSE event, or an element of Gemini's JSON-array stream), then the
    /// connection is dropped without ending the chunked body. With `events` at or above the
    /// stream's length, the whole stream is sent and then the connection is dropped all the same.
    pub fn break_stream_after(&self, events: usize) {
        self.inner
            .break_after
            .store(events.min(usize::MAX - 1), Ordering::SeqCst);
    }

    /// Injected failures carry `retry-after: <secs>` (default: no such header).
    pub fn set_retry_after(&self, secs: Option<u64>) {
        self.inner
            .retry_after
            .store(secs.map_or(NONE, |s| s.min(NONE - 1)), Ordering::SeqCst);
    }

    /// Recording is on by default; off, a request costs no more than counting it.
    pub fn set_recording(&self, on: bool) {
        self.inner.recording.store(on, Ordering::SeqCst);
    }

    /// The recorded requests, oldest first (at most the last [`RECORD_LIMIT`]).
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.log.lock().unwrap().iter().cloned().collect()
    }

    pub fn last_request(&self) -> Option<Recorded> {
        self.inner.log.lock().unwrap().back().cloned()
    }

    /// Forgets the recorded requests (the count goes on).
    pub fn clear_requests(&self) {
        self.inner.log.lock().unwrap().clear();
    }

    /// Requests received so far, recorded or not, answered or still waiting.
    pub fn request_count(&self) -> usize {
        self.inner.count.load(Ordering::SeqCst)
    }
}

fn check_status(status: u16) {
    assert!(
        (400..=599).contains(&status),
        "fake_llm: an injected failure needs an error status (400..=599), not {status}"
    );
}

/// The embedding the fakes give `text`: `dims` floats in [-1, 1] from a hash of the text,
/// scaled to unit length. Equal texts give equal vectors.
pub fn fake_embedding(text: &str, dims: usize) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut v: Vec<f32> = (0..dims as u64)
        .map(|i| {
            // splitmix64 of (hash, index)
            let mut z = h.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Server state and routing

struct Inner {
    name: String,
    api_key: String,
    count: AtomicUsize,
    /// `status << 48 | remaining`.
    fail_next: AtomicU64,
    /// 0: off.
    fail_always: AtomicU16,
    delay_ns: AtomicU64,
    interval_ns: AtomicU64,
    /// `usize::MAX`: off.
    break_after: AtomicUsize,
    /// Seconds; `NONE`: no header.
    retry_after: AtomicU64,
    recording: AtomicBool,
    log: Mutex<VecDeque<Recorded>>,
}

impl Inner {
    fn injected_failure(&self) -> Option<u16> {
        let taken = self
            .fail_next
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & COUNT_MASK > 0).then(|| v - 1)
            });
        if let Ok(v) = taken {
            return Some((v >> 48) as u16);
        }
        match self.fail_always.load(Ordering::Acquire) {
            0 => None,
            s => Some(s),
        }
    }

    fn record(&self, parts: &Parts, body: &[u8], json: Option<&Value>) {
        let mut headers = BTreeMap::new();
        for (name, value) in &parts.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            headers
                .entry(name.as_str().to_string())
                .and_modify(|v: &mut String| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert_with(|| value.into_owned());
        }
        let body = match json {
            Some(v) => v.clone(),
            None if body.is_empty() => Value::Null,
            None => Value::String(String::from_utf8_lossy(body).into_owned()),
        };
        let rec = Recorded {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_string(), |pq| pq.to_string()),
            headers,
            body,
        };
        let mut log = self.log.lock().unwrap();
        if log.len() >= RECORD_LIMIT {
            log.pop_front();
        }
        log.push_back(rec);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Family {
    OpenAi,
    Azure,
    Anthropic,
    Gemini,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum OpenAiOp {
    Chat,
    Completions,
    Embeddings,
}

enum Target {
    OpenAi(OpenAiOp),
    Azure(OpenAiOp, String),
    Anthropic,
    Gemini(String),
    NotFound,
}

type St = State<Arc<Inner>>;

fn router(inner: Arc<Inner>) -> Router {
    use OpenAiOp::*;
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|State(st): St, req: Request| handle(st, Target::OpenAi(Chat), req)),
        )
        .route(
            "/v1/completions",
            post(|State(st): St, req: Request| handle(st, Target::OpenAi(Completions), req)),
        )
        .route(
            "/v1/embeddings",
            post(|State(st): St, req: Request| handle(st, Target::OpenAi(Embeddings), req)),
        )
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(|State(st): St, Path(d): Path<String>, req: Request| {
                handle(st, Target::Azure(Chat, d), req)
            }),
        )
        .route(
            "/openai/deployments/{deployment}/completions",
            post(|State(st): St, Path(d): Path<String>, req: Request| {
                handle(st, Target::Azure(Completions, d), req)
            }),
        )
        .route(
            "/openai/deployments/{deployment}/embeddings",
            post(|State(st): St, Path(d): Path<String>, req: Request| {
                handle(st, Target::Azure(Embeddings, d), req)
            }),
        )
        .route(
            "/v1/messages",
            post(|State(st): St, req: Request| handle(st, Target::Anthropic, req)),
        )
        .route(
            "/v1beta/models/{rest}",
            post(|State(st): St, Path(rest): Path<String>, req: Request| {
                handle(st, Target::Gemini(rest), req)
            }),
        )
        .fallback(|State(st): St, req: Request| handle(st, Target::NotFound, req))
        .with_state(inner)
}

/// What one handler needs to answer.
struct Call<'a> {
    st: &'a Inner,
    seq: usize,
    parts: &'a Parts,
    json: Option<&'a Value>,
}

impl Call<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.parts.headers.get(name)?.to_str().ok()
    }

    fn query(&self, name: &str) -> Option<String> {
        url::form_urlencoded::parse(self.parts.uri.query()?.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// The body when it is a JSON object.
    fn object(&self) -> Option<&Value> {
        self.json.filter(|v| v.is_object())
    }
}

async fn handle(st: Arc<Inner>, target: Target, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .unwrap_or_default();
    let seq = st.count.fetch_add(1, Ordering::SeqCst) + 1;
    let json = serde_json::from_slice::<Value>(&body).ok();
    if st.recording.load(Ordering::Relaxed) {
        st.record(&parts, &body, json.as_ref());
    }
    let delay = st.delay_ns.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_nanos(delay)).await;
    }
    let family = match &target {
        Target::OpenAi(_) => Family::OpenAi,
        Target::Azure(..) => Family::Azure,
        Target::Anthropic => Family::Anthropic,
        Target::Gemini(_) => Family::Gemini,
        Target::NotFound => family_of_path(parts.uri.path()),
    };
    if let Some(status) = st.injected_failure() {
        let mut resp = injected_error(&st.name, family, status);
        let secs = st.retry_after.load(Ordering::Relaxed);
        if secs != NONE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return resp;
    }
    let call = Call {
        st: &st,
        seq,
        parts: &parts,
        json: json.as_ref(),
    };
    match target {
        Target::OpenAi(op) => openai(&call, op),
        Target::Azure(op, deployment) => azure(&call, op, &deployment),
        Target::Anthropic => anthropic(&call),
        Target::Gemini(rest) => gemini(&call, &rest),
        Target::NotFound => not_found(&call, family),
    }
}

fn family_of_path(path: &str) -> Family {
    if path.starts_with("/v1beta/") {
        Family::Gemini
    } else if path.starts_with("/openai/") {
        Family::Azure
    } else if path.starts_with("/v1/messages") {
        Family::Anthropic
    } else {
        Family::OpenAi
    }
}

fn not_found(call: &Call, family: Family) -> Response {
    match family {
        Family::OpenAi => openai_error(
            404,
            &format!(
                "Invalid URL ({} {})",
                call.parts.method,
                call.parts.uri.path()
            ),
            "invalid_request_error",
            None,
            None,
        ),
        Family::Azure => azure_error(404, "404", "Resource not found"),
        Family::Anthropic => anthropic_error(404, "not_found_error", "Not Found"),
        Family::Gemini => gemini_error(404, "Requested entity was not found."),
    }
}

// ---------------------------------------------------------------------------------------------
// Responses

fn json_response(status: u16, v: &Value) -> Response {
    (
        StatusCode::from_u16(status).expect("valid status"),
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).expect("serialize JSON"),
    )
        .into_response()
}

fn openai_error(
    status: u16,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
    )
}

fn azure_error(status: u16, code: &str, message: &str) -> Response {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

fn anthropic_error(status: u16, kind: &str, message: &str) -> Response {
    json_response(
        status,
        &json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

fn gemini_status(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        500 => "INTERNAL",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        s if s < 500 => "FAILED_PRECONDITION",
        _ => "UNKNOWN",
    }
}

fn gemini_error(status: u16, message: &str) -> Response {
    json_response(
        status,
        &json!({"error": {"code": status, "message": message, "status": gemini_status(status)}}),
    )
}

/// The error body a provider gives for `status`, marked as injected by this fake.
fn injected_error(name: &str, family: Family, status: u16) -> Response {
    let suffix = format!(" (injected by fake_llm {name})");
    match family {
        Family::OpenAi => {
            let (message, kind, code) = match status {
                401 => (
                    "Incorrect API key provided.",
                    "invalid_request_error",
                    Some("invalid_api_key"),
                ),
                404 => (
                    "The model does not exist or you do not have access to it.",
                    "invalid_request_error",
                    Some("model_not_found"),
                ),
                429 => (
                    "Rate limit reached for requests.",
                    "requests",
                    Some("rate_limit_exceeded"),
                ),
                503 => (
                    "The engine is currently overloaded, please try again later.",
                    "server_error",
                    None,
                ),
                s if s >= 500 => (
                    "The server had an error while processing your request. Sorry about that!",
                    "server_error",
                    None,
                ),
                _ => ("The request was rejected.", "invalid_request_error", None),
            };
            openai_error(status, &format!("{message}{suffix}"), kind, None, code)
        }
        Family::Azure => {
            let message = match status {
                401 => "Access denied due to invalid subscription key or wrong API endpoint.",
                404 => "Resource not found",
                429 => {
                    "Requests to the deployment have exceeded the call rate limit of your current pricing tier. Please retry after 1 second."
                }
                s if s >= 500 => "The server had an error while processing your request.",
                _ => "The request was rejected.",
            };
            azure_error(status, &status.to_string(), &format!("{message}{suffix}"))
        }
        Family::Anthropic => {
            let (kind, message) = match status {
                400 => ("invalid_request_error", "Invalid request"),
                401 => ("authentication_error", "invalid x-api-key"),
                403 => ("permission_error", "Permission denied"),
                404 => ("not_found_error", "Not found"),
                413 => (
                    "request_too_large",
                    "Request exceeds the maximum allowed size",
                ),
                429 => ("rate_limit_error", "Rate limit exceeded"),
                529 => ("overloaded_error", "Overloaded"),
                s if s >= 500 => ("api_error", "Internal server error"),
                _ => ("invalid_request_error", "The request was rejected"),
            };
            anthropic_error(status, kind, &format!("{message}{suffix}"))
        }
        Family::Gemini => {
            let message = match status {
                400 => "Request contains an invalid argument.",
                403 => "The caller does not have permission.",
                404 => "Requested entity was not found.",
                429 => "Resource has been exhausted (e.g. check quota).",
                503 => "The model is overloaded. Please try again later.",
                504 => "Deadline expired before operation could complete.",
                s if s >= 500 => "An internal error has occurred.",
                _ => "The request was rejected.",
            };
            gemini_error(status, &format!("{message}{suffix}"))
        }
    }
}

/// A streaming 200 whose body is `events`, honouring the event interval and the stream break.
fn stream_response(st: &Inner, content_type: &'static str, events: Vec<String>) -> Response {
    let break_after = st.break_after.load(Ordering::Relaxed);
    let interval = Duration::from_nanos(st.interval_ns.load(Ordering::Relaxed));
    let broken = break_after != usize::MAX;
    let events = futures::stream::iter(events.into_iter().take(break_after).enumerate()).then(
        move |(i, event)| async move {
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            Ok::<_, std::io::Error>(Bytes::from(event))
        },
    );
    // Let the events already yielded reach the socket, then fail the body: hyper drops the
    // connection without the chunked terminator, so the client sees a truncated response.
    let cut = futures::stream::iter(broken.then_some(())).then(|()| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Err(std::io::Error::other("fake_llm: stream broken on purpose"))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(events.chain(cut)))
        .expect("stream response")
}

fn sse(data: &Value) -> String {
    format!("data: {data}\n\n")
}

fn named_sse(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

// ---------------------------------------------------------------------------------------------
// Text helpers

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

fn reply_text(name: &str, text: &str) -> String {
    format!("reply from {name} to: {text}")
}

/// `s` cut before each word but the first: every piece is the whitespace before a word and the
/// word (the last also any trailing whitespace). The pieces concatenate to `s`.
fn word_chunks(s: &str) -> Vec<&str> {
    // Where each word ends.
    let mut ends = Vec::new();
    let mut in_word = false;
    for (i, c) in s.char_indices() {
        let ws = c.is_whitespace();
        if ws && in_word {
            ends.push(i);
        }
        in_word = !ws;
    }
    if in_word {
        ends.push(s.len());
    }
    let Some(last) = ends.last_mut() else {
        return if s.is_empty() { Vec::new() } else { vec![s] };
    };
    *last = s.len();
    let mut start = 0;
    ends.iter()
        .map(|&end| {
            let piece = &s[start..end];
            start = end;
            piece
        })
        .collect()
}

/// A reply, cut to `max` words when it is longer.
struct Reply {
    text: String,
    tokens: usize,
    truncated: bool,
}

impl Reply {
    fn new(name: &str, input: &str, max: Option<u64>) -> Reply {
        let mut text = reply_text(name, input);
        let mut truncated = false;
        if let Some(max) = max.map(|m| m as usize) {
            let chunks = word_chunks(&text);
            if chunks.len() > max {
                text = chunks[..max].concat();
                truncated = true;
            }
        }
        Reply {
            tokens: words(&text),
            text,
            truncated,
        }
    }

    fn chunks(&self) -> Vec<&str> {
        word_chunks(&self.text)
    }
}

/// The text of an OpenAI or Anthropic `content`: a string, or the `text` of its text parts joined
/// with one space.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn content_words(content: Option<&Value>) -> usize {
    match content {
        Some(Value::String(s)) => words(s),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(words)
            .sum(),
        _ => 0,
    }
}

/// OpenAI's `input` / `prompt`: a string, an array of strings, an array of token ids or an array
/// of such arrays. Token arrays become their ids joined by spaces (so words = tokens).
fn text_inputs(input: &Value) -> Option<Vec<String>> {
    fn tokens(a: &[Value]) -> Option<String> {
        a.iter()
            .map(|t| t.as_i64().map(|t| t.to_string()))
            .collect::<Option<Vec<_>>>()
            .map(|t| t.join(" "))
    }
    match input {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) if a.is_empty() => None,
        Value::Array(a) if a.iter().all(Value::is_number) => Some(vec![tokens(a)?]),
        Value::Array(a) => a
            .iter()
            .map(|item| match item {
                Value::String(s) => Some(s.clone()),
                Value::Array(t) => tokens(t),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn embedding_json(text: &str, dims: usize, base64: bool) -> Value {
    let v = fake_embedding(text, dims);
    if base64 {
        use base64::Engine;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        json!(v)
    }
}

fn dims_of(v: Option<&Value>) -> usize {
    v.and_then(Value::as_u64)
        .map_or(DEFAULT_EMBEDDING_DIMS, |d| (d as usize).clamp(1, 8192))
}

// ---------------------------------------------------------------------------------------------
// OpenAI and Azure OpenAI

fn mask(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 7))
}

fn bad_json_openai() -> Response {
    openai_error(
        400,
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)",
        "invalid_request_error",
        None,
        None,
    )
}

fn missing_param(name: &str) -> Response {
    openai_error(
        400,
        &format!("Missing required parameter: '{name}'."),
        "invalid_request_error",
        Some(name),
        Some("missing_required_parameter"),
    )
}

fn openai(call: &Call, op: OpenAiOp) -> Response {
    let key = call
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "));
    match key {
        None => {
            return openai_error(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            );
        }
        Some(k) if k != call.st.api_key => {
            return openai_error(
                401,
                &format!(
                    "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                    mask(k)
                ),
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            );
        }
        Some(_) => {}
    }
    let Some(body) = call.object() else {
        return bad_json_openai();
    };
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return openai_error(
            400,
            "you must provide a model parameter",
            "invalid_request_error",
            None,
            None,
        );
    };
    openai_op(call, op, body, model)
}

fn azure(call: &Call, op: OpenAiOp, deployment: &str) -> Response {
    if call.header("api-key") != Some(call.st.api_key.as_str()) {
        return azure_error(
            401,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
        );
    }
    if call.query("api-version").is_none_or(|v| v.is_empty()) {
        return azure_error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        );
    }
    let Some(body) = call.object() else {
        return bad_json_openai();
    };
    openai_op(call, op, body, deployment)
}

fn openai_op(call: &Call, op: OpenAiOp, body: &Value, model: &str) -> Response {
    match op {
        OpenAiOp::Chat => chat(call, body, model),
        OpenAiOp::Completions => completions(call, body, model),
        OpenAiOp::Embeddings => embeddings(body, model),
    }
}

fn usage_json(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn openai_max_tokens(body: &Value) -> Option<u64> {
    body.get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| body.get("max_tokens").and_then(Value::as_u64))
}

fn chat(call: &Call, body: &Value, model: &str) -> Response {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return missing_param("messages");
    };
    if messages.is_empty() {
        return openai_error(
            400,
            "[] is too short - 'messages'",
            "invalid_request_error",
            Some("messages"),
            None,
        );
    }
    let prompt_tokens: usize = messages
        .iter()
        .map(|m| content_words(m.get("content")))
        .sum();
    let user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content")))
        .unwrap_or_default();
    let reply = Reply::new(&call.st.name, &user, openai_max_tokens(body));
    let finish = if reply.truncated { "length" } else { "stop" };
    let id = format!("chatcmpl-fake{}", call.seq);
    let created = now();
    let usage = usage_json(prompt_tokens, reply.tokens);

    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        return json_response(
            200,
            &json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text, "refusal": null},
                    "logprobs": null,
                    "finish_reason": finish,
                }],
                "usage": usage,
            }),
        );
    }

    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let chunk = |delta: Value, finish: Option<&str>| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        sse(&c)
    };
    let pieces = reply.chunks();
    let mut events = Vec::with_capacity(pieces.len() + 4);
    events.push(chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    ));
    for piece in pieces {
        events.push(chunk(json!({"content": piece}), None));
    }
    events.push(chunk(json!({}), Some(finish)));
    if include_usage {
        events.push(sse(&json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [],
            "usage": usage,
        })));
    }
    events.push("data: [DONE]\n\n".to_string());
    stream_response(call.st, "text/event-stream", events)
}

fn completions(call: &Call, body: &Value, model: &str) -> Response {
    let Some(prompts) = body.get("prompt").and_then(text_inputs) else {
        return missing_param("prompt");
    };
    let prompt_tokens: usize = prompts.iter().map(|p| words(p)).sum();
    let max = body.get("max_tokens").and_then(Value::as_u64);
    let replies: Vec<Reply> = prompts
        .iter()
        .map(|p| Reply::new(&call.st.name, p, max))
        .collect();
    let completion_tokens: usize = replies.iter().map(|r| r.tokens).sum();
    let usage = usage_json(prompt_tokens, completion_tokens);
    let id = format!("cmpl-fake{}", call.seq);
    let created = now();
    let finish = |r: &Reply| if r.truncated { "length" } else { "stop" };

    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        let choices: Vec<Value> = replies
            .iter()
            .enumerate()
            .map(|(i, r)| {
                json!({"text": r.text, "index": i, "logprobs": null, "finish_reason": finish(r)})
            })
            .collect();
        return json_response(
            200,
            &json!({
                "id": id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": choices,
                "usage": usage,
            }),
        );
    }

    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let chunk = |choices: Value, usage: Option<&Value>| {
        let mut c = json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": choices,
        });
        if include_usage {
            c["usage"] = usage.cloned().unwrap_or(Value::Null);
        }
        sse(&c)
    };
    let mut events = Vec::new();
    for (i, r) in replies.iter().enumerate() {
        for piece in r.chunks() {
            events.push(chunk(
                json!([{"text": piece, "index": i, "logprobs": null, "finish_reason": null}]),
                None,
            ));
        }
        events.push(chunk(
            json!([{"text": "", "index": i, "logprobs": null, "finish_reason": finish(r)}]),
            None,
        ));
    }
    if include_usage {
        events.push(chunk(json!([]), Some(&usage)));
    }
    events.push("data: [DONE]\n\n".to_string());
    stream_response(call.st, "text/event-stream", events)
}

fn embeddings(body: &Value, model: &str) -> Response {
    let Some(input) = body.get("input") else {
        return missing_param("input");
    };
    let Some(inputs) = text_inputs(input) else {
        return openai_error(
            400,
            "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
            "invalid_request_error",
            None,
            None,
        );
    };
    let dims = dims_of(body.get("dimensions"));
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            json!({"object": "embedding", "index": i, "embedding": embedding_json(text, dims, base64)})
        })
        .collect();
    let tokens: usize = inputs.iter().map(|t| words(t)).sum();
    json_response(
        200,
        &json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// Anthropic Messages

fn anthropic(call: &Call) -> Response {
    match call.header("x-api-key") {
        None => {
            return anthropic_error(401, "authentication_error", "x-api-key header is required");
        }
        Some(k) if k != call.st.api_key => {
            return anthropic_error(401, "authentication_error", "invalid x-api-key");
        }
        Some(_) => {}
    }
    if call.header("anthropic-version").is_none() {
        return anthropic_error(
            400,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    let invalid = |m: &str| anthropic_error(400, "invalid_request_error", m);
    let Some(body) = call.object() else {
        return invalid("The request body is not valid JSON.");
    };
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return invalid("model: Field required");
    };
    let Some(max_tokens) = body.get("max_tokens") else {
        return invalid("max_tokens: Field required");
    };
    let Some(max_tokens) = max_tokens.as_u64().filter(|&m| m >= 1) else {
        return invalid("max_tokens: Input should be a valid integer greater than or equal to 1");
    };
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return invalid("messages: Field required");
    };
    if messages.is_empty() {
        return invalid("messages: at least one message is required");
    }
    let input_tokens = content_words(body.get("system"))
        + messages
            .iter()
            .map(|m| content_words(m.get("content")))
            .sum::<usize>();
    let user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content")))
        .unwrap_or_default();
    let reply = Reply::new(&call.st.name, &user, Some(max_tokens));
    let stop_reason = if reply.truncated {
        "max_tokens"
    } else {
        "end_turn"
    };
    let id = format!("msg_fake{:020}", call.seq);

    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        return json_response(
            200,
            &json!({
                "id": id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": reply.text}],
                "stop_reason": stop_reason,
                "stop_sequence": null,
                "usage": {
                    "input_tokens": input_tokens,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "output_tokens": reply.tokens,
                },
            }),
        );
    }

    let pieces = reply.chunks();
    let mut events = Vec::with_capacity(pieces.len() + 6);
    events.push(named_sse(
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {
                "input_tokens": input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            },
        }}),
    ));
    events.push(named_sse(
        "content_block_start",
        &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ));
    events.push(named_sse("ping", &json!({"type": "ping"})));
    for piece in pieces {
        events.push(named_sse(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
        ));
    }
    events.push(named_sse(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(named_sse(
        "message_delta",
        &json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": reply.tokens},
        }),
    ));
    events.push(named_sse("message_stop", &json!({"type": "message_stop"})));
    stream_response(call.st, "text/event-stream", events)
}

// ---------------------------------------------------------------------------------------------
// Gemini

fn parts_text(content: Option<&Value>) -> String {
    content
        .and_then(|c| c.get("parts"))
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn parts_words(content: Option<&Value>) -> usize {
    content
        .and_then(|c| c.get("parts"))
        .and_then(Value::as_array)
        .map_or(0, |parts| {
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .map(words)
                .sum()
        })
}

fn gemini(call: &Call, rest: &str) -> Response {
    let key = call
        .header("x-goog-api-key")
        .map(str::to_string)
        .or_else(|| call.query("key"));
    match key {
        None => {
            return gemini_error(
                403,
                "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
            );
        }
        Some(k) if k != call.st.api_key => {
            return gemini_error(400, "API key not valid. Please pass a valid API key.");
        }
        Some(_) => {}
    }
    let Some((model, method)) = rest.split_once(':') else {
        return gemini_error(404, "Requested entity was not found.");
    };
    let Some(body) = call.object() else {
        return gemini_error(400, "Invalid JSON payload received.");
    };
    match method {
        "generateContent" => generate(call, body, model, false),
        "streamGenerateContent" => generate(call, body, model, true),
        "embedContent" => {
            let dims = dims_of(body.get("outputDimensionality"));
            let text = parts_text(body.get("content"));
            json_response(
                200,
                &json!({"embedding": {"values": fake_embedding(&text, dims)}}),
            )
        }
        "batchEmbedContents" => {
            let Some(requests) = body.get("requests").and_then(Value::as_array) else {
                return gemini_error(
                    400,
                    "* BatchEmbedContentsRequest.requests: requests is not specified\n",
                );
            };
            let embeddings: Vec<Value> = requests
                .iter()
                .map(|r| {
                    let dims = dims_of(r.get("outputDimensionality"));
                    json!({"values": fake_embedding(&parts_text(r.get("content")), dims)})
                })
                .collect();
            json_response(200, &json!({"embeddings": embeddings}))
        }
        "countTokens" => {
            let total: usize = body
                .get("contents")
                .and_then(Value::as_array)
                .map_or(0, |c| c.iter().map(|c| parts_words(Some(c))).sum());
            json_response(200, &json!({"totalTokens": total}))
        }
        _ => gemini_error(404, "Requested entity was not found."),
    }
}

fn generate(call: &Call, body: &Value, model: &str, stream: bool) -> Response {
    let contents = body
        .get("contents")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty());
    let Some(contents) = contents else {
        return gemini_error(
            400,
            "* GenerateContentRequest.contents: contents is not specified\n",
        );
    };
    let prompt_tokens = parts_words(body.get("systemInstruction"))
        + contents.iter().map(|c| parts_words(Some(c))).sum::<usize>();
    let user = contents
        .iter()
        .rev()
        .find(|c| {
            c.get("role")
                .and_then(Value::as_str)
                .is_none_or(|r| r == "user")
        })
        .map(|c| parts_text(Some(c)))
        .unwrap_or_default();
    let max = body
        .pointer("/generationConfig/maxOutputTokens")
        .and_then(Value::as_u64);
    let reply = Reply::new(&call.st.name, &user, max);
    let finish = if reply.truncated {
        "MAX_TOKENS"
    } else {
        "STOP"
    };
    let response_id = format!("fake-{}", call.seq);
    let usage = |candidates: usize| {
        json!({
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": candidates,
            "totalTokenCount": prompt_tokens + candidates,
        })
    };

    if !stream {
        return json_response(
            200,
            &json!({
                "candidates": [{
                    "content": {"role": "model", "parts": [{"text": reply.text}]},
                    "finishReason": finish,
                    "index": 0,
                }],
                "usageMetadata": usage(reply.tokens),
                "modelVersion": model,
                "responseId": response_id,
            }),
        );
    }

    // One response per word; usageMetadata is cumulative on every chunk (as Gemini sends it), so
    // the last chunk carries the final counts; finishReason is on the last chunk only.
    let pieces = reply.chunks();
    let last = pieces.len().saturating_sub(1);
    let pieces = if pieces.is_empty() { vec![""] } else { pieces };
    let sse_mode = call.query("alt").as_deref() == Some("sse");
    let mut sent = 0;
    let mut events: Vec<String> = pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            sent += words(piece);
            let mut candidate = json!({
                "content": {"role": "model", "parts": [{"text": piece}]},
                "index": 0,
            });
            if i == last {
                candidate["finishReason"] = json!(finish);
            }
            let chunk = json!({
                "candidates": [candidate],
                "usageMetadata": usage(sent),
                "modelVersion": model,
                "responseId": response_id,
            });
            if sse_mode {
                // Gemini ends its SSE events with CRLF CRLF.
                format!("data: {chunk}\r\n\r\n")
            } else if i == 0 {
                format!("[{chunk}")
            } else {
                format!(",\r\n{chunk}")
            }
        })
        .collect();
    if sse_mode {
        stream_response(call.st, "text/event-stream", events)
    } else {
        if let Some(end) = events.last_mut() {
            end.push(']');
        }
        stream_response(call.st, "application/json", events)
    }
}
