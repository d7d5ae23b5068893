//! The queue's files: recovery at open, the writer thread that appends records to segments, and
//! the reader that reads them back and moves the cursor. Files in the directory:
//! `segment-<id>.log` (records, [`SEGMENT_BYTES`] each at most unless one record is larger),
//! `cursor` (the first undelivered record; missing: the oldest segment's first), `lock`.
//!
//! Only the writer thread writes segments, at offsets it tracks (`pwrite`), so a failed write is
//! simply written again at the same place; only the reader writes the cursor and deletes
//! segments. They meet in [`super::State::segments`]: the writer publishes each segment's
//! written length there after a write, the reader reads no further.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::frame::{
    FRAME_HEADER, FrameHeader, SEGMENT_HEADER, SEGMENT_MAGIC, decode_cursor, encode_cursor,
    encode_frame,
};
use super::{Ages, QueueError, QueueReader, ReaderKind, Record, Shared, TraceQueue, check_ack};

/// A segment is closed and a new one started once it would grow beyond this; a segment is
/// deleted once every record in it is delivered, so disk use exceeds the undelivered bytes by
/// at most about two segments (the reader's and the writer's).
pub(super) const SEGMENT_BYTES: u64 = 4 << 20;
/// How long the writer, after a write, keeps looking for new records before it sleeps until
/// woken: under load, pushes never pay for a wakeup (a futex syscall).
pub(super) const LINGER: Duration = Duration::from_millis(2);
/// The reader reads segments this much at a time.
const READ_CHUNK: usize = 256 << 10;
const CURSOR_FILE: &str = "cursor";
const CURSOR_TMP: &str = "cursor.tmp";
const LOCK_FILE: &str = "lock";

/// One segment file as the writer has published it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    pub id: u64,
    /// Bytes written and readable (header included).
    pub len: u64,
}

/// A place in the queue's files: a record starts (or the last one ended) here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pos {
    segment: u64,
    offset: u64,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("segment-{id:020}.log"))
}

fn segment_id(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("segment-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(super) fn open(dir: PathBuf, max_bytes: u64) -> Result<(TraceQueue, QueueReader), QueueError> {
    let fail = |action: &'static str| {
        let dir = dir.clone();
        move |source| QueueError::Dir {
            dir,
            action,
            source,
        }
    };
    fs::create_dir_all(&dir).map_err(fail("create it"))?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(fail("write in it"))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(QueueError::InUse { dir }),
        Err(TryLockError::Error(e)) => return Err(fail("lock it")(e)),
    }
    let recovered = recover(&dir).map_err(fail("recover its records"))?;
    let writer_id = recovered.next_id;
    let file = new_segment(&dir, writer_id).map_err(fail("write in it"))?;
    let cursor = recovered.cursor.unwrap_or(Pos {
        segment: writer_id,
        offset: SEGMENT_HEADER,
    });
    if recovered.traces > 0 {
        ::tracing::info!(
            dir = %dir.display(),
            traces = recovered.traces,
            bytes = recovered.bytes,
            "trace queue: undelivered traces recovered from disk"
        );
    }
    let shared = Arc::new(Shared::new(max_bytes, true, Some(lock)));
    shared.bytes.store(recovered.bytes, Ordering::Relaxed);
    {
        let mut st = shared.lock();
        st.traces = recovered.traces;
        st.ages = recovered.ages;
        st.segments = recovered.segments;
        st.segments.push_back(Segment {
            id: writer_id,
            len: SEGMENT_HEADER,
        });
    }
    let writer = Writer {
        dir: dir.clone(),
        shared: Arc::clone(&shared),
        file,
        id: writer_id,
        len: SEGMENT_HEADER,
        buf: Vec::new(),
    };
    let thread = std::thread::Builder::new()
        .name("trace-queue-writer".to_string())
        .spawn(move || writer.run())
        .map_err(fail("start its writer thread"))?;
    let reader = DiskReader {
        dir,
        cursor,
        file: None,
        buf: Vec::new(),
        buf_at: Pos {
            segment: u64::MAX,
            offset: 0,
        },
        batch: Vec::new(),
    };
    let queue = TraceQueue::new(Arc::clone(&shared), Some(thread));
    Ok((
        queue,
        QueueReader {
            shared,
            kind: ReaderKind::Disk(reader),
        },
    ))
}

fn new_segment(dir: &Path, id: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(segment_path(dir, id))?;
    file.write_all_at(&SEGMENT_MAGIC, 0)?;
    Ok(file)
}

/// What an earlier process left in the directory.
#[derive(Default)]
struct Recovered {
    /// Segments holding undelivered records, oldest first.
    segments: VecDeque<Segment>,
    /// The first undelivered record; None: there is none.
    cursor: Option<Pos>,
    bytes: u64,
    traces: u64,
    ages: Ages,
    /// The writer's new segment: after every id seen, so none is reused.
    next_id: u64,
}

