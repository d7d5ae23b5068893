//! The status vocabulary: every condition type and every reason the operator writes, as enums with
//! their wire names in one place, and the pure rules that merge conditions into status. Typed so
//! that a decision is compared with `==` on a variant, never with a string that a typo would
//! silently miss.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::experiment::BlockedReason;
use crate::mlflow::{ErrorCode, MlflowError};

/// The condition types of a `GatewayEndpoint`'s status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionType {
    /// Everything below holds: the endpoint serves and traces.
    Ready,
    /// The endpoint's experiment exists as declared (or tracking is off).
    ExperimentReady,
    /// Every Secret and key the gateway pods read exists.
    SecretsReady,
    /// The gateway pods serve.
    Available,
    /// A rollout is under way.
    Progressing,
    /// Which MLflow credential the pods write traces with, and whether it is in place.
    TraceCredentialReady,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::ExperimentReady => "ExperimentReady",
            ConditionType::SecretsReady => "SecretsReady",
            ConditionType::Available => "Available",
            ConditionType::Progressing => "Progressing",
            ConditionType::TraceCredentialReady => "TraceCredentialReady",
        }
    }
}

/// A condition's reason. The operator's own reasons are variants; the Deployment controller's
/// reasons for `Available` pass through as [`Reason::Deployment`] when they are not one of ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    // Ready
    Ready,
    // ExperimentReady
    UsageTrackingDisabled,
    ExistingExperiment,
    ExperimentActive,
    ExperimentNameConflict,
    ExperimentNotFound,
    ExperimentDeleted,
    ExperimentNameReserved,
    ExperimentNotShared,
    WorkspaceInvalid,
    TrackingServerUnavailable,
    TrackingServerUnauthorized,
    TrackingServerForbidden,
    TrackingServerError,
    // SecretsReady (and Available/Progressing while the Secrets block the Deployment)
    SecretsFound,
    SecretNotFound,
    SecretKeyNotFound,
    CredentialsInvalid,
    // Available / Progressing
    NameConflict,
    /// The API server refused an owned object (its message says why).
    ApplyFailed,
    /// A gateway container exits (its termination message says why).
    CrashLoopBackOff,
    /// spec.access declares ServiceAccount callers, which the operator's install cannot serve.
    AccessNotSupported,
    WaitingForExperiment,
    DeploymentPending,
    MinimumReplicasAvailable,
    MinimumReplicasUnavailable,
    ProgressDeadlineExceeded,
    RolloutComplete,
    RollingOut,
    // TraceCredentialReady
    PerEndpointCredential,
    MirroredCredential,
    EndpointCredential,
    NoCredential,
    CredentialUnavailable,
    /// Another reason the Deployment gave, as it gave it.
    Deployment(String),
}

impl Reason {
    pub fn as_str(&self) -> &str {
        match self {
            Reason::Ready => "Ready",
            Reason::UsageTrackingDisabled => "UsageTrackingDisabled",
            Reason::ExistingExperiment => "ExistingExperiment",
            Reason::ExperimentActive => "ExperimentActive",
            Reason::ExperimentNameConflict => "ExperimentNameConflict",
            Reason::ExperimentNotFound => "ExperimentNotFound",
            Reason::ExperimentDeleted => "ExperimentDeleted",
            Reason::ExperimentNameReserved => "ExperimentNameReserved",
            Reason::ExperimentNotShared => "ExperimentNotShared",
            Reason::WorkspaceInvalid => "WorkspaceInvalid",
            Reason::TrackingServerUnavailable => "TrackingServerUnavailable",
            Reason::TrackingServerUnauthorized => "TrackingServerUnauthorized",
            Reason::TrackingServerForbidden => "TrackingServerForbidden",
            Reason::TrackingServerError => "TrackingServerError",
            Reason::SecretsFound => "SecretsFound",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretKeyNotFound => "SecretKeyNotFound",
            Reason::CredentialsInvalid => "CredentialsInvalid",
            Reason::NameConflict => "NameConflict",
            Reason::ApplyFailed => "ApplyFailed",
            Reason::CrashLoopBackOff => "CrashLoopBackOff",
            Reason::AccessNotSupported => "AccessNotSupported",
            Reason::WaitingForExperiment => "WaitingForExperiment",
            Reason::DeploymentPending => "DeploymentPending",
            Reason::MinimumReplicasAvailable => "MinimumReplicasAvailable",
            Reason::MinimumReplicasUnavailable => "MinimumReplicasUnavailable",
            Reason::ProgressDeadlineExceeded => "ProgressDeadlineExceeded",
            Reason::RolloutComplete => "RolloutComplete",
            Reason::RollingOut => "RollingOut",
            Reason::PerEndpointCredential => "PerEndpointCredential",
            Reason::MirroredCredential => "MirroredCredential",
            Reason::EndpointCredential => "EndpointCredential",
            Reason::NoCredential => "NoCredential",
            Reason::CredentialUnavailable => "CredentialUnavailable",
            Reason::Deployment(other) => other,
        }
    }

    /// A reason read from a Deployment condition: one of ours when it has the same name.
    pub fn from_deployment(reason: String) -> Reason {
        match reason.as_str() {
            "MinimumReplicasAvailable" => Reason::MinimumReplicasAvailable,
            "MinimumReplicasUnavailable" => Reason::MinimumReplicasUnavailable,
            "ProgressDeadlineExceeded" => Reason::ProgressDeadlineExceeded,
            _ => Reason::Deployment(reason),
        }
    }

    /// The reason for a tracking-server failure.
    pub fn tracking_error(e: &MlflowError) -> Reason {
        match e {
            MlflowError::Unavailable { .. } => Reason::TrackingServerUnavailable,
            MlflowError::Unauthenticated { .. } => Reason::TrackingServerUnauthorized,
            MlflowError::Api {
                code: ErrorCode::PermissionDenied,
                ..
            } => Reason::TrackingServerForbidden,
            _ => Reason::TrackingServerError,
        }
    }
}

