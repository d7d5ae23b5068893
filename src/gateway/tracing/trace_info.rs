//! The trace-info client: one `POST /api/3.0/mlflow/traces` (StartTraceV3) per trace, carrying
//! the gateway metadata (`mlflow.gateway.endpointId`, `requestType`, `caller`), which MLflow's OTLP
//! handler does not take from span attributes. [`post_infos`] is the stage before a batch's spans
//! (a few at a time, within a budget; it stops early when the server struggles), and
//! [`trace_info_worker`] posts the infos left over, after their spans. Retries follow the MLflow
//! transport's one policy.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, Method, StatusCode};
use opentelemetry::trace::{Status, TraceId};
use opentelemetry_http::{Bytes, Request};
use opentelemetry_sdk::trace::SpanData;

use super::counters::Counters;
use super::http::ExportHttp;
use super::schema::{
    META_AUTH_USER_ID, META_AUTH_USERNAME, META_CALLER, META_ENDPOINT_ID, META_REQUEST_TYPE,
    META_SCHEMA_VERSION, META_TRACE_USER, TAG_TRACE_NAME, mlflow_trace_id,
};

/// Trace-info requests in flight at once.
const TRACE_INFO_CONCURRENCY: usize = 4;

/// What the trace-info request needs from a root span.
#[derive(Debug, Clone)]
pub(super) struct TraceInfoJob {
    trace_id: TraceId,
    start: SystemTime,
    end: SystemTime,
    error: bool,
    request_type: Option<String>,
    caller: Option<String>,
    /// mlflow.auth.username, mlflow.auth.userId, mlflow.trace.user, when set.
    identity: Vec<(&'static str, String)>,
}

impl TraceInfoJob {
    pub(super) fn from_root(span: &SpanData) -> Self {
        let attribute = |key: &str| {
            span.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.as_str().into_owned())
        };
        TraceInfoJob {
            trace_id: span.span_context.trace_id(),
            start: span.start_time,
            end: span.end_time,
            error: matches!(span.status, Status::Error { .. }),
            request_type: attribute(META_REQUEST_TYPE),
            caller: attribute(META_CALLER),
            identity: [META_AUTH_USERNAME, META_AUTH_USER_ID, META_TRACE_USER]
                .into_iter()
                .filter_map(|k| attribute(k).map(|v| (k, v)))
                .collect(),
        }
    }
}

/// Why a trace info was not stored. `transient`: no answer, or a status worth trying again
/// (after the retries).
#[derive(Debug)]
pub(super) struct InfoFailure {
    reason: String,
    transient: bool,
}

impl fmt::Display for InfoFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

#[derive(Clone)]
pub(super) struct TraceInfoPoster {
    pub(super) http: ExportHttp,
    /// `<tracking uri>/api/3.0/mlflow/traces`.
    pub(super) uri: axum::http::Uri,
    pub(super) experiment_id: String,
    pub(super) endpoint_id: String,
    pub(super) trace_name: String,
}

