//! Failed MLflow calls, typed by MLflow's `error_code` and never by the HTTP status alone: MLflow
//! answers `RESOURCE_ALREADY_EXISTS`, `INVALID_PARAMETER_VALUE` and `BAD_REQUEST` all with HTTP
//! 400, and `INVALID_STATE` with HTTP 500. An answer that is not MLflow's (a proxy's HTML page) is
//! a protocol error with a readable excerpt. Messages never hold credentials.

use std::fmt;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::transport::is_transient_status;

/// MLflow's `error_code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    ResourceAlreadyExists,
    ResourceDoesNotExist,
    InvalidParameterValue,
    BadRequest,
    PermissionDenied,
    InvalidState,
    Other(String),
}

impl ErrorCode {
    pub fn parse(code: &str) -> Self {
        match code {
            "RESOURCE_ALREADY_EXISTS" => ErrorCode::ResourceAlreadyExists,
            "RESOURCE_DOES_NOT_EXIST" => ErrorCode::ResourceDoesNotExist,
            "INVALID_PARAMETER_VALUE" => ErrorCode::InvalidParameterValue,
            "BAD_REQUEST" => ErrorCode::BadRequest,
            "PERMISSION_DENIED" => ErrorCode::PermissionDenied,
            "INVALID_STATE" => ErrorCode::InvalidState,
            other => ErrorCode::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::ResourceAlreadyExists => "RESOURCE_ALREADY_EXISTS",
            ErrorCode::ResourceDoesNotExist => "RESOURCE_DOES_NOT_EXIST",
            ErrorCode::InvalidParameterValue => "INVALID_PARAMETER_VALUE",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::InvalidState => "INVALID_STATE",
            ErrorCode::Other(s) => s,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed MLflow call. `call` is the REST call, e.g. `experiments/create`.
#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    /// MLflow answered with an error body, typed by its `error_code`.
    #[error("MLflow {call}: {code} (HTTP {status}): {message}")]
    Api {
        call: &'static str,
        status: u16,
        code: ErrorCode,
        message: String,
    },
    /// HTTP 401: missing or wrong credentials.
    #[error(
        "MLflow {call}: not authenticated (HTTP 401): check MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
    )]
    Unauthenticated { call: &'static str },
    /// The server could not be reached, or did not answer in time (after retries).
    #[error("MLflow {call}: tracking server unavailable: {reason}")]
    Unavailable { call: &'static str, reason: String },
    /// An answer that is not MLflow's (e.g. an HTML error page from a proxy) or cannot be decoded.
    #[error("MLflow {call}: unexpected answer (HTTP {status}): {message}")]
    Protocol {
        call: &'static str,
        status: u16,
        message: String,
    },
}

impl MlflowError {
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            MlflowError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            MlflowError::Api { status, .. } | MlflowError::Protocol { status, .. } => Some(*status),
            MlflowError::Unauthenticated { .. } => Some(401),
            MlflowError::Unavailable { .. } => None,
        }
    }

    pub fn is_already_exists(&self) -> bool {
        self.code() == Some(&ErrorCode::ResourceAlreadyExists)
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Some(&ErrorCode::ResourceDoesNotExist)
    }

    /// Connection errors, timeouts, HTTP 429/502/503/504: worth retrying later.
    pub fn is_transient(&self) -> bool {
        match self {
            MlflowError::Unavailable { .. } => true,
            MlflowError::Api { status, .. } | MlflowError::Protocol { status, .. } => {
                is_transient_status(*status)
            }
            MlflowError::Unauthenticated { .. } => false,
        }
    }

    /// A short stable label for metrics and conditions.
    pub fn label(&self) -> &'static str {
        match self {
            MlflowError::Unauthenticated { .. } => "unauthenticated",
            MlflowError::Unavailable { .. } => "unavailable",
            MlflowError::Api { status: 429, .. } | MlflowError::Protocol { status: 429, .. } => {
                "rate_limited"
            }
            MlflowError::Api { code, status, .. } => match code {
                ErrorCode::ResourceAlreadyExists => "already_exists",
                ErrorCode::ResourceDoesNotExist => "not_found",
                ErrorCode::InvalidParameterValue => "invalid_parameter",
                ErrorCode::BadRequest => "bad_request",
                ErrorCode::PermissionDenied => "permission_denied",
                ErrorCode::InvalidState => "invalid_state",
                ErrorCode::Other(_) if is_transient_status(*status) => "unavailable",
                ErrorCode::Other(_) => "api_error",
            },
            MlflowError::Protocol { status, .. } if is_transient_status(*status) => "unavailable",
            MlflowError::Protocol { .. } => "protocol_error",
        }
    }

    pub fn call(&self) -> &'static str {
        match self {
            MlflowError::Api { call, .. }
            | MlflowError::Unauthenticated { call }
            | MlflowError::Unavailable { call, .. }
            | MlflowError::Protocol { call, .. } => call,
        }
    }
}

