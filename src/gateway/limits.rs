//! What the gateway holds for its callers and providers, bounded: requests in flight, a memory
//! budget shared by request bodies and buffered upstream answers, and the timeouts for slow
//! clients and silent streams.
//!
//! The providers' conversions work on a parsed JSON tree, whose size is not the body's: ten
//! megabytes of `[0,0,...]` make hundreds of megabytes of tree. So a body is charged to the budget
//! as its bytes arrive (a half-sent body holds only what it sent), then for the tree it will
//! become, estimated by one pass over its bytes ([`parse_cost`]) before it is parsed. Refusing
//! early (503 when the budget is spent now, 413 when one body alone exceeds it) keeps the process
//! under its memory limit whatever comes in. Every check is an atomic operation on a semaphore;
//! nothing is allocated for it on the way of a request.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::openai_error;

/// The limits' settings (all from the gateway's flags/environment).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Invocations in flight (streams included) beyond which a request is answered 503.
    pub max_concurrent_requests: usize,
    /// Bytes of request bodies, their parsed trees and buffered upstream answers held at once.
    pub memory_budget_bytes: usize,
    /// Largest request body (413 beyond).
    pub max_body_bytes: usize,
    /// Largest upstream answer, whole or streamed (502 beyond).
    pub max_answer_bytes: usize,
    /// Longest line (or event) of an upstream server-sent-event stream (502 beyond).
    pub max_sse_line_bytes: usize,
    /// Longest silence of an upstream stream after its first event.
    pub stream_idle_timeout: Duration,
    /// Time a client has to send its request headers, and then its body.
    pub request_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_concurrent_requests: 128,
            memory_budget_bytes: 96 << 20,
            max_body_bytes: 10 << 20,
            max_answer_bytes: 32 << 20,
            max_sse_line_bytes: 1 << 20,
            stream_idle_timeout: Duration::from_secs(120),
            request_read_timeout: Duration::from_secs(30),
        }
    }
}

/// The memory budget for a container memory limit: 3/8 of it (96 MiB of the default 256 MiB),
/// leaving the rest to the process itself, connections, the trace queue and the allocator's
/// slack; 96 MiB without a limit.
pub fn budget_for(memory_limit: Option<u64>) -> usize {
    match memory_limit {
        Some(limit) => usize::try_from(limit / 8 * 3)
            .unwrap_or(usize::MAX)
            .max(1 << 20),
        None => 96 << 20,
    }
}

/// Bytes charged per JSON value of a parsed tree: a `serde_json::Value` is 32 bytes, an array's
/// storage may hold up to twice its elements, and an object's entry adds its key and map node.
const VALUE_BYTES: usize = 80;
/// The budget counts in KiB, so that a semaphore's `u32` permits cover any budget.
const UNIT: usize = 1024;

/// The shared counters behind [`Limits`].
#[derive(Debug)]
pub struct Guard {
    pub limits: Limits,
    slots: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    memory_units: usize,
}

/// Memory charged to the budget, given back when dropped.
#[derive(Debug, Default)]
pub struct Charge(Option<OwnedSemaphorePermit>);

/// One invocation's place among those in flight.
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

fn units(bytes: usize) -> usize {
    bytes.div_ceil(UNIT)
}

impl Guard {
    pub fn new(limits: Limits) -> Self {
        let memory_units = units(limits.memory_budget_bytes).clamp(1, u32::MAX as usize);
        Guard {
            slots: Arc::new(Semaphore::new(
                limits
                    .max_concurrent_requests
                    .clamp(1, Semaphore::MAX_PERMITS),
            )),
            memory: Arc::new(Semaphore::new(memory_units)),
            memory_units,
            limits,
        }
    }

    /// A place for one more invocation, if there is one.
    pub fn slot(&self) -> Option<Slot> {
        self.slots.clone().try_acquire_owned().ok().map(Slot)
    }

    /// Adds `bytes` to `charge`, if the budget has them now.
    #[must_use]
    pub fn charge(&self, charge: &mut Charge, bytes: usize) -> bool {
        let n = units(bytes);
        if n == 0 {
            return true;
        }
        let Ok(n) = u32::try_from(n) else {
            return false;
        };
        match self.memory.clone().try_acquire_many_owned(n) {
            Ok(p) => {
                match &mut charge.0 {
                    Some(held) => held.merge(p),
                    None => charge.0 = Some(p),
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Whether `bytes` could ever be charged (the whole budget is that large).
    pub fn fits(&self, bytes: usize) -> bool {
        units(bytes) <= self.memory_units
    }
}

/// The gateway is at capacity: 503 with `Retry-After`, in OpenAI's error shape.
pub fn overloaded(what: &str) -> Response {
    let mut resp = openai_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_overloaded",
        format!("the gateway is at capacity: {what}; retry shortly"),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    resp
}

fn too_large(message: String) -> Response {
    openai_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        message,
    )
}

/// Collects a body's pieces. The usual body arrives in one piece, kept as is; pieces are copied
/// only when a second one comes, into room for the whole body reserved at once: the declared
/// length, else the cap. Room reserved and not written is address space, not resident memory,
/// whereas a buffer grown by doubling copies itself and holds both copies for a moment.
pub struct Accumulator {
    first: Option<Bytes>,
    buf: Vec<u8>,
    room: usize,
}

impl Accumulator {
    /// `declared`: the declared length, if any (already checked against `cap`).
    pub fn new(declared: Option<usize>, cap: usize) -> Self {
        Accumulator {
            first: None,
            buf: Vec::new(),
            room: declared.unwrap_or(cap),
        }
    }

    pub fn held(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.buf.len()
    }

    pub fn push(&mut self, data: Bytes) {
        match self.first.take() {
            None if self.buf.is_empty() => self.first = Some(data),
            None => self.buf.extend_from_slice(&data),
            Some(first) => {
                self.buf.reserve(self.room.max(first.len() + data.len()));
                self.buf.extend_from_slice(&first);
                self.buf.extend_from_slice(&data);
            }
        }
    }

    pub fn finish(self) -> Bytes {
        self.first.unwrap_or_else(|| Bytes::from(self.buf))
    }
}

/// Estimated bytes of `json` once parsed into a tree: its text (strings are copied) and a share
/// per value (one pass, counting `[`, `{` and `,` outside strings).
pub fn parse_cost(json: &[u8]) -> usize {
    let mut values = 1usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'[' | b'{' | b',' => values += 1,
                _ => {}
            }
        }
    }
    json.len()
        .saturating_add(values.saturating_mul(VALUE_BYTES))
}

