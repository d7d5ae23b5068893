//! mlflow-gateway-operator: runs traced LLM gateway endpoints on Kubernetes, each with its
//! experiment in an MLflow tracking server.

pub mod api;
pub mod controller;
pub mod experiment;
pub mod gateway;
pub mod metrics;
pub mod mlflow;
pub mod providers;
pub mod telemetry;
