//! The experiments API of MLflow's REST interface (`/api/2.0/mlflow/experiments/...`): the model
//! ([`Experiment`]), its wire format, the calls ([`ApiCall`], which also says which of them write)
//! and [`MlflowClient`], which sends them through the shared [`Transport`] and its retry policy.
//! One cohesive thing, kept whole; most of its length past 800 lines is its unit tests.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Bytes;
use axum::http::{Method, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use url::Url;

use super::config::{ConfigError, MlflowConfig};
use super::error::{MlflowError, classify, decode};
use super::transport::Transport;
use super::workspaces::WORKSPACE_HEADER;

// ---------------------------------------------------------------------------------------------
// Calls

/// The REST calls of the experiments API this client makes; the one list of which of them write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiCall {
    Create,
    Get,
    GetByName,
    Update,
    Delete,
    Restore,
    SetExperimentTag,
    Search,
}

impl ApiCall {
    pub const ALL: [ApiCall; 8] = [
        ApiCall::Create,
        ApiCall::Get,
        ApiCall::GetByName,
        ApiCall::Update,
        ApiCall::Delete,
        ApiCall::Restore,
        ApiCall::SetExperimentTag,
        ApiCall::Search,
    ];

    /// The call's path under `/api/2.0/mlflow/`, also its name in errors and metrics.
    pub const fn path(self) -> &'static str {
        match self {
            ApiCall::Create => "experiments/create",
            ApiCall::Get => "experiments/get",
            ApiCall::GetByName => "experiments/get-by-name",
            ApiCall::Update => "experiments/update",
            ApiCall::Delete => "experiments/delete",
            ApiCall::Restore => "experiments/restore",
            ApiCall::SetExperimentTag => "experiments/set-experiment-tag",
            ApiCall::Search => "experiments/search",
        }
    }

    /// Whether the call changes the tracking server.
    pub const fn is_write(self) -> bool {
        matches!(
            self,
            ApiCall::Create
                | ApiCall::Update
                | ApiCall::Delete
                | ApiCall::Restore
                | ApiCall::SetExperimentTag
        )
    }
}

/// Whether `call` (a name as [`CallObserver::observe`] gets it) changes the tracking server.
pub fn is_write_call(call: &str) -> bool {
    ApiCall::ALL
        .iter()
        .any(|c| c.is_write() && c.path() == call)
}

// ---------------------------------------------------------------------------------------------
// Model

/// Which experiments a search returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ViewType {
    #[default]
    ActiveOnly,
    DeletedOnly,
    All,
}

impl ViewType {
    pub fn as_str(self) -> &'static str {
        match self {
            ViewType::ActiveOnly => "ACTIVE_ONLY",
            ViewType::DeletedOnly => "DELETED_ONLY",
            ViewType::All => "ALL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleStage {
    Active,
    /// Soft-deleted: restorable, and its name stays taken.
    Deleted,
    Other(String),
}

impl LifecycleStage {
    fn parse(s: &str) -> Self {
        match s {
            "active" => LifecycleStage::Active,
            "deleted" => LifecycleStage::Deleted,
            other => LifecycleStage::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            LifecycleStage::Active => "active",
            LifecycleStage::Deleted => "deleted",
            LifecycleStage::Other(s) => s,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Experiment {
    pub experiment_id: String,
    pub name: String,
    pub lifecycle_stage: LifecycleStage,
    pub tags: BTreeMap<String, String>,
    pub artifact_location: Option<String>,
    /// Milliseconds since the epoch.
    pub creation_time: Option<i64>,
    pub last_update_time: Option<i64>,
}

impl Experiment {
    pub fn is_active(&self) -> bool {
        self.lifecycle_stage == LifecycleStage::Active
    }

    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
}

/// One page of a search.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentPage {
    pub experiments: Vec<Experiment>,
    /// `Some` when more results follow: pass it back as `page_token`.
    pub next_page_token: Option<String>,
}

// Wire format. int64 fields may come as JSON numbers (MLflow's server) or strings (proto3 JSON).

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(i64),
    Str(String),
}

fn de_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => n.to_string(),
        NumOrStr::Str(s) => s,
    })
}

