//! A trace as bytes: spans recorded straight into OTLP protobuf (no SDK span objects, no second
//! encoding), the queue *record* that carries one whole trace, and the assembly of a batch of
//! records into one `ExportTraceServiceRequest` body.
//!
//! Protobuf lets a message's fields come in any order and concatenates repeated fields, so a span
//! is one growing buffer: its fixed fields at start, attributes as they are set, end time and
//! status at its end ([`SpanBuf`]). A record ([`encode_record`]) keeps what the trace-info request
//! and the tags of the spans-only mode need in a small header, the children as framed `Span`
//! fields of a `ScopeSpans`, and the root span's body unframed, so that the root can take extra
//! attributes (`mlflow.traceTag.<key>`) at assembly by a copy. Assembling a batch
//! ([`append_resource_spans`]) writes a few length prefixes and copies bytes: no decoding.
//!
//! Field numbers are those of `opentelemetry/proto/trace/v1/trace.proto` and
//! `common/v1/common.proto`; the tests decode the result with the `opentelemetry-proto` types.

use super::schema::TAG_ATTRIBUTE_PREFIX;

/// `Span.kind`.
pub(super) const KIND_SERVER: u64 = 2;
pub(super) const KIND_CLIENT: u64 = 3;
/// `Status.code`.
pub(super) const STATUS_OK: u64 = 1;
pub(super) const STATUS_ERROR: u64 = 2;

const RECORD_VERSION: u8 = 1;
/// Instrumentation scope name of every span (`ScopeSpans.scope`).
const SCOPE_NAME: &str = env!("CARGO_PKG_NAME");

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field's key (field numbers here are all below 16: one byte).
fn put_len_key(out: &mut Vec<u8>, field: u8, len: usize) {
    out.push(field << 3 | 2);
    put_varint(out, len as u64);
}

fn put_bytes(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    put_len_key(out, field, bytes.len());
    out.extend_from_slice(bytes);
}

fn put_fixed64(out: &mut Vec<u8>, field: u8, v: u64) {
    out.push(field << 3 | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_varint_field(out: &mut Vec<u8>, field: u8, v: u64) {
    out.push(field << 3);
    put_varint(out, v);
}

/// Size of a length-delimited field holding `len` bytes.
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// An attribute value.
#[derive(Clone, Copy, Debug)]
pub(super) enum Value<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
}

impl Value<'_> {
    /// Size of the `AnyValue` message.
    fn any_len(&self) -> usize {
        match self {
            Value::Str(s) => field_len(s.len()),
            Value::Bool(_) => 2,
            Value::Int(i) => 1 + varint_len(*i as u64),
        }
    }

    fn put_any(&self, out: &mut Vec<u8>) {
        match self {
            Value::Str(s) => put_bytes(out, 1, s.as_bytes()),
            Value::Bool(b) => put_varint_field(out, 2, u64::from(*b)),
            Value::Int(i) => put_varint_field(out, 3, *i as u64),
        }
    }
}

/// A `KeyValue` (key `prefix` + `key`) as field `field` of its message.
fn put_attribute(out: &mut Vec<u8>, field: u8, prefix: &str, key: &str, value: Value<'_>) {
    let key_len = prefix.len() + key.len();
    let any = value.any_len();
    put_len_key(out, field, field_len(key_len) + field_len(any));
    put_len_key(out, 1, key_len);
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(key.as_bytes());
    put_len_key(out, 2, any);
    value.put_any(out);
}

/// Nanoseconds since the Unix epoch, now.
pub(super) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One span being recorded: the body of an OTLP `Span` message.
#[derive(Debug)]
pub(super) struct SpanBuf {
    buf: Vec<u8>,
}

impl SpanBuf {
    pub(super) fn start(
        trace_id: &[u8; 16],
        span_id: &[u8; 8],
        parent: Option<&[u8; 8]>,
        name: &str,
        kind: u64,
        capacity: usize,
    ) -> Self {
        let mut buf = Vec::with_capacity(capacity + name.len() + 64);
        put_bytes(&mut buf, 1, trace_id);
        put_bytes(&mut buf, 2, span_id);
        if let Some(parent) = parent {
            put_bytes(&mut buf, 4, parent);
        }
        put_bytes(&mut buf, 5, name.as_bytes());
        put_varint_field(&mut buf, 6, kind);
        put_fixed64(&mut buf, 7, now_ns());
        SpanBuf { buf }
    }

    pub(super) fn attribute(&mut self, key: &str, value: Value<'_>) {
        put_attribute(&mut self.buf, 9, "", key, value);
    }

    pub(super) fn str(&mut self, key: &str, value: &str) {
        self.attribute(key, Value::Str(value));
    }

    /// A link to a remote span (field 13).
    pub(super) fn link(&mut self, trace_id: &[u8; 16], span_id: &[u8; 8]) {
        put_len_key(&mut self.buf, 13, field_len(16) + field_len(8));
        put_bytes(&mut self.buf, 1, trace_id);
        put_bytes(&mut self.buf, 2, span_id);
    }

