//! One invocation: walk the routing's attempts (a model picked by weight, then the fallbacks),
//! try each, trace every attempt, and answer in OpenAI's shape (or stream server-sent events).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;

use super::access::Identity;
use super::limits::{Accumulator, Charge, Slot, parse_cost};
use super::tracing::{Attempt, Invocation, RequestType, TokenUsage};
use super::{Admitted, Gateway, JsonBody, Shared, openai_error};
use crate::gateway::config::{ModelConfig, ProviderConfig};
use crate::gateway::providers::{Operation, ProviderError, StreamConverter, usage_of};
use crate::http_client::{ByteStream, TransportError};

/// What the client called.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    pub op: Operation,
    /// The route template, for metrics.
    pub route: &'static str,
    /// MLflow's `mlflow.gateway.requestType`.
    pub request_type: RequestType,
}

impl Call {
    pub fn new(op: Operation, route: &'static str, request_type: RequestType) -> Self {
        Call {
            op,
            route,
            request_type,
        }
    }

    pub fn unified(op: Operation, route: &'static str) -> Self {
        let request_type = match op {
            Operation::Chat => RequestType::UnifiedChat,
            Operation::Completions => RequestType::UnifiedCompletions,
            Operation::Embeddings => RequestType::UnifiedEmbeddings,
        };
        Call::new(op, route, request_type)
    }
}

/// Answers a request the gateway refuses before any attempt.
pub fn reject(
    g: &Gateway,
    route: &'static str,
    status: StatusCode,
    message: impl Into<String>,
) -> Response {
    record(g, route, status, None);
    openai_error(status, "invalid_request_error", message)
}

fn record(g: &Gateway, route: &'static str, status: StatusCode, started: Option<Instant>) {
    g.metrics
        .requests
        .get_or_create(&super::metrics::RouteStatus {
            route,
            status: status.as_u16(),
        })
        .inc();
    if let Some(t) = started {
        g.metrics
            .duration
            .get_or_create(&super::metrics::RouteLabel { route })
            .observe(t.elapsed().as_secs_f64());
    }
}

fn method(op: Operation, stream: bool) -> &'static str {
    match (op, stream) {
        (Operation::Chat, false) => "chat",
        (Operation::Chat, true) => "chat_stream",
        (Operation::Completions, false) => "completions",
        (Operation::Completions, true) => "completions_stream",
        (Operation::Embeddings, _) => "embeddings",
    }
}

/// Why an attempt failed, and whether another model may be tried.
struct Failure {
    message: String,
    /// Connection errors, timeouts, 429 and 5xx: try the next model. Other 4xx: answer now.
    retryable: bool,
    status: Option<StatusCode>,
    /// For metrics: connect, timeout, status_429, status_5xx, status_4xx, bad_response, stream,
    /// too_large, overloaded, request (the request could not be built for this model).
    kind: &'static str,
}

impl Failure {
    /// A failure of this attempt that another model may not have.
    fn retryable(kind: &'static str, message: String) -> Self {
        Failure {
            message,
            retryable: true,
            status: None,
            kind,
        }
    }
}

/// How a request reaches the provider: the unified (OpenAI-shaped) conversion, or Anthropic's
/// Messages API passed through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Unified,
    AnthropicPassthrough,
}

pub async fn run(
    g: &Shared,
    call: Call,
    caller: Option<&Identity>,
    headers: &HeaderMap,
    body: JsonBody,
) -> Response {
    let served = g.endpoint.operation;
    if call.op != served {
        return reject(
            g,
            call.route,
            StatusCode::BAD_REQUEST,
            format!(
                "endpoint {:?} serves {}: use POST {}",
                g.endpoint.name,
                served.endpoint_type(),
                served.path()
            ),
        );
    }
    execute(g, call, caller, headers, body, Mode::Unified).await
}

pub async fn run_anthropic_passthrough(
    g: &Shared,
    route: &'static str,
    caller: Option<&Identity>,
    headers: &HeaderMap,
    body: JsonBody,
) -> Response {
    if g.endpoint.operation != Operation::Chat {
        return reject(
            g,
            route,
            StatusCode::BAD_REQUEST,
            format!(
                "endpoint {:?} serves {}, not chat",
                g.endpoint.name,
                g.endpoint.operation.endpoint_type()
            ),
        );
    }
    let call = Call::new(
        Operation::Chat,
        route,
        RequestType::PassthroughAnthropicMessages,
    );
    execute(g, call, caller, headers, body, Mode::AnthropicPassthrough).await
}

