//! The trace queue: finished traces (opaque encoded records) wait here, oldest first, until the
//! delivery task has them stored by MLflow. Shaped by three constraints:
//!
//! - **A request never waits.** [`TraceQueue::push`] reserves the record's bytes against the bound
//!   with one atomic, then moves the `Vec` into an in-memory handoff under a mutex held for a
//!   `VecDeque::push_back`. No syscall on a busy queue: the disk writer is only woken (a futex)
//!   when it is fully idle; while busy it polls the handoff every [`disk::LINGER`].
//! - **A container restart loses nothing written.** With a directory (the
//!   pod's `emptyDir`), one writer thread appends records to segment files, every record framed
//!   with its length, a CRC-32C and its enqueue time ([`frame`]), many records per `write`. The
//!   reader reads them back from the files; [`QueueReader::ack`] writes a cursor (write a
//!   temporary file, rename it over the old one) and deletes segments wholly behind it. On
//!   [`open`] a torn tail is truncated and every record behind the cursor is delivered again.
//! - **Bounded.** `max_bytes` bounds the undelivered records in memory and on disk together
//!   (payloads plus their 16-byte frame headers); at the bound `push` returns [`Full`] and
//!   `has_room` false, so whole traces are dropped at their start, not halfway.
//!
//! Delivery is at least once: a crash between a delivery and its ack sends those records again.
//! MLflow 3.17.2 takes that without duplicates: `/v1/traces` upserts spans by (trace id, span id)
//! (`SqlAlchemyStore._log_spans_once`, "bulk upsert") and a repeated StartTraceV3 of a stored
//! trace takes its `IntegrityError` merge path.
//!
//! Durability is against the process dying (SIGKILL, OOM, a crash): the page cache survives it,
//! so there is no `fsync`. A node's power loss loses the pod's `emptyDir` anyway. A record is
//! on disk within about [`disk::LINGER`] plus one write of its push; a SIGKILL inside that window
//! loses it (writing on the request path is what would close it). [`TraceQueue::flush`], on
//! SIGTERM, leaves none behind.
//!
//! Without a directory the queue is memory only, with the same API and semantics but for the
//! restart.
//!
//! [`QueueReader::ack`] of a partial batch: the records not acked come first in the next batch
//! (a failed delivery is retried by not acking it). The enqueue times kept in the frames give
//! [`QueueStats::oldest_age`] after a restart; ages are tracked per 100 ms, so it may be up to
//! that much too old.

mod disk;
mod frame;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use frame::FRAME_HEADER;

/// With a directory, records pushed but not yet written take at most this much memory: the
/// writer keeps it near empty (hundreds of MB/s), so it only fills while the disk fails, and
/// pushes are then refused rather than held in memory up to `max_bytes`.
pub const MAX_HANDOFF_BYTES: u64 = 16 << 20;

/// Where the queue keeps records and how much it may hold.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    /// The directory of segment files (created if missing); `None`: memory only.
    pub dir: Option<PathBuf>,
    /// Undelivered bytes (payloads plus 16 bytes each), in memory and on disk together, at most.
    pub max_bytes: u64,
}

/// Why the queue could not be opened. With a directory, the caller may fall back to memory.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("trace queue directory {}: cannot {action}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error(
        "trace queue directory {} is in use by another process (its lock file is held)",
        dir.display()
    )]
    InUse { dir: PathBuf },
}

/// The queue was at its byte bound: the record was dropped (the caller counts it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the trace queue is full")
    }
}

impl std::error::Error for Full {}

/// What the queue holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Undelivered bytes (payloads plus frame headers), in memory and on disk.
    pub bytes: u64,
    /// Undelivered records.
    pub traces: u64,
    /// Age of the oldest undelivered record (from its enqueue time, kept across restarts).
    pub oldest_age: Option<Duration>,
    /// Whether records are kept on disk.
    pub durable: bool,
}