/// Reads the cursor and every segment, truncates each segment after its last whole record (a
/// torn tail, or the rest of a damaged segment), deletes delivered segments, and counts what is
/// left.
fn recover(dir: &Path) -> io::Result<Recovered> {
    let cursor = match fs::read(dir.join(CURSOR_FILE)) {
        Ok(bytes) => {
            let cursor = decode_cursor(&bytes);
            if cursor.is_none() {
                ::tracing::warn!(dir = %dir.display(), "trace queue: unreadable cursor, delivering every record on disk again");
            }
            cursor.map(|(segment, offset)| Pos { segment, offset })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    remove_if_present(&dir.join(CURSOR_TMP))?;
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        if let Some(id) = entry?.file_name().to_str().and_then(segment_id) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    let mut out = Recovered {
        next_id: ids
            .last()
            .copied()
            .max(cursor.map(|c| c.segment))
            .map_or(0, |id| id + 1),
        ..Recovered::default()
    };
    for id in ids {
        let path = segment_path(dir, id);
        let start = match cursor {
            Some(c) if id < c.segment => {
                remove_if_present(&path)?;
                continue;
            }
            Some(c) if id == c.segment => c.offset.max(SEGMENT_HEADER),
            _ => SEGMENT_HEADER,
        };
        let data = fs::read(&path)?;
        if data.len() < SEGMENT_MAGIC.len() || data[..SEGMENT_MAGIC.len()] != SEGMENT_MAGIC {
            ::tracing::warn!(path = %path.display(), "trace queue: not a segment of this format, removed");
            remove_if_present(&path)?;
            continue;
        }
        let mut offset = SEGMENT_HEADER as usize;
        while let Some(header) = data.get(offset..offset + FRAME_HEADER) {
            let Ok(header) = header.try_into().map(FrameHeader::parse) else {
                break;
            };
            let end = offset + FRAME_HEADER + header.len as usize;
            match data.get(offset + FRAME_HEADER..end) {
                Some(payload) if header.matches(payload) => {}
                _ => break,
            }
            if offset as u64 >= start {
                out.bytes += (end - offset) as u64;
                out.traces += 1;
                out.ages.push(header.enqueued_us);
            }
            offset = end;
        }
        if offset < data.len() {
            ::tracing::warn!(
                path = %path.display(),
                offset,
                dropped_bytes = data.len() - offset,
                "trace queue: segment truncated after its last whole record (a torn write or damage)"
            );
            OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(offset as u64)?;
        }
        let len = offset as u64;
        if start >= len {
            remove_if_present(&path)?;
            continue;
        }
        out.cursor.get_or_insert(Pos {
            segment: id,
            offset: start,
        });
        out.segments.push_back(Segment { id, len });
    }
    Ok(out)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The writer thread: takes the handoff, appends its records to the current segment with one
/// write per segment touched, publishes the new length and wakes the reader.
struct Writer {
    dir: PathBuf,
    shared: Arc<Shared>,
    file: File,
    id: u64,
    /// Bytes of the current segment written so far.
    len: u64,
    buf: Vec<u8>,
}

impl Writer {
    fn run(mut self) {
        let mut batch = VecDeque::new();
        let mut failures: u32 = 0;
        let mut last_report: Option<Instant> = None;
        let mut linger = false;
        loop {
            {
                let mut st = self.shared.lock();
                while st.pending.is_empty() {
                    if st.closed {
                        st.writer_done = true;
                        drop(st);
                        self.shared.written_cv.notify_all();
                        self.shared.readable.notify_one();
                        return;
                    }
                    if linger && st.flush_waiters == 0 {
                        linger = false;
                        st = self
                            .shared
                            .writer_cv
                            .wait_timeout(st, LINGER)
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .0;
                    } else {
                        st.writer_idle = true;
                        st = self
                            .shared
                            .writer_cv
                            .wait(st)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                }
                st.writer_idle = false;
                std::mem::swap(&mut st.pending, &mut batch);
            }
            linger = true;
            while !batch.is_empty() {
                let Err(e) = self.write(&mut batch) else {
                    failures = 0;
                    break;
                };
                failures = failures.saturating_add(1);
                if last_report.is_none_or(|at| at.elapsed() >= Duration::from_secs(30)) {
                    last_report = Some(Instant::now());
                    ::tracing::error!(dir = %self.dir.display(), error = %e, "trace queue: cannot write to disk; retrying");
                }
                if self.shared.lock().closed && failures >= 3 {
                    self.give_up(&mut batch);
                    break;
                }
                std::thread::sleep(Duration::from_millis(100 << failures.min(5)));
            }
        }
    }

    /// Writes `batch` (removing what is written): as many records per `write` as fit in the
    /// current segment, then a new segment.
    fn write(&mut self, batch: &mut VecDeque<Record>) -> io::Result<()> {
        while !batch.is_empty() {
            self.buf.clear();
            let mut n = 0;
            for record in batch.iter() {
                let frame = (FRAME_HEADER + record.payload.len()) as u64;
                let full = self.len + self.buf.len() as u64 + frame > SEGMENT_BYTES;
                if n > 0 && full {
                    break;
                }
                if n == 0 && full && self.len > SEGMENT_HEADER {
                    self.rotate()?;
                }
                encode_frame(&mut self.buf, record.enqueued_us, &record.payload);
                n += 1;
            }
            self.file.write_all_at(&self.buf, self.len)?;
            let written = self.buf.len() as u64;
            self.len += written;
            {
                let mut st = self.shared.lock();
                if let Some(segment) = st.segments.back_mut() {
                    segment.len = self.len;
                }
                st.written += n as u64;
                st.handoff_bytes = st.handoff_bytes.saturating_sub(written);
                if st.flush_waiters > 0 {
                    self.shared.written_cv.notify_all();
                }
            }
            self.shared.readable.notify_one();
            // The payloads are freed here, on this thread, not on a request's.
            batch.drain(..n);
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let id = self.id + 1;
        self.file = new_segment(&self.dir, id)?;
        self.id = id;
        self.len = SEGMENT_HEADER;
        self.shared.lock().segments.push_back(Segment {
            id,
            len: SEGMENT_HEADER,
        });
        Ok(())
    }

    /// Shutting down with a disk that keeps failing: the records are lost, and counted out.
    fn give_up(&mut self, batch: &mut VecDeque<Record>) {
        let n = batch.len() as u64;
        let bytes = batch
            .drain(..)
            .map(|r| (r.payload.len() + FRAME_HEADER) as u64)
            .sum();
        ::tracing::error!(
            dir = %self.dir.display(),
            traces = n,
            "trace queue: shutting down with traces that could not be written to disk; they are lost"
        );
        self.shared.release(n, bytes);
        let mut st = self.shared.lock();
        st.written += n;
        st.handoff_bytes = st.handoff_bytes.saturating_sub(bytes);
        self.shared.written_cv.notify_all();
    }
}

/// The reader of a queue on disk: reads from the cursor (the first undelivered record) up to
/// what the writer has published; `ack` moves the cursor and writes it.
pub(super) struct DiskReader {
    dir: PathBuf,
    cursor: Pos,
    file: Option<(u64, File)>,
    /// Bytes of a segment read ahead, starting at `buf_at`.
    buf: Vec<u8>,
    buf_at: Pos,
    /// Where each record of the last batch ends, and its bytes with its header.
    batch: Vec<(Pos, u64)>,
}

impl DiskReader {
    pub(super) fn take(
        &mut self,
        shared: &Shared,
        max_records: usize,
        max_bytes: usize,
    ) -> (Vec<Vec<u8>>, bool) {
        self.batch.clear();
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut bytes = 0usize;
        let mut pos = self.cursor;
        loop {
            let (len, next, writer_done) = {
                let st = shared.lock();
                let i = st.segments.iter().position(|s| s.id >= pos.segment);
                let here = i.and_then(|i| st.segments.get(i));
                let next = i.and_then(|i| st.segments.get(i + 1)).map(|s| s.id);
                match here {
                    Some(s) if s.id == pos.segment => (s.len, next, st.writer_done),
                    // The segment is gone (it cannot be: only `ack` deletes, behind the
                    // cursor); go on from the next one.
                    Some(s) => (pos.offset, Some(s.id), st.writer_done),
                    None => (pos.offset, None, st.writer_done),
                }
            };
            if pos.offset >= len {
                match next {
                    Some(id) => {
                        pos = Pos {
                            segment: id,
                            offset: SEGMENT_HEADER,
                        };
                        if out.is_empty() {
                            self.cursor = pos;
                        }
                        continue;
                    }
                    None => {
                        let finished = out.is_empty() && writer_done;
                        return (out, finished);
                    }
                }
            }
            while pos.offset < len {
                if out.len() >= max_records {
                    return (out, false);
                }
                match self.read_record(pos, len) {
                    Ok((header, payload)) => {
                        if !out.is_empty() && bytes.saturating_add(payload.len()) > max_bytes {
                            return (out, false);
                        }
                        bytes += payload.len();
                        out.push(payload);
                        let frame = FRAME_HEADER as u64 + u64::from(header.len);
                        pos.offset += frame;
                        self.batch.push((pos, frame));
                    }
                    // Deliver what was read; the next batch starts at the bad record.
                    Err(_) if !out.is_empty() => return (out, false),
                    Err(e) => {
                        self.skip_unreadable(shared, pos, len, &e);
                        pos = self.cursor;
                    }
                }
            }
        }
    }

    /// Reads the record at `pos`, checked against its CRC; `len`: the segment's published length.
    fn read_record(&mut self, pos: Pos, len: u64) -> io::Result<(FrameHeader, Vec<u8>)> {
        let header: [u8; FRAME_HEADER] = self
            .read_at(pos, FRAME_HEADER, len)?
            .try_into()
            .map_err(|_| damaged("short header"))?;
        let header = FrameHeader::parse(&header);
        let payload = self.read_at(
            Pos {
                segment: pos.segment,
                offset: pos.offset + FRAME_HEADER as u64,
            },
            header.len as usize,
            len,
        )?;
        if !header.matches(payload) {
            return Err(damaged("CRC mismatch"));
        }
        Ok((header, payload.to_vec()))
    }

    /// `n` bytes at `pos`, from the read-ahead buffer, refilled (up to `limit`) when needed.
    fn read_at(&mut self, pos: Pos, n: usize, limit: u64) -> io::Result<&[u8]> {
        let end = pos.offset + n as u64;
        if end > limit {
            return Err(damaged("record beyond the written length"));
        }
        let buffered = self.buf_at.segment == pos.segment
            && pos.offset >= self.buf_at.offset
            && end <= self.buf_at.offset + self.buf.len() as u64;
        if !buffered {
            if self.file.as_ref().map(|(id, _)| *id) != Some(pos.segment) {
                self.file = None;
                self.file = Some((
                    pos.segment,
                    File::open(segment_path(&self.dir, pos.segment))?,
                ));
            }
            let Some((_, file)) = &self.file else {
                return Err(damaged("no file"));
            };
            let want = (n.max(READ_CHUNK) as u64).min(limit - pos.offset) as usize;
            self.buf_at.segment = u64::MAX;
            self.buf.resize(want, 0);
            file.read_exact_at(&mut self.buf, pos.offset)?;
            self.buf_at = pos;
        }
        let start = (pos.offset - self.buf_at.offset) as usize;
        Ok(&self.buf[start..start + n])
    }

    /// A record this process wrote reads back damaged (the disk, or someone else, changed it):
    /// the rest of what is written in its segment is skipped, and counted out as one record.
    fn skip_unreadable(&mut self, shared: &Shared, pos: Pos, len: u64, error: &io::Error) {
        ::tracing::error!(
            dir = %self.dir.display(),
            segment = pos.segment,
            offset = pos.offset,
            skipped_bytes = len - pos.offset,
            %error,
            "trace queue: unreadable record; the rest of its segment is skipped"
        );
        shared.release(1, len - pos.offset);
        self.cursor = Pos {
            segment: pos.segment,
            offset: len,
        };
        self.buf_at.segment = u64::MAX;
    }

    pub(super) fn ack(&mut self, shared: &Shared, n: usize) -> io::Result<()> {
        check_ack(n, self.batch.len())?;
        if n == 0 {
            self.batch.clear();
            return Ok(());
        }
        let (end, _) = self.batch[n - 1];
        let bytes = self.batch[..n].iter().map(|(_, b)| b).sum();
        self.batch.clear();
        // The cursor goes first: a crash after it re-delivers nothing, a crash before it
        // re-delivers these records (at least once).
        let written = write_cursor(&self.dir, end);
        self.cursor = end;
        shared.release(n as u64, bytes);
        let delivered: Vec<u64> = {
            let mut st = shared.lock();
            // A segment read to its end, with a newer one after it, is delivered too.
            if let Some(i) = st.segments.iter().position(|s| s.id == end.segment)
                && st.segments[i].len <= end.offset
                && let Some(next) = st.segments.get(i + 1)
            {
                self.cursor = Pos {
                    segment: next.id,
                    offset: SEGMENT_HEADER,
                };
            }
            let mut delivered = Vec::new();
            while let Some(front) = st.segments.front()
                && front.id < self.cursor.segment
            {
                delivered.push(front.id);
                st.segments.pop_front();
            }
            delivered
        };
        for id in delivered {
            if let Err(e) = remove_if_present(&segment_path(&self.dir, id)) {
                ::tracing::warn!(dir = %self.dir.display(), segment = id, error = %e, "trace queue: cannot delete a delivered segment");
            }
        }
        written
    }
}

/// Writes the cursor atomically: a temporary file renamed over the old one.
fn write_cursor(dir: &Path, pos: Pos) -> io::Result<()> {
    let tmp = dir.join(CURSOR_TMP);
    fs::write(&tmp, encode_cursor(pos.segment, pos.offset))?;
    fs::rename(&tmp, dir.join(CURSOR_FILE))
}

fn damaged(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}
