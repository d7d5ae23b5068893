//! Named API keys: each declared key is a file `<dir>/<name>/key` (a Secret key the pods mount,
//! which the kubelet keeps current), re-read every few seconds so that a rotated or removed key
//! takes effect without a restart. Only SHA-256 hashes of the keys are kept in memory; a file may
//! hold several keys, one per line, all valid (the overlap of a rotation).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The file of a key inside its directory (the Secret volume's item path).
pub const KEY_FILE: &str = "key";

type Digest = [u8; 32];

fn digest(key: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Hashes of the current keys, by hash: the caller's name.
#[derive(Default)]
pub struct KeyStore {
    by_hash: RwLock<HashMap<Digest, Arc<str>>>,
}

impl KeyStore {
    /// The name of the caller whose key this is.
    pub fn caller(&self, presented: &str) -> Option<Arc<str>> {
        let d = digest(presented);
        self.by_hash
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&d)
            .cloned()
    }

    /// Replaces every key: (name, its keys). Returns how many keys each name now has.
    pub fn replace(
        &self,
        keys: impl IntoIterator<Item = (String, Vec<String>)>,
    ) -> Vec<(String, usize)> {
        let mut map = HashMap::new();
        let mut counts = Vec::new();
        for (name, values) in keys {
            let name: Arc<str> = Arc::from(name.as_str());
            let mut n = 0;
            for v in values {
                map.insert(digest(&v), Arc::clone(&name));
                n += 1;
            }
            counts.push((name.to_string(), n));
        }
        *self.by_hash.write().unwrap_or_else(|p| p.into_inner()) = map;
        counts
    }
}

/// The keys of one file: its lines, trimmed, empty ones skipped (`kubectl create secret
/// --from-file` keeps a trailing newline).
pub fn parse_keys(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Reads the declared keys from `dir`: a missing or unreadable file is a name with no key
/// (revoked, or its Secret is gone), never an error that stops the gateway.
pub fn read_keys(dir: &Path, names: &[String]) -> Vec<(String, Vec<String>)> {
    names
        .iter()
        .map(|name| {
            let file: PathBuf = dir.join(name).join(KEY_FILE);
            let keys = std::fs::read_to_string(&file)
                .map(|t| parse_keys(&t))
                .unwrap_or_default();
            (name.clone(), keys)
        })
        .collect()
}

/// Loads the keys now, then re-reads them every `every` in the background. Logs the number of
/// keys per name when it changes (never a key).
pub fn watch(dir: PathBuf, names: Vec<String>, every: Duration) -> Arc<KeyStore> {
    let store = Arc::new(KeyStore::default());
    let mut last = store.replace(read_keys(&dir, &names));
    log_counts(&dir, &last);
    let weak = Arc::downgrade(&store);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(store) = weak.upgrade() else { return };
            let d = dir.clone();
            let n = names.clone();
            // File reads off the runtime threads.
            let Ok(keys) = tokio::task::spawn_blocking(move || read_keys(&d, &n)).await else {
                continue;
            };
            let counts = store.replace(keys);
            if counts != last {
                log_counts(&dir, &counts);
                last = counts;
            }
        }
    });
    store
}

fn log_counts(dir: &Path, counts: &[(String, usize)]) {
    for (name, n) in counts {
        if *n == 0 {
            ::tracing::warn!(caller = %name, dir = %dir.display(), "API key caller has no key: its calls are refused until its Secret holds one");
        } else {
            ::tracing::info!(caller = %name, keys = n, "API key caller loaded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_lines_trimmed_and_only_hashes_are_kept() {
        assert_eq!(parse_keys("sk-a\n\n  sk-b \r\n"), vec!["sk-a", "sk-b"]);
        let store = KeyStore::default();
        store.replace([("ci".to_string(), parse_keys("sk-a\nsk-b\n"))]);
        assert_eq!(store.caller("sk-a").as_deref(), Some("ci"));
        assert_eq!(store.caller("sk-b").as_deref(), Some("ci"));
        assert_eq!(store.caller("sk-c"), None);
        let held = store.by_hash.read().unwrap();
        assert!(held.keys().all(|k| k != &[0u8; 32]));
        assert_eq!(held.len(), 2);
    }

    #[test]
    fn a_missing_file_is_a_name_without_keys() {
        let dir = std::env::temp_dir().join(format!("mgo-keys-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("ci")).unwrap();
        std::fs::write(dir.join("ci").join(KEY_FILE), "sk-1\n").unwrap();
        let keys = read_keys(&dir, &["ci".into(), "gone".into()]);
        assert_eq!(
            keys,
            vec![("ci".into(), vec!["sk-1".into()]), ("gone".into(), vec![])]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
