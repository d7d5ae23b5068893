//! MLflow's basic-auth users and permissions API (MLflow 3.17.2, `mlflow server --app-name
//! basic-auth`), as the operator needs it to give each endpoint its own trace credential: who the
//! operator's account is (the probe), users (create, reset the password, delete) and one user's
//! grants on experiments. Methods of [`MlflowClient`], so they go through the same transport,
//! retry policy and per-request additions (such as a workspace header) as the experiments API.
//!
//! Shaped by what the server does (docs/notes/mlflow-auth-workspaces-admission.md): the per-user
//! permission routes are under `/api/3.0` (the 2.0 ones are gone); a grant that exists is a 400
//! `RESOURCE_ALREADY_EXISTS` (no upsert), a revoke of none a 404; a caller who is not an admin
//! gets a plain-text 403; a server without the auth app answers 404 with an HTML page.

use axum::http::Method;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::json;

use super::error::MlflowError;
use super::experiments::MlflowClient;

/// What the operator's own account may do with users, from `GET users/current`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Account {
    /// The auth app is there and the account is an admin: it may create, reset and delete users.
    Admin { username: String },
    /// The auth app is there, the account is not an admin.
    NotAdmin { username: String },
    /// No users API: the server runs without the basic-auth app (or another auth in front).
    NoUsersApi,
}

/// The permissions a grant can give (MLflow's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Read,
    Use,
    Edit,
    Manage,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "READ",
            Permission::Use => "USE",
            Permission::Edit => "EDIT",
            Permission::Manage => "MANAGE",
        }
    }
}

/// One grant of a user, as `users/permissions/list` gives it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Grant {
    pub resource_type: String,
    /// The experiment id for an experiment grant (`*` for a workspace-wide one).
    pub resource_pattern: String,
    pub permission: String,
    #[serde(default)]
    pub workspace: Option<String>,
}

impl Grant {
    /// The experiment this grant is on, if it is an experiment grant.
    pub fn experiment(&self) -> Option<&str> {
        (self.resource_type == "experiment").then_some(self.resource_pattern.as_str())
    }
}

#[derive(Deserialize)]
struct User {
    username: String,
    #[serde(default)]
    is_admin: bool,
}

#[derive(Deserialize)]
struct CurrentUser {
    user: User,
}

#[derive(Deserialize)]
struct GrantList {
    #[serde(default)]
    permissions: Vec<Grant>,
}

const USERS: &str = "api/2.0/mlflow/users";
const PERMISSIONS: &str = "api/3.0/mlflow/users/permissions";

/// Refused by the users API of a server without the auth app: an HTML 404, not MLflow's JSON.
fn is_missing_route(e: &MlflowError) -> bool {
    matches!(e, MlflowError::Protocol { status: 404, .. })
}

impl MlflowClient {
    /// Who the client's credential is, and whether it may manage users. Never `users/list`,
    /// which any user may call when workspaces are off.
    pub async fn current_account(&self) -> Result<Account, MlflowError> {
        let answer: Result<CurrentUser, _> = self
            .request(
                "users/current",
                false,
                Method::GET,
                &format!("{USERS}/current"),
                &[],
                None,
            )
            .await;
        match answer {
            Ok(CurrentUser { user }) if user.is_admin => Ok(Account::Admin {
                username: user.username,
            }),
            Ok(CurrentUser { user }) => Ok(Account::NotAdmin {
                username: user.username,
            }),
            Err(e) if is_missing_route(&e) => Ok(Account::NoUsersApi),
            Err(e) => Err(e),
        }
    }

