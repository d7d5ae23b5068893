//! The queue's behaviour in memory and on disk: order, the bound, acks, restarts, torn and
//! damaged files. Plus an ignored micro-benchmark of a push (see `push_cost`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::frame::{FRAME_HEADER, SEGMENT_HEADER, SEGMENT_MAGIC, encode_frame};
use super::*;

/// A fresh directory under the system's temporary one, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("mgo-trace-queue-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn segments(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        out.sort();
        out
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn on_disk(dir: &TempDir, max_bytes: u64) -> (TraceQueue, QueueReader) {
    open(QueueConfig {
        dir: Some(dir.path().to_path_buf()),
        max_bytes,
    })
    .unwrap()
}

fn in_memory(max_bytes: u64) -> (TraceQueue, QueueReader) {
    open(QueueConfig {
        dir: None,
        max_bytes,
    })
    .unwrap()
}

/// Waits until every push so far is readable (on disk: written by the writer thread).
fn settle(queue: &TraceQueue) {
    queue.flush(Instant::now() + Duration::from_secs(10));
}

fn record(i: usize) -> Vec<u8> {
    format!("trace-{i:05}").into_bytes()
}

/// A batch, within a deadline (a hang fails the test instead of blocking it).
async fn batch(reader: &mut QueueReader, max_records: usize) -> Vec<Vec<u8>> {
    tokio::time::timeout(
        Duration::from_secs(10),
        reader.next_batch(max_records, usize::MAX),
    )
    .await
    .expect("a batch within 10 s")
}

/// Reads and acks `n` records, in batches of at most `per_batch`.
async fn drain(reader: &mut QueueReader, n: usize, per_batch: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while out.len() < n {
        let b = batch(reader, per_batch.min(n - out.len())).await;
        reader.ack(b.len()).unwrap();
        out.extend(b);
    }
    out
}

fn records(range: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    range.map(record).collect()
}

/// Bytes `n` records of [`record`] take against the bound.
fn size_of(n: usize) -> u64 {
    (n * (record(0).len() + FRAME_HEADER)) as u64
}

#[tokio::test]
async fn memory_mode_delivers_oldest_first_and_forgets_acked_records() {
    let (queue, mut reader) = in_memory(1 << 20);
    for i in 0..10 {
        queue.push(record(i)).unwrap();
    }
    let stats = queue.stats();
    assert_eq!(
        (stats.traces, stats.bytes, stats.durable),
        (10, size_of(10), false)
    );
    assert!(
        stats
            .oldest_age
            .is_some_and(|age| age < Duration::from_secs(60))
    );
    assert_eq!(batch(&mut reader, 4).await, records(0..4));
    reader.ack(4).unwrap();
    assert_eq!(drain(&mut reader, 6, 100).await, records(4..10));
    let stats = queue.stats();
    assert_eq!((stats.traces, stats.bytes, stats.oldest_age), (0, 0, None));
}

#[tokio::test]
async fn records_not_acked_come_first_in_the_next_batch() {
    for durable in [false, true] {
        let dir = TempDir::new("retry");
        let (queue, mut reader) = if durable {
            on_disk(&dir, 1 << 20)
        } else {
            in_memory(1 << 20)
        };
        for i in 0..6 {
            queue.push(record(i)).unwrap();
        }
        settle(&queue);
        assert_eq!(batch(&mut reader, 4).await, records(0..4));
        reader.ack(1).unwrap();
        assert_eq!(
            batch(&mut reader, 10).await,
            records(1..6),
            "durable={durable}"
        );
        reader.ack(0).unwrap();
        assert_eq!(
            batch(&mut reader, 10).await,
            records(1..6),
            "durable={durable}"
        );
        assert_eq!(queue.stats().traces, 5);
    }
}