async fn execute(
    g: &Shared,
    call: Call,
    identity: Option<&Identity>,
    headers: &HeaderMap,
    JsonBody(body, text, admitted): JsonBody,
    mode: Mode,
) -> Response {
    let Admitted { slot, mut charge } = admitted;
    let started = Instant::now();
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if stream && call.op == Operation::Embeddings {
        return reject(
            g,
            call.route,
            StatusCode::BAD_REQUEST,
            "embeddings cannot be streamed",
        );
    }
    let attempts = g.routing.attempts_without(0);
    let anthropic = |u: &&ModelConfig| matches!(u.provider, ProviderConfig::Anthropic { .. });
    // Pass-through only makes sense when the chosen model speaks the Messages API.
    if mode == Mode::AnthropicPassthrough && attempts.clone().next().is_none_or(|u| !anthropic(&u))
    {
        return reject(
            g,
            call.route,
            StatusCode::BAD_REQUEST,
            "the Anthropic Messages pass-through needs the chosen model to be provider anthropic; use /v1/chat/completions",
        );
    }
    let mut attempts = attempts;
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let caller = if g.telemetry.is_enabled() {
        super::tracing::caller_from_headers(headers)
    } else {
        None
    };
    let mut invocation = g.telemetry.start_invocation_of(
        call.request_type,
        caller.as_deref(),
        traceparent,
        &body,
        Some(&text),
    );
    if let Some(id) = identity {
        invocation.set_authenticated_caller(&id.name, id.uid.as_deref());
    }
    let trace_id = invocation.trace_id();
    let wants_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let mut upstream_time = Duration::ZERO;
    let mut last: Option<(String, Failure)> = None;
    let mut tried = 0;
    // Whether every attempt so far failed because the request could not be built for its model
    // (then the client's request is at fault: 400 rather than 502).
    let mut all_refused = true;
    // Models of the split that could not take this request.
    let mut left_out = 0u64;
    while let Some(up) = attempts.next() {
        if mode == Mode::AnthropicPassthrough && !anthropic(&up) {
            continue;
        }
        tried += 1;
        if tried > 1 {
            g.metrics.fallbacks.inc();
        }
        let attempt = invocation.start_attempt(
            up.provider_name(),
            &up.model,
            method(call.op, stream),
            stream,
        );
        let request = match mode {
            Mode::Unified => up.build_request(call.op, &body),
            Mode::AnthropicPassthrough => up.build_anthropic_passthrough(&body),
        };
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                // This model cannot take the request as is (a field its provider refuses, a
                // key that is no header value): its attempt failed, another model may do.
                all_refused &= matches!(
                    e,
                    ProviderError::InvalidRequest(_) | ProviderError::Unsupported(_)
                );
                let f = Failure::retryable("request", e.to_string());
                g.metrics.upstream_error(up.provider_name(), f.kind);
                attempt.fail("InvalidRequest", &f.message, None);
                last = Some((label(up), f));
                if let Some(bit) = g.routing.primary_bit(up) {
                    // The draw again among the split's other models, then the fallbacks.
                    left_out |= bit;
                    attempts = g.routing.attempts_without(left_out);
                }
                continue;
            }
        };
        all_refused = false;
        let t0 = Instant::now();
        if stream {
            match open_stream(g, up, call.op, request, wants_usage, mode).await {
                Ok(mut opened) => {
                    upstream_time += t0.elapsed();
                    opened.slot = Some(slot);
                    return stream_response(
                        g.clone(),
                        call,
                        opened,
                        attempt,
                        invocation,
                        trace_id,
                        started,
                    );
                }
                Err(f) => {
                    upstream_time += t0.elapsed();
                    g.metrics.upstream_error(up.provider_name(), f.kind);
                    attempt.fail(f.kind, &f.message, f.status.map(|s| s.as_u16()));
                    if !f.retryable {
                        return client_error(g, call, invocation, f, trace_id, started);
                    }
                    last = Some((label(up), f));
                }
            }
            continue;
        }
        let outcome = unary(g, up, call.op, &body, request, mode, &mut charge).await;
        upstream_time += t0.elapsed();
        match outcome {
            Ok(answer) => {
                let usage = answer.usage();
                if let Some(u) = usage {
                    g.metrics.tokens(u.input_tokens, u.output_tokens);
                }
                // Serialized once for both spans (or the provider's text kept), and only when
                // the trace is built.
                let outputs = answer.outputs(&invocation);
                attempt.succeed_with(usage.map(token_usage), Some(&outputs));
                invocation.finish_with(Some(&outputs), None);
                record(g, call.route, StatusCode::OK, Some(started));
                let mut resp = answer.into_response();
                timing_headers(
                    resp.headers_mut(),
                    started,
                    upstream_time,
                    trace_id.as_deref(),
                );
                return resp;
            }
            Err(f) => {
                g.metrics.upstream_error(up.provider_name(), f.kind);
                attempt.fail(f.kind, &f.message, f.status.map(|s| s.as_u16()));
                if !f.retryable {
                    return client_error(g, call, invocation, f, trace_id, started);
                }
                last = Some((label(up), f));
            }
        }
    }
    let message = match &last {
        Some((who, f)) if tried == 1 => format!("{who}: {}", f.message),
        Some((who, f)) => format!("all {tried} attempts failed; last: {who}: {}", f.message),
        None => "no model to try".to_string(),
    };
    invocation.finish(None, Some(&message));
    let (status, kind) = if all_refused && last.is_some() {
        (StatusCode::BAD_REQUEST, "invalid_request_error")
    } else {
        (StatusCode::BAD_GATEWAY, "upstream_error")
    };
    record(g, call.route, status, Some(started));
    openai_error(status, kind, message)
}

