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
