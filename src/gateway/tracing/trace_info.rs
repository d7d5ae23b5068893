//! The trace-info client: one `POST /api/3.0/mlflow/traces` (StartTraceV3) per trace, carrying
//! the gateway metadata (`mlflow.gateway.endpointId`, `requestType`, `caller`), which MLflow's OTLP
//! handler does not take from span attributes. [`post_infos`] is the stage before a batch's spans
//! (a few at a time, within a budget; it stops early when the server struggles); the delivery
//! task posts the infos left over after their spans. Retries follow the MLflow transport's one
//! policy.

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, Method, StatusCode};
use opentelemetry::trace::TraceId;
use opentelemetry_http::{Bytes, Request};

use super::counters::Counters;
use super::http::ExportHttp;
use super::record::Head;
use super::schema::{META_SCHEMA_VERSION, TAG_TRACE_NAME, mlflow_trace_id};

/// Trace-info requests in flight at once.
const TRACE_INFO_CONCURRENCY: usize = 4;

/// What the trace-info request needs: from a queue record's head.
#[derive(Debug, Clone)]
pub(super) struct TraceInfoJob {
    pub(super) trace_id: TraceId,
    pub(super) start: SystemTime,
    pub(super) end: SystemTime,
    pub(super) error: bool,
    /// The gateway metadata (`mlflow.gateway.*`, the caller's identity), as recorded.
    pub(super) metadata: Vec<(String, String)>,
}

impl TraceInfoJob {
    pub(super) fn from_head(head: &Head<'_>) -> Self {
        TraceInfoJob {
            trace_id: TraceId::from_bytes(head.trace_id),
            start: UNIX_EPOCH + Duration::from_nanos(head.start_ns),
            end: UNIX_EPOCH + Duration::from_nanos(head.end_ns),
            error: head.error,
            metadata: head
                .metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
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
            r#"}}}},"request_time":"{}","execution_duration":"{}","state":"{}","trace_metadata":{{"{META_SCHEMA_VERSION}":"3""#,
            rfc3339(job.start),
            proto_duration(duration),
            if job.error { "ERROR" } else { "OK" },
        );
        for (key, value) in &job.metadata {
            out.push(',');
            str_json(&mut out, key);
            out.push(':');
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

/// What became of one trace's info in a trace-info stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum InfoOutcome {
    Stored,
    /// Refused for good (for example the experiment is gone) or failing after the retries.
    Failed,
    /// Not posted: the stage's time was up, or the tracking server kept failing.
    Late,
}

/// Posts the trace infos of `jobs`, a few at a time, for at most `budget`. Stops early, leaving
/// the rest late, when one fails on a transient error after its retries (the server is struggling
/// or down: the rest would wait for the same).
pub(super) async fn post_infos(
    poster: &TraceInfoPoster,
    counters: &Counters,
    jobs: &[TraceInfoJob],
    budget: Duration,
) -> Vec<InfoOutcome> {
    use futures::StreamExt as _;
    let deadline = tokio::time::Instant::now() + budget;
    let mut outcomes = vec![InfoOutcome::Late; jobs.len()];
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
        outcomes[index] = match &result {
            Ok(()) => InfoOutcome::Stored,
            // The server down or struggling: tried again after the spans (which wait for it).
            Err(failure) if failure.transient => {
                struggling = true;
                InfoOutcome::Late
            }
            Err(_) => InfoOutcome::Failed,
        };
        note_info_result(poster, counters, &jobs[index], result.as_ref().err());
    }
    outcomes
}

/// Logs a trace info's fate: a warning at the start of a streak of failures, not per trace.
fn note_info_result(
    poster: &TraceInfoPoster,
    counters: &Counters,
    job: &TraceInfoJob,
    failure: Option<&InfoFailure>,
) {
    let counter = if failure.is_none() {
        &counters.info_ok
    } else {
        &counters.info_error
    };
    counter.fetch_add(1, Ordering::Relaxed);
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
    use super::super::schema::*;
    use super::*;
    use crate::mlflow::{MlflowConfig, Transport};
    use std::sync::Arc;
    use url::Url;

    #[tokio::test]
    async fn trace_info_body() {
        let config = MlflowConfig::new(Url::parse("http://127.0.0.1:1").unwrap()).unwrap();
        let transport = Transport::new(&config, Duration::from_secs(1)).unwrap();
        let poster = TraceInfoPoster {
            http: ExportHttp::new(Arc::new(transport), "7").unwrap(),
            uri: "http://127.0.0.1:1/api/3.0/mlflow/traces".parse().unwrap(),
            experiment_id: "7".into(),
            trace_name: "gateway/chat".into(),
        };
        let job = TraceInfoJob {
            trace_id: TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_millis(1250),
            error: true,
            metadata: vec![
                (META_ENDPOINT_ID.into(), "uid-1".into()),
                (META_REQUEST_TYPE.into(), "unified/chat".into()),
            ],
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
        let mut metadata = job.metadata.clone();
        metadata.extend([
            (META_CALLER.into(), "a \"quoted\" caller\\".into()),
            (META_AUTH_USERNAME.into(), "apikey:ci".into()),
            (META_TRACE_USER.into(), "apikey:ci".into()),
        ]);
        let quoted = TraceInfoJob {
            error: false,
            metadata,
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