fn label(up: &ModelConfig) -> String {
    format!("{} ({}/{})", up.name, up.provider_name(), up.model)
}

fn token_usage(u: crate::gateway::providers::Usage) -> TokenUsage {
    TokenUsage {
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        total_tokens: u.total_tokens,
    }
}

const DURATION_HEADER: HeaderName = HeaderName::from_static("x-mlflow-gateway-duration-ms");
const OVERHEAD_HEADER: HeaderName =
    HeaderName::from_static("x-mlflow-gateway-overhead-duration-ms");
const TRACE_ID_HEADER: HeaderName = HeaderName::from_static("x-mlflow-trace-id");

/// MLflow's gateway headers, plus the trace id.
fn timing_headers(h: &mut HeaderMap, started: Instant, upstream: Duration, trace_id: Option<&str>) {
    let total = started.elapsed();
    let ms = |d: Duration| HeaderValue::from(d.as_millis() as u64);
    h.insert(DURATION_HEADER, ms(total));
    h.insert(OVERHEAD_HEADER, ms(total.saturating_sub(upstream)));
    if let Some(id) = trace_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        h.insert(TRACE_ID_HEADER, id);
    }
}

/// An upstream client error (4xx other than 429): passed through with its status, no fallback.
fn client_error(
    g: &Gateway,
    call: Call,
    invocation: Invocation,
    f: Failure,
    trace_id: Option<String>,
    started: Instant,
) -> Response {
    invocation.finish(None, Some(&f.message));
    let status = f.status.unwrap_or(StatusCode::BAD_REQUEST);
    record(g, call.route, status, Some(started));
    let mut resp = openai_error(status, "upstream_error", f.message);
    timing_headers(
        resp.headers_mut(),
        started,
        Duration::ZERO,
        trace_id.as_deref(),
    );
    resp
}

fn classify_status(up: &ModelConfig, status: StatusCode, body: &[u8]) -> Failure {
    let message = format!(
        "HTTP {}: {}",
        status.as_u16(),
        up.error_message(status.as_u16(), body)
    );
    let (retryable, kind) = if status == StatusCode::TOO_MANY_REQUESTS {
        (true, "status_429")
    } else if status.is_server_error() {
        (true, "status_5xx")
    } else {
        (false, "status_4xx")
    };
    Failure {
        message,
        retryable,
        status: Some(status),
        kind,
    }
}

