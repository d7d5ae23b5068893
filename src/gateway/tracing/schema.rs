//! The names MLflow reads from a gateway trace (`mlflow/tracing/constant.py`, `mlflow/gateway/`):
//! span attributes, trace metadata and tags, the headers of the export, and the request types.
//! Written once here so that a misspelt name cannot compile: a wrong one would be stored without
//! error and silently missing from MLflow's UI.

use opentelemetry::trace::TraceId;

/// Header naming the experiment an OTLP request writes to.
pub const EXPERIMENT_ID_HEADER: &str = "x-mlflow-experiment-id";
/// Header a client sets to name itself (MLflow's `X-MLflow-Gateway-Caller`).
pub const CALLER_HEADER: &str = "x-mlflow-gateway-caller";

/// `mlflow.gateway.requestType`: what the client called (MLflow's `GatewayRequestType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestType {
    UnifiedChat,
    UnifiedCompletions,
    UnifiedEmbeddings,
    PassthroughOpenaiChat,
    PassthroughOpenaiEmbeddings,
    PassthroughOpenaiResponses,
    PassthroughAnthropicMessages,
    PassthroughGeminiGenerateContent,
    RawProxy,
}

impl RequestType {
    /// The value MLflow stores.
    pub const fn as_str(self) -> &'static str {
        match self {
            RequestType::UnifiedChat => "unified/chat",
            RequestType::UnifiedCompletions => "unified/completions",
            RequestType::UnifiedEmbeddings => "unified/embeddings",
            RequestType::PassthroughOpenaiChat => "passthrough/model/openai-chat",
            RequestType::PassthroughOpenaiEmbeddings => "passthrough/model/openai-embeddings",
            RequestType::PassthroughOpenaiResponses => "passthrough/model/openai-responses",
            RequestType::PassthroughAnthropicMessages => "passthrough/model/anthropic-messages",
            RequestType::PassthroughGeminiGenerateContent => {
                "passthrough/model/gemini-generateContent"
            }
            RequestType::RawProxy => "proxy/raw",
        }
    }

    /// `mlflow.message.format` for request types whose answers are not OpenAI-shaped (as MLflow's
    /// gateway sets it, so that the UI renders the chat).
    pub const fn message_format(self) -> Option<&'static str> {
        match self {
            RequestType::PassthroughAnthropicMessages => Some("anthropic"),
            RequestType::PassthroughGeminiGenerateContent => Some("gemini"),
            _ => None,
        }
    }
}

impl std::fmt::Display for RequestType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub(super) const ATTR_SPAN_TYPE: &str = "mlflow.spanType";
pub(super) const ATTR_INPUTS: &str = "mlflow.spanInputs";
pub(super) const ATTR_OUTPUTS: &str = "mlflow.spanOutputs";
pub(super) const ATTR_TOKEN_USAGE: &str = "mlflow.chat.tokenUsage";
pub(super) const ATTR_MODEL: &str = "mlflow.llm.model";
pub(super) const ATTR_PROVIDER: &str = "mlflow.llm.provider";
pub(super) const ATTR_MESSAGE_FORMAT: &str = "mlflow.message.format";
pub(super) const ATTR_TRACE_NAME_TAG: &str = "mlflow.traceTag.mlflow.traceName";
pub(super) const ATTR_LINKED_TRACE_ID: &str = "mlflow.gateway.linkedTraceId";
pub(super) const ATTR_ENDPOINT_ID: &str = "endpoint_id";
pub(super) const ATTR_ENDPOINT_NAME: &str = "endpoint_name";
pub(super) const ATTR_METHOD: &str = "method";
pub(super) const ATTR_STREAMING: &str = "streaming";
pub(super) const ATTR_HTTP_STATUS: &str = "http.response.status_code";
/// Root-span attributes that also become trace metadata (through the trace-info request).
pub(super) const META_ENDPOINT_ID: &str = "mlflow.gateway.endpointId";
pub(super) const META_REQUEST_TYPE: &str = "mlflow.gateway.requestType";
pub(super) const META_CALLER: &str = "mlflow.gateway.caller";
/// The authenticated caller, under the keys MLflow's gateway writes from its auth
/// (`mlflow/server/gateway_api.py` `_get_user_metadata`), and the trace's user.
pub(super) const META_AUTH_USERNAME: &str = "mlflow.auth.username";
pub(super) const META_AUTH_USER_ID: &str = "mlflow.auth.userId";
pub(super) const META_TRACE_USER: &str = "mlflow.trace.user";
pub(super) const META_SCHEMA_VERSION: &str = "mlflow.trace_schema.version";
pub(super) const TAG_TRACE_NAME: &str = "mlflow.traceName";
/// A root-span attribute `mlflow.traceTag.<key>` becomes the trace tag `<key>`.
pub(super) const TAG_ATTRIBUTE_PREFIX: &str = "mlflow.traceTag.";
/// The trace's user, as MLflow's OTLP handler reads it from a span.
pub(super) const ATTR_USER_ID: &str = "user.id";

/// MLflow keeps trace metadata values up to this many characters on every backend.
pub(super) const MAX_METADATA_BYTES: usize = 250;

/// `tr-<32 hex>`, MLflow's id of the trace with this OpenTelemetry id.
pub(super) fn mlflow_trace_id(trace_id: TraceId) -> String {
    format!("tr-{trace_id:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_types_are_mlflows_values() {
        assert_eq!(RequestType::UnifiedChat.as_str(), "unified/chat");
        assert_eq!(
            RequestType::PassthroughAnthropicMessages.to_string(),
            "passthrough/model/anthropic-messages"
        );
        assert_eq!(
            RequestType::PassthroughAnthropicMessages.message_format(),
            Some("anthropic")
        );
        assert_eq!(
            RequestType::PassthroughGeminiGenerateContent.message_format(),
            Some("gemini")
        );
        assert_eq!(RequestType::UnifiedChat.message_format(), None);
        assert_eq!(RequestType::PassthroughOpenaiChat.message_format(), None);
        // Each value fits in trace metadata.
        assert!(RequestType::PassthroughGeminiGenerateContent.as_str().len() <= MAX_METADATA_BYTES);
    }

    #[test]
    fn trace_ids() {
        let id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        assert_eq!(mlflow_trace_id(id), "tr-4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