#[tokio::test]
async fn a_batch_keeps_to_its_byte_limit_but_holds_at_least_one_record() {
    let (queue, mut reader) = in_memory(1 << 20);
    queue.push(vec![1; 100]).unwrap();
    queue.push(vec![2; 100]).unwrap();
    queue.push(vec![3; 10]).unwrap();
    let b = reader.next_batch(10, 50).await;
    assert_eq!(b, vec![vec![1; 100]]);
    reader.ack(1).unwrap();
    let b = reader.next_batch(10, 110).await;
    assert_eq!(b, vec![vec![2; 100], vec![3; 10]]);
}

#[tokio::test]
async fn the_bound_refuses_pushes_until_records_are_acked() {
    for durable in [false, true] {
        let dir = TempDir::new("bound");
        let max = size_of(5);
        let (queue, mut reader) = if durable {
            on_disk(&dir, max)
        } else {
            in_memory(max)
        };
        for i in 0..5 {
            assert!(queue.has_room());
            queue.push(record(i)).unwrap();
        }
        settle(&queue);
        assert!(!queue.has_room(), "durable={durable}");
        assert_eq!(queue.push(record(5)), Err(Full));
        assert_eq!(queue.stats().traces, 5);
        // Delivered but not acked: still counted.
        let b = batch(&mut reader, 2).await;
        assert_eq!(queue.push(record(5)), Err(Full));
        reader.ack(b.len()).unwrap();
        assert!(queue.has_room());
        queue.push(record(5)).unwrap();
        queue.push(record(6)).unwrap();
        assert_eq!(queue.push(record(7)), Err(Full));
        assert_eq!(drain(&mut reader, 5, 10).await, records(2..7));
    }
}

#[tokio::test]
async fn a_record_larger_than_the_bound_is_refused() {
    let (queue, _reader) = in_memory(64);
    assert!(queue.has_room());
    assert_eq!(queue.push(vec![0; 64]), Err(Full));
    queue.push(vec![0; 64 - FRAME_HEADER]).unwrap();
}

#[tokio::test]
async fn next_batch_waits_for_a_push() {
    for durable in [false, true] {
        let dir = TempDir::new("wake");
        let (queue, mut reader) = if durable {
            on_disk(&dir, 1 << 20)
        } else {
            in_memory(1 << 20)
        };
        let waiting = tokio::spawn(async move {
            let b = reader.next_batch(10, usize::MAX).await;
            (b, reader)
        });
        tokio::task::yield_now().await;
        queue.push(record(0)).unwrap();
        let (b, _reader) = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("woken within 10 s")
            .unwrap();
        assert_eq!(b, records(0..1), "durable={durable}");
    }
}

#[tokio::test]
async fn next_batch_is_empty_once_every_producer_is_gone_and_all_is_delivered() {
    for durable in [false, true] {
        let dir = TempDir::new("closed");
        let (queue, mut reader) = if durable {
            on_disk(&dir, 1 << 20)
        } else {
            in_memory(1 << 20)
        };
        queue.push(record(0)).unwrap();
        let clone = queue.clone();
        drop(queue);
        clone.push(record(1)).unwrap();
        drop(clone);
        assert_eq!(drain(&mut reader, 2, 10).await, records(0..2));
        assert!(batch(&mut reader, 10).await.is_empty(), "durable={durable}");
    }
}

#[tokio::test]
async fn an_ack_beyond_the_last_batch_is_refused() {
    let (queue, mut reader) = in_memory(1 << 20);
    queue.push(record(0)).unwrap();
    queue.push(record(1)).unwrap();
    assert_eq!(batch(&mut reader, 1).await.len(), 1);
    let e = reader.ack(2).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    reader.ack(1).unwrap();
    assert_eq!(
        reader.ack(1).unwrap_err().kind(),
        io::ErrorKind::InvalidInput
    );
}