fn transport_failure(e: TransportError) -> Failure {
    let kind = if e.timeout { "timeout" } else { "connect" };
    Failure {
        message: e.message,
        retryable: true,
        status: None,
        kind,
    }
}

fn timeout_failure(after: Duration) -> Failure {
    Failure {
        message: format!("no answer within {} ms", after.as_millis()),
        retryable: true,
        status: None,
        kind: "timeout",
    }
}

/// A provider's successful answer, in the OpenAI shape (or Anthropic's, passed through).
enum Answer {
    /// Parsed (and converted, if the provider's shape is not the client's); `verbatim`: the
    /// provider's bytes, when they are the answer as is, sent unchanged rather than serialized
    /// again.
    Parsed {
        response: Value,
        verbatim: Option<Bytes>,
    },
    /// The provider's bytes, the answer as is, checked without being parsed whole.
    Checked {
        bytes: Bytes,
        check: crate::gateway::providers::openai::Checked,
    },
}

impl Answer {
    fn usage(&self) -> Option<crate::gateway::providers::Usage> {
        match self {
            Answer::Parsed { response, .. } => usage_of(response),
            Answer::Checked { check, .. } => check.usage,
        }
    }

    /// The spans' outputs (nothing is serialized for an invocation not traced).
    fn outputs(&self, invocation: &Invocation) -> super::tracing::Outputs {
        match self {
            Answer::Parsed { response, verbatim } => {
                invocation.outputs_of(response, verbatim.as_deref())
            }
            Answer::Checked { bytes, check } => {
                invocation.outputs_of_json(bytes, &[(check.list, check.items)])
            }
        }
    }

    fn into_response(self) -> Response {
        let json = |bytes: Bytes| {
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                bytes,
            )
                .into_response()
        };
        match self {
            Answer::Parsed {
                verbatim: Some(bytes),
                ..
            }
            | Answer::Checked { bytes, .. } => json(bytes),
            Answer::Parsed { response, .. } => axum::Json(response).into_response(),
        }
    }
}

/// One non-streamed attempt, within the attempt timeout.
async fn unary(
    g: &Gateway,
    up: &ModelConfig,
    op: Operation,
    body: &Value,
    request: Request<Bytes>,
    mode: Mode,
    charge: &mut Charge,
) -> Result<Answer, Failure> {
    let call = async {
        let mut resp = g.http.send(request).await.map_err(transport_failure)?;
        let status = resp.status;
        let bytes = read_answer(g, &mut resp, charge).await?;
        Ok::<_, Failure>((status, bytes))
    };
    let (status, bytes) = tokio::time::timeout(g.attempt_timeout, call)
        .await
        .map_err(|_| timeout_failure(g.attempt_timeout))??;
    if !status.is_success() {
        return Err(classify_status(up, status, &bytes));
    }
    if mode == Mode::Unified
        && let Some(check) = up.check_verbatim(op, &bytes)
    {
        return Ok(Answer::Checked { bytes, check });
    }
    // Parsed whole from here: its tree is charged first.
    if !g.guard.charge(charge, parse_cost(&bytes) - bytes.len()) {
        return Err(Failure::retryable(
            "overloaded",
            format!(
                "the answer ({} bytes) is more than the gateway's memory budget has left to parse it (GATEWAY_MEMORY_BUDGET_BYTES)",
                bytes.len()
            ),
        ));
    }
    let (parsed, verbatim) = match mode {
        // The client's request tells how to encode embeddings (float or base64).
        Mode::Unified => (
            up.parse_response_for(op, Some(body), &bytes),
            up.answers_verbatim(op),
        ),
        Mode::AnthropicPassthrough => (
            serde_json::from_slice(&bytes)
                .map_err(|e| ProviderError::BadUpstreamResponse(format!("not JSON: {e}"))),
            true,
        ),
    };
    match parsed {
        Ok(response) => Ok(Answer::Parsed {
            response,
            verbatim: verbatim.then_some(bytes),
        }),
        Err(e) => Err(Failure {
            message: e.to_string(),
            retryable: true,
            status: None,
            kind: "bad_response",
        }),
    }
}

