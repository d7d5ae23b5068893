//! The tracking server as the trace export reaches it: the MLflow transport (URLs, credentials,
//! TLS, User-Agent, timeout) plus the experiment header every export request carries. It is the
//! OTLP exporter's HTTP client, and the trace-info client sends through it too. With an MLflow
//! workspace, both carry `X-MLFLOW-WORKSPACE` (the server scopes experiment ids by it).

use std::fmt;
use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue, StatusCode};
use opentelemetry_http::{Bytes, HttpError, Request, Response};

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

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (status, body) = self.send(request).await.map_err(HttpError::from)?;
        // An error answer is only quoted in a log line: keep it short.
        let body = if status.is_success() {
            body
        } else {
            body.slice(..body.len().min(300))
        };
        Ok(Response::builder().status(status).body(body)?)
    }
}