/// Opens the queue: memory only without a directory; with one, creates it if missing, takes its
/// lock file, recovers what an earlier process left (truncating a torn tail) and starts the
/// writer thread.
pub fn open(config: QueueConfig) -> Result<(TraceQueue, QueueReader), QueueError> {
    match config.dir {
        None => {
            let shared = Arc::new(Shared::new(config.max_bytes, false, None));
            let queue = TraceQueue::new(Arc::clone(&shared), None);
            let reader = QueueReader {
                shared,
                kind: ReaderKind::Memory(MemoryReader::default()),
            };
            Ok((queue, reader))
        }
        Some(dir) => disk::open(dir, config.max_bytes),
    }
}

/// The producer side. Cheap to clone; every clone pushes into the same queue. When the last one
/// is dropped, the writer thread writes what is left and stops (the drop waits for it).
#[derive(Clone)]
pub struct TraceQueue {
    producer: Arc<Producer>,
}

struct Producer {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for TraceQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceQueue")
            .field("stats", &self.stats())
            .finish()
    }
}

impl TraceQueue {
    fn new(shared: Arc<Shared>, writer: Option<JoinHandle<()>>) -> Self {
        TraceQueue {
            producer: Arc::new(Producer {
                shared,
                writer: Mutex::new(writer),
            }),
        }
    }

    /// Whether a record could be pushed now: checked at a trace's start, so a trace is dropped
    /// whole rather than after its work. One atomic load.
    pub fn has_room(&self) -> bool {
        let shared = &self.producer.shared;
        shared.bytes.load(Ordering::Relaxed) < shared.max_bytes
    }

    /// Queues one record. Never blocks on the disk or the delivery; `Err(Full)` when the record
    /// does not fit in the bound (it is dropped).
    pub fn push(&self, payload: Vec<u8>) -> Result<(), Full> {
        let shared = &self.producer.shared;
        if payload.len() > u32::MAX as usize {
            return Err(Full);
        }
        let size = (payload.len() + FRAME_HEADER) as u64;
        shared
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                let after = used.checked_add(size)?;
                (after <= shared.max_bytes).then_some(after)
            })
            .map_err(|_| Full)?;
        let enqueued_us = now_us();
        let wake_writer = {
            let mut st = shared.lock();
            if shared.durable {
                // A disk that fails must not turn the queue into memory held until the bound.
                if st.handoff_bytes + size > MAX_HANDOFF_BYTES {
                    drop(st);
                    shared.bytes.fetch_sub(size, Ordering::Relaxed);
                    return Err(Full);
                }
                st.handoff_bytes += size;
            }
            st.pending.push_back(Record {
                enqueued_us,
                payload,
            });
            st.traces += 1;
            st.pushed += 1;
            st.ages.push(enqueued_us);
            std::mem::take(&mut st.writer_idle)
        };
        if shared.durable {
            if wake_writer {
                shared.writer_cv.notify_one();
            }
        } else {
            // Memory only: the reader takes records straight from the handoff. An atomic store
            // of a permit unless the reader is waiting.
            shared.readable.notify_one();
        }
        Ok(())
    }

    pub fn stats(&self) -> QueueStats {
        self.producer.shared.stats()
    }

    /// Waits (blocking the thread) until every record pushed before the call is written to
    /// disk, or until `deadline`. For SIGTERM: call it from `spawn_blocking`, not on a runtime
    /// thread. Memory only: returns at once.
    pub fn flush(&self, deadline: Instant) {
        let shared = &self.producer.shared;
        if !shared.durable {
            return;
        }
        let mut st = shared.lock();
        let target = st.pushed;
        if st.written >= target {
            return;
        }
        st.flush_waiters += 1;
        shared.writer_cv.notify_one();
        while st.written < target && !st.writer_done {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = shared
                .written_cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        st.flush_waiters -= 1;
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.writer_cv.notify_all();
        self.shared.readable.notify_one();
        let writer = self
            .writer
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer
            && writer.join().is_err()
        {
            ::tracing::error!("the trace queue's writer thread panicked");
        }
    }
}

