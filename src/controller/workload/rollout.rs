//! `Available` and `Progressing` from the endpoint's Deployment, read as kstatus reads a
//! Deployment. Pure: the Deployment in, the two conditions out.

use k8s_openapi::api::apps::v1::Deployment;

use crate::controller::conditions::{ConditionState, ConditionType, Reason};

/// `Available` and `Progressing` from the Deployment, as kstatus reads a Deployment: the rollout is
/// done when the controller has seen the latest generation and every replica is updated and
/// available.
pub fn deployment_conditions(
    deployment: Option<&Deployment>,
    blocked: Option<(Reason, String)>,
) -> (ConditionState, ConditionState) {
    let Some(d) = deployment else {
        let (reason, message) = blocked.unwrap_or((
            Reason::DeploymentPending,
            "the Deployment is being created".into(),
        ));
        return (
            ConditionState::new(
                ConditionType::Available,
                false,
                reason.clone(),
                format!("no gateway pods: {message}"),
            ),
            ConditionState::new(ConditionType::Progressing, false, reason, message),
        );
    };
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = d.status.clone().unwrap_or_default();
    let condition = |t: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t)
            .cloned()
    };
    let ready = status.ready_replicas.unwrap_or(0);
    let available = match condition("Available") {
        Some(c) if c.status == "True" => ConditionState::new(
            ConditionType::Available,
            true,
            c.reason
                .map_or(Reason::MinimumReplicasAvailable, Reason::from_deployment),
            format!("{ready} of {wanted} gateway pods ready"),
        ),
        Some(c) => ConditionState::new(
            ConditionType::Available,
            false,
            c.reason
                .map_or(Reason::MinimumReplicasUnavailable, Reason::from_deployment),
            format!(
                "{ready} of {wanted} gateway pods ready: {}",
                c.message.unwrap_or_default()
            ),
        ),
        None => ConditionState::new(
            ConditionType::Available,
            false,
            Reason::DeploymentPending,
            format!("{ready} of {wanted} gateway pods ready"),
        ),
    };
    let generation = d.metadata.generation.unwrap_or(0);
    let observed = status.observed_generation.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let available_n = status.available_replicas.unwrap_or(0);
    let done =
        observed >= generation && updated >= wanted && total == updated && available_n >= wanted;
    let deadline = condition("Progressing").filter(|c| {
        c.reason.clone().map(Reason::from_deployment) == Some(Reason::ProgressDeadlineExceeded)
    });
    let progressing = if let Some(c) = deadline {
        ConditionState::new(
            ConditionType::Progressing,
            false,
            Reason::ProgressDeadlineExceeded,
            c.message.unwrap_or_else(|| "the rollout is stuck".into()),
        )
    } else if done {
        ConditionState::new(
            ConditionType::Progressing,
            false,
            Reason::RolloutComplete,
            format!("{wanted} of {wanted} gateway pods run the latest config"),
        )
    } else {
        ConditionState::new(
            ConditionType::Progressing,
            true,
            Reason::RollingOut,
            format!(
                "{updated} of {wanted} pods updated, {available_n} available{}",
                if observed < generation {
                    " (the Deployment controller has not seen the change yet)"
                } else {
                    ""
                }
            ),
        )
    };
    (available, progressing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn dep(generation: i64, status: DeploymentStatus) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                ..Default::default()
            }),
            status: Some(status),
        }
    }

    fn cond(t: &str, s: &str, reason: &str) -> DeploymentCondition {
        DeploymentCondition {
            type_: t.into(),
            status: s.into(),
            reason: Some(reason.into()),
            ..Default::default()
        }
    }

    #[test]
    fn rolled_out_deployment_is_available_and_not_progressing() {
        let d = dep(
            2,
            DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(2),
                updated_replicas: Some(2),
                ready_replicas: Some(2),
                available_replicas: Some(2),
                conditions: Some(vec![cond("Available", "True", "MinimumReplicasAvailable")]),
                ..Default::default()
            },
        );
        let (a, p) = deployment_conditions(Some(&d), None);
        assert!(a.status);
        assert!(!p.status);
        assert_eq!(p.reason, Reason::RolloutComplete);
    }

    #[test]
    fn unseen_generation_or_old_pods_mean_rolling_out() {
        let mut s = DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(2),
            updated_replicas: Some(2),
            available_replicas: Some(2),
            conditions: Some(vec![cond("Available", "True", "MinimumReplicasAvailable")]),
            ..Default::default()
        };
        let (a, p) = deployment_conditions(Some(&dep(2, s.clone())), None);
        assert!(a.status, "old pods still serve");
        assert!(p.status);
        assert_eq!(p.reason, Reason::RollingOut);
        s.observed_generation = Some(2);
        s.replicas = Some(3);
        let (_, p) = deployment_conditions(Some(&dep(2, s)), None);
        assert!(p.status, "an old pod is still there");
    }

    #[test]
    fn stuck_rollout_and_missing_deployment_are_reported() {
        let d = dep(
            1,
            DeploymentStatus {
                observed_generation: Some(1),
                conditions: Some(vec![
                    cond("Available", "False", "MinimumReplicasUnavailable"),
                    cond("Progressing", "False", "ProgressDeadlineExceeded"),
                ]),
                ..Default::default()
            },
        );
        let (a, p) = deployment_conditions(Some(&d), None);
        assert!(!a.status);
        assert_eq!(p.reason, Reason::ProgressDeadlineExceeded);
        let (a, _) = deployment_conditions(None, Some((Reason::SecretNotFound, "x".into())));
        assert!(!a.status);
        assert_eq!(a.reason, Reason::SecretNotFound);
    }
}