/// Reads a request body within the limits: refused at once when its declared length exceeds the
/// cap, charged as it arrives, given up after the read timeout (408), then charged for its parse.
/// Answers are errors in OpenAI's shape.
pub async fn read_body(
    guard: &Guard,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, Charge), Response> {
    let limits = &guard.limits;
    let max = limits.max_body_bytes;
    let body_too_large = || {
        too_large(format!(
            "request body is larger than the gateway accepts ({max} bytes, GATEWAY_MAX_BODY_BYTES)"
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(body_too_large());
    }
    let mut charge = Charge::default();
    let read = async {
        let mut body = body;
        let mut acc = Accumulator::new(declared, max);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                openai_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!("request body could not be read: {e}"),
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if acc.held() + data.len() > max {
                return Err(body_too_large());
            }
            if !guard.charge(&mut charge, data.len()) {
                return Err(overloaded(
                    "the memory budget is spent (GATEWAY_MEMORY_BUDGET_BYTES)",
                ));
            }
            acc.push(data);
        }
        Ok(acc.finish())
    };
    let bytes = match tokio::time::timeout(limits.request_read_timeout, read).await {
        Ok(read) => read?,
        Err(_) => {
            return Err(openai_error(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "request body not received within {} s (GATEWAY_REQUEST_READ_TIMEOUT_SECONDS)",
                    limits.request_read_timeout.as_secs()
                ),
            ));
        }
    };
    let tree = parse_cost(&bytes) - bytes.len();
    if !guard.fits(bytes.len() + tree) {
        return Err(too_large(format!(
            "request body has too many JSON values for the gateway's memory budget (about {} MiB once parsed; GATEWAY_MEMORY_BUDGET_BYTES)",
            (bytes.len() + tree) >> 20
        )));
    }
    if !guard.charge(&mut charge, tree) {
        return Err(overloaded(
            "the memory budget is spent (GATEWAY_MEMORY_BUDGET_BYTES)",
        ));
    }
    Ok((bytes, charge))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(budget: usize) -> Guard {
        Guard::new(Limits {
            memory_budget_bytes: budget,
            max_concurrent_requests: 2,
            ..Limits::default()
        })
    }

    #[test]
    fn the_parse_cost_counts_values_outside_strings() {
        assert_eq!(parse_cost(b"[0,0,0]"), 7 + 4 * VALUE_BYTES);
        let text = br#"{"a":"x, [y] {z} \" ,"}"#;
        assert_eq!(parse_cost(text), text.len() + 2 * VALUE_BYTES);
    }

    #[test]
    fn the_budget_is_three_eighths_of_the_memory_limit() {
        assert_eq!(budget_for(Some(256 << 20)), 96 << 20);
        assert_eq!(budget_for(Some(1 << 30)), 384 << 20);
        assert_eq!(budget_for(None), 96 << 20);
    }

    #[test]
    fn charges_come_back_when_dropped_and_slots_are_bounded() {
        let g = guard(4 * UNIT);
        let mut a = Charge::default();
        assert!(g.charge(&mut a, 3 * UNIT));
        let mut b = Charge::default();
        assert!(!g.charge(&mut b, 2 * UNIT));
        assert!(g.charge(&mut b, UNIT));
        drop(a);
        assert!(g.charge(&mut b, 2 * UNIT));
        assert!(!g.fits(5 * UNIT));
        let (s1, s2) = (g.slot(), g.slot());
        assert!(s1.is_some() && s2.is_some() && g.slot().is_none());
        drop(s1);
        assert!(g.slot().is_some());
    }

    #[tokio::test]
    async fn a_body_of_tiny_values_beyond_the_budget_is_refused_413() {
        let g = guard(1 << 20);
        let body = format!("{{\"input\":[{}0]}}", "0,".repeat(200_000));
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, body.len().into());
        let err = read_body(&g, &h, Body::from(body)).await.unwrap_err();
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let ok = read_body(&g, &HeaderMap::new(), Body::from("{\"a\":[1,2]}")).await;
        assert!(ok.is_ok());
    }
}
