//! Content capture: what of a request and its answer goes into the spans (`mlflow.spanInputs`,
//! `mlflow.spanOutputs`, error messages). With capture on, the JSON as it came, cut at
//! [`MAX_CONTENT_BYTES`]; with capture off, a summary that holds no text of it (counts of its
//! top-level lists), and error messages reduced to their type and HTTP status, since an upstream
//! message may quote the request.

use std::borrow::Cow;

use super::record::SpanBuf;

/// Longest request or response body kept in a span (bytes of its JSON); longer ones are cut.
pub const MAX_CONTENT_BYTES: usize = 1 << 20;
/// Longest error message kept in a span.
const MAX_MESSAGE_BYTES: usize = 4096;

/// Top-level arrays counted in a content summary.
const SUMMARY_ARRAYS: [&str; 8] = [
    "messages",
    "input",
    "contents",
    "choices",
    "data",
    "content",
    "candidates",
    "output",
];

/// The span attribute for a request or response body: its JSON (cut at [`MAX_CONTENT_BYTES`]),
/// or without `capture`, a summary that holds no text of it.
pub(super) fn content_attribute(value: &serde_json::Value, capture: bool) -> String {
    if capture {
        return cut_content(Cow::Owned(serde_json::to_string(value).unwrap_or_default()));
    }
    content_summary(value)
}

/// JSON text as a span attribute: cut at [`MAX_CONTENT_BYTES`].
pub(super) fn cut_content(json: Cow<'_, str>) -> String {
    if json.len() <= MAX_CONTENT_BYTES {
        return json.into_owned();
    }
    let mut end = MAX_CONTENT_BYTES;
    while !json.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated: {} bytes in all]", &json[..end], json.len())
}

fn content_summary(value: &serde_json::Value) -> String {
    let lists = SUMMARY_ARRAYS
        .iter()
        .filter_map(|&key| match value.get(key) {
            Some(serde_json::Value::Array(items)) => Some((key, items.len())),
            _ => None,
        });
    summary_of(lists)
}

/// `{"content_omitted":true,"<list>":<length>,...}`, the lists in [`SUMMARY_ARRAYS`] order.
pub(super) fn summary_of<'a>(lists: impl Iterator<Item = (&'a str, usize)> + Clone) -> String {
    use std::fmt::Write as _;
    let mut summary = String::from(r#"{"content_omitted":true"#);
    for key in SUMMARY_ARRAYS {
        if let Some((_, len)) = lists.clone().find(|(k, _)| *k == key) {
            let _ = write!(summary, r#","{key}":{len}"#);
        }
    }
    summary.push('}');
    summary
}

/// The message recorded for an error: itself (cut) with content capture, else only its type
/// and status, since upstream messages may quote the request.
pub(super) fn error_message<'a>(
    message: &'a str,
    error_type: &str,
    http_status: Option<u16>,
    capture: bool,
) -> Cow<'a, str> {
    if capture {
        return Cow::Borrowed(crate::text::clip(message, MAX_MESSAGE_BYTES));
    }
    Cow::Owned(match http_status {
        Some(status) => format!("{error_type} (HTTP {status}; message omitted)"),
        None => format!("{error_type} (message omitted)"),
    })
}

/// An "exception" event, as MLflow's `record_exception` writes it; returns the description of
/// the span's status ERROR.
pub(super) fn record_error(span: &mut SpanBuf, error_type: &str, message: Cow<'_, str>) -> String {
    span.exception(error_type, &message);
    format!("{error_type}: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_without_capture_has_no_text() {
        let request = json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "SECRET-SYSTEM-PROMPT"},
                {"role": "user", "content": "SECRET-USER-QUESTION"}
            ],
            "temperature": 0.2
        });
        let summary = content_attribute(&request, false);
        assert_eq!(summary, r#"{"content_omitted":true,"messages":2}"#);
        let response = json!({"choices": [{"message": {"content": "SECRET-ANSWER"}}]});
        assert_eq!(
            content_attribute(&response, false),
            r#"{"content_omitted":true,"choices":1}"#
        );
        assert_eq!(
            content_attribute(&json!("SECRET-STRING"), false),
            r#"{"content_omitted":true}"#
        );
        // Captured: the JSON itself.
        assert!(content_attribute(&request, true).contains("SECRET-USER-QUESTION"));
        // Error messages lose their text without capture.
        let msg = error_message(
            "upstream said: SECRET-USER-QUESTION",
            "UpstreamError",
            Some(400),
            false,
        );
        assert_eq!(msg, "UpstreamError (HTTP 400; message omitted)");
        assert_eq!(
            error_message("boom", "Timeout", None, true),
            Cow::Borrowed("boom")
        );
    }

    #[test]
    fn content_is_cut_at_the_limit() {
        let big = serde_json::Value::String("é".repeat(MAX_CONTENT_BYTES));
        let attr = content_attribute(&big, true);
        assert!(attr.len() < MAX_CONTENT_BYTES + 100);
        assert!(attr.ends_with("bytes in all]"));
    }
}
