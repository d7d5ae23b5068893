//! MLflow workspaces (3.17+, `MLFLOW_ENABLE_WORKSPACES`): whether the server has them
//! (`GET /api/3.0/mlflow/server-info`), and the workspace calls the operator needs (get, create).
//! The header that puts any other call in a workspace is [`WORKSPACE_HEADER`], sent by
//! [`MlflowClient::in_workspace`]'s clones and by the gateway's trace export. Kept apart from the
//! experiments API: a different API version, and its own rules for names.

use axum::http::Method;
use serde::Deserialize;
use serde_json::json;

use super::error::MlflowError;
use super::experiments::MlflowClient;

/// The header that names the workspace of a request (MLflow's `X-MLFLOW-WORKSPACE`).
pub const WORKSPACE_HEADER: &str = "x-mlflow-workspace";
/// MLflow's own client variable for the workspace; the gateway pods get theirs in it.
pub const ENV_WORKSPACE: &str = "MLFLOW_WORKSPACE";
/// The workspace a request without the header is in.
pub const DEFAULT_WORKSPACE: &str = "default";

/// What the operator needs to know of the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    pub workspaces_enabled: bool,
}

#[derive(Deserialize)]
struct RawServerInfo {
    #[serde(default)]
    workspaces_enabled: bool,
}

#[derive(Deserialize)]
struct WorkspaceAnswer {
    workspace: Workspace,
}

/// One workspace.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Workspace {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
}

/// Why a name cannot be a workspace name, or `None` when it can (MLflow 3.17's rule,
/// `store/workspace/abstract_store.py`: 2-63 characters of `[a-z0-9-]`, starting and ending with
/// a letter or digit, and none of its reserved words).
pub fn invalid_workspace_name(name: &str) -> Option<String> {
    const RESERVED: [&str; 4] = ["workspaces", "api", "ajax-api", "static-files"];
    let bytes = name.as_bytes();
    let edge = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !(2..=63).contains(&bytes.len()) {
        Some(format!(
            "{name:?} has {} characters; MLflow workspace names have 2 to 63",
            bytes.len()
        ))
    } else if !bytes.iter().all(|&b| edge(b) || b == b'-')
        || !edge(bytes[0])
        || !edge(bytes[bytes.len() - 1])
    {
        Some(format!(
            "{name:?} is not a MLflow workspace name (lowercase letters, digits and '-', starting and ending with a letter or digit)"
        ))
    } else if RESERVED.contains(&name) {
        Some(format!("{name:?} is reserved by MLflow"))
    } else {
        None
    }
}

impl MlflowClient {
    /// Whether the server has workspaces. Public even with auth on; sent without a workspace
    /// header. A server older than the route (404) has none.
    pub async fn server_info(&self) -> Result<ServerInfo, MlflowError> {
        let client = self.in_workspace(None);
        match client
            .request::<RawServerInfo>(
                "server-info",
                false,
                Method::GET,
                "api/3.0/mlflow/server-info",
                &[],
                None,
            )
            .await
        {
            Ok(raw) => Ok(ServerInfo {
                workspaces_enabled: raw.workspaces_enabled,
            }),
            Err(e) if e.status() == Some(404) => Ok(ServerInfo {
                workspaces_enabled: false,
            }),
            Err(e) => Err(e),
        }
    }

    /// The workspace `name` (`RESOURCE_DOES_NOT_EXIST` if there is none).
    pub async fn get_workspace(&self, name: &str) -> Result<Workspace, MlflowError> {
        if let Some(why) = invalid_workspace_name(name) {
            return Err(bad_name(why));
        }
        let client = self.in_workspace(None);
        let answer: WorkspaceAnswer = client
            .request(
                "workspaces/get",
                false,
                Method::GET,
                &format!("api/3.0/mlflow/workspaces/{name}"),
                &[],
                None,
            )
            .await?;
        Ok(answer.workspace)
    }

    /// Creates the workspace `name` (`RESOURCE_ALREADY_EXISTS` if it exists). Needs an admin
    /// when the server has basic auth.
    pub async fn create_workspace(&self, name: &str, description: &str) -> Result<(), MlflowError> {
        if let Some(why) = invalid_workspace_name(name) {
            return Err(bad_name(why));
        }
        let client = self.in_workspace(None);
        client
            .request::<serde::de::IgnoredAny>(
                "workspaces/create",
                true,
                Method::POST,
                "api/3.0/mlflow/workspaces",
                &[],
                Some(json!({"name": name, "description": description})),
            )
            .await
            .map(drop)
    }

    /// Makes the workspace `name` exist: true when this call created it. The server's own
    /// `default` always exists.
    pub async fn ensure_workspace(
        &self,
        name: &str,
        description: &str,
    ) -> Result<bool, MlflowError> {
        if name == DEFAULT_WORKSPACE {
            return Ok(false);
        }
        match self.get_workspace(name).await {
            Ok(_) => return Ok(false),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        match self.create_workspace(name, description).await {
            Ok(()) => Ok(true),
            // Created meanwhile (another replica, or a race with an admin).
            Err(e) if e.is_already_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn bad_name(why: String) -> MlflowError {
    MlflowError::Api {
        call: "workspaces",
        status: 400,
        code: super::ErrorCode::InvalidParameterValue,
        message: why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_names_follow_mlflow() {
        for ok in ["team-a", "default", "ab", "a1", &"a".repeat(63)] {
            assert_eq!(invalid_workspace_name(ok), None, "{ok}");
        }
        for bad in [
            "a",
            "",
            "Team",
            "team_a",
            "-team",
            "team-",
            "te.am",
            "api",
            "workspaces",
            "ajax-api",
            "static-files",
            &"a".repeat(64),
        ] {
            assert!(invalid_workspace_name(bad).is_some(), "{bad}");
        }
    }
}
