//! Leader election over a `coordination.k8s.io/v1` Lease, with the rules of client-go's
//! `leaderelection` package, so several operator replicas can run and only one reconciles.
//!
//! - Every write is a create or a full update carrying the `resourceVersion` that was read: two
//!   candidates racing for the same Lease cannot both win (the loser gets 409 Conflict).
//! - Expiry is judged on the local clock only: a follower takes over when the Lease's record has
//!   not changed for `leaseDurationSeconds` since *it* first saw that record. Clocks of different
//!   machines are never compared.
//! - The leader renews every `retry_period`. If it cannot renew for `renew_deadline` (shorter than
//!   the lease duration), or it sees another holder, it has lost: the caller stops reconciling at
//!   once (the operator exits non-zero and restarts as a follower). Because
//!   `renew_deadline < lease_duration`, it has stopped before any follower may take over.
//! - On a clean shutdown the leader releases the Lease (clears the holder), so a follower takes
//!   over on its next try instead of waiting for the lease to expire.
//!
//! The API requests are `get`, `create` and `update` of one Lease in one namespace.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tracing::{debug, info, warn};

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This candidate's identity, unique among the candidates (the pod name in a cluster).
    pub identity: String,
    /// How long a follower waits, after the Lease last changed, before it takes over.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up leadership.
    pub renew_deadline: Duration,
    /// Time between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl Config {
    /// Checks the durations the way client-go does: each must leave room for the next.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.namespace.is_empty() || self.identity.is_empty() {
            return Err("leader election needs a Lease name, a namespace and an identity".into());
        }
        if self.retry_period.is_zero() {
            return Err("the leader election retry period must be above 0".into());
        }
        if self.renew_deadline <= self.retry_period {
            return Err(format!(
                "the leader election renew deadline ({}s) must be longer than the retry period ({}s)",
                self.renew_deadline.as_secs(),
                self.retry_period.as_secs()
            ));
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(format!(
                "the leader election lease duration ({}s) must be longer than the renew deadline \
                 ({}s), or a follower could take over before the leader stops",
                self.lease_duration.as_secs(),
                self.renew_deadline.as_secs()
            ));
        }
        if i32::try_from(self.lease_duration.as_secs()).is_err() {
            return Err("the leader election lease duration is too long".into());
        }
        Ok(())
    }
}

/// What a candidate does with the Lease it has just read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or the holder's lease expired: take it.
    Acquire,
    /// Someone else holds it and its lease is still running: wait.
    Follow { holder: String },
}

/// Decides what to do with a Lease whose holder is `holder` and whose declared lease duration
/// is `lease_duration` (the Lease's `leaseDurationSeconds`; `default_duration` when absent),
/// given that its record has been unchanged for `unchanged_for` on our clock.
pub fn decide(
    holder: Option<&str>,
    lease_duration: Option<Duration>,
    me: &str,
    unchanged_for: Duration,
    default_duration: Duration,
) -> Decision {
    match holder {
        Some(h) if h == me => Decision::Renew,
        None | Some("") => Decision::Acquire,
        Some(other) => {
            if unchanged_for >= lease_duration.unwrap_or(default_duration) {
                Decision::Acquire
            } else {
                Decision::Follow {
                    holder: other.to_string(),
                }
            }
        }
    }
}

/// The spec to write for `decision` (Renew or Acquire) over the spec that was read.
pub fn next_spec(
    read: &LeaseSpec,
    decision: &Decision,
    me: &str,
    lease_duration: Duration,
    now: Timestamp,
) -> LeaseSpec {
    let renewing = *decision == Decision::Renew;
    let transitions = read.lease_transitions.unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(i32::try_from(lease_duration.as_secs()).unwrap_or(i32::MAX)),
        acquire_time: if renewing {
            read.acquire_time.clone().or(Some(MicroTime(now)))
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if renewing {
            transitions
        } else {
            transitions.saturating_add(1)
        }),
        ..read.clone()
    }
}

/// The spec of a released Lease: no holder, so the next candidate to try takes it at once.
pub fn released_spec(read: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: None,
        renew_time: Some(MicroTime(now)),
        ..read.clone()
    }
}

/// When this candidate first saw the Lease's current record (its resourceVersion), on its clock.
#[derive(Debug, Default)]
pub struct Observation {
    seen: Option<(String, Instant)>,
}

impl Observation {
    /// Records that the Lease has `resource_version` at `now`; returns how long it has had it.
    pub fn observe(&mut self, resource_version: &str, now: Instant) -> Duration {
        match &self.seen {
            Some((rv, since)) if rv == resource_version => now.saturating_duration_since(*since),
            _ => {
                self.seen = Some((resource_version.to_string(), now));
                Duration::ZERO
            }
        }
    }
}