/// Longest message kept from an answer (MLflow's messages may carry whole SQL statements).
const MAX_MESSAGE_BYTES: usize = 1000;

/// A readable excerpt of a non-MLflow answer: an HTML page's title, else its first words.
fn excerpt(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        return "empty body".to_string();
    }
    let lower = body.to_ascii_lowercase();
    if let (Some(start), Some(end)) = (lower.find("<title>"), lower.find("</title>")) {
        let start = start + "<title>".len();
        if start <= end {
            return format!(
                "HTML page \"{}\"",
                crate::text::truncate(body[start..end].trim(), 200)
            );
        }
    }
    let flat = body.split_whitespace().collect::<Vec<_>>().join(" ");
    crate::text::truncate(&flat, 200)
}

#[derive(Deserialize)]
struct ErrorBody {
    error_code: String,
    #[serde(default)]
    message: Option<String>,
}

/// Types an error answer (status >= 300) by MLflow's `error_code`.
pub(super) fn classify(call: &'static str, status: u16, body: &str) -> MlflowError {
    if status == 401 {
        return MlflowError::Unauthenticated { call };
    }
    if let Ok(err) = serde_json::from_str::<ErrorBody>(body)
        && !err.error_code.is_empty()
    {
        return MlflowError::Api {
            call,
            status,
            code: ErrorCode::parse(&err.error_code),
            message: crate::text::truncate(
                err.message.as_deref().unwrap_or("").trim(),
                MAX_MESSAGE_BYTES,
            ),
        };
    }
    match status {
        // MLflow's basic-auth app answers a plain-text "Permission denied".
        403 => MlflowError::Api {
            call,
            status,
            code: ErrorCode::PermissionDenied,
            message: excerpt(body),
        },
        404 => MlflowError::Protocol {
            call,
            status,
            message: format!(
                "{} (no such endpoint: is MLFLOW_TRACKING_URI the tracking server's base URL, including any path prefix?)",
                excerpt(body)
            ),
        },
        _ => MlflowError::Protocol {
            call,
            status,
            message: excerpt(body),
        },
    }
}