/// The delivery side: one per queue.
pub struct QueueReader {
    shared: Arc<Shared>,
    kind: ReaderKind,
}

enum ReaderKind {
    Memory(MemoryReader),
    Disk(disk::DiskReader),
}

impl fmt::Debug for QueueReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueReader")
            .field("durable", &self.shared.durable)
            .finish_non_exhaustive()
    }
}

impl QueueReader {
    /// The oldest undelivered records, at least one: at most `max_records` and, beyond the
    /// first, at most `max_bytes` of payload; what is there now (on disk: written), not waiting
    /// for a full batch. Records of the last batch that were not acked come
    /// first again. Waits until there is one; empty only once every [`TraceQueue`] is dropped
    /// and nothing is left. Cancel-safe: a dropped call takes nothing out of the queue.
    pub async fn next_batch(&mut self, max_records: usize, max_bytes: usize) -> Vec<Vec<u8>> {
        let max_records = max_records.max(1);
        loop {
            let (batch, finished) = match &mut self.kind {
                ReaderKind::Memory(m) => m.take(&self.shared, max_records, max_bytes),
                ReaderKind::Disk(d) => d.take(&self.shared, max_records, max_bytes),
            };
            if !batch.is_empty() || finished {
                return batch;
            }
            // A notify_one that came after `take` looked left a permit: no wakeup is lost.
            self.shared.readable.notified().await;
        }
    }

    /// What the queue holds now (as [`TraceQueue::stats`]), e.g. the backlog's age.
    pub fn stats(&self) -> QueueStats {
        self.shared.stats()
    }

    /// The first `n` records of the last batch are done (stored or rejected for good): they
    /// leave the queue. With a directory the cursor is written first; an `Err` means it could
    /// not be, and these records may be delivered again after a restart (they are done for
    /// this process either way).
    pub fn ack(&mut self, n: usize) -> io::Result<()> {
        match &mut self.kind {
            ReaderKind::Memory(m) => m.ack(&self.shared, n),
            ReaderKind::Disk(d) => d.ack(&self.shared, n),
        }
    }
}

/// State shared by the producers, the writer thread and the reader.
struct Shared {
    max_bytes: u64,
    /// Undelivered bytes, reserved by `push`, released by `ack`.
    bytes: AtomicU64,
    durable: bool,
    state: Mutex<State>,
    /// The writer waits here when idle.
    writer_cv: Condvar,
    /// `flush` waits here for the writer.
    written_cv: Condvar,
    /// The reader waits here for records.
    readable: Notify,
    /// The directory's lock file, held while any part of the queue lives.
    _lock: Option<File>,
}

#[derive(Default)]
struct State {
    /// Pushed records: memory only, the undelivered ones not yet in a batch; with a directory,
    /// those not yet taken by the writer.
    pending: VecDeque<Record>,
    /// Undelivered records.
    traces: u64,
    ages: Ages,
    /// With a directory: bytes (with headers) pushed and not yet written, at most
    /// [`MAX_HANDOFF_BYTES`].
    handoff_bytes: u64,
    /// Records pushed and written since open, for `flush`.
    pushed: u64,
    written: u64,
    /// The writer sleeps until woken (rather than polling).
    writer_idle: bool,
    flush_waiters: usize,
    /// Every TraceQueue is dropped.
    closed: bool,
    /// The writer thread has stopped: nothing more will be written.
    writer_done: bool,
    /// Segment files, oldest first; the last is the writer's.
    segments: VecDeque<disk::Segment>,
}

struct Record {
    enqueued_us: u64,
    payload: Vec<u8>,
}