    /// An `exception` event, as MLflow's `record_exception` writes it.
    pub(super) fn exception(&mut self, error_type: &str, message: &str) {
        let attr_len = |key: &str, value: &str| {
            field_len(field_len(key.len()) + field_len(field_len(value.len())))
        };
        let len = 9
            + field_len("exception".len())
            + attr_len("exception.type", error_type)
            + attr_len("exception.message", message);
        put_len_key(&mut self.buf, 11, len);
        put_fixed64(&mut self.buf, 1, now_ns());
        put_bytes(&mut self.buf, 2, b"exception");
        put_attribute(
            &mut self.buf,
            3,
            "",
            "exception.type",
            Value::Str(error_type),
        );
        put_attribute(
            &mut self.buf,
            3,
            "",
            "exception.message",
            Value::Str(message),
        );
    }

    /// Ends the span: end time and status (`message` only for an error). Returns its body.
    pub(super) fn end(mut self, code: u64, message: &str) -> Vec<u8> {
        put_fixed64(&mut self.buf, 8, now_ns());
        let msg_len = if message.is_empty() {
            0
        } else {
            field_len(message.len())
        };
        put_len_key(&mut self.buf, 15, msg_len + 2);
        if !message.is_empty() {
            put_bytes(&mut self.buf, 2, message.as_bytes());
        }
        put_varint_field(&mut self.buf, 3, code);
        self.buf
    }
}

/// Appends a finished span as a framed `ScopeSpans.spans` field.
pub(super) fn append_child(children: &mut Vec<u8>, body: &[u8]) {
    put_bytes(children, 2, body);
}

/// What a record says about its trace beside the spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Head<'a> {
    pub(super) trace_id: [u8; 16],
    pub(super) start_ns: u64,
    pub(super) end_ns: u64,
    pub(super) error: bool,
    pub(super) spans: u32,
    /// The gateway metadata: trace metadata in the info-then-spans mode, trace tags otherwise.
    pub(super) metadata: Vec<(&'a str, &'a str)>,
}

/// One record: version, trace id, times, error flag, span count, the metadata, the framed
/// children, then the root span's body.
pub(super) fn encode_record(head: &Head<'_>, children: &[u8], root: &[u8]) -> Vec<u8> {
    let meta_len: usize = head
        .metadata
        .iter()
        .map(|(k, v)| field_len(k.len()) + field_len(v.len()))
        .sum();
    let mut out = Vec::with_capacity(
        38 + 2 + meta_len + varint_len(children.len() as u64) + children.len() + root.len(),
    );
    out.push(RECORD_VERSION);
    out.extend_from_slice(&head.trace_id);
    out.extend_from_slice(&head.start_ns.to_le_bytes());
    out.extend_from_slice(&head.end_ns.to_le_bytes());
    out.push(u8::from(head.error));
    out.extend_from_slice(&head.spans.to_le_bytes());
    put_varint(&mut out, head.metadata.len() as u64);
    for (k, v) in &head.metadata {
        put_varint(&mut out, k.len() as u64);
        out.extend_from_slice(k.as_bytes());
        put_varint(&mut out, v.len() as u64);
        out.extend_from_slice(v.as_bytes());
    }
    put_varint(&mut out, children.len() as u64);
    out.extend_from_slice(children);
    out.extend_from_slice(root);
    out
}

/// A record read back (borrowing it).
#[derive(Debug)]
pub(super) struct RecordView<'a> {
    pub(super) head: Head<'a>,
    children: &'a [u8],
    root: &'a [u8],
}

impl RecordView<'_> {
    /// About the size of the record's spans in a request.
    pub(super) fn len_hint(&self) -> usize {
        self.children.len() + self.root.len() + 64 * self.head.metadata.len()
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.take(1)?.first()?;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = usize::try_from(self.varint()?).ok()?;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// None for bytes that are not a record of this version (a record from a future version, or
/// damaged: the queue checks its frames, so this is not expected).
pub(super) fn decode_record(bytes: &[u8]) -> Option<RecordView<'_>> {
    let mut r = Reader(bytes);
    if r.take(1)? != [RECORD_VERSION] {
        return None;
    }
    let trace_id: [u8; 16] = r.take(16)?.try_into().ok()?;
    let start_ns = r.u64()?;
    let end_ns = r.u64()?;
    let error = r.take(1)?[0] != 0;
    let spans = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
    let n = r.varint()?;
    let mut metadata = Vec::with_capacity(n.min(16) as usize);
    for _ in 0..n {
        let k = r.str()?;
        let v = r.str()?;
        metadata.push((k, v));
    }
    let children_len = usize::try_from(r.varint()?).ok()?;
    let children = r.take(children_len)?;
    Some(RecordView {
        head: Head {
            trace_id,
            start_ns,
            end_ns,
            error,
            spans,
            metadata,
        },
        children,
        root: r.0,
    })
}