impl From<BlockedReason> for Reason {
    fn from(r: BlockedReason) -> Reason {
        match r {
            BlockedReason::ExperimentNameConflict => Reason::ExperimentNameConflict,
            BlockedReason::ExperimentNotFound => Reason::ExperimentNotFound,
            BlockedReason::ExperimentDeleted => Reason::ExperimentDeleted,
            BlockedReason::ExperimentNameReserved => Reason::ExperimentNameReserved,
            BlockedReason::ExperimentNotShared => Reason::ExperimentNotShared,
            BlockedReason::WorkspaceInvalid => Reason::WorkspaceInvalid,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One condition as the reconciler decides it; `lastTransitionTime` is filled in on write.
#[derive(Clone, Debug, PartialEq)]
pub struct ConditionState {
    pub type_: ConditionType,
    pub status: bool,
    pub reason: Reason,
    pub message: String,
}

impl ConditionState {
    pub fn new(type_: ConditionType, status: bool, reason: Reason, message: String) -> Self {
        ConditionState {
            type_,
            status,
            reason,
            message,
        }
    }

    /// True when `previous` (from status) already says this condition is failing this way.
    pub fn same_failure_as(&self, previous: Option<&Condition>) -> bool {
        previous.is_some_and(|c| {
            c.status == "False" && c.reason == self.reason.as_str() && c.message == self.message
        })
    }
}

/// `Ready` from its parts: the first failing part's reason, else serving at `url`.
pub fn ready(
    parts: &[&ConditionState],
    url: &str,
    available: &str,
    experiment: &str,
) -> ConditionState {
    match parts.iter().find(|c| !c.status) {
        Some(failing) => ConditionState::new(
            ConditionType::Ready,
            false,
            failing.reason.clone(),
            format!("{}: {}", failing.type_.as_str(), failing.message),
        ),
        None => ConditionState::new(
            ConditionType::Ready,
            true,
            Reason::Ready,
            format!("serving at {url} ({available}); {experiment}"),
        ),
    }
}

/// New conditions, keeping `lastTransitionTime` where the status did not change.
pub fn merge_conditions(
    current: &[Condition],
    wanted: &[ConditionState],
    generation: Option<i64>,
) -> Vec<Condition> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut out: Vec<Condition> = current
        .iter()
        .filter(|c| !wanted.iter().any(|w| w.type_.as_str() == c.type_))
        .cloned()
        .collect();
    for w in wanted {
        let status = if w.status { "True" } else { "False" };
        let last = current
            .iter()
            .find(|c| c.type_ == w.type_.as_str() && c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        out.push(Condition {
            type_: w.type_.as_str().to_string(),
            status: status.to_string(),
            reason: w.reason.as_str().to_string(),
            message: w.message.clone(),
            last_transition_time: last,
            observed_generation: generation,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cond(type_: ConditionType, status: bool, reason: Reason) -> ConditionState {
        ConditionState::new(type_, status, reason, "m".into())
    }

    #[test]
    fn transition_time_is_kept_while_status_is_unchanged() {
        let first = merge_conditions(
            &[],
            &[cond(ConditionType::Ready, false, Reason::NameConflict)],
            Some(1),
        );
        std::thread::sleep(Duration::from_millis(1100));
        let second = merge_conditions(
            &first,
            &[cond(ConditionType::Ready, false, Reason::RollingOut)],
            Some(2),
        );
        assert_eq!(
            first[0].last_transition_time,
            second[0].last_transition_time
        );
        assert_eq!(second[0].reason, "RollingOut");
        assert_eq!(second[0].observed_generation, Some(2));
        let third = merge_conditions(
            &second,
            &[cond(ConditionType::Ready, true, Reason::Ready)],
            Some(2),
        );
        assert_ne!(
            third[0].last_transition_time,
            second[0].last_transition_time
        );
    }

    #[test]
    fn deployment_reasons_map_to_ours_or_pass_through() {
        assert_eq!(
            Reason::from_deployment("ProgressDeadlineExceeded".into()),
            Reason::ProgressDeadlineExceeded
        );
        let other = Reason::from_deployment("NewReplicaSetAvailable".into());
        assert_eq!(other.as_str(), "NewReplicaSetAvailable");
        assert_eq!(
            Reason::from(BlockedReason::ExperimentNotFound).as_str(),
            "ExperimentNotFound"
        );
    }

    #[test]
    fn ready_takes_the_first_failing_part() {
        let ok = cond(ConditionType::SecretsReady, true, Reason::SecretsFound);
        let bad = ConditionState::new(
            ConditionType::Available,
            false,
            Reason::NameConflict,
            "taken".into(),
        );
        let r = ready(&[&ok, &bad], "http://x", "a", "e");
        assert!(!r.status);
        assert_eq!(r.reason, Reason::NameConflict);
        assert_eq!(r.message, "Available: taken");
        let r = ready(&[&ok], "http://x", "2 of 2", "traces go to 1");
        assert_eq!(r.reason, Reason::Ready);
        assert_eq!(r.message, "serving at http://x (2 of 2); traces go to 1");
    }

    #[test]
    fn a_failure_is_the_same_only_with_status_reason_and_message() {
        let wanted = cond(ConditionType::Available, false, Reason::NameConflict);
        let mut merged = merge_conditions(&[], std::slice::from_ref(&wanted), None);
        assert!(wanted.same_failure_as(merged.first()));
        merged[0].message = "other".into();
        assert!(!wanted.same_failure_as(merged.first()));
        assert!(!wanted.same_failure_as(None));
    }
}
