//! mlflow-gateway-operator: runs traced LLM gateway endpoints on Kubernetes, each with its
//! experiment in an MLflow tracking server.

pub mod api;
pub mod api_base;
pub mod controller;
pub mod gateway;
pub mod http_client;
pub mod leader;
pub mod mlflow;
pub mod shutdown;
pub mod text;

/// An error and its causes on one line, each cause once (libraries often repeat their source's
/// text in their own message).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
