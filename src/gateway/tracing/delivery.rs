//! The delivery task: takes records from the trace queue oldest first, in batches, and stores
//! them in MLflow in the configured [`ExportMode`]; acknowledges a batch (the queue's durable
//! cursor) only once every record in it is settled, stored or refused for good.
//!
//! * No answer, a 5xx, 408 or 429: the same request again after a pause (0.5 s doubling to 30 s),
//!   for as long as it takes: records wait in the queue, which drops only when full. A batch not
//!   answered within the export timeout is sent again in halves (MLflow upserts spans, so a batch
//!   it stored after all is stored once).
//! * Any other 4xx (a malformed or unauthorized batch, a deleted experiment): the batch is split in
//!   halves and each sent alone, down to single traces; a trace refused alone is dropped and
//!   counted (`traces_dropped_total{reason="rejected"}`). 401 and 403 are in this class: a
//!   credential MLflow refuses would otherwise fill the queue with traces no retry can store.
//!
//! Modes: `info-then-spans` posts the batch's trace infos (at most [`INFO_BATCH`] traces, within
//! [`INFO_BUDGET`]) and then its spans, so a trace is stored complete within about a second of
//! its info; infos that had no time go after their spans. `spans-only` sends each record with
//! its metadata as root-span tags. `adaptive` is `info-then-spans` while the queue keeps up and
//! `spans-only` while it is behind ([`ExportMode::Adaptive`]); the infos that had no time in its
//! stage go as tags too.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, Method, StatusCode};
use opentelemetry_http::{Bytes, Request};

use super::counters::Counters;
use super::http::ExportHttp;
use super::queue::{QueueReader, TraceQueue};
use super::record::{RecordView, append_resource_spans, decode_record};
use super::trace_info::{InfoOutcome, TraceInfoJob, TraceInfoPoster, post_infos};

/// How traces reach MLflow (`GATEWAY_TRACE_EXPORT_MODE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExportMode {
    /// `info-then-spans`: one StartTraceV3 per trace (the gateway metadata as trace metadata,
    /// as MLflow's own gateway writes it), then one OTLP request per batch.
    InfoThenSpans,
    /// `spans-only`: one OTLP request per batch; the gateway metadata as trace tags.
    #[default]
    SpansOnly,
    /// `adaptive`: `info-then-spans` while the queue keeps up; `spans-only` while it is behind,
    /// that is while its oldest trace waits longer than [`BEHIND_AGE`] or more than one
    /// info-then-spans batch ([`INFO_BATCH`] traces) waits.
    Adaptive,
}

impl ExportMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            ExportMode::InfoThenSpans => "info-then-spans",
            ExportMode::SpansOnly => "spans-only",
            ExportMode::Adaptive => "adaptive",
        }
    }
}

impl std::str::FromStr for ExportMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "info-then-spans" => Ok(ExportMode::InfoThenSpans),
            "spans-only" => Ok(ExportMode::SpansOnly),
            "adaptive" => Ok(ExportMode::Adaptive),
            other => Err(format!(
                "{other:?} is not an export mode: info-then-spans, spans-only or adaptive"
            )),
        }
    }
}

/// Traces per batch when their infos go first: their infos take about a second at most, so a
/// trace's spans follow its info within about a second.
pub(super) const INFO_BATCH: usize = 32;
/// Time the infos of a batch may take before its spans go.
pub(super) const INFO_BUDGET: Duration = Duration::from_secs(1);
/// Adaptive: the queue is behind when its oldest trace is older than this.
pub(super) const BEHIND_AGE: Duration = Duration::from_secs(2);
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const LONGEST_PAUSE: Duration = Duration::from_secs(30);

pub(super) struct Delivery {
    pub(super) http: ExportHttp,
    /// `<tracking uri>/v1/traces`.
    pub(super) otlp_uri: axum::http::Uri,
    /// None in tests of the span pipeline: every info counts as stored.
    pub(super) poster: Option<TraceInfoPoster>,
    pub(super) counters: Arc<Counters>,
    pub(super) queue: TraceQueue,
    pub(super) mode: ExportMode,
    pub(super) max_batch: usize,
    pub(super) max_batch_bytes: usize,
    pub(super) export_timeout: Duration,
    pub(super) experiment_id: String,
}