#[tokio::test]
async fn undelivered_records_survive_a_restart_in_order() {
    let dir = TempDir::new("restart");
    {
        let (queue, _reader) = on_disk(&dir, 1 << 20);
        for i in 0..100 {
            queue.push(record(i)).unwrap();
        }
        assert!(queue.stats().durable);
    }
    let (queue, mut reader) = on_disk(&dir, 1 << 20);
    let stats = queue.stats();
    assert_eq!((stats.traces, stats.bytes), (100, size_of(100)));
    assert!(stats.oldest_age.is_some());
    queue.push(record(100)).unwrap();
    assert_eq!(drain(&mut reader, 101, 7).await, records(0..101));
}

#[tokio::test]
async fn acked_records_are_not_delivered_again_after_a_restart() {
    let dir = TempDir::new("ack");
    {
        let (queue, mut reader) = on_disk(&dir, 1 << 20);
        for i in 0..10 {
            queue.push(record(i)).unwrap();
        }
        settle(&queue);
        assert_eq!(batch(&mut reader, 10).await, records(0..10));
        reader.ack(4).unwrap();
    }
    let (queue, mut reader) = on_disk(&dir, 1 << 20);
    assert_eq!(queue.stats().traces, 6);
    assert_eq!(queue.stats().bytes, size_of(6));
    assert_eq!(drain(&mut reader, 6, 10).await, records(4..10));
}

#[tokio::test]
async fn records_delivered_but_not_acked_before_a_crash_are_delivered_again() {
    let dir = TempDir::new("at-least-once");
    {
        let (queue, mut reader) = on_disk(&dir, 1 << 20);
        for i in 0..3 {
            queue.push(record(i)).unwrap();
        }
        settle(&queue);
        assert_eq!(batch(&mut reader, 10).await, records(0..3));
        // No ack: the process dies between the delivery and the cursor write.
    }
    let (_queue, mut reader) = on_disk(&dir, 1 << 20);
    assert_eq!(drain(&mut reader, 3, 10).await, records(0..3));
}

#[tokio::test]
async fn a_torn_tail_is_truncated_on_open() {
    let dir = TempDir::new("torn");
    {
        let (queue, _reader) = on_disk(&dir, 1 << 20);
        for i in 0..5 {
            queue.push(record(i)).unwrap();
        }
    }
    let segment = dir.segments().pop().unwrap();
    let whole = std::fs::metadata(&segment).unwrap().len();
    // The process died halfway through writing a frame.
    let mut torn = Vec::new();
    encode_frame(&mut torn, 1, &record(5));
    torn.truncate(FRAME_HEADER + 3);
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes.extend_from_slice(&torn);
    std::fs::write(&segment, bytes).unwrap();

    let (queue, mut reader) = on_disk(&dir, 1 << 20);
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), whole);
    assert_eq!(queue.stats().traces, 5);
    queue.push(record(5)).unwrap();
    assert_eq!(drain(&mut reader, 6, 10).await, records(0..6));
}

#[tokio::test]
async fn a_damaged_record_ends_its_segment_on_open() {
    let dir = TempDir::new("damaged");
    {
        let (queue, _reader) = on_disk(&dir, 1 << 20);
        for i in 0..5 {
            queue.push(record(i)).unwrap();
        }
    }
    let segment = dir.segments().pop().unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let third = SEGMENT_HEADER as usize + 2 * (FRAME_HEADER + record(0).len());
    bytes[third + FRAME_HEADER + 1] ^= 0x40;
    std::fs::write(&segment, bytes).unwrap();

    let (queue, mut reader) = on_disk(&dir, 1 << 20);
    assert_eq!(queue.stats().traces, 2);
    assert_eq!(queue.stats().bytes, size_of(2));
    queue.push(record(9)).unwrap();
    let mut expected = records(0..2);
    expected.push(record(9));
    assert_eq!(drain(&mut reader, 3, 10).await, expected);
}