    /// Creates a user; `false` if one of that name exists already (its password unchanged).
    /// MLflow wants passwords of 12 characters or more.
    pub async fn create_user(&self, username: &str, password: &str) -> Result<bool, MlflowError> {
        let body = json!({"username": username, "password": password});
        let created: Result<IgnoredAny, _> = self
            .request(
                "users/create",
                true,
                Method::POST,
                &format!("{USERS}/create"),
                &[],
                Some(body),
            )
            .await;
        match created {
            Ok(_) => Ok(true),
            Err(e) if e.is_already_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether a user of that name exists (admin, or the user itself, may ask).
    pub async fn user_exists(&self, username: &str) -> Result<bool, MlflowError> {
        let got: Result<IgnoredAny, _> = self
            .request(
                "users/get",
                false,
                Method::GET,
                &format!("{USERS}/get"),
                &[("username", username)],
                None,
            )
            .await;
        match got {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets a user's password (as an admin: no current password needed). The old one stops
    /// working at once.
    pub async fn update_password(&self, username: &str, password: &str) -> Result<(), MlflowError> {
        let body = json!({"username": username, "password": password});
        self.request::<IgnoredAny>(
            "users/update-password",
            true,
            Method::PATCH,
            &format!("{USERS}/update-password"),
            &[],
            Some(body),
        )
        .await
        .map(drop)
    }

    /// Deletes a user and its grants; `false` if there was none.
    pub async fn delete_user(&self, username: &str) -> Result<bool, MlflowError> {
        let deleted: Result<IgnoredAny, _> = self
            .request(
                "users/delete",
                true,
                Method::DELETE,
                &format!("{USERS}/delete"),
                &[],
                Some(json!({"username": username})),
            )
            .await;
        match deleted {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Grants `permission` on experiment `experiment_id`; `false` if the user holds a grant on it
    /// already (whatever its permission: MLflow has no upsert). The grant lands in the request's
    /// workspace.
    pub async fn grant_experiment(
        &self,
        username: &str,
        experiment_id: &str,
        permission: Permission,
    ) -> Result<bool, MlflowError> {
        let body = json!({"username": username, "resource_type": "experiment",
                          "resource_id": experiment_id, "permission": permission.as_str()});
        let granted: Result<IgnoredAny, _> = self
            .request(
                "users/permissions/grant",
                true,
                Method::POST,
                &format!("{PERMISSIONS}/grant"),
                &[],
                Some(body),
            )
            .await;
        match granted {
            Ok(_) => Ok(true),
            Err(e) if e.is_already_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Revokes the user's grant on experiment `experiment_id`; `false` if there was none.
    pub async fn revoke_experiment(
        &self,
        username: &str,
        experiment_id: &str,
    ) -> Result<bool, MlflowError> {
        let body = json!({"username": username, "resource_type": "experiment",
                          "resource_id": experiment_id});
        let revoked: Result<IgnoredAny, _> = self
            .request(
                "users/permissions/revoke",
                true,
                Method::POST,
                &format!("{PERMISSIONS}/revoke"),
                &[],
                Some(body),
            )
            .await;
        match revoked {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every grant the user holds (in every workspace).
    pub async fn user_grants(&self, username: &str) -> Result<Vec<Grant>, MlflowError> {
        let list: GrantList = self
            .request(
                "users/permissions/list",
                false,
                Method::GET,
                &format!("{PERMISSIONS}/list"),
                &[("username", username)],
                None,
            )
            .await?;
        Ok(list.permissions)
    }
}

/// A random password for an MLflow user: 24 bytes from the system's CSPRNG, URL-safe base64
/// (32 characters, over MLflow's minimum of 12, no ':' so Basic auth can carry it).
pub fn random_password() -> Result<String, ring::error::Unspecified> {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlflow::MlflowConfig;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-route-at-a-time HTTP server answering each request with the next canned answer, and
    /// recording the request lines and bodies it got.
    async fn server(answers: Vec<(u16, &'static str)>) -> (url::Url, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            for (status, body) in answers {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 16384];
                let mut got = Vec::new();
                loop {
                    let n = socket.read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            let first = text.lines().next().unwrap().to_string();
                            log.lock()
                                .unwrap()
                                .push(format!("{first} {}", &text[end + 4..]));
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                let ctype = if body.starts_with('<') || body.starts_with("Permission") {
                    "text/html"
                } else {
                    "application/json"
                };
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        (url::Url::parse(&format!("http://{addr}")).unwrap(), seen)
    }

    fn client(uri: url::Url) -> MlflowClient {
        let config = MlflowConfig::builder(uri).max_retries(0).build().unwrap();
        MlflowClient::new(&config).unwrap()
    }

    #[tokio::test]
    async fn the_probe_tells_admin_from_user_from_no_users_api() {
        let (uri, seen) = server(vec![
            (
                200,
                r#"{"is_basic_auth":true,"user":{"id":1,"is_admin":true,"username":"admin"}}"#,
            ),
            (
                200,
                r#"{"is_basic_auth":true,"user":{"id":2,"is_admin":false,"username":"bob"}}"#,
            ),
            (404, "<!doctype html><title>404 Not Found</title>"),
            (401, "You are not authenticated."),
        ])
        .await;
        let c = client(uri);
        assert_eq!(
            c.current_account().await.unwrap(),
            Account::Admin {
                username: "admin".into()
            }
        );
        assert_eq!(
            c.current_account().await.unwrap(),
            Account::NotAdmin {
                username: "bob".into()
            }
        );
        assert_eq!(c.current_account().await.unwrap(), Account::NoUsersApi);
        assert!(matches!(
            c.current_account().await,
            Err(MlflowError::Unauthenticated { .. })
        ));
        assert!(seen.lock().unwrap()[0].starts_with("GET /api/2.0/mlflow/users/current "));
    }

    #[tokio::test]
    async fn existing_and_missing_answers_are_not_errors() {
        let exists = r#"{"error_code":"RESOURCE_ALREADY_EXISTS","message":"m"}"#;
        let missing = r#"{"error_code":"RESOURCE_DOES_NOT_EXIST","message":"m"}"#;
        let (uri, seen) = server(vec![
            (400, exists),
            (400, exists),
            (404, missing),
            (404, missing),
            (404, missing),
            (403, "Permission denied"),
        ])
        .await;
        let c = client(uri);
        assert!(!c.create_user("u", "password-123456").await.unwrap());
        assert!(
            !c.grant_experiment("u", "7", Permission::Edit)
                .await
                .unwrap()
        );
        assert!(!c.revoke_experiment("u", "7").await.unwrap());
        assert!(!c.delete_user("u").await.unwrap());
        assert!(!c.user_exists("u").await.unwrap());
        let e = c.update_password("u", "password-123456").await.unwrap_err();
        assert_eq!(e.status(), Some(403));
        let seen = seen.lock().unwrap();
        assert!(seen[1].starts_with("POST /api/3.0/mlflow/users/permissions/grant "));
        assert!(seen[1].contains(r#""permission":"EDIT""#), "{}", seen[1]);
        assert!(seen[1].contains(r#""resource_id":"7""#), "{}", seen[1]);
        assert!(seen[2].starts_with("POST /api/3.0/mlflow/users/permissions/revoke "));
        assert!(seen[3].starts_with("DELETE /api/2.0/mlflow/users/delete "));
        assert!(seen[4].starts_with("GET /api/2.0/mlflow/users/get?username=u "));
        assert!(seen[5].starts_with("PATCH /api/2.0/mlflow/users/update-password "));
        // The operator's write counter sees the writes (create, grant, revoke, delete, password).
        assert_eq!(c.write_count(), 5);
    }

    #[test]
    fn grants_decode_and_name_their_experiment() {
        let list: GrantList = serde_json::from_str(
            r#"{"is_admin":false,"permissions":[{"permission":"EDIT","resource_pattern":"1","resource_type":"experiment","role_id":2,"role_name":"__user_2__","workspace":"default"},{"permission":"USE","resource_pattern":"*","resource_type":"workspace","role_id":3}]}"#,
        )
        .unwrap();
        assert_eq!(list.permissions[0].experiment(), Some("1"));
        assert_eq!(list.permissions[0].workspace.as_deref(), Some("default"));
        assert_eq!(list.permissions[1].experiment(), None);
    }

    #[test]
    fn passwords_are_long_random_and_basic_auth_safe() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(!a.contains(':'));
    }
}