enum Answer {
    Stored,
    Refused(String),
    /// No answer within the export timeout: the batch is sent again in halves (a batch MLflow
    /// cannot store within the timeout would otherwise be sent again forever).
    TooSlow,
}

impl Delivery {
    /// Whether the queue is behind (adaptive mode's switch).
    fn behind(&self) -> bool {
        let stats = self.queue.stats();
        stats.traces > INFO_BATCH as u64 || stats.oldest_age.is_some_and(|age| age > BEHIND_AGE)
    }

    /// Runs until the task is aborted (shutdown) or the runtime ends.
    pub(super) async fn run(self, mut reader: QueueReader) {
        loop {
            let infos = match self.mode {
                ExportMode::InfoThenSpans => true,
                ExportMode::SpansOnly => false,
                ExportMode::Adaptive => !self.behind(),
            };
            let max = if infos { INFO_BATCH } else { self.max_batch };
            let batch = reader.next_batch(max, self.max_batch_bytes).await;
            self.deliver(&batch, infos).await;
            if let Err(e) = reader.ack(batch.len()) {
                tracing::warn!(error = %e, "trace queue: cannot record what was delivered; those traces may be sent again after a restart");
            }
            self.counters.settled(batch.len());
        }
    }

    async fn deliver(&self, batch: &[Vec<u8>], infos: bool) {
        let mut records: Vec<RecordView<'_>> = Vec::with_capacity(batch.len());
        for bytes in batch {
            match decode_record(bytes) {
                Some(record) => records.push(record),
                None => {
                    tracing::warn!("trace queue: a record of an unknown format, dropped");
                    self.counters.rejected(0);
                }
            }
        }
        let adaptive = self.mode == ExportMode::Adaptive;
        let mut outcomes = vec![InfoOutcome::Stored; records.len()];
        let mut with_tags = vec![!infos; records.len()];
        let jobs: Vec<TraceInfoJob> = if infos && self.poster.is_some() {
            records
                .iter()
                .map(|r| TraceInfoJob::from_head(&r.head))
                .collect()
        } else {
            Vec::new()
        };
        if let Some(poster) = self.poster.as_ref().filter(|_| infos) {
            outcomes = post_infos(poster, &self.counters, &jobs, INFO_BUDGET).await;
            if adaptive {
                for (tags, outcome) in with_tags.iter_mut().zip(&outcomes) {
                    *tags = *outcome == InfoOutcome::Late;
                }
            }
        }
        let stored = self.send_spans(&records, &with_tags).await;
        // Infos that had no time before their spans (info-then-spans), now after them.
        let late: Vec<usize> = (0..records.len())
            .filter(|&i| stored[i] && !with_tags[i] && outcomes[i] == InfoOutcome::Late)
            .collect();
        if let (Some(poster), false) = (&self.poster, late.is_empty()) {
            let late_jobs: Vec<TraceInfoJob> = late.iter().map(|&i| jobs[i].clone()).collect();
            let budget = self.export_timeout.saturating_mul(4);
            let late_outcomes = post_infos(poster, &self.counters, &late_jobs, budget).await;
            for (&i, outcome) in late.iter().zip(late_outcomes) {
                outcomes[i] = outcome;
            }
        }
        for (i, record) in records.iter().enumerate() {
            if stored[i] {
                let with_metadata = with_tags[i] || outcomes[i] == InfoOutcome::Stored;
                self.counters.delivered(record.head.spans, with_metadata);
            } else {
                self.counters.rejected(record.head.spans);
            }
        }
    }