#[tokio::test]
async fn records_go_oldest_first_across_segments_and_delivered_segments_are_deleted() {
    let dir = TempDir::new("segments");
    let big = |i: usize| {
        let mut r = vec![i as u8; 1 << 20];
        r[..8].copy_from_slice(&(i as u64).to_le_bytes());
        r
    };
    let (queue, mut reader) = on_disk(&dir, 64 << 20);
    for i in 0..10 {
        queue.push(big(i)).unwrap();
    }
    settle(&queue);
    // 3 records of 1 MiB per 4 MiB segment.
    assert_eq!(dir.segments().len(), 4);
    let got = drain(&mut reader, 7, 2).await;
    assert!(got.iter().zip(0..).all(|(r, i)| *r == big(i)));
    // Segments 0 and 1 (records 0-5) are delivered; record 6 opened the third.
    assert_eq!(dir.segments().len(), 2);
    drop((queue, reader));
    let (_queue, mut reader) = on_disk(&dir, 64 << 20);
    let got = drain(&mut reader, 3, 10).await;
    assert!(got.iter().zip(7..).all(|(r, i)| *r == big(i)));
}

#[tokio::test]
async fn flush_puts_pushed_records_on_disk() {
    let dir = TempDir::new("flush");
    let (queue, _reader) = on_disk(&dir, 1 << 20);
    for i in 0..20 {
        queue.push(record(i)).unwrap();
    }
    settle(&queue);
    let segment = dir.segments().pop().unwrap();
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        SEGMENT_HEADER + size_of(20)
    );
}

#[tokio::test]
async fn the_oldest_age_comes_from_the_enqueue_time_kept_on_disk() {
    let dir = TempDir::new("age");
    std::fs::create_dir_all(dir.path()).unwrap();
    let hour_ago = now_us() - 3_600_000_000;
    let mut bytes = SEGMENT_MAGIC.to_vec();
    encode_frame(&mut bytes, hour_ago, b"old");
    encode_frame(&mut bytes, hour_ago + 1_000_000, b"newer");
    std::fs::write(dir.path().join("segment-00000000000000000007.log"), bytes).unwrap();

    let (queue, mut reader) = on_disk(&dir, 1 << 20);
    let age = queue.stats().oldest_age.unwrap();
    assert!(
        age >= Duration::from_secs(3600) && age < Duration::from_secs(3700),
        "{age:?}"
    );
    assert_eq!(
        drain(&mut reader, 2, 10).await,
        vec![b"old".to_vec(), b"newer".to_vec()]
    );
    assert_eq!(queue.stats().oldest_age, None);
}

#[tokio::test]
async fn records_on_disk_count_against_the_bound_after_a_restart() {
    let dir = TempDir::new("bound-restart");
    {
        let (queue, _reader) = on_disk(&dir, 1 << 20);
        for i in 0..10 {
            queue.push(record(i)).unwrap();
        }
    }
    let (queue, mut reader) = on_disk(&dir, size_of(10));
    assert!(!queue.has_room());
    assert_eq!(queue.push(record(10)), Err(Full));
    let b = batch(&mut reader, 1).await;
    reader.ack(b.len()).unwrap();
    queue.push(record(10)).unwrap();
}

#[tokio::test]
async fn an_unreadable_cursor_delivers_everything_on_disk_again() {
    let dir = TempDir::new("cursor");
    {
        let (queue, mut reader) = on_disk(&dir, 1 << 20);
        for i in 0..4 {
            queue.push(record(i)).unwrap();
        }
        let b = batch(&mut reader, 2).await;
        reader.ack(b.len()).unwrap();
    }
    std::fs::write(dir.path().join("cursor"), b"garbage").unwrap();
    let (_queue, mut reader) = on_disk(&dir, 1 << 20);
    assert_eq!(drain(&mut reader, 4, 10).await, records(0..4));
}

#[test]
fn a_directory_that_cannot_be_created_is_an_error_naming_it() {
    let dir = TempDir::new("not-a-dir");
    std::fs::create_dir_all(dir.path()).unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let e = open(QueueConfig {
        dir: Some(file.join("queue")),
        max_bytes: 1 << 20,
    })
    .unwrap_err();
    let message = e.to_string();
    assert!(message.contains(&*file.to_string_lossy()), "{message}");
    assert!(message.contains("cannot create it"), "{message}");
}

