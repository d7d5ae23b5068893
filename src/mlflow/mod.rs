//! The MLflow tracking server, as both halves of the project reach it: one validated
//! configuration ([`config`]), one transport with one retry policy ([`transport`]), and the
//! experiments API on top ([`experiments`], its errors in [`error`]), workspaces
//! ([`workspaces`]), and the users API the per-endpoint trace credentials need ([`users`]). The
//! gateway's trace export
//! (`crate::gateway::tracing`) sends through the same [`Transport`].
//!
//! Credentials never appear in `Debug` output, error messages or logs.

pub mod config;
pub mod error;
pub mod experiments;
pub mod transport;
pub mod users;
pub mod workspaces;

pub use config::{
    Auth, CaBundle, ConfigError, DEFAULT_USER_AGENT, ENV_INSECURE_TLS, ENV_PASSWORD,
    ENV_SERVER_CERT_PATH, ENV_TOKEN, ENV_TRACKING_URI, ENV_USERNAME, MLFLOW_TLS_SETTINGS,
    MlflowConfig, MlflowConfigBuilder, TlsSettingNames, TlsTrust, read_ca_bundle,
};
pub use error::{ErrorCode, MlflowError};
pub use experiments::{
    ApiCall, CallObserver, Experiment, ExperimentPage, LifecycleStage, MlflowClient, ViewType,
    is_write_call,
};
pub use transport::{Answer, NoAnswer, RetryPolicy, Transport};
pub use users::{Account, Grant, Permission};
pub use workspaces::{
    DEFAULT_WORKSPACE, ENV_WORKSPACE, ServerInfo, WORKSPACE_HEADER, Workspace,
    invalid_workspace_name,
};