    /// Sends the records' spans, splitting a refused batch down to single traces. Returns which
    /// were stored (the others were refused alone).
    async fn send_spans(&self, records: &[RecordView<'_>], with_tags: &[bool]) -> Vec<bool> {
        let mut stored = vec![true; records.len()];
        let mut parts = vec![(0, records.len())];
        while let Some((lo, hi)) = parts.pop() {
            if lo >= hi {
                continue;
            }
            let mut body = Vec::with_capacity(
                records[lo..hi]
                    .iter()
                    .map(|r| r.len_hint() + 64)
                    .sum::<usize>(),
            );
            for i in lo..hi {
                append_resource_spans(&mut body, &records[i], with_tags[i]);
            }
            match self
                .post_until_answered(Bytes::from(body), hi - lo > 1)
                .await
            {
                Answer::Stored => {}
                Answer::TooSlow => {
                    let mid = lo + (hi - lo) / 2;
                    parts.push((mid, hi));
                    parts.push((lo, mid));
                }
                Answer::Refused(reason) if hi - lo == 1 => {
                    stored[lo] = false;
                    tracing::warn!(
                        experiment_id = %self.experiment_id,
                        %reason,
                        "MLflow refused a trace for good: dropped"
                    );
                }
                Answer::Refused(_) => {
                    let mid = lo + (hi - lo) / 2;
                    parts.push((mid, hi));
                    parts.push((lo, mid));
                }
            }
        }
        stored
    }

    /// Posts one OTLP body until MLflow stores or refuses it for good (or, `splittable`, does
    /// not answer it within the export timeout).
    async fn post_until_answered(&self, body: Bytes, splittable: bool) -> Answer {
        let mut pause = FIRST_PAUSE;
        loop {
            let sent = tokio::time::Instant::now();
            let mut request = Request::new(body.clone());
            *request.method_mut() = Method::POST;
            *request.uri_mut() = self.otlp_uri.clone();
            request.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-protobuf"),
            );
            let reason = match self.http.send(request).await {
                Ok((status, _)) if status.is_success() => {
                    self.counters.otlp(true, &self.experiment_id, "");
                    return Answer::Stored;
                }
                Ok((status, text)) => {
                    let reason = format!(
                        "HTTP {}: {}",
                        status.as_u16(),
                        crate::text::clip(String::from_utf8_lossy(&text).trim(), 300)
                    );
                    if status.is_client_error()
                        && status != StatusCode::REQUEST_TIMEOUT
                        && status != StatusCode::TOO_MANY_REQUESTS
                    {
                        self.counters.otlp(false, &self.experiment_id, &reason);
                        return Answer::Refused(reason);
                    }
                    reason
                }
                Err(reason) => {
                    if splittable && sent.elapsed() >= self.export_timeout.mul_f64(0.9) {
                        self.counters.otlp(false, &self.experiment_id, &reason);
                        return Answer::TooSlow;
                    }
                    reason
                }
            };
            self.counters.otlp(false, &self.experiment_id, &reason);
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    }
}

/// The delivery task's thread: a current-thread tokio runtime that runs until this is dropped, so
/// that encoding and sending never hold up a runtime thread that serves requests.
#[derive(Debug)]
pub(super) struct ExportThread {
    pub(super) handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ExportThread {
    /// None (the export then runs on the caller's runtime) if the thread cannot be started.
    pub(super) fn start() -> Option<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let runtime = match runtime {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::warn!(error = %e, "no runtime for trace export: it shares the gateway's");
                return None;
            }
        };
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let started = std::thread::Builder::new()
            .name("trace-export".to_string())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            });
        match started {
            Ok(_) => Some(ExportThread {
                handle,
                _stop: stop,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "no thread for trace export: it shares the gateway's");
                None
            }
        }
    }
}

/// Whether the delivery paused to try again since `retries_before` was read (MLflow is down or
/// failing: flush stops waiting then).
pub(super) fn retried_since(counters: &Counters, retries_before: u64) -> bool {
    counters.retries.load(Ordering::Relaxed) > retries_before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        for mode in [
            ExportMode::InfoThenSpans,
            ExportMode::SpansOnly,
            ExportMode::Adaptive,
        ] {
            assert_eq!(mode.as_str().parse::<ExportMode>(), Ok(mode));
        }
        assert!("both".parse::<ExportMode>().is_err());
    }
}