/// An upstream answer, whole, within the answer cap and the memory budget.
async fn read_answer(
    g: &Gateway,
    resp: &mut crate::http_client::UpstreamResponse,
    charge: &mut Charge,
) -> Result<Bytes, Failure> {
    let max = g.guard.limits.max_answer_bytes;
    let too_large = || {
        Failure::retryable(
            "too_large",
            format!("the answer is larger than {max} bytes (GATEWAY_MAX_ANSWER_BYTES)"),
        )
    };
    let declared = resp
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut acc = Accumulator::new(declared, max);
    while let Some(data) = resp.chunk().await.map_err(transport_failure)? {
        if acc.held() + data.len() > max {
            return Err(too_large());
        }
        if !g.guard.charge(charge, data.len()) {
            return Err(Failure::retryable(
                "overloaded",
                "the gateway's memory budget is spent (GATEWAY_MEMORY_BUDGET_BYTES)".into(),
            ));
        }
        acc.push(data);
    }
    Ok(acc.finish())
}

/// A stream whose provider answered 2xx and sent its first bytes: from here on, no fallback.
struct Opened {
    upstream: ByteStream,
    converter: StreamConverter,
    /// What is ready to send (converted from the first bytes).
    pending: VecDeque<Bytes>,
    mode: Mode,
    provider: &'static str,
    /// Bytes received from the provider so far (capped by GATEWAY_MAX_ANSWER_BYTES).
    received: usize,
    /// The invocation's place among those in flight, held until the stream ends.
    slot: Option<Slot>,
}

impl Opened {
    /// Counts `bytes` against the answer cap.
    fn count(&mut self, bytes: &Bytes, max: usize) -> Result<(), Failure> {
        self.received += bytes.len();
        if self.received > max {
            return Err(Failure::retryable(
                "too_large",
                format!("the stream is longer than {max} bytes (GATEWAY_MAX_ANSWER_BYTES)"),
            ));
        }
        Ok(())
    }
}

fn sse_event(v: &Value) -> Bytes {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"data: ");
    // Serializing a Value cannot fail.
    let _ = serde_json::to_writer(&mut out, v);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Sends the request and waits, within the attempt timeout, for a 2xx answer and its first bytes.
async fn open_stream(
    g: &Gateway,
    up: &ModelConfig,
    op: Operation,
    request: Request<Bytes>,
    wants_usage: bool,
    mode: Mode,
) -> Result<Opened, Failure> {
    let max = g.guard.limits.max_answer_bytes;
    let open = async {
        let mut resp = g.http.send(request).await.map_err(transport_failure)?;
        let status = resp.status;
        if !status.is_success() {
            let bytes = read_answer(g, &mut resp, &mut Charge::default()).await?;
            return Err(classify_status(up, status, &bytes));
        }
        let mut upstream = resp.into_stream();
        let mut converter = up.stream_converter(op, wants_usage);
        converter.limit_lines(g.guard.limits.max_sse_line_bytes);
        let mut pending = VecDeque::new();
        let mut received = 0usize;
        // Read until there is something to send: only then is the client committed to this model.
        while pending.is_empty() {
            match upstream.next().await {
                Some(Ok(bytes)) => {
                    received += bytes.len();
                    if received > max {
                        return Err(Failure::retryable(
                            "too_large",
                            format!(
                                "the stream is longer than {max} bytes (GATEWAY_MAX_ANSWER_BYTES)"
                            ),
                        ));
                    }
                    let chunks = converter.push(&bytes).map_err(|e| Failure {
                        message: e.to_string(),
                        retryable: true,
                        status: None,
                        kind: "stream",
                    })?;
                    match mode {
                        Mode::Unified => pending.extend(chunks.iter().map(sse_event)),
                        Mode::AnthropicPassthrough => {
                            if !bytes.is_empty() {
                                pending.push_back(bytes)
                            }
                        }
                    }
                }
                Some(Err(e)) => return Err(transport_failure(e)),
                None => {
                    return Err(Failure {
                        message: "the stream ended before any event".into(),
                        retryable: true,
                        status: None,
                        kind: "stream",
                    });
                }
            }
        }
        Ok(Opened {
            upstream,
            converter,
            pending,
            mode,
            provider: up.provider_name(),
            received,
            slot: None,
        })
    };
    tokio::time::timeout(g.attempt_timeout, open)
        .await
        .map_err(|_| timeout_failure(g.attempt_timeout))?
}