#[test]
fn a_directory_in_use_by_another_queue_is_refused() {
    let dir = TempDir::new("in-use");
    let _first = on_disk(&dir, 1 << 20);
    let e = open(QueueConfig {
        dir: Some(dir.path().to_path_buf()),
        max_bytes: 1 << 20,
    })
    .unwrap_err();
    assert!(matches!(e, QueueError::InUse { .. }), "{e}");
}

#[test]
fn ages_count_records_per_bucket() {
    let mut ages = Ages::default();
    ages.push(1_000_000);
    ages.push(1_050_000);
    ages.push(990_000);
    ages.push(2_000_000);
    assert_eq!(ages.oldest(), Some(1_000_000));
    ages.pop(2);
    assert_eq!(ages.oldest(), Some(1_000_000));
    ages.pop(1);
    assert_eq!(ages.oldest(), Some(2_000_000));
    ages.pop(5);
    assert_eq!(ages.oldest(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_and_partial_acks_deliver_each_record_once_in_order() {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 1500;
    let dir = TempDir::new("concurrent");
    let (queue, mut reader) = on_disk(&dir, 64 << 20);
    // (producer, sequence) in the first 16 bytes, then filler: 100 B to 20 kB, so the
    // records span several segments.
    let producers: Vec<_> = (0..THREADS)
        .map(|t| {
            let queue = queue.clone();
            std::thread::spawn(move || {
                for i in 0..PER_THREAD {
                    let mut r = vec![0u8; 100 + ((i * 7919 + t * 104_729) % 20_000) as usize];
                    r[..8].copy_from_slice(&t.to_le_bytes());
                    r[8..16].copy_from_slice(&i.to_le_bytes());
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while queue.push(r.clone()).is_err() {
                        assert!(Instant::now() < deadline, "the queue stayed full");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        })
        .collect();
    drop(queue);
    let mut next = [0u64; THREADS as usize];
    let mut round = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while next.iter().sum::<u64>() < THREADS * PER_THREAD {
        assert!(Instant::now() < deadline, "delivered {next:?} in 60 s");
        let b = batch(&mut reader, 1 + round % 50).await;
        // Ack all, all but one, or none of the batch, in turn.
        let acked = b.len().saturating_sub(round % 3).min(b.len());
        round += 1;
        for r in &b[..acked] {
            let t = u64::from_le_bytes(r[..8].try_into().unwrap()) as usize;
            let i = u64::from_le_bytes(r[8..16].try_into().unwrap());
            assert_eq!(i, next[t], "producer {t}: record {i} after {}", next[t]);
            next[t] += 1;
        }
        reader.ack(acked).unwrap();
    }
    for p in producers {
        p.join().unwrap();
    }
    assert!(batch(&mut reader, 10).await.is_empty());
    assert_eq!(reader.stats().traces, 0);
    assert_eq!(reader.stats().bytes, 0);
    assert!(dir.segments().len() <= 2, "{:?}", dir.segments());
}

#[tokio::test]
async fn a_restart_mid_delivery_resumes_at_the_cursor_across_segments() {
    let dir = TempDir::new("resume");
    let sized = |i: usize| {
        let mut r = vec![0u8; 20_000 + (i * 7919) % 40_000];
        r[..8].copy_from_slice(&(i as u64).to_le_bytes());
        r
    };
    let id = |r: &[u8]| u64::from_le_bytes(r[..8].try_into().unwrap()) as usize;
    let mut delivered = Vec::new();
    {
        let (queue, mut reader) = on_disk(&dir, 256 << 20);
        for i in 0..300 {
            queue.push(sized(i)).unwrap();
            if i % 50 == 49 {
                settle(&queue);
            }
        }
        settle(&queue);
        assert!(dir.segments().len() > 2, "{:?}", dir.segments());
        for _ in 0..20 {
            let b = batch(&mut reader, 9).await;
            let acked = b.len() - b.len() / 3;
            delivered.extend(b[..acked].iter().map(|r| id(r)));
            reader.ack(acked).unwrap();
        }
    }
    let (queue, mut reader) = on_disk(&dir, 256 << 20);
    let left = 300 - delivered.len();
    assert_eq!(queue.stats().traces, left as u64);
    delivered.extend(drain(&mut reader, left, 13).await.iter().map(|r| id(r)));
    assert_eq!(delivered, (0..300).collect::<Vec<_>>());
    assert!(dir.segments().len() <= 2, "{:?}", dir.segments());
}

/// The cost of a push on the request path, and the writer's throughput to disk. A benchmark,
/// not a test (nothing is asserted about time); run it optimised with `hack/bench-queue.sh`
/// (this module alone, release), or `cargo test --release --lib queue::tests::push_cost --
/// --ignored --nocapture`. 2 KiB records; MB/s: from the first push until every record is
/// written, pushes included.
/// Best of 3 rounds per line: the machine's other load only ever adds time.
#[test]
#[ignore = "a benchmark: run it by hand, optimised"]
fn push_cost() {
    const PUSHES: usize = 100_000;
    const SIZE: usize = 2048;
    for durable in [false, true] {
        for threads in [1, 4] {
            let rounds: Vec<(f64, f64)> = (0..3)
                .map(|_| push_round(durable, threads, PUSHES / threads, SIZE))
                .collect();
            let ns = rounds.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
            let mbps = rounds.iter().map(|r| r.1).fold(0.0, f64::max);
            println!(
                "{}: {threads} thread(s), {PUSHES} pushes of {SIZE} B: {ns:.0} ns per push{}",
                if durable { "disk" } else { "memory" },
                if durable {
                    format!("; {mbps:.0} MB/s written (first push to all on disk)")
                } else {
                    String::new()
                },
            );
        }
    }
}

/// One round: (ns per push, averaged over the threads; MB/s from the first push until every
/// record is written).
fn push_round(durable: bool, threads: usize, per_thread: usize, size: usize) -> (f64, f64) {
    const BURST: usize = 1024;
    let dir = TempDir::new("bench");
    let (queue, reader) = open(QueueConfig {
        dir: durable.then(|| dir.path().to_path_buf()),
        max_bytes: 1 << 30,
    })
    .unwrap();
    let payloads: Vec<Vec<Vec<u8>>> = (0..threads)
        .map(|_| (0..per_thread).map(|_| vec![7u8; size]).collect())
        .collect();
    let started = Instant::now();
    let per_push: Vec<f64> = std::thread::scope(|s| {
        let workers: Vec<_> = payloads
            .into_iter()
            .map(|payloads| {
                let queue = queue.clone();
                s.spawn(move || {
                    // Bursts within the handoff's cap (4 threads x 2 MiB), each then flushed
                    // (not timed): pushes outrun any disk.
                    let mut pushing = Duration::ZERO;
                    let mut payloads = payloads.into_iter();
                    loop {
                        let burst: Vec<Vec<u8>> = payloads.by_ref().take(BURST).collect();
                        if burst.is_empty() {
                            break;
                        }
                        let t = Instant::now();
                        for p in burst {
                            queue.push(p).unwrap();
                        }
                        pushing += t.elapsed();
                        queue.flush(Instant::now() + Duration::from_secs(60));
                    }
                    pushing.as_nanos() as f64 / per_thread as f64
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    queue.flush(Instant::now() + Duration::from_secs(120));
    let elapsed = started.elapsed();
    let bytes = queue.stats().bytes;
    drop((queue, reader));
    (
        per_push.iter().sum::<f64>() / per_push.len() as f64,
        bytes as f64 / elapsed.as_secs_f64() / 1e6,
    )
}