fn de_opt_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match Option::<NumOrStr>::deserialize(d)? {
        None => Ok(None),
        Some(NumOrStr::Num(n)) => Ok(Some(n)),
        Some(NumOrStr::Str(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("not an integer: {s:?}"))),
    }
}

#[derive(Debug, Deserialize)]
struct RawTag {
    key: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawExperiment {
    #[serde(deserialize_with = "de_id")]
    experiment_id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    artifact_location: Option<String>,
    #[serde(default)]
    lifecycle_stage: Option<String>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    creation_time: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_i64")]
    last_update_time: Option<i64>,
    #[serde(default)]
    tags: Option<Vec<RawTag>>,
}

impl From<RawExperiment> for Experiment {
    fn from(raw: RawExperiment) -> Self {
        Experiment {
            experiment_id: raw.experiment_id,
            name: raw.name.unwrap_or_default(),
            lifecycle_stage: LifecycleStage::parse(raw.lifecycle_stage.as_deref().unwrap_or("")),
            tags: raw
                .tags
                .unwrap_or_default()
                .into_iter()
                .map(|t| (t.key, t.value.unwrap_or_default()))
                .collect(),
            artifact_location: raw.artifact_location,
            creation_time: raw.creation_time,
            last_update_time: raw.last_update_time,
        }
    }
}

#[derive(Debug, Deserialize)]
struct CreateResponse {
    #[serde(deserialize_with = "de_id")]
    experiment_id: String,
}

#[derive(Debug, Deserialize)]
struct GetResponse {
    experiment: RawExperiment,
}

#[derive(Debug, Deserialize)]
struct SearchResponse {
    #[serde(default)]
    experiments: Option<Vec<RawExperiment>>,
    #[serde(default)]
    next_page_token: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Client

/// Sees every HTTP request the client makes (one per attempt), e.g. to feed metrics.
pub trait CallObserver: Send + Sync {
    /// `status` is the HTTP status code (`"200"`), or `"error"` when no answer came.
    fn observe(&self, call: &'static str, status: &str, seconds: f64);
}

pub(super) enum Request<'a> {
    Get(&'a [(&'a str, &'a str)]),
    Post(serde_json::Value),
}

/// The experiments API of one tracking server. Cheap to clone; clones share the write counter.
/// A clone made by [`MlflowClient::in_workspace`] sends `X-MLFLOW-WORKSPACE` on every call.
#[derive(Clone)]
pub struct MlflowClient {
    transport: Arc<Transport>,
    tracking_uri: Url,
    writes: Arc<AtomicU64>,
    observer: Option<Arc<dyn CallObserver>>,
    /// The MLflow workspace every call is made in (`None`: no header, the server's default).
    workspace: Option<Arc<str>>,
}

impl fmt::Debug for MlflowClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MlflowClient")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl MlflowClient {
    /// The client of the tracking server `config` describes; each request has the configured
    /// timeout and the transport's retry policy.
    pub fn new(config: &MlflowConfig) -> Result<Self, ConfigError> {
        Ok(MlflowClient {
            transport: Arc::new(Transport::new(config, config.request_timeout())?),
            tracking_uri: config.tracking_uri().clone(),
            writes: Arc::new(AtomicU64::new(0)),
            observer: None,
            workspace: None,
        })
    }

    /// This client, making every call in MLflow workspace `workspace` (the `X-MLFLOW-WORKSPACE`
    /// header), or with no header for `None`. A cheap clone sharing connections and the write
    /// counter. Only for a server that has workspaces ([`MlflowClient::server_info`]): one
    /// without them answers any such header with 500 `FEATURE_DISABLED`.
    pub fn in_workspace(&self, workspace: Option<String>) -> Self {
        let mut client = self.clone();
        client.workspace = workspace.map(Arc::from);
        client
    }

    /// The workspace every call is made in, if any.
    pub fn workspace(&self) -> Option<&str> {
        self.workspace.as_deref()
    }