/// Streams the rest to the client; the attempt and the invocation end with the stream (or when
/// the client goes away, which drops them).
struct Streaming {
    g: Shared,
    call: Call,
    opened: Opened,
    attempt: Option<Attempt>,
    invocation: Option<Invocation>,
    started: Instant,
    done: bool,
    /// Ends a stream whose provider fell silent (GATEWAY_STREAM_IDLE_TIMEOUT_SECONDS); reset at
    /// each piece received.
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Streaming {
    fn fail(&mut self, kind: &'static str, message: String) {
        self.g.metrics.upstream_error(self.opened.provider, kind);
        if let Some(a) = self.attempt.take() {
            a.fail(kind, &message, None);
        }
        if let Some(i) = self.invocation.take() {
            i.finish(None, Some(&message));
        }
        let err = serde_json::json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": 502}});
        self.opened.pending.push_back(sse_event(&err));
        self.done = true;
    }

    fn complete(&mut self) {
        match self.opened.converter.finish() {
            Ok(chunks) => {
                if self.opened.mode == Mode::Unified {
                    self.opened.pending.extend(chunks.iter().map(sse_event));
                    self.opened
                        .pending
                        .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                }
            }
            Err(e) => return self.fail("stream", e.to_string()),
        }
        let usage = self.opened.converter.usage();
        if let Some(u) = usage {
            self.g.metrics.tokens(u.input_tokens, u.output_tokens);
        }
        // The aggregated answer is only built, and serialized once, for a trace being built.
        let outputs = match &self.invocation {
            Some(i) if i.is_traced() => i.outputs(&self.opened.converter.aggregated()),
            _ => Default::default(),
        };
        if let Some(a) = self.attempt.take() {
            a.succeed_with(usage.map(token_usage), Some(&outputs));
        }
        if let Some(i) = self.invocation.take() {
            i.finish_with(Some(&outputs), None);
        }
        self.done = true;
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        // Counted when the stream ends, however it ends (a client gone away included).
        record(&self.g, self.call.route, StatusCode::OK, Some(self.started));
    }
}

fn stream_response(
    g: Shared,
    call: Call,
    opened: Opened,
    attempt: Attempt,
    invocation: Invocation,
    trace_id: Option<String>,
    started: Instant,
) -> Response {
    let idle = g.guard.limits.stream_idle_timeout;
    let state = Streaming {
        g,
        call,
        opened,
        attempt: Some(attempt),
        invocation: Some(invocation),
        started,
        done: false,
        idle: Box::pin(tokio::time::sleep(idle)),
    };
    let body = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(b) = st.opened.pending.pop_front() {
                return Some((Ok::<Bytes, Infallible>(b), st));
            }
            if st.done {
                return None;
            }
            let next = tokio::select! {
                next = st.opened.upstream.next() => next,
                () = st.idle.as_mut() => {
                    let after = st.g.guard.limits.stream_idle_timeout;
                    st.fail("timeout", format!(
                        "the provider sent nothing for {} s (GATEWAY_STREAM_IDLE_TIMEOUT_SECONDS)",
                        after.as_secs()
                    ));
                    continue;
                }
            };
            match next {
                Some(Ok(bytes)) => {
                    let idle = st.g.guard.limits.stream_idle_timeout;
                    st.idle.as_mut().reset(tokio::time::Instant::now() + idle);
                    let max = st.g.guard.limits.max_answer_bytes;
                    if let Err(f) = st.opened.count(&bytes, max) {
                        st.fail(f.kind, f.message);
                        continue;
                    }
                    match st.opened.converter.push(&bytes) {
                        Ok(chunks) => match st.opened.mode {
                            Mode::Unified => st.opened.pending.extend(chunks.iter().map(sse_event)),
                            Mode::AnthropicPassthrough => st.opened.pending.push_back(bytes),
                        },
                        Err(e) => st.fail("stream", e.to_string()),
                    }
                }
                Some(Err(e)) => st.fail("stream", e.message),
                None => st.complete(),
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(id) = trace_id
        .as_deref()
        .and_then(|id| HeaderValue::from_str(id).ok())
    {
        h.insert(TRACE_ID_HEADER, id);
    }
    resp
}
