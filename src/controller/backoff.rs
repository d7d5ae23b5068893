//! Retry timing: exponential backoff per failing endpoint, and the spread of resyncs. Counting a
//! failure and forgetting failures are separate calls, so each says what it does.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

/// The wait before retry number `failures` (1 after the first failure): 2 s, 4 s, 8 s, ... up to
/// `max`, so a broken tracking server or wrong credentials never make a hot loop. `max` is the
/// only cap, whatever it is.
pub fn backoff(failures: u32, max: Duration) -> Duration {
    let secs = 2u64.saturating_pow(failures.max(1));
    Duration::from_secs(secs).min(max)
}

/// Consecutive failures per endpoint.
pub struct Failures<K> {
    counts: Mutex<HashMap<K, u32>>,
}

impl<K> Default for Failures<K> {
    fn default() -> Self {
        Failures {
            counts: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone> Failures<K> {
    /// Counts one more failure of `key`; returns how many in a row.
    pub fn record(&self, key: &K) -> u32 {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// `key` succeeded: its next failure is the first again.
    pub fn reset(&self, key: &K) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(key);
    }

    /// Forgets every key not in `live` (endpoints that are gone).
    pub fn retain(&self, live: &HashSet<K>) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|k, _| live.contains(k));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The longest wait between retries of a failing watch, whatever `--max-backoff-seconds` says:
/// a watch that was refused (RBAC not yet granted, the API server restarting) is retried at least
/// this often, so the operator notices the fix within it.
pub const WATCH_MAX: Duration = Duration::from_secs(30);

/// The wait between retries of a failing watch (list or watch refused, connection lost): 1 s,
/// 2 s, 4 s ... up to `max` (the operator's max backoff) and never more than [`WATCH_MAX`], each
/// lengthened by up to 25% at random so that watches failing together do not retry together.
/// Reset by the stream once the watch yields again. kube's default doubles to 30 s and then
/// jitters up to twice that, so a granted Role could go unnoticed for a minute.
pub struct WatchBackoff {
    failures: u32,
    max: Duration,
}

impl WatchBackoff {
    pub fn new(max: Duration) -> Self {
        WatchBackoff {
            failures: 0,
            max: max.min(WATCH_MAX),
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        use std::hash::{BuildHasher, Hasher};
        let base = Duration::from_secs(2u64.saturating_pow(self.failures)).min(self.max);
        self.failures = self.failures.saturating_add(1);
        // RandomState is seeded per instance from the OS: a random quarter at most, no crate.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let spread = base.as_millis() as u64 / 4;
        Some(base + Duration::from_millis(if spread == 0 { 0 } else { random % spread }))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// The resync period, spread by up to +10% by `seed` (an endpoint's uid) so that endpoints
/// created together do not resync together.
pub fn jitter(resync: Duration, seed: Option<&str>) -> Duration {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut h);
    let spread = resync.as_millis() as u64 / 10;
    resync + Duration::from_millis(if spread == 0 { 0 } else { h.finish() % spread })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_MAX: Duration = Duration::from_secs(300);

    #[test]
    fn a_watch_backoff_doubles_from_one_second_is_capped_by_max_and_30s_and_resets() {
        use kube::runtime::utils::Backoff;
        let within = |d: Duration, base: u64| {
            let base = Duration::from_secs(base);
            assert!(d >= base && d <= base + base / 4, "{d:?} for {base:?}");
        };
        let mut b = WatchBackoff::new(Duration::from_secs(300));
        for base in [1, 2, 4, 8, 16, 30, 30] {
            within(b.next().unwrap(), base);
        }
        b.reset();
        within(b.next().unwrap(), 1);
        let mut short = WatchBackoff::new(Duration::from_secs(2));
        for base in [1, 2, 2, 2] {
            within(short.next().unwrap(), base);
        }
        let mut long = WatchBackoff::new(Duration::from_secs(3600));
        for _ in 0..100 {
            assert!(long.next().unwrap() <= WATCH_MAX + WATCH_MAX / 4);
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1, DEFAULT_MAX), Duration::from_secs(2));
        assert_eq!(backoff(3, DEFAULT_MAX), Duration::from_secs(8));
        assert_eq!(backoff(30, DEFAULT_MAX), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX, DEFAULT_MAX), Duration::from_secs(300));
    }

    #[test]
    fn the_configured_max_is_the_cap_even_above_300_seconds() {
        let max = Duration::from_secs(1800);
        assert_eq!(backoff(9, max), Duration::from_secs(512));
        assert_eq!(backoff(10, max), Duration::from_secs(1024));
        assert_eq!(backoff(11, max), max);
        assert_eq!(backoff(5, Duration::from_secs(10)), Duration::from_secs(10));
    }

    #[test]
    fn failures_count_until_reset_and_gone_keys_are_forgotten() {
        let f = Failures::default();
        assert_eq!(f.record(&"a"), 1);
        assert_eq!(f.record(&"a"), 2);
        assert_eq!(f.record(&"b"), 1);
        f.reset(&"a");
        assert_eq!(f.record(&"a"), 1);
        f.retain(&HashSet::from(["a"]));
        assert_eq!(f.len(), 1);
        assert_eq!(f.record(&"b"), 1);
    }

    #[test]
    fn jitter_adds_at_most_a_tenth() {
        let resync = Duration::from_secs(300);
        let j = jitter(resync, Some("uid-1"));
        assert!(j >= resync && j < resync + Duration::from_secs(30));
        assert_eq!(j, jitter(resync, Some("uid-1")));
    }
}
