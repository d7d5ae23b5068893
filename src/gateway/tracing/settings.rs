//! The trace export's settings: [`TelemetryConfig`] as the gateway's config builds it from the
//! endpoint and the environment, and [`Settings`], the same checked, as the pipeline uses it.

use std::path::PathBuf;
use std::time::Duration;

use axum::http::HeaderValue;

use super::delivery::ExportMode;
use super::schema::MAX_METADATA_BYTES;
use crate::mlflow::{ConfigError, MlflowConfig};

/// Bytes of records per OTLP request, at most (a single larger trace goes alone). Small enough
/// that MLflow stores a batch well within the export timeout when it is short of CPU: in batches
/// of 512 traces (8 MiB) on 2 busy cores it took over 10 s, and a batch resent after a timeout is
/// work done twice.
pub const MAX_BATCH_BYTES: usize = 2 << 20;

/// Where and how one endpoint's invocations are traced.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// Tracking server, auth and TLS.
    pub mlflow: MlflowConfig,
    pub experiment_id: String,
    /// The MLflow workspace the experiment is in (`X-MLFLOW-WORKSPACE` on every export request);
    /// `None` for a server without workspaces.
    pub workspace: Option<String>,
    /// `<endpoint>` in the root span's name `gateway/<endpoint>`.
    pub endpoint_name: String,
    /// Trace metadata `mlflow.gateway.endpointId` (the resource uid).
    pub endpoint_id: String,
    /// `false`: no request or response text anywhere in the trace. Inputs and outputs become
    /// summaries such as `{"content_omitted":true,"messages":3}` (counts of the top-level arrays
    /// `messages`, `input`, `contents`, `choices`, `data`, `content`, `candidates`, `output`), and
    /// error messages (which may quote an upstream answer) are replaced by their error type and
    /// HTTP status.
    pub capture_content: bool,
    /// How traces reach MLflow (`GATEWAY_TRACE_EXPORT_MODE`).
    pub export_mode: ExportMode,
    /// The queue's directory (`GATEWAY_TRACE_QUEUE_DIR`); None: in memory only.
    pub queue_dir: Option<PathBuf>,
    /// Bytes the queue holds at most (`GATEWAY_TRACE_QUEUE_MAX_BYTES`); traces beyond are
    /// dropped whole and counted.
    pub queue_max_bytes: u64,
    /// Traces per OTLP request, at most.
    pub max_export_batch: usize,
    /// Time limit of one OTLP request (and of one trace-info request).
    pub export_timeout: Duration,
}

impl TelemetryConfig {
    pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 256 << 20;
    pub const DEFAULT_MAX_EXPORT_BATCH: usize = 64;
    pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Content captured, the default mode, a memory queue, default batch and timeout.
    pub fn new(
        mlflow: MlflowConfig,
        experiment_id: impl Into<String>,
        endpoint_name: impl Into<String>,
        endpoint_id: impl Into<String>,
    ) -> Self {
        TelemetryConfig {
            mlflow,
            experiment_id: experiment_id.into(),
            workspace: None,
            endpoint_name: endpoint_name.into(),
            endpoint_id: endpoint_id.into(),
            capture_content: true,
            export_mode: ExportMode::default(),
            queue_dir: None,
            queue_max_bytes: Self::DEFAULT_QUEUE_MAX_BYTES,
            max_export_batch: Self::DEFAULT_MAX_EXPORT_BATCH,
            export_timeout: Self::DEFAULT_EXPORT_TIMEOUT,
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("Telemetry::new must be called inside a tokio runtime")]
    NoRuntime,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid telemetry setting: {0}")]
    Invalid(String),
    #[error("cannot open the trace queue: {0}")]
    Queue(String),
}

/// A [`TelemetryConfig`], checked, as the pipeline uses it.
pub(super) struct Settings {
    pub(super) capture_content: bool,
    pub(super) export_mode: ExportMode,
    pub(super) queue_dir: Option<PathBuf>,
    pub(super) queue_max_bytes: u64,
    pub(super) max_export_batch: usize,
    pub(super) export_timeout: Duration,
    pub(super) experiment_id: String,
    pub(super) endpoint_id: String,
    pub(super) endpoint_name: String,
    pub(super) root_name: String,
}

impl Settings {
    pub(super) fn from_config(config: &TelemetryConfig) -> Result<Self, TelemetryError> {
        if config.experiment_id.trim().is_empty() {
            return Err(TelemetryError::Invalid(
                "experiment_id is empty".to_string(),
            ));
        }
        if HeaderValue::from_str(&config.experiment_id).is_err() {
            return Err(TelemetryError::Invalid(
                "experiment_id is not usable in an HTTP header".to_string(),
            ));
        }
        if config.endpoint_name.is_empty() {
            return Err(TelemetryError::Invalid(
                "endpoint_name is empty".to_string(),
            ));
        }
        if config.queue_max_bytes == 0 || config.max_export_batch == 0 {
            return Err(TelemetryError::Invalid(
                "queue_max_bytes and max_export_batch must be at least 1".to_string(),
            ));
        }
        if config.export_timeout.is_zero() {
            return Err(TelemetryError::Invalid(
                "export_timeout must be positive".to_string(),
            ));
        }
        Ok(Settings {
            capture_content: config.capture_content,
            export_mode: config.export_mode,
            queue_dir: config.queue_dir.clone(),
            queue_max_bytes: config.queue_max_bytes,
            max_export_batch: config.max_export_batch,
            export_timeout: config.export_timeout,
            experiment_id: config.experiment_id.clone(),
            endpoint_id: crate::text::clip(&config.endpoint_id, MAX_METADATA_BYTES).to_string(),
            endpoint_name: config.endpoint_name.clone(),
            root_name: format!("gateway/{}", config.endpoint_name),
        })
    }
}