    /// Reports every request to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn tracking_uri(&self) -> &Url {
        &self.tracking_uri
    }

    /// Requests sent by mutating calls (create, update, delete, restore, set-tag), answered or
    /// not, retries included; shared by all clones of this client.
    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Creates an active experiment; returns its id.
    pub async fn create_experiment(
        &self,
        name: &str,
        tags: &[(String, String)],
    ) -> Result<String, MlflowError> {
        let tags: Vec<_> = tags
            .iter()
            .map(|(key, value)| json!({"key": key, "value": value}))
            .collect();
        let body = json!({"name": name, "tags": tags});
        let r: CreateResponse = self.call(ApiCall::Create, Request::Post(body)).await?;
        Ok(r.experiment_id)
    }

    /// The experiment, active or deleted.
    pub async fn get_experiment(&self, id: &str) -> Result<Experiment, MlflowError> {
        let r: GetResponse = self
            .call(ApiCall::Get, Request::Get(&[("experiment_id", id)]))
            .await?;
        Ok(r.experiment.into())
    }

    /// The experiment of that name, active or deleted (a deleted experiment keeps its name).
    pub async fn get_experiment_by_name(&self, name: &str) -> Result<Experiment, MlflowError> {
        let r: GetResponse = self
            .call(
                ApiCall::GetByName,
                Request::Get(&[("experiment_name", name)]),
            )
            .await?;
        Ok(r.experiment.into())
    }

    /// Renames an active experiment (`BAD_REQUEST` if the name is taken, `INVALID_STATE` if the
    /// experiment is deleted).
    pub async fn rename_experiment(&self, id: &str, new_name: &str) -> Result<(), MlflowError> {
        let body = json!({"experiment_id": id, "new_name": new_name});
        self.call::<serde::de::IgnoredAny>(ApiCall::Update, Request::Post(body))
            .await
            .map(drop)
    }

    /// Soft-deletes an active experiment (`RESOURCE_DOES_NOT_EXIST` if already deleted).
    pub async fn delete_experiment(&self, id: &str) -> Result<(), MlflowError> {
        let body = json!({"experiment_id": id});
        self.call::<serde::de::IgnoredAny>(ApiCall::Delete, Request::Post(body))
            .await
            .map(drop)
    }

    /// Restores a deleted experiment (`RESOURCE_DOES_NOT_EXIST` if it is active).
    pub async fn restore_experiment(&self, id: &str) -> Result<(), MlflowError> {
        let body = json!({"experiment_id": id});
        self.call::<serde::de::IgnoredAny>(ApiCall::Restore, Request::Post(body))
            .await
            .map(drop)
    }

    /// Sets one tag of an active experiment (`INVALID_PARAMETER_VALUE` if deleted).
    pub async fn set_experiment_tag(
        &self,
        id: &str,
        key: &str,
        value: &str,
    ) -> Result<(), MlflowError> {
        let body = json!({"experiment_id": id, "key": key, "value": value});
        self.call::<serde::de::IgnoredAny>(ApiCall::SetExperimentTag, Request::Post(body))
            .await
            .map(drop)
    }

    /// One page of experiments matching `filter` (MLflow's filter syntax, e.g.
    /// ``tags.`mlflow.experiment.isGateway` = 'true'``; empty for all). `max_results` must be
    /// between 1 and 50000.
    pub async fn search_experiments(
        &self,
        filter: &str,
        view: ViewType,
        max_results: u32,
        page_token: Option<&str>,
    ) -> Result<ExperimentPage, MlflowError> {
        let mut body = json!({"max_results": max_results, "view_type": view.as_str()});
        if !filter.is_empty() {
            body["filter"] = json!(filter);
        }
        if let Some(token) = page_token.filter(|t| !t.is_empty()) {
            body["page_token"] = json!(token);
        }
        let r: SearchResponse = self.call(ApiCall::Search, Request::Post(body)).await?;
        Ok(ExperimentPage {
            experiments: r
                .experiments
                .unwrap_or_default()
                .into_iter()
                .map(Experiment::from)
                .collect(),
            next_page_token: r.next_page_token.filter(|t| !t.is_empty()),
        })
    }