/// The outcome of one attempt to acquire or renew.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Held,
    NotHeld {
        holder: String,
    },
    /// Someone wrote the Lease between our read and our write: read again.
    Conflict,
}

/// Why the leader stopped being the leader.
#[derive(Debug, PartialEq, Eq)]
pub enum Lost {
    /// Another candidate holds the Lease.
    TakenBy(String),
    /// No renewal succeeded within the renew deadline.
    RenewDeadline,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::TakenBy(holder) => write!(f, "the lease is now held by {holder}"),
            Lost::RenewDeadline => {
                f.write_str("could not renew the lease within the renew deadline")
            }
        }
    }
}

/// One candidate for leadership.
pub struct Elector {
    api: Api<Lease>,
    config: Config,
    observation: Observation,
    last_renewed: Option<Instant>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    pub fn new(client: kube::Client, config: Config) -> Self {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observation: Observation::default(),
            last_renewed: None,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let me = self.config.identity.clone();
        let now = Timestamp::now();
        let Some(lease) = self.api.get_opt(&self.config.name).await? else {
            let spec = next_spec(
                &LeaseSpec::default(),
                &Decision::Acquire,
                &me,
                self.config.lease_duration,
                now,
            );
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    lease_transitions: Some(0),
                    ..spec
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.held(&created);
                    Ok(Attempt::Held)
                }
                Err(e) if is_conflict(&e) => Ok(Attempt::Conflict),
                Err(e) => Err(e),
            };
        };
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let unchanged_for = self.observation.observe(&rv, Instant::now());
        let read = lease.spec.clone().unwrap_or_default();
        let declared = read
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs);
        let decision = decide(
            read.holder_identity.as_deref(),
            declared,
            &me,
            unchanged_for,
            self.config.lease_duration,
        );
        if let Decision::Follow { holder } = decision {
            return Ok(Attempt::NotHeld { holder });
        }
        if decision == Decision::Acquire {
            debug!(previous = ?read.holder_identity, "acquiring the leader lease");
        }
        // The update carries the resourceVersion we read: it fails with 409 if anyone wrote since.
        let next = Lease {
            spec: Some(next_spec(
                &read,
                &decision,
                &me,
                self.config.lease_duration,
                now,
            )),
            ..lease
        };
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &next)
            .await
        {
            Ok(updated) => {
                self.held(&updated);
                Ok(Attempt::Held)
            }
            Err(e) if is_conflict(&e) => Ok(Attempt::Conflict),
            Err(e) => Err(e),
        }
    }

    fn held(&mut self, lease: &Lease) {
        let now = Instant::now();
        if let Some(rv) = &lease.metadata.resource_version {
            self.observation.observe(rv, now);
        }
        self.last_renewed = Some(now);
    }

    /// Returns once this candidate holds the Lease: tries every retry period (with jitter).
    pub async fn acquire(&mut self) {
        let mut following: Option<String> = None;
        loop {
            match tokio::time::timeout(self.config.renew_deadline, self.try_acquire_or_renew())
                .await
            {
                Ok(Ok(Attempt::Held)) => {
                    info!(
                        lease = %format!("{}/{}", self.config.namespace, self.config.name),
                        identity = %self.config.identity,
                        "became the leader"
                    );
                    return;
                }
                Ok(Ok(Attempt::NotHeld { holder })) => {
                    if following.as_deref() != Some(holder.as_str()) {
                        info!(%holder, "another instance is the leader; waiting for the lease");
                        following = Some(holder);
                    }
                }
                Ok(Ok(Attempt::Conflict)) => debug!("lease changed while acquiring; retrying"),
                Ok(Err(e)) => {
                    warn!(error = %crate::error_chain(&e), "cannot read or write the leader lease")
                }
                Err(_) => warn!("timed out reading or writing the leader lease"),
            }
            tokio::time::sleep(jittered(self.config.retry_period)).await;
        }
    }

    /// Keeps the Lease renewed while this candidate leads. Returns when leadership is lost.
    pub async fn hold(&mut self) -> Lost {
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            let renewed = self.last_renewed.unwrap_or_else(Instant::now);
            let left = self.config.renew_deadline.saturating_sub(renewed.elapsed());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Held)) => {}
                Ok(Ok(Attempt::NotHeld { holder })) => return Lost::TakenBy(holder),
                Ok(Ok(Attempt::Conflict)) => debug!("lease changed while renewing; re-reading"),
                Ok(Err(e)) => {
                    warn!(error = %crate::error_chain(&e), "cannot renew the leader lease")
                }
                Err(_) => {}
            }
            let since = self.last_renewed.map_or(Duration::MAX, |t| t.elapsed());
            if since >= self.config.renew_deadline {
                return Lost::RenewDeadline;
            }
        }
    }

    /// Gives the Lease up if this candidate still holds it, so a follower takes over at once.
    /// Returns whether it was released.
    pub async fn release(&mut self) -> Result<bool, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(false);
        };
        let read = lease.spec.clone().unwrap_or_default();
        if read.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(false);
        }
        let next = Lease {
            spec: Some(released_spec(&read, Timestamp::now())),
            ..lease
        };
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => {
                self.last_renewed = None;
                Ok(true)
            }
            // Someone wrote it since our read: it is not ours to clear any more.
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// `base` plus up to 20% (spreads the candidates' attempts, as client-go's JitterUntil does).
fn jittered(base: Duration) -> Duration {
    base + base.mul_f64(fastrand::f64() * 0.2)
}

