//! The tracking server as the trace export reaches it: the MLflow transport (URLs, credentials,
//! TLS, User-Agent, timeout) plus the experiment header every export request carries. The OTLP
//! requests and the trace-info requests go through it. With an MLflow workspace, both carry
//! `X-MLFLOW-WORKSPACE` (the server scopes experiment ids by it).

use std::fmt;
use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue, StatusCode};
use opentelemetry_http::{Bytes, Request};

use super::schema::EXPERIMENT_ID_HEADER;
use crate::mlflow::{Transport, WORKSPACE_HEADER};

/// The export's requests to one experiment. Cheap to clone.
#[derive(Clone)]
pub(super) struct ExportHttp {
    pub(super) transport: Arc<Transport>,
    experiment_id: HeaderValue,
    /// The MLflow workspace of the experiment; `None`: no header (a server without workspaces
    /// answers any such header with 500).
    workspace: Option<HeaderValue>,
}

impl fmt::Debug for ExportHttp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportHttp")
            .field("experiment_id", &self.experiment_id)
            .field("workspace", &self.workspace)
            .field("transport", &self.transport)
            .finish()
    }
}

impl ExportHttp {
    /// None when `experiment_id` is not usable in a header.
    pub(super) fn new(transport: Arc<Transport>, experiment_id: &str) -> Option<Self> {
        Some(ExportHttp {
            transport,
            experiment_id: HeaderValue::from_str(experiment_id).ok()?,
            workspace: None,
        })
    }

    /// The same, sending `X-MLFLOW-WORKSPACE: <workspace>` too. None when the name is not
    /// usable in a header.
    pub(super) fn in_workspace(mut self, workspace: Option<&str>) -> Option<Self> {
        self.workspace = match workspace {
            None => None,
            Some(w) => Some(HeaderValue::from_str(w).ok()?),
        };
        Some(self)
    }

    /// Sends `request` with the experiment header, and reads the answer, within the export
    /// timeout. The error is a reason for a log line: it holds no header.
    pub(super) async fn send(
        &self,
        mut request: Request<Bytes>,
    ) -> Result<(StatusCode, Bytes), String> {
        request.headers_mut().insert(
            HeaderName::from_static(EXPERIMENT_ID_HEADER),
            self.experiment_id.clone(),
        );
        if let Some(workspace) = &self.workspace {
            request
                .headers_mut()
                .insert(HeaderName::from_static(WORKSPACE_HEADER), workspace.clone());
        }
        let answer = self.transport.send(request).await.map_err(|e| e.reason)?;
        Ok((answer.status, answer.body))
    }
}
