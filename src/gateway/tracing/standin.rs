//! THROWAWAY: an in-memory stand-in for the trace queue (`queue/`, helper `q`), with its API, so
//! that the export pipeline builds before the queue is merged. Deleted at the merge.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct QueueConfig {
    #[allow(dead_code)]
    pub dir: Option<PathBuf>,
    pub max_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("trace queue: {0}")]
pub struct QueueError(String);

#[derive(Debug)]
pub struct Full;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub bytes: u64,
    pub traces: u64,
    pub oldest_age: Option<Duration>,
    pub durable: bool,
}

#[derive(Default)]
struct State {
    records: VecDeque<(Instant, Vec<u8>)>,
    bytes: u64,
    /// Records handed out by the last batch (not yet acked).
    lent: usize,
}

struct Shared {
    state: Mutex<State>,
    notify: tokio::sync::Notify,
    max_bytes: u64,
}

#[derive(Clone)]
pub struct TraceQueue(Arc<Shared>);

pub struct QueueReader(Arc<Shared>);

pub fn open(config: QueueConfig) -> Result<(TraceQueue, QueueReader), QueueError> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        notify: tokio::sync::Notify::new(),
        max_bytes: config.max_bytes,
    });
    Ok((TraceQueue(Arc::clone(&shared)), QueueReader(shared)))
}

impl TraceQueue {
    pub fn has_room(&self) -> bool {
        self.0
            .state
            .lock()
            .is_ok_and(|s| s.bytes < self.0.max_bytes)
    }

    pub fn push(&self, payload: Vec<u8>) -> Result<(), Full> {
        let mut s = self.0.state.lock().map_err(|_| Full)?;
        if s.bytes + payload.len() as u64 > self.0.max_bytes {
            return Err(Full);
        }
        s.bytes += payload.len() as u64;
        s.records.push_back((Instant::now(), payload));
        drop(s);
        self.0.notify.notify_one();
        Ok(())
    }

    pub fn stats(&self) -> QueueStats {
        let Ok(s) = self.0.state.lock() else {
            return QueueStats::default();
        };
        QueueStats {
            bytes: s.bytes,
            traces: s.records.len() as u64,
            oldest_age: s.records.front().map(|(t, _)| t.elapsed()),
            durable: false,
        }
    }

    pub fn flush(&self, _deadline: Instant) {}
}

impl QueueReader {
    pub async fn next_batch(&mut self, max_records: usize, max_bytes: usize) -> Vec<Vec<u8>> {
        loop {
            let notified = self.0.notify.notified();
            if let Ok(mut s) = self.0.state.lock()
                && !s.records.is_empty()
            {
                let mut out = Vec::new();
                let mut bytes = 0;
                for (_, r) in s.records.iter() {
                    if out.len() >= max_records.max(1)
                        || (!out.is_empty() && bytes + r.len() > max_bytes)
                    {
                        break;
                    }
                    bytes += r.len();
                    out.push(r.clone());
                }
                s.lent = out.len();
                return out;
            }
            notified.await;
        }
    }

    pub fn ack(&mut self, n: usize) -> io::Result<()> {
        let mut s = self
            .0
            .state
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        for _ in 0..n.min(s.lent) {
            if let Some((_, r)) = s.records.pop_front() {
                s.bytes -= r.len() as u64;
            }
        }
        s.lent = 0;
        Ok(())
    }
}