/// A default identity when the pod name is unknown (out of cluster): host name and a random part,
/// so two processes on one machine are two candidates.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "operator".to_string());
    format!("{host}-{:08x}", fastrand::u32(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn the_holder_renews() {
        assert_eq!(
            decide(Some("a"), Some(S(15)), "a", S(100), S(15)),
            Decision::Renew
        );
    }

    #[test]
    fn a_free_lease_is_taken_at_once() {
        assert_eq!(decide(None, None, "a", S(0), S(15)), Decision::Acquire);
        assert_eq!(
            decide(Some(""), Some(S(1)), "a", S(0), S(15)),
            Decision::Acquire
        );
    }

    #[test]
    fn a_running_lease_of_another_is_followed() {
        assert_eq!(
            decide(Some("b"), Some(S(15)), "a", S(14), S(30)),
            Decision::Follow { holder: "b".into() }
        );
    }

    #[test]
    fn an_expired_lease_of_another_is_taken_by_its_declared_duration() {
        // The Lease's own duration counts, not ours.
        assert_eq!(
            decide(Some("b"), Some(S(15)), "a", S(15), S(30)),
            Decision::Acquire
        );
        // Without a declared duration, ours does.
        assert_eq!(
            decide(Some("b"), None, "a", S(15), S(30)),
            Decision::Follow { holder: "b".into() }
        );
        assert_eq!(
            decide(Some("b"), None, "a", S(30), S(30)),
            Decision::Acquire
        );
    }

    #[test]
    fn expiry_is_measured_from_when_the_record_last_changed_on_our_clock() {
        let mut o = Observation::default();
        let t0 = Instant::now();
        assert_eq!(o.observe("1", t0), S(0));
        assert_eq!(o.observe("1", t0 + S(10)), S(10));
        // The holder renewed: a new record, the wait starts over.
        assert_eq!(o.observe("2", t0 + S(11)), S(0));
        assert_eq!(o.observe("2", t0 + S(12)), S(1));
    }

    #[test]
    fn acquiring_counts_a_transition_and_renewing_keeps_the_acquire_time() {
        let read = LeaseSpec {
            holder_identity: Some("b".into()),
            acquire_time: Some(MicroTime(ts(100))),
            renew_time: Some(MicroTime(ts(110))),
            lease_duration_seconds: Some(15),
            lease_transitions: Some(3),
            ..Default::default()
        };
        let taken = next_spec(&read, &Decision::Acquire, "a", S(20), ts(200));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(ts(200))));
        assert_eq!(taken.renew_time, Some(MicroTime(ts(200))));
        assert_eq!(taken.lease_duration_seconds, Some(20));

        let renewed = next_spec(&taken, &Decision::Renew, "a", S(20), ts(205));
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, Some(MicroTime(ts(200))));
        assert_eq!(renewed.renew_time, Some(MicroTime(ts(205))));
    }

    #[test]
    fn a_released_lease_has_no_holder_and_is_taken_by_the_next_candidate() {
        let read = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_transitions: Some(2),
            ..Default::default()
        };
        let released = released_spec(&read, ts(300));
        assert_eq!(released.holder_identity, None);
        assert_eq!(released.lease_transitions, Some(2));
        assert_eq!(
            decide(
                released.holder_identity.as_deref(),
                Some(S(1)),
                "b",
                S(0),
                S(15)
            ),
            Decision::Acquire
        );
    }

    #[test]
    fn durations_must_leave_room_for_each_other() {
        let ok = Config {
            namespace: "ns".into(),
            name: "lease".into(),
            identity: "a".into(),
            lease_duration: S(15),
            renew_deadline: S(10),
            retry_period: S(2),
        };
        assert!(ok.validate().is_ok());
        let e = Config {
            renew_deadline: S(15),
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("lease duration (15s) must be longer than the renew deadline"));
        let e = Config {
            retry_period: S(10),
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("renew deadline (10s) must be longer than the retry period"));
        assert!(
            Config {
                identity: String::new(),
                ..ok
            }
            .validate()
            .is_err()
        );
    }
}