impl Shared {
    fn new(max_bytes: u64, durable: bool, lock: Option<File>) -> Self {
        Shared {
            max_bytes,
            bytes: AtomicU64::new(0),
            durable,
            state: Mutex::new(State::default()),
            writer_cv: Condvar::new(),
            written_cv: Condvar::new(),
            readable: Notify::new(),
            _lock: lock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere leaves counters, not broken invariants: go on.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stats(&self) -> QueueStats {
        let (traces, oldest) = {
            let st = self.lock();
            (st.traces, st.ages.oldest())
        };
        QueueStats {
            bytes: self.bytes.load(Ordering::Relaxed),
            traces,
            oldest_age: oldest.map(|t| Duration::from_micros(now_us().saturating_sub(t))),
            durable: self.durable,
        }
    }

    /// `records` records of `bytes` bytes (with headers) left the queue.
    fn release(&self, records: u64, bytes: u64) {
        {
            let mut st = self.lock();
            st.traces = st.traces.saturating_sub(records);
            st.ages.pop(records);
        }
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(bytes))
            });
    }
}

/// The reader of a memory-only queue: the records of the last batch stay in `inflight` until
/// acked, and the batch hands out copies.
#[derive(Default)]
struct MemoryReader {
    inflight: VecDeque<Record>,
    batch: usize,
}

impl MemoryReader {
    fn take(
        &mut self,
        shared: &Shared,
        max_records: usize,
        max_bytes: usize,
    ) -> (Vec<Vec<u8>>, bool) {
        let mut count = 0;
        let mut bytes = 0usize;
        let fits = |count: usize, bytes: usize, len: usize| {
            count < max_records && (count == 0 || bytes.saturating_add(len) <= max_bytes)
        };
        for r in &self.inflight {
            if !fits(count, bytes, r.payload.len()) {
                break;
            }
            count += 1;
            bytes += r.payload.len();
        }
        let mut finished = false;
        if count == self.inflight.len() {
            let mut st = shared.lock();
            while let Some(front) = st.pending.front() {
                if !fits(count, bytes, front.payload.len()) {
                    break;
                }
                count += 1;
                bytes += front.payload.len();
                if let Some(record) = st.pending.pop_front() {
                    self.inflight.push_back(record);
                }
            }
            finished = count == 0 && st.closed;
        }
        // Copies are made outside the lock: pushes never wait for them.
        self.batch = count;
        let batch = self
            .inflight
            .iter()
            .take(count)
            .map(|r| r.payload.clone())
            .collect();
        (batch, finished)
    }

    fn ack(&mut self, shared: &Shared, n: usize) -> io::Result<()> {
        check_ack(n, self.batch)?;
        self.batch = 0;
        let bytes: u64 = self
            .inflight
            .drain(..n)
            .map(|r| (r.payload.len() + FRAME_HEADER) as u64)
            .sum();
        if n > 0 {
            shared.release(n as u64, bytes);
        }
        Ok(())
    }
}

fn check_ack(n: usize, batch: usize) -> io::Result<()> {
    if n > batch {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("trace queue: ack of {n} records, but the last batch had {batch}"),
        ));
    }
    Ok(())
}

/// Enqueue times of the undelivered records, oldest first, counted per [`Ages::BUCKET_US`]:
/// a few entries per second of backlog, whatever the rate.
#[derive(Default)]
struct Ages {
    /// (enqueue time of the bucket's first record, records in it)
    buckets: VecDeque<(u64, u64)>,
}

impl Ages {
    const BUCKET_US: u64 = 100_000;

    fn push(&mut self, enqueued_us: u64) {
        match self.buckets.back_mut() {
            // Pushes from several threads may arrive a little out of order: same bucket.
            Some((first, count)) if enqueued_us.abs_diff(*first) < Self::BUCKET_US => *count += 1,
            _ => self.buckets.push_back((enqueued_us, 1)),
        }
    }

    fn pop(&mut self, mut n: u64) {
        while n > 0 {
            let Some((_, count)) = self.buckets.front_mut() else {
                return;
            };
            let take = n.min(*count);
            *count -= take;
            n -= take;
            if *count == 0 {
                self.buckets.pop_front();
            }
        }
    }

    fn oldest(&self) -> Option<u64> {
        self.buckets.front().map(|(first, _)| *first)
    }
}

/// Microseconds since the Unix epoch: enqueue times survive a restart.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