impl TraceInfoPoster {
    /// The StartTraceV3 body: the trace's info with the gateway metadata. Written directly (one
    /// per exported trace: no `serde_json::Value` tree to build and drop).
    fn body(&self, job: &TraceInfoJob) -> String {
        use std::fmt::Write as _;
        // Escaping a string into JSON cannot fail.
        let str_json = |out: &mut String, s: &str| {
            out.push_str(&serde_json::to_string(s).unwrap_or_default());
        };
        let duration = job.end.duration_since(job.start).unwrap_or_default();
        let mut out = String::with_capacity(512);
        let _ = write!(
            out,
            r#"{{"trace":{{"trace_info":{{"trace_id":"{}","trace_location":{{"type":"MLFLOW_EXPERIMENT","mlflow_experiment":{{"experiment_id":"#,
            mlflow_trace_id(job.trace_id)
        );
        str_json(&mut out, &self.experiment_id);
        let _ = write!(
            out,
            r#"}}}},"request_time":"{}","execution_duration":"{}","state":"{}","trace_metadata":{{"{META_ENDPOINT_ID}":"#,
            rfc3339(job.start),
            proto_duration(duration),
            if job.error { "ERROR" } else { "OK" },
        );
        str_json(&mut out, &self.endpoint_id);
        let _ = write!(out, r#","{META_SCHEMA_VERSION}":"3""#);
        if let Some(request_type) = &job.request_type {
            let _ = write!(out, r#","{META_REQUEST_TYPE}":"#);
            str_json(&mut out, request_type);
        }
        if let Some(caller) = &job.caller {
            let _ = write!(out, r#","{META_CALLER}":"#);
            str_json(&mut out, caller);
        }
        for (key, value) in &job.identity {
            let _ = write!(out, r#","{key}":"#);
            str_json(&mut out, value);
        }
        let _ = write!(out, r#"}},"tags":{{"{TAG_TRACE_NAME}":"#);
        str_json(&mut out, &self.trace_name);
        out.push_str("}}}}");
        out
    }

    /// Posts the trace info, retrying transient failures (the transport's retry policy); Err
    /// when it was not stored.
    pub(super) async fn post(&self, job: &TraceInfoJob) -> Result<(), InfoFailure> {
        let body = Bytes::from(self.body(job));
        let attempt = || async {
            let mut request = Request::new(body.clone());
            *request.method_mut() = Method::POST;
            *request.uri_mut() = self.uri.clone();
            request
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            match self.http.send(request).await {
                Ok((status, _)) if status.is_success() => Ok(()),
                Ok((status, text)) => {
                    let text = String::from_utf8_lossy(&text);
                    Err(InfoFailure {
                        reason: format!(
                            "HTTP {}: {}",
                            status.as_u16(),
                            crate::text::clip(text.trim(), 300)
                        ),
                        // StartTraceV3 has no business-rule 500 (unlike the experiments
                        // API's INVALID_STATE): any 5xx is the server failing, for example a
                        // sqlite database locked under load, and worth another try; so is 429.
                        transient: status.is_server_error()
                            || status == StatusCode::TOO_MANY_REQUESTS,
                    })
                }
                Err(reason) => Err(InfoFailure {
                    reason,
                    transient: true,
                }),
            }
        };
        self.http
            .transport
            .retry()
            .run("traces (trace info)", attempt, |f: &InfoFailure| {
                f.transient
            })
            .await
    }
}

/// What the trace-info stage of one batch did.
pub(super) struct InfoStage {
    pub(super) stored: usize,
    pub(super) failed: usize,
    /// Not posted: the stage's time was up, or the tracking server kept failing.
    pub(super) late: Vec<TraceInfoJob>,
}

/// Posts the trace infos of one batch, a few at a time, for at most `budget`. Stops early, leaving
/// the rest late, when one fails on a transient error after its retries (the server is struggling
/// or down: the rest would wait for the same).
pub(super) async fn post_infos(
    poster: &TraceInfoPoster,
    counters: &Counters,
    jobs: Vec<TraceInfoJob>,
    budget: Duration,
) -> InfoStage {
    use futures::StreamExt as _;
    let deadline = tokio::time::Instant::now() + budget;
    let mut stage = InfoStage {
        stored: 0,
        failed: 0,
        late: Vec::new(),
    };
    let mut done = vec![false; jobs.len()];
    let mut next = 0;
    let mut running = futures::stream::FuturesUnordered::new();
    let mut struggling = false;
    loop {
        while !struggling && running.len() < TRACE_INFO_CONCURRENCY && next < jobs.len() {
            let index = next;
            next += 1;
            let job = &jobs[index];
            running.push(async move { (index, poster.post(job).await) });
        }
        let Ok(Some((index, result))) = tokio::time::timeout_at(deadline, running.next()).await
        else {
            break;
        };
        done[index] = true;
        match &result {
            Ok(()) => stage.stored += 1,
            Err(failure) => {
                struggling |= failure.transient;
                stage.failed += 1;
            }
        }
        note_info_result(poster, counters, &jobs[index], result.as_ref().err());
    }
    drop(running);
    stage.late = jobs
        .into_iter()
        .zip(done)
        .filter(|(_, done)| !done)
        .map(|(job, _)| job)
        .collect();
    stage
}

/// Logs a trace info's fate: a warning at the start of a streak of failures, not per trace.
fn note_info_result(
    poster: &TraceInfoPoster,
    counters: &Counters,
    job: &TraceInfoJob,
    failure: Option<&InfoFailure>,
) {
    match failure {
        None => {
            if counters.trace_info_failing.swap(false, Ordering::Relaxed) {
                tracing::info!("writing gateway trace metadata to MLflow works again");
            }
        }
        Some(failure) => {
            let trace_id = mlflow_trace_id(job.trace_id);
            let reason = &failure.reason;
            if counters.trace_info_failing.swap(true, Ordering::Relaxed) {
                tracing::debug!(%trace_id, %reason, "cannot write trace metadata");
            } else {
                tracing::warn!(
                    %trace_id,
                    experiment_id = %poster.experiment_id,
                    %reason,
                    "cannot write gateway trace metadata to MLflow; traces are stored without it (further failures are logged at debug level)"
                );
            }
        }
    }
}

/// Posts the trace infos left over from their batch's stage, a few at a time, after their spans.
/// Ends when the exporter (the sender) is gone.
pub(super) async fn trace_info_worker(
    mut jobs: tokio::sync::mpsc::Receiver<TraceInfoJob>,
    poster: Option<Arc<TraceInfoPoster>>,
    counters: Arc<Counters>,
) {
    let Some(poster) = poster else {
        // No tracking server (tests of the span pipeline): nothing to write.
        while jobs.recv().await.is_some() {
            counters.trace_info_done(true);
        }
        return;
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(TRACE_INFO_CONCURRENCY));
    while let Some(job) = jobs.recv().await {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            counters.trace_info_done(false);
            continue;
        };
        let poster = Arc::clone(&poster);
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            let result = poster.post(&job).await;
            drop(slot);
            note_info_result(&poster, &counters, &job, result.as_ref().err());
            counters.trace_info_done(result.is_ok());
        });
    }
}

/// RFC 3339 UTC with nanoseconds, as protobuf's JSON mapping of `Timestamp` wants it (a time
/// before 1970 or past 9999 as 1970-01-01).
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    let nanos = i32::try_from(since.subsec_nanos()).unwrap_or(0);
    let time = jiff::Timestamp::new(secs, nanos).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    format!("{time:.9}")
}

/// Protobuf's JSON mapping of `Duration`.
fn proto_duration(d: Duration) -> String {
    format!("{}.{:09}s", d.as_secs(), d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlflow::{MlflowConfig, Transport};
    use url::Url;

    #[tokio::test]
    async fn trace_info_body() {
        let config = MlflowConfig::new(Url::parse("http://127.0.0.1:1").unwrap()).unwrap();
        let transport = Transport::new(&config, Duration::from_secs(1)).unwrap();
        let poster = TraceInfoPoster {
            http: ExportHttp::new(Arc::new(transport), "7").unwrap(),
            uri: "http://127.0.0.1:1/api/3.0/mlflow/traces".parse().unwrap(),
            experiment_id: "7".into(),
            endpoint_id: "uid-1".into(),
            trace_name: "gateway/chat".into(),
        };
        let job = TraceInfoJob {
            trace_id: TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_millis(1250),
            error: true,
            request_type: Some("unified/chat".into()),
            caller: None,
            identity: vec![],
        };
        let body: serde_json::Value = serde_json::from_str(&poster.body(&job)).unwrap();
        let info = &body["trace"]["trace_info"];
        assert_eq!(info["trace_id"], "tr-4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(info["state"], "ERROR");
        assert_eq!(info["execution_duration"], "0.250000000s");
        assert_eq!(info["trace_metadata"][META_ENDPOINT_ID], "uid-1");
        assert_eq!(info["trace_metadata"][META_REQUEST_TYPE], "unified/chat");
        assert!(info["trace_metadata"].get(META_CALLER).is_none());
        assert_eq!(info["trace_metadata"][META_SCHEMA_VERSION], "3");
        assert_eq!(info["request_time"], "1970-01-01T00:00:01.000000000Z");
        let quoted = TraceInfoJob {
            caller: Some("a \"quoted\" caller\\".into()),
            error: false,
            identity: vec![
                (META_AUTH_USERNAME, "apikey:ci".into()),
                (META_TRACE_USER, "apikey:ci".into()),
            ],
            ..job
        };
        let body: serde_json::Value = serde_json::from_str(&poster.body(&quoted)).unwrap();
        let info = &body["trace"]["trace_info"];
        assert_eq!(info["trace_metadata"][META_CALLER], "a \"quoted\" caller\\");
        assert_eq!(info["trace_metadata"][META_AUTH_USERNAME], "apikey:ci");
        assert_eq!(info["trace_metadata"][META_TRACE_USER], "apikey:ci");
        assert_eq!(info["state"], "OK");
        assert_eq!(info.as_object().unwrap().len(), 7);
        assert_eq!(info["tags"][TAG_TRACE_NAME], "gateway/chat");
        assert_eq!(
            info["trace_location"]["mlflow_experiment"]["experiment_id"],
            "7"
        );
    }

    #[test]
    fn timestamps_and_durations() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_251_199, 123_456_789);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.123456789Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000000000Z");
        assert_eq!(proto_duration(Duration::from_millis(1500)), "1.500000000s");
    }
}
