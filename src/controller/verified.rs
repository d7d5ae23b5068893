//! The memory of experiments lately found as declared, so that a reconcile a pod or Secret change
//! triggers soon after skips the MLflow round trip. Keyed by the endpoint's uid: an endpoint
//! deleted and re-created under the same name is a new object and is checked again. Entries go
//! when their endpoint is cleaned up or no longer watched, so the map holds live endpoints only.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::conditions::ConditionState;

/// The experiment fields of status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExperimentFields {
    pub id: Option<String>,
    pub name: Option<String>,
    pub url: Option<String>,
}

/// An experiment found as declared: for which generation, and what status said of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    pub generation: Option<i64>,
    /// What else it was verified for (the MLflow workspace, sharing): a reconcile that finds
    /// another scope verifies again.
    pub scope: String,
    pub fields: ExperimentFields,
    pub condition: ConditionState,
}

/// Verified experiments by endpoint uid, each with when it was verified.
pub struct VerifiedExperiments {
    /// How long a verification holds (half a resync period).
    ttl: Duration,
    map: Mutex<HashMap<String, (Instant, Verified)>>,
}

impl VerifiedExperiments {
    pub fn new(ttl: Duration) -> Self {
        VerifiedExperiments {
            ttl,
            map: Mutex::default(),
        }
    }

    /// What was found when the experiment of endpoint `uid` was last found as declared, if that
    /// was for this generation less than `ttl` ago. Kept in memory, not read back from the
    /// endpoint: the cached endpoint may not show the operator's own status write yet.
    pub fn recent(&self, uid: &str, generation: Option<i64>) -> Option<Verified> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(uid)
            .filter(|(at, v)| v.generation == generation && at.elapsed() < self.ttl)
            .map(|(_, v)| v.clone())
    }

    /// Records what this reconcile found: `Some` when verified, `None` to forget (not verified).
    pub fn record(&self, uid: &str, verified: Option<Verified>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match verified {
            Some(v) => map.insert(uid.to_string(), (Instant::now(), v)),
            None => map.remove(uid),
        };
    }

    /// Forgets endpoint `uid` (cleaned up).
    pub fn forget(&self, uid: &str) {
        self.record(uid, None);
    }

    /// Forgets every endpoint whose uid is not in `live`.
    pub fn retain(&self, live: &HashSet<String>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|uid, _| live.contains(uid));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::conditions::{ConditionType, Reason};

    fn verified(generation: i64) -> Verified {
        Verified {
            scope: String::new(),
            generation: Some(generation),
            fields: ExperimentFields {
                id: Some("1".into()),
                ..Default::default()
            },
            condition: ConditionState::new(
                ConditionType::ExperimentReady,
                true,
                Reason::ExperimentActive,
                "m".into(),
            ),
        }
    }

    #[test]
    fn holds_for_the_same_uid_and_generation_only() {
        let memo = VerifiedExperiments::new(Duration::from_secs(60));
        memo.record("uid-1", Some(verified(3)));
        assert_eq!(memo.recent("uid-1", Some(3)), Some(verified(3)));
        assert_eq!(memo.recent("uid-1", Some(4)), None, "a new generation");
        // Deleted and re-created under the same name: a new uid, checked against MLflow again.
        assert_eq!(memo.recent("uid-2", Some(3)), None);
        memo.record("uid-1", None);
        assert_eq!(memo.recent("uid-1", Some(3)), None);
    }

    #[test]
    fn expires_after_its_ttl() {
        let memo = VerifiedExperiments::new(Duration::ZERO);
        memo.record("uid-1", Some(verified(1)));
        assert_eq!(memo.recent("uid-1", Some(1)), None);
    }

    #[test]
    fn cleaned_up_and_unwatched_endpoints_are_forgotten() {
        let memo = VerifiedExperiments::new(Duration::from_secs(60));
        memo.record("uid-1", Some(verified(1)));
        memo.record("uid-2", Some(verified(1)));
        memo.record("uid-3", Some(verified(1)));
        memo.forget("uid-1");
        assert_eq!(memo.len(), 2);
        memo.retain(&HashSet::from(["uid-2".to_string()]));
        assert_eq!(memo.len(), 1);
        assert!(memo.recent("uid-2", Some(1)).is_some());
    }
}
