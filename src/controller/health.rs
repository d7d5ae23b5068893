//! Whether the controller can see what it reconciles, for `/readyz`. Each watch reports here: its
//! first full list (until then its cache is not synced) and its errors (a watch the operator's
//! RBAC forbids fails on every retry). Ready means every watch has listed once and none is failing
//! now; the answer names the watches that are not. An instance waiting for the leader lease
//! watches nothing and is ready: it stands by, and a rollout of the operator must not wait on it.

use std::collections::BTreeMap;
use std::sync::Mutex;

use kube::runtime::watcher;

/// How one watch is doing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Watch {
    /// The first full list arrived.
    synced: bool,
    /// The last error, until the watch works again.
    error: Option<String>,
}

#[derive(Debug, Default)]
enum Phase {
    /// Before the controller starts or stands by.
    #[default]
    Starting,
    /// Waiting for the leader lease.
    Standby,
    /// Running the controller with these watches.
    Watching(BTreeMap<&'static str, Watch>),
}

/// The watches' state, shared by the controller (writes) and `/readyz` (reads).
#[derive(Debug, Default)]
pub struct Health {
    phase: Mutex<Phase>,
}

impl Health {
    fn with<T>(&self, f: impl FnOnce(&mut Phase) -> T) -> T {
        f(&mut self.phase.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// This instance waits for the leader lease.
    pub fn standby(&self) {
        self.with(|p| *p = Phase::Standby);
    }

    /// The controller starts these watches: not ready until each has listed once.
    pub fn watching(&self, watches: &[&'static str]) {
        let map = watches.iter().map(|w| (*w, Watch::default())).collect();
        self.with(|p| *p = Phase::Watching(map));
    }

    /// What the watch `name` yielded: an error marks it failing; its first full list (or any
    /// event after an error) marks it synced and working.
    pub fn observe<K>(
        &self,
        name: &'static str,
        event: &Result<watcher::Event<K>, watcher::Error>,
    ) {
        self.with(|p| {
            let Phase::Watching(map) = p else { return };
            let watch = map.entry(name).or_default();
            match event {
                Err(e) => watch.error = Some(describe(e)),
                Ok(watcher::Event::Init) => {}
                Ok(watcher::Event::InitDone) => {
                    watch.synced = true;
                    watch.error = None;
                }
                Ok(watcher::Event::InitApply(_)) => {}
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => watch.error = None,
            }
        });
    }

    /// Ok with a short note when ready; otherwise what is not, per watch.
    pub fn readiness(&self) -> Result<String, String> {
        self.with(|p| match p {
            Phase::Starting => Err("starting".to_string()),
            Phase::Standby => Ok("standing by for the leader lease".to_string()),
            Phase::Watching(map) => {
                let problems: Vec<String> = map
                    .iter()
                    .filter_map(|(name, w)| match (&w.error, w.synced) {
                        (Some(e), _) => Some(format!("watch of {name} failing: {e}")),
                        (None, false) => Some(format!("watch of {name} not yet listed")),
                        (None, true) => None,
                    })
                    .collect();
                if problems.is_empty() {
                    Ok(format!("ok: {} watches synced", map.len()))
                } else {
                    Err(problems.join("; "))
                }
            }
        })
    }
}

/// The API server's message when it gave one (what RBAC refused), else the error's chain.
fn describe(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.message.clone(),
        watcher::Error::WatchError(s) => s.message.clone(),
        e => crate::error_chain(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;

    fn forbidden() -> watcher::Error {
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(kube::core::Status::failure(
            "services is forbidden: User \"op\" cannot list resource \"services\"",
            "Forbidden",
        ))))
    }

    #[test]
    fn ready_once_every_watch_listed_and_none_fails() {
        let h = Health::default();
        assert!(h.readiness().is_err(), "starting");
        h.standby();
        assert!(h.readiness().is_ok(), "a follower stands by");
        h.watching(&["services", "deployments"]);
        let err = h.readiness().unwrap_err();
        assert!(err.contains("watch of services not yet listed"), "{err}");
        h.observe::<Service>("services", &Ok(watcher::Event::InitDone));
        h.observe::<Service>("deployments", &Ok(watcher::Event::Init));
        assert!(h.readiness().is_err());
        h.observe::<Service>("deployments", &Ok(watcher::Event::InitDone));
        assert_eq!(h.readiness(), Ok("ok: 2 watches synced".to_string()));
    }

    #[test]
    fn a_forbidden_watch_is_not_ready_until_it_works_again() {
        let h = Health::default();
        h.watching(&["services"]);
        h.observe::<Service>("services", &Ok(watcher::Event::InitDone));
        h.observe::<Service>("services", &Err(forbidden()));
        let err = h.readiness().unwrap_err();
        assert!(err.contains("watch of services failing"), "{err}");
        assert_eq!(
            err,
            "watch of services failing: services is forbidden: User \"op\" cannot list resource \"services\""
        );
        h.observe::<Service>("services", &Ok(watcher::Event::Init));
        assert!(h.readiness().is_err());
        h.observe::<Service>("services", &Ok(watcher::Event::InitDone));
        assert!(h.readiness().is_ok());
    }
}