    /// All experiments matching `filter`, following `next_page_token` to the end.
    pub async fn search_all_experiments(
        &self,
        filter: &str,
        view: ViewType,
    ) -> Result<Vec<Experiment>, MlflowError> {
        self.search_all_experiments_paged(filter, view, 1000).await
    }

    /// As [`MlflowClient::search_all_experiments`], with pages of `page_size`.
    pub async fn search_all_experiments_paged(
        &self,
        filter: &str,
        view: ViewType,
        page_size: u32,
    ) -> Result<Vec<Experiment>, MlflowError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .search_experiments(filter, view, page_size, token.as_deref())
                .await?;
            all.extend(page.experiments);
            match page.next_page_token {
                None => return Ok(all),
                Some(next) if token.as_deref() == Some(next.as_str()) => {
                    return Err(MlflowError::Protocol {
                        call: ApiCall::Search.path(),
                        status: 200,
                        message: "the server returned the same next_page_token twice".to_string(),
                    });
                }
                Some(next) => token = Some(next),
            }
        }
    }

    /// One REST call of the experiments API, retried while it fails transiently.
    async fn call<T: DeserializeOwned>(
        &self,
        call: ApiCall,
        request: Request<'_>,
    ) -> Result<T, MlflowError> {
        let path = format!("api/2.0/mlflow/{}", call.path());
        let (method, query, body) = match request {
            Request::Get(query) => (Method::GET, query, None),
            Request::Post(body) => (Method::POST, &[][..], Some(body)),
        };
        self.request(call.path(), call.is_write(), method, &path, query, body)
            .await
    }

    /// One REST call to `path` (under the tracking URI), named `name` in errors, logs and
    /// metrics, counted as a write if `write`, with `query` and a JSON `body`; retried while it
    /// fails transiently. Every API module (experiments, users, workspaces) sends through here,
    /// so whatever the client adds to a request (the workspace header) applies to all of them.
    pub(super) async fn request<T: DeserializeOwned>(
        &self,
        name: &'static str,
        write: bool,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> Result<T, MlflowError> {
        let mut url = self.transport.url(path);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter());
        }
        let uri: axum::http::Uri = url.as_str().parse().map_err(|e| MlflowError::Protocol {
            call: name,
            status: 0,
            message: format!("cannot make a request URI of {url}: {e}"),
        })?;
        let workspace = match self.workspace.as_deref() {
            None => None,
            Some(w) => {
                Some(
                    header::HeaderValue::from_str(w).map_err(|_| MlflowError::Protocol {
                        call: name,
                        status: 0,
                        message: format!("the workspace name {w:?} is not usable in a header"),
                    })?,
                )
            }
        };
        let body = body.map(|b| Bytes::from(b.to_string()));
        let call = Call {
            name,
            write,
            method: &method,
            uri: &uri,
            workspace: workspace.as_ref(),
        };
        self.transport
            .retry()
            .run(
                name,
                || self.attempt(&call, body.clone()),
                MlflowError::is_transient,
            )
            .await
    }

    async fn attempt<T: DeserializeOwned>(
        &self,
        call: &Call<'_>,
        body: Option<Bytes>,
    ) -> Result<T, MlflowError> {
        let name = call.name;
        let has_body = body.is_some();
        let mut request = axum::http::Request::new(body.unwrap_or_default());
        *request.method_mut() = call.method.clone();
        *request.uri_mut() = call.uri.clone();
        if has_body {
            request.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
        }
        if let Some(workspace) = call.workspace {
            request
                .headers_mut()
                .insert(WORKSPACE_HEADER, workspace.clone());
        }
        if call.write {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        let start = Instant::now();
        let answer = self.transport.send(request).await;
        let elapsed = start.elapsed();
        let status_label = match &answer {
            Ok(answer) => answer.status.as_str().to_string(),
            Err(_) => "error".to_string(),
        };
        tracing::debug!(
            call = name,
            status = %status_label,
            elapsed_ms = elapsed.as_millis() as u64,
            "MLflow request"
        );
        if let Some(observer) = &self.observer {
            observer.observe(name, &status_label, elapsed.as_secs_f64());
        }

        let answer = answer.map_err(|e| MlflowError::Unavailable {
            call: name,
            reason: e.reason,
        })?;
        let code = answer.status.as_u16();
        let body = String::from_utf8_lossy(&answer.body);
        if answer.status.is_success() {
            decode(name, code, &body)
        } else if answer.status.is_redirection() {
            let location = answer
                .headers
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok());
            Err(MlflowError::Protocol {
                call: name,
                status: code,
                message: format!(
                    "redirected to {}: set MLFLOW_TRACKING_URI to the tracking server's final address",
                    location.unwrap_or("an unknown location")
                ),
            })
        } else {
            Err(classify(name, code, &body))
        }
    }
}