/// Decodes a success answer.
pub(super) fn decode<T: DeserializeOwned>(
    call: &'static str,
    status: u16,
    body: &str,
) -> Result<T, MlflowError> {
    let text = if body.trim().is_empty() { "{}" } else { body };
    serde_json::from_str(text).map_err(|e| {
        let hint = if body.trim_start().starts_with('<') {
            format!(
                "expected JSON, got {} (is MLFLOW_TRACKING_URI the tracking server's base URL, including any path prefix?)",
                excerpt(body)
            )
        } else {
            format!("cannot decode the answer ({e}): {}", excerpt(body))
        };
        MlflowError::Protocol {
            call,
            status,
            message: hint,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, code: &str) -> MlflowError {
        classify(
            "experiments/create",
            status,
            &format!(r#"{{"error_code": "{code}", "message": "m"}}"#),
        )
    }

    #[test]
    fn classifies_mlflow_error_bodies_by_code() {
        let e = api(400, "RESOURCE_ALREADY_EXISTS");
        assert!(e.is_already_exists());
        assert!(!e.is_not_found());
        assert_eq!(e.label(), "already_exists");
        assert_eq!(e.call(), "experiments/create");
        assert_eq!(e.status(), Some(400));

        let e = api(404, "RESOURCE_DOES_NOT_EXIST");
        assert!(e.is_not_found());
        assert_eq!(e.label(), "not_found");

        assert_eq!(
            api(400, "INVALID_PARAMETER_VALUE").code(),
            Some(&ErrorCode::InvalidParameterValue)
        );
        assert_eq!(api(400, "BAD_REQUEST").code(), Some(&ErrorCode::BadRequest));
        assert_eq!(api(400, "BAD_REQUEST").label(), "bad_request");
        assert_eq!(
            api(403, "PERMISSION_DENIED").code(),
            Some(&ErrorCode::PermissionDenied)
        );
        let e = api(500, "INVALID_STATE");
        assert_eq!(e.code(), Some(&ErrorCode::InvalidState));
        assert!(!e.is_transient());
        assert_eq!(e.label(), "invalid_state");
        let e = api(500, "INTERNAL_ERROR");
        assert_eq!(e.code(), Some(&ErrorCode::Other("INTERNAL_ERROR".into())));
        assert_eq!(e.label(), "api_error");
        assert!(e.to_string().contains("INTERNAL_ERROR"), "{e}");
    }

    #[test]
    fn classifies_the_real_server_answers() {
        let body = r#"{"error_code": "RESOURCE_ALREADY_EXISTS", "message": "Experiment(name=p1) already exists. Error: (sqlite3.IntegrityError) UNIQUE constraint failed", "sqlstate": "KAM00", "error_class": "RESOURCE_ALREADY_EXISTS"}"#;
        let e = classify("experiments/create", 400, body);
        match &e {
            MlflowError::Api {
                status: 400,
                code: ErrorCode::ResourceAlreadyExists,
                message,
                ..
            } => assert!(message.starts_with("Experiment(name=p1) already exists")),
            other => panic!("{other:?}"),
        }

        // The basic-auth app's 401 and 403 are plain text.
        let e = classify(
            "experiments/get",
            401,
            "You are not authenticated. Please see https://www.mlflow.org/docs/latest/auth/index.html",
        );
        assert!(matches!(
            e,
            MlflowError::Unauthenticated {
                call: "experiments/get"
            }
        ));
        assert_eq!(e.label(), "unauthenticated");
        assert!(!e.is_transient());
        assert!(e.to_string().contains("MLFLOW_TRACKING_USERNAME"), "{e}");
        assert!(e.to_string().contains("MLFLOW_TRACKING_TOKEN"), "{e}");
        let e = classify(
            "experiments/get",
            401,
            r#"{"error_code":"UNAUTHENTICATED"}"#,
        );
        assert!(matches!(e, MlflowError::Unauthenticated { .. }));

        let e = classify("experiments/set-experiment-tag", 403, "Permission denied");
        assert_eq!(e.code(), Some(&ErrorCode::PermissionDenied));
        assert_eq!(e.label(), "permission_denied");
    }

    #[test]
    fn classifies_foreign_answers_as_protocol_errors() {
        let html = "<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>";
        let e = classify("experiments/get", 502, html);
        match &e {
            MlflowError::Protocol {
                status: 502,
                message,
                ..
            } => assert!(message.contains("502 Bad Gateway"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(e.is_transient());
        assert_eq!(e.label(), "unavailable");
        assert_eq!(e.code(), None);

        // A 404 that is not MLflow's: a wrong path prefix, not a missing experiment.
        let e = classify(
            "experiments/get",
            404,
            "<!doctype html><title>404 Not Found</title><h1>Not Found</h1>",
        );
        assert!(matches!(e, MlflowError::Protocol { status: 404, .. }));
        assert!(!e.is_not_found());
        assert!(e.to_string().contains("path prefix"), "{e}");

        let e = classify("experiments/get", 500, "Internal Server Error");
        assert!(matches!(e, MlflowError::Protocol { status: 500, .. }));
        assert!(!e.is_transient());
        assert_eq!(e.label(), "protocol_error");

        let e = classify("experiments/get", 503, "");
        assert!(e.is_transient());
        assert!(e.to_string().contains("empty body"), "{e}");

        // JSON without an error_code is not an MLflow error body.
        let e = classify("experiments/get", 400, r#"{"detail":"nope"}"#);
        assert!(matches!(e, MlflowError::Protocol { status: 400, .. }));

        let e = classify(
            "experiments/get",
            429,
            r#"{"error_code":"REQUEST_LIMIT_EXCEEDED"}"#,
        );
        assert!(e.is_transient());
        assert_eq!(e.label(), "rate_limited");
    }

    #[test]
    fn long_messages_are_truncated() {
        let body = format!(
            r#"{{"error_code":"BAD_REQUEST","message":"{}"}}"#,
            "é".repeat(5000)
        );
        match classify("experiments/update", 400, &body) {
            MlflowError::Api { message, .. } => {
                assert!(message.len() <= MAX_MESSAGE_BYTES, "{}", message.len());
                assert!(message.ends_with('…'));
            }
            other => panic!("{other:?}"),
        }
        let e = classify("experiments/get", 502, &"x ".repeat(10_000));
        assert!(e.to_string().len() < 400, "{e}");
    }

    #[test]
    fn transient_errors() {
        let unavailable = MlflowError::Unavailable {
            call: "experiments/get",
            reason: "connection refused".into(),
        };
        assert!(unavailable.is_transient());
        assert_eq!(unavailable.label(), "unavailable");
        assert_eq!(unavailable.status(), None);
        for status in [429, 502, 503, 504] {
            assert!(classify("c", status, "x").is_transient(), "{status}");
            assert!(
                api(status, "TEMPORARILY_UNAVAILABLE").is_transient(),
                "{status}"
            );
        }
        for status in [400, 403, 404, 409, 500, 501] {
            assert!(!classify("c", status, "x").is_transient(), "{status}");
        }
        assert!(!api(400, "RESOURCE_ALREADY_EXISTS").is_transient());
        assert!(!api(500, "INVALID_STATE").is_transient());
        assert!(!classify("c", 401, "").is_transient());
    }
}
