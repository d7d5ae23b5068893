//! The Kubernetes Events the reconciler records: built by pure functions (what to say), published
//! by one (saying it), so each reconcile step returns the Events it decided and the caller
//! publishes them in order.

use kube::Resource;
use kube::runtime::events::{Event, EventType};
use tracing::warn;

use super::conditions::ConditionState;
use super::context::Context;
use super::experiment::Change;
use crate::api::{GatewayEndpoint, GatewayEndpointStatus};

/// The longest Event note; the API server refuses longer ones.
const MAX_NOTE: usize = 1000;

/// A Warning Event when `wanted` is failing and was not failing the same way before: a Warning
/// when the endpoint enters a failing state, not on every retry.
pub fn warn_on_entering(
    current: &GatewayEndpointStatus,
    wanted: &ConditionState,
    action: &str,
) -> Option<Event> {
    let previous = current.condition(wanted.type_.as_str());
    (!wanted.status && !wanted.same_failure_as(previous)).then(|| Event {
        type_: EventType::Warning,
        reason: wanted.reason.as_str().to_string(),
        note: Some(crate::text::truncate(&wanted.message, MAX_NOTE)),
        action: action.into(),
        secondary: None,
    })
}

/// The Normal Event of something the operator did to an experiment.
pub fn change_event(change: &Change, id: &str, name: &str) -> Event {
    let (reason, note) = match change {
        Change::Created => (
            "ExperimentCreated",
            format!("created experiment {id} ({name}) in MLflow"),
        ),
        Change::Adopted => (
            "ExperimentAdopted",
            format!("adopted existing experiment {id} ({name}): its tags name this endpoint"),
        ),
        Change::Restored => (
            "ExperimentRestored",
            format!("experiment {id} ({name}) was deleted in MLflow; restored it"),
        ),
        Change::Renamed { from } => (
            "ExperimentRenamed",
            format!("renamed experiment {id} from {from} to {name}; its traces stay"),
        ),
        Change::Retagged => (
            "ExperimentRetagged",
            format!("restored the gateway tags of experiment {id} ({name})"),
        ),
    };
    Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note),
        action: "EnsureExperiment".into(),
        secondary: None,
    }
}

/// An Event of the cleanup (action `Reconcile`).
pub fn cleanup_event(type_: EventType, reason: &str, note: &str) -> Event {
    Event {
        type_,
        reason: reason.into(),
        note: Some(crate::text::truncate(note, MAX_NOTE)),
        action: "Reconcile".into(),
        secondary: None,
    }
}

/// Publishes `events` in order; a failure to publish is logged, never fails the reconcile.
pub async fn publish_all(ctx: &Context, ep: &GatewayEndpoint, events: &[Event]) {
    for event in events {
        if let Err(e) = ctx.recorder.publish(event, &ep.object_ref(&())).await {
            warn!(error = %e, reason = %event.reason, "could not publish event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::conditions::{ConditionType, Reason, merge_conditions};

    #[test]
    fn a_warning_only_on_entering_a_failure() {
        let failing = ConditionState::new(
            ConditionType::Progressing,
            false,
            Reason::ProgressDeadlineExceeded,
            "stuck".into(),
        );
        let fresh = GatewayEndpointStatus::default();
        let event = warn_on_entering(&fresh, &failing, "RollOut").expect("a warning");
        assert_eq!(event.type_, EventType::Warning);
        assert_eq!(event.reason, "ProgressDeadlineExceeded");
        assert_eq!(event.action, "RollOut");
        let already = GatewayEndpointStatus {
            conditions: merge_conditions(&[], std::slice::from_ref(&failing), None),
            ..Default::default()
        };
        assert!(warn_on_entering(&already, &failing, "RollOut").is_none());
        let fine = ConditionState {
            status: true,
            ..failing
        };
        assert!(warn_on_entering(&fresh, &fine, "RollOut").is_none());
    }

    #[test]
    fn long_notes_fit_the_api_servers_limit() {
        // The API server refuses an Event whose note is over 1024 bytes.
        let note = cleanup_event(EventType::Warning, "R", &"é".repeat(600))
            .note
            .unwrap_or_default();
        assert!(note.len() <= 1024, "{}", note.len());
        assert!(note.ends_with('…'));
    }
}
