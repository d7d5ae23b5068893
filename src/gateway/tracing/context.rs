//! What a trace takes from the incoming request: the caller's name (trace metadata
//! `mlflow.gateway.caller`) and the W3C `traceparent` (a link to the caller's span), each read as
//! MLflow's gateway reads it.

use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

use super::schema::{CALLER_HEADER, MAX_METADATA_BYTES};

/// The caller's name, as MLflow's gateway derives it: the `X-MLflow-Gateway-Caller` header,
/// else the product token of the `User-Agent` (the part before the first `/`). Trimmed, control
/// characters removed, at most 250 characters; None when nothing is left.
pub fn caller_from(caller_header: Option<&str>, user_agent: Option<&str>) -> Option<String> {
    if let Some(caller) = caller_header.and_then(clean_caller) {
        return Some(caller);
    }
    user_agent
        .and_then(|ua| ua.split('/').next())
        .and_then(clean_caller)
}

/// [`caller_from`] on a request's headers.
pub fn caller_from_headers(headers: &axum::http::HeaderMap) -> Option<String> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    caller_from(get(CALLER_HEADER), get("user-agent"))
}

/// A W3C `traceparent` value as the remote span context it names; None when it is malformed
/// (wrong length or field count, not lowercase hex, all-zero ids, version `ff`).
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut fields = value.trim().split('-');
    let version = fields.next()?;
    let trace_id = fields.next()?;
    let span_id = fields.next()?;
    let flags = fields.next()?;
    // Version 00 has exactly four fields; a later version may append more.
    if version == "00" && fields.next().is_some() {
        return None;
    }
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2) || version == "ff" || !hex(trace_id, 32) || !hex(span_id, 16) {
        return None;
    }
    if !hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        TraceState::default(),
    ))
}

/// A caller's name as metadata: trimmed, control characters removed, at most 250 characters;
/// None when nothing is left.
pub(super) fn clean_caller(raw: &str) -> Option<String> {
    let cleaned: String = raw.trim().chars().filter(|c| !c.is_control()).collect();
    let cleaned = cleaned.trim();
    (!cleaned.is_empty()).then(|| crate::text::clip(cleaned, MAX_METADATA_BYTES).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_valid() {
        let sc = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(
            format!("{:032x}", sc.trace_id()),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(format!("{:016x}", sc.span_id()), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        assert!(sc.is_remote());
        let unsampled =
            parse_traceparent(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00 ")
                .expect("valid with spaces");
        assert!(!unsampled.is_sampled());
        // A later version may append fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
    }

    #[test]
    fn traceparent_malformed() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47g6-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn caller_extraction() {
        assert_eq!(
            caller_from(Some("my-agent"), Some("curl/8.0")),
            Some("my-agent".to_string())
        );
        assert_eq!(
            caller_from(None, Some("OpenAI/Python 1.40.0")),
            Some("OpenAI".to_string())
        );
        assert_eq!(
            caller_from(Some("  "), Some(" python-requests/2.31")),
            Some("python-requests".to_string())
        );
        assert_eq!(caller_from(None, Some("/1.0")), None);
        assert_eq!(caller_from(None, None), None);
        assert_eq!(caller_from(Some("a\u{7}b\n"), None), Some("ab".to_string()));
        let long = "x".repeat(400);
        assert_eq!(
            caller_from(Some(&long), None).map(|c| c.len()),
            Some(MAX_METADATA_BYTES)
        );
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("user-agent", "claude-cli/1.2 (external)".parse().unwrap());
        assert_eq!(
            caller_from_headers(&headers),
            Some("claude-cli".to_string())
        );
        headers.insert(CALLER_HEADER, "nightly-eval".parse().unwrap());
        assert_eq!(
            caller_from_headers(&headers),
            Some("nightly-eval".to_string())
        );
    }
}