/// Appends the record as one framed `ResourceSpans` (field 1 of `ExportTraceServiceRequest`).
/// `with_tags`: the root span also gets every metadata key as `mlflow.traceTag.<key>`.
pub(super) fn append_resource_spans(out: &mut Vec<u8>, record: &RecordView<'_>, with_tags: bool) {
    let tags_len: usize = if with_tags {
        record
            .head
            .metadata
            .iter()
            .map(|(k, v)| {
                let any = field_len(v.len());
                field_len(field_len(TAG_ATTRIBUTE_PREFIX.len() + k.len()) + field_len(any))
            })
            .sum()
    } else {
        0
    };
    let root_len = record.root.len() + tags_len;
    let scope_len = field_len(SCOPE_NAME.len());
    let scope_spans_len = field_len(scope_len) + record.children.len() + field_len(root_len);
    let resource_spans_len = field_len(scope_spans_len);
    out.reserve(field_len(resource_spans_len));
    put_len_key(out, 1, resource_spans_len);
    put_len_key(out, 2, scope_spans_len);
    put_len_key(out, 1, scope_len);
    put_bytes(out, 1, SCOPE_NAME.as_bytes());
    out.extend_from_slice(record.children);
    put_len_key(out, 2, root_len);
    out.extend_from_slice(record.root);
    if with_tags {
        for (k, v) in &record.head.metadata {
            put_attribute(out, 9, TAG_ATTRIBUTE_PREFIX, k, Value::Str(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use prost::Message as _;

    fn value(kv: &opentelemetry_proto::tonic::common::v1::KeyValue) -> String {
        match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => s.clone(),
            Some(any_value::Value::BoolValue(b)) => b.to_string(),
            Some(any_value::Value::IntValue(i)) => i.to_string(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn records_assemble_into_an_otlp_request() {
        let trace_id = [7u8; 16];
        let mut root = SpanBuf::start(&trace_id, &[1; 8], None, "gateway/chat", KIND_SERVER, 64);
        root.str("mlflow.spanInputs", "{\"a\":\"é\"}");
        root.attribute("streaming", Value::Bool(true));
        root.link(&[9; 16], &[8; 8]);
        let mut child = SpanBuf::start(
            &trace_id,
            &[2; 8],
            Some(&[1; 8]),
            "provider/x",
            KIND_CLIENT,
            64,
        );
        child.attribute("http.response.status_code", Value::Int(429));
        child.exception("UpstreamError", &"m".repeat(300));
        let mut children = Vec::new();
        append_child(
            &mut children,
            &child.end(STATUS_ERROR, "UpstreamError: boom"),
        );
        let root = root.end(STATUS_OK, "");
        let head = Head {
            trace_id,
            start_ns: 5,
            end_ns: 6,
            error: false,
            spans: 2,
            metadata: vec![("mlflow.gateway.caller", "agent"), ("k", "v")],
        };
        let record = encode_record(&head, &children, &root);
        let view = decode_record(&record).unwrap();
        assert_eq!(view.head, head);

        let mut body = Vec::new();
        append_resource_spans(&mut body, &view, false);
        append_resource_spans(&mut body, &view, true);
        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        assert_eq!(request.resource_spans.len(), 2);
        for (i, rs) in request.resource_spans.iter().enumerate() {
            let ss = &rs.scope_spans[0];
            assert_eq!(ss.scope.as_ref().unwrap().name, SCOPE_NAME);
            assert_eq!(ss.spans.len(), 2);
            let child = &ss.spans[0];
            assert_eq!(child.parent_span_id, vec![1; 8]);
            assert_eq!(child.kind, KIND_CLIENT as i32);
            assert_eq!(child.status.as_ref().unwrap().code, 2);
            assert_eq!(
                child.status.as_ref().unwrap().message,
                "UpstreamError: boom"
            );
            assert_eq!(child.events[0].name, "exception");
            assert_eq!(value(&child.events[0].attributes[1]), "m".repeat(300));
            assert_eq!(value(&child.attributes[0]), "429");
            let root = &ss.spans[1];
            assert_eq!(root.trace_id, vec![7; 16]);
            assert!(root.parent_span_id.is_empty());
            assert_eq!(root.name, "gateway/chat");
            assert!(root.end_time_unix_nano >= root.start_time_unix_nano);
            assert_eq!(root.links[0].trace_id, vec![9; 16]);
            assert_eq!(value(&root.attributes[0]), "{\"a\":\"é\"}");
            assert_eq!(value(&root.attributes[1]), "true");
            assert_eq!(root.status.as_ref().unwrap().code, 1);
            let tags: Vec<(String, String)> = root.attributes[2..]
                .iter()
                .map(|kv| (kv.key.clone(), value(kv)))
                .collect();
            if i == 0 {
                assert!(tags.is_empty());
            } else {
                assert_eq!(
                    tags,
                    [
                        (
                            "mlflow.traceTag.mlflow.gateway.caller".to_string(),
                            "agent".to_string()
                        ),
                        ("mlflow.traceTag.k".to_string(), "v".to_string())
                    ]
                );
            }
        }
        assert!(decode_record(&record[..10]).is_none());
        assert!(decode_record(b"").is_none());
    }
}