/// One call as every attempt sends it.
struct Call<'a> {
    name: &'static str,
    write: bool,
    method: &'a Method,
    uri: &'a axum::http::Uri,
    workspace: Option<&'a header::HeaderValue>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlflow::config::Auth;
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_write_calls() {
        let writes: Vec<&str> = ApiCall::ALL
            .iter()
            .filter(|c| c.is_write())
            .map(|c| c.path())
            .collect();
        assert_eq!(
            writes,
            [
                "experiments/create",
                "experiments/update",
                "experiments/delete",
                "experiments/restore",
                "experiments/set-experiment-tag"
            ]
        );
        assert!(is_write_call("experiments/create"));
        assert!(!is_write_call("experiments/get"));
        assert!(!is_write_call("experiments/search"));
        assert!(!is_write_call("nonsense"));
    }

    // -- wire format ------------------------------------------------------------------------

    #[test]
    fn decodes_experiments() {
        let body = r#"{"experiment": {"experiment_id": "1", "name": "p1",
            "artifact_location": "/a/1", "lifecycle_stage": "active",
            "last_update_time": 1795308682310, "creation_time": 1795308681661,
            "tags": [{"key": "a", "value": "b"}, {"key": "empty", "value": ""}],
            "workspace": "default"}}"#;
        let e: Experiment = decode::<GetResponse>("experiments/get", 200, body)
            .unwrap()
            .experiment
            .into();
        assert_eq!(e.experiment_id, "1");
        assert_eq!(e.name, "p1");
        assert!(e.is_active());
        assert_eq!(e.tag("a"), Some("b"));
        assert_eq!(e.tag("empty"), Some(""));
        assert_eq!(e.tag("missing"), None);
        assert_eq!(e.artifact_location.as_deref(), Some("/a/1"));
        assert_eq!(e.creation_time, Some(1795308681661));

        // No tags; ids and times as strings (proto3 JSON); unknown stage.
        let body = r#"{"experiment": {"experiment_id": 7, "name": "x",
            "lifecycle_stage": "deleted", "creation_time": "12"}}"#;
        let e: Experiment = decode::<GetResponse>("experiments/get", 200, body)
            .unwrap()
            .experiment
            .into();
        assert_eq!(e.experiment_id, "7");
        assert!(e.tags.is_empty());
        assert_eq!(e.lifecycle_stage, LifecycleStage::Deleted);
        assert_eq!(e.creation_time, Some(12));
        assert_eq!(e.last_update_time, None);
        let body = r#"{"experiment": {"experiment_id": "7", "lifecycle_stage": "archived"}}"#;
        let e: Experiment = decode::<GetResponse>("experiments/get", 200, body)
            .unwrap()
            .experiment
            .into();
        assert_eq!(
            e.lifecycle_stage,
            LifecycleStage::Other("archived".to_string())
        );
        assert!(!e.is_active());

        // An empty search answers `{}`.
        let r: SearchResponse = decode("experiments/search", 200, "{}").unwrap();
        assert!(r.experiments.is_none() && r.next_page_token.is_none());
    }

    #[test]
    fn html_success_answers_are_protocol_errors() {
        let e = decode::<GetResponse>(
            "experiments/get",
            200,
            "<!doctype html><html><head><title>MLflow</title></head></html>",
        )
        .unwrap_err();
        assert!(matches!(e, MlflowError::Protocol { status: 200, .. }));
        assert!(e.to_string().contains("path prefix"), "{e}");
        assert!(!e.is_transient());
    }
    // -- against a scripted HTTP server -----------------------------------------------------

    /// Answers each connection with the next scripted `(status, body)` (the last one repeats);
    /// `None` means: accept and never answer. Records each request's head.
    struct Scripted {
        uri: Url,
        requests: Arc<Mutex<Vec<String>>>,
    }

    async fn scripted(prefix: &str, answers: Vec<Option<(u16, &'static str)>>) -> Scripted {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let answer = answers[n.min(answers.len() - 1)];
                n += 1;
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        let Ok(k) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if k == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..k]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    seen.lock().unwrap().push(head);
                    let Some((status, body)) = answer else {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    };
                    let response = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(response.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Scripted {
            uri: Url::parse(&format!("http://127.0.0.1:{port}{prefix}")).unwrap(),
            requests,
        }
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(&'static str, String)>>);

    impl CallObserver for Recorder {
        fn observe(&self, call: &'static str, status: &str, seconds: f64) {
            assert!(seconds >= 0.0);
            self.0.lock().unwrap().push((call, status.to_string()));
        }
    }

    const GET_OK: &str =
        r#"{"experiment":{"experiment_id":"1","name":"e","lifecycle_stage":"active"}}"#;

    #[tokio::test]
    async fn a_workspace_clone_sends_the_header_and_the_original_does_not() {
        let server = scripted("", vec![Some((200, GET_OK))]).await;
        let client = MlflowClient::new(&MlflowConfig::new(server.uri.clone()).unwrap()).unwrap();
        let team = client.in_workspace(Some("team-a".into()));
        team.get_experiment("1").await.unwrap();
        client.get_experiment("1").await.unwrap();
        team.in_workspace(None).get_experiment("1").await.unwrap();
        let heads = server.requests.lock().unwrap().clone();
        let with = |h: &String| {
            h.to_ascii_lowercase()
                .contains("x-mlflow-workspace: team-a")
        };
        assert_eq!(
            heads.iter().map(with).collect::<Vec<_>>(),
            [true, false, false]
        );
        assert_eq!(team.workspace(), Some("team-a"));
        assert_eq!(client.workspace(), None);
    }

    #[tokio::test]
    async fn retries_transient_answers_then_succeeds() {
        let server = scripted(
            "/mlflow",
            vec![
                Some((503, "<html><title>Service Unavailable</title></html>")),
                Some((
                    429,
                    r#"{"error_code":"REQUEST_LIMIT_EXCEEDED","message":"slow"}"#,
                )),
                Some((200, GET_OK)),
            ],
        )
        .await;
        let config = MlflowConfig::builder(server.uri.clone())
            .auth(Auth::Basic {
                username: "alice".into(),
                password: "hunter2".into(),
            })
            .build()
            .unwrap();
        let recorder = Arc::new(Recorder::default());
        let client = MlflowClient::new(&config)
            .unwrap()
            .with_observer(recorder.clone());
        let e = client.get_experiment("1").await.unwrap();
        assert_eq!(e.name, "e");
        let seen: Vec<_> = recorder.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                ("experiments/get", "503".to_string()),
                ("experiments/get", "429".to_string()),
                ("experiments/get", "200".to_string())
            ]
        );
        let requests = server.requests.lock().unwrap().clone();
        assert!(
            requests[0].starts_with("GET /mlflow/api/2.0/mlflow/experiments/get?experiment_id=1 "),
            "{}",
            requests[0]
        );
        use base64::Engine as _;
        let expected = format!(
            "authorization: Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:hunter2")
        );
        assert!(requests[0].contains(&expected), "{}", requests[0]);
        assert_eq!(client.write_count(), 0);
    }

    #[tokio::test]
    async fn gives_up_after_max_retries() {
        let server = scripted("", vec![Some((502, "bad gateway"))]).await;
        let config = MlflowConfig::builder(server.uri.clone())
            .max_retries(2)
            .auth(Auth::Bearer {
                token: "tok-abc".into(),
            })
            .build()
            .unwrap();
        let client = MlflowClient::new(&config).unwrap();
        let e = client.delete_experiment("1").await.unwrap_err();
        assert!(
            matches!(e, MlflowError::Protocol { status: 502, .. }),
            "{e}"
        );
        assert!(e.is_transient());
        assert_eq!(server.requests.lock().unwrap().len(), 3);
        assert_eq!(client.write_count(), 3);
        let head = server.requests.lock().unwrap()[0].clone();
        assert!(
            head.starts_with("POST /api/2.0/mlflow/experiments/delete "),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json")
        );
        assert!(head.contains("Bearer tok-abc") || head.contains("bearer tok-abc"));
        assert!(!e.to_string().contains("tok-abc"));
    }

    #[tokio::test]
    async fn does_not_retry_client_errors_or_invalid_state() {
        for (status, body) in [
            (
                400,
                r#"{"error_code":"RESOURCE_ALREADY_EXISTS","message":"taken"}"#,
            ),
            (
                500,
                r#"{"error_code":"INVALID_STATE","message":"Cannot rename"}"#,
            ),
            (401, "You are not authenticated."),
            (
                404,
                r#"{"error_code":"RESOURCE_DOES_NOT_EXIST","message":"no"}"#,
            ),
        ] {
            let server = scripted("", vec![Some((status, body))]).await;
            let client =
                MlflowClient::new(&MlflowConfig::new(server.uri.clone()).unwrap()).unwrap();
            let clone = client.clone();
            let e = clone
                .create_experiment("x", &[("k".into(), "v".into())])
                .await
                .unwrap_err();
            assert!(!e.is_transient(), "{e}");
            assert_eq!(server.requests.lock().unwrap().len(), 1, "{status}");
            // Clones share the write counter.
            assert_eq!(client.write_count(), 1);
        }
    }

    #[tokio::test]
    async fn timeouts_are_unavailable() {
        let server = scripted("", vec![None]).await;
        let config = MlflowConfig::builder(server.uri.clone())
            .request_timeout(Duration::from_millis(300))
            .max_retries(1)
            .build()
            .unwrap();
        let recorder = Arc::new(Recorder::default());
        let client = MlflowClient::new(&config)
            .unwrap()
            .with_observer(recorder.clone());
        let e = client.get_experiment("1").await.unwrap_err();
        assert!(matches!(e, MlflowError::Unavailable { .. }), "{e}");
        assert!(e.is_transient());
        assert!(e.to_string().contains("300 ms"), "{e}");
        assert_eq!(server.requests.lock().unwrap().len(), 2);
        let seen = recorder.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                ("experiments/get", "error".to_string()),
                ("experiments/get", "error".to_string())
            ]
        );
    }

    #[tokio::test]
    async fn connection_refused_is_unavailable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let config =
            MlflowConfig::builder(Url::parse(&format!("http://127.0.0.1:{port}")).unwrap())
                .max_retries(0)
                .build()
                .unwrap();
        let client = MlflowClient::new(&config).unwrap();
        let e = client.set_experiment_tag("1", "k", "v").await.unwrap_err();
        assert!(matches!(e, MlflowError::Unavailable { .. }), "{e}");
        assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
        assert_eq!(e.call(), "experiments/set-experiment-tag");
        assert_eq!(client.write_count(), 1);
    }

    #[tokio::test]
    async fn redirects_are_reported_not_followed() {
        let server = scripted("", vec![Some((301, ""))]).await;
        let client = MlflowClient::new(&MlflowConfig::new(server.uri.clone()).unwrap()).unwrap();
        let e = client.get_experiment("1").await.unwrap_err();
        assert!(
            matches!(e, MlflowError::Protocol { status: 301, .. }),
            "{e}"
        );
        assert_eq!(server.requests.lock().unwrap().len(), 1);
    }
}
