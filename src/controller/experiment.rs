//! The experiment rules: which MLflow experiment an endpoint traces into, and what the operator
//! may do to it. Written against the [`Tracking`] trait so the rules are unit-tested with a double
//! and integration-tested against a real tracking server with [`MlflowClient`].

use std::collections::BTreeMap;

use crate::mlflow::{ErrorCode, Experiment, MlflowClient, MlflowError};

/// MLflow's own gateway experiment tags (mlflow/utils/mlflow_tags.py).
pub const TAG_SOURCE_TYPE: &str = "mlflow.experiment.sourceType";
pub const TAG_SOURCE_ID: &str = "mlflow.experiment.sourceId";
pub const TAG_IS_GATEWAY: &str = "mlflow.experiment.isGateway";
/// The operator's ownership tag: `<namespace>/<name>` of the endpoint.
pub const TAG_ENDPOINT: &str = "mlflow-gateway.dev/endpoint";

/// The experiment calls the rules need.
#[allow(async_fn_in_trait)]
pub trait Tracking {
    async fn create_experiment(
        &self,
        name: &str,
        tags: &[(String, String)],
    ) -> Result<String, MlflowError>;
    async fn get_experiment(&self, id: &str) -> Result<Experiment, MlflowError>;
    async fn get_experiment_by_name(&self, name: &str) -> Result<Experiment, MlflowError>;
    async fn rename_experiment(&self, id: &str, new_name: &str) -> Result<(), MlflowError>;
    async fn delete_experiment(&self, id: &str) -> Result<(), MlflowError>;
    async fn restore_experiment(&self, id: &str) -> Result<(), MlflowError>;
    async fn set_experiment_tag(&self, id: &str, key: &str, value: &str)
    -> Result<(), MlflowError>;
    /// The MLflow workspace the calls are made in, if any (for messages).
    fn workspace(&self) -> Option<&str> {
        None
    }
}

impl Tracking for MlflowClient {
    async fn create_experiment(
        &self,
        name: &str,
        tags: &[(String, String)],
    ) -> Result<String, MlflowError> {
        MlflowClient::create_experiment(self, name, tags).await
    }
    async fn get_experiment(&self, id: &str) -> Result<Experiment, MlflowError> {
        MlflowClient::get_experiment(self, id).await
    }
    async fn get_experiment_by_name(&self, name: &str) -> Result<Experiment, MlflowError> {
        MlflowClient::get_experiment_by_name(self, name).await
    }
    async fn rename_experiment(&self, id: &str, new_name: &str) -> Result<(), MlflowError> {
        MlflowClient::rename_experiment(self, id, new_name).await
    }
    async fn delete_experiment(&self, id: &str) -> Result<(), MlflowError> {
        MlflowClient::delete_experiment(self, id).await
    }
    async fn restore_experiment(&self, id: &str) -> Result<(), MlflowError> {
        MlflowClient::restore_experiment(self, id).await
    }
    async fn set_experiment_tag(
        &self,
        id: &str,
        key: &str,
        value: &str,
    ) -> Result<(), MlflowError> {
        MlflowClient::set_experiment_tag(self, id, key, value).await
    }
    fn workspace(&self) -> Option<&str> {
        MlflowClient::workspace(self)
    }
}

/// Who an endpoint is, as far as its experiment is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointIdentity {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`: MLflow's `sourceId`, the endpoint id.
    pub uid: String,
}

impl EndpointIdentity {
    /// The value of the ownership tag: `<namespace>/<name>`.
    pub fn owner(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `gateway/<namespace>/<name>`: MLflow names its own `gateway/<name>`; namespaces make that
    /// ambiguous.
    pub fn default_experiment_name(&self) -> String {
        format!("gateway/{}/{}", self.namespace, self.name)
    }

    /// The tags an experiment of this endpoint carries.
    pub fn tags(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (TAG_SOURCE_TYPE.to_string(), "GATEWAY".to_string()),
            (TAG_SOURCE_ID.to_string(), self.uid.clone()),
            (TAG_IS_GATEWAY.to_string(), "true".to_string()),
            (TAG_ENDPOINT.to_string(), self.owner()),
        ])
    }

    /// Ours: carries our ownership tag, whatever its uid (a restored or re-created resource).
    pub fn owns(&self, experiment: &Experiment) -> bool {
        experiment.tag(TAG_ENDPOINT) == Some(self.owner().as_str())
    }
}

/// What the endpoint declares about its experiment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Declared {
    /// `usageTracking: false`: no experiment.
    Disabled,
    /// `experimentId`: the user's experiment, used as is. `shared`: the endpoint's Namespace
    /// lists it as shared with it (it may then belong to another namespace).
    UserExperiment { id: String, shared: bool },
    /// The operator's experiment, with this name.
    Managed { name: String },
}

/// Something the operator did to an experiment, for Events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Created,
    Adopted,
    Restored,
    Renamed { from: String },
    Retagged,
}

/// Where the endpoint's experiment stands after [`ensure`].
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Tracking off: nothing to do.
    Disabled,
    /// The experiment to trace into, and what was changed to get there (empty in steady state).
    Ready {
        experiment: Experiment,
        changes: Vec<Change>,
    },
    /// The declared state cannot be reached without user action; `experiment_id` is the one still
    /// in use, if any.
    Blocked {
        reason: BlockedReason,
        message: String,
        experiment_id: Option<String>,
    },
}

/// Why the declared experiment cannot be reached (each is also a condition reason of that name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockedReason {
    /// The name is held by an experiment that is not ours.
    ExperimentNameConflict,
    /// The user's `experimentId` does not exist.
    ExperimentNotFound,
    /// The user's `experimentId` is deleted.
    ExperimentDeleted,
    /// `experimentName` is under another namespace's prefix `gateway/<namespace>/`.
    ExperimentNameReserved,
    /// The user's `experimentId` belongs to another namespace and is not shared with this one.
    ExperimentNotShared,
    /// The tracking server has workspaces and the endpoint's namespace maps to no valid one.
    WorkspaceInvalid,
}

/// Makes the declared experiment exist, and reports which one it is.
///
/// `known_id` is the experiment recorded in status: the rules re-check it rather than trust it
/// (it may have been deleted, renamed, re-tagged, or belong to a tracking server that was reset).
/// Crash-safe: if the process dies between the create and the status write, the next call finds
/// the experiment by name and adopts it by its tags, so each endpoint has exactly one.
pub async fn ensure<T: Tracking>(
    tracking: &T,
    endpoint: &EndpointIdentity,
    declared: &Declared,
    known_id: Option<&str>,
) -> Result<Outcome, MlflowError> {
    // Refused before any call: nothing is written to MLflow.
    if let Some(message) = super::tenancy::refuse_declared(endpoint, declared) {
        return Ok(Outcome::Blocked {
            reason: BlockedReason::ExperimentNameReserved,
            message,
            experiment_id: None,
        });
    }
    match declared {
        Declared::Disabled => Ok(Outcome::Disabled),
        Declared::UserExperiment { id, shared } => {
            check_user_experiment(tracking, endpoint, id, *shared).await
        }
        Declared::Managed { name } => ensure_managed(tracking, endpoint, name, known_id).await,
    }
}

async fn check_user_experiment<T: Tracking>(
    tracking: &T,
    endpoint: &EndpointIdentity,
    id: &str,
    shared: bool,
) -> Result<Outcome, MlflowError> {
    let found = tracking.get_experiment(id).await;
    // Another namespace's experiment is refused whatever its state: nothing about it is shown.
    if let Ok(experiment) = &found
        && let Some(message) = super::tenancy::refuse_experiment(endpoint, experiment, shared)
    {
        return Ok(Outcome::Blocked {
            reason: BlockedReason::ExperimentNotShared,
            message,
            experiment_id: None,
        });
    }
    let in_workspace = tracking
        .workspace()
        .map(|w| format!(" workspace {w}"))
        .unwrap_or_default();
    match found {
        Ok(experiment) if experiment.is_active() => Ok(Outcome::Ready {
            experiment,
            changes: vec![],
        }),
        Ok(experiment) => Ok(Outcome::Blocked {
            reason: BlockedReason::ExperimentDeleted,
            message: format!(
                "experiment {id} ({}) given by experimentId is deleted in MLflow; the operator never \
                 modifies it: restore it in MLflow, or change experimentId",
                experiment.name
            ),
            experiment_id: None,
        }),
        Err(e) if e.is_not_found() || is_invalid_id(&e) => Ok(Outcome::Blocked {
            reason: BlockedReason::ExperimentNotFound,
            message: format!(
                "experiment {id} given by experimentId does not exist in MLflow{in_workspace}: \
                 create it, or change experimentId (or remove it to let the operator manage one)"
            ),
            experiment_id: None,
        }),
        Err(e) => Err(e),
    }
}

/// MLflow answers a malformed id (not a number, in the SQL stores) with INVALID_PARAMETER_VALUE.
fn is_invalid_id(e: &MlflowError) -> bool {
    matches!(e.code(), Some(ErrorCode::InvalidParameterValue))
}

async fn ensure_managed<T: Tracking>(
    tracking: &T,
    endpoint: &EndpointIdentity,
    name: &str,
    known_id: Option<&str>,
) -> Result<Outcome, MlflowError> {
    let mut changes = Vec::new();
    // The experiment recorded in status, if it is still there and still ours.
    let mut current = None;
    if let Some(id) = known_id {
        match tracking.get_experiment(id).await {
            Ok(e) if endpoint.owns(&e) => current = Some(e),
            Ok(_) => {} // not ours (a reset tracking server reused the id): never touch it
            Err(e) if e.is_not_found() || is_invalid_id(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let mut experiment = match current {
        Some(e) => e,
        None => match tracking
            .create_experiment(name, &tag_list(&endpoint.tags()))
            .await
        {
            Ok(id) => {
                changes.push(Change::Created);
                // Created as declared: no need to read it back.
                Experiment {
                    experiment_id: id,
                    name: name.to_string(),
                    lifecycle_stage: crate::mlflow::LifecycleStage::Active,
                    tags: endpoint.tags(),
                    artifact_location: None,
                    creation_time: None,
                    last_update_time: None,
                }
            }
            Err(e) if e.is_already_exists() => {
                let existing = tracking.get_experiment_by_name(name).await?;
                if !endpoint.owns(&existing) {
                    return Ok(conflict(name, &existing, None));
                }
                changes.push(Change::Adopted);
                existing
            }
            Err(e) => return Err(e),
        },
    };

    if !experiment.is_active() {
        tracking
            .restore_experiment(&experiment.experiment_id)
            .await?;
        changes.push(Change::Restored);
    }

    if experiment.name != name {
        match tracking
            .rename_experiment(&experiment.experiment_id, name)
            .await
        {
            Ok(()) => {
                changes.push(Change::Renamed {
                    from: std::mem::replace(&mut experiment.name, name.to_string()),
                });
            }
            Err(e)
                if matches!(
                    e.code(),
                    Some(ErrorCode::BadRequest | ErrorCode::ResourceAlreadyExists)
                ) =>
            {
                // The new name is taken: keep tracing into the current experiment.
                let holder = tracking.get_experiment_by_name(name).await?;
                return Ok(conflict(name, &holder, Some(experiment.experiment_id)));
            }
            Err(e) => return Err(e),
        }
    }

    let mut retagged = false;
    for (key, value) in endpoint.tags() {
        if experiment.tag(&key) != Some(value.as_str()) {
            tracking
                .set_experiment_tag(&experiment.experiment_id, &key, &value)
                .await?;
            experiment.tags.insert(key, value);
            retagged = true;
        }
    }
    // Adoption refreshes the tags as part of adopting: no separate change to report.
    if retagged && !changes.contains(&Change::Adopted) && !changes.contains(&Change::Created) {
        changes.push(Change::Retagged);
    }
    experiment.lifecycle_stage = crate::mlflow::LifecycleStage::Active;
    Ok(Outcome::Ready {
        experiment,
        changes,
    })
}

fn conflict(name: &str, holder: &Experiment, in_use: Option<String>) -> Outcome {
    let whose = match holder.tag(TAG_ENDPOINT) {
        Some(owner) => format!("the operator's experiment of endpoint {owner}"),
        None if holder.tag(TAG_IS_GATEWAY) == Some("true") => {
            "a gateway experiment not managed by this operator".to_string()
        }
        None => "an experiment not managed by this operator".to_string(),
    };
    let deleted = if holder.is_active() {
        ""
    } else {
        " (deleted, but MLflow keeps deleted names)"
    };
    Outcome::Blocked {
        reason: BlockedReason::ExperimentNameConflict,
        message: format!(
            "experiment name {name:?} is taken by experiment {} ({whose}){deleted}; it is left \
             untouched: set spec.experimentName to another name, or spec.experimentId to use that \
             experiment as is",
            holder.experiment_id
        ),
        experiment_id: in_use,
    }
}

fn tag_list(tags: &BTreeMap<String, String>) -> Vec<(String, String)> {
    tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Applies `experimentDeletionPolicy: Delete`: soft-deletes the endpoint's experiment if, and only
/// if, it is the operator's own (carries our ownership tag). Returns the id deleted, if any.
pub async fn delete_owned<T: Tracking>(
    tracking: &T,
    endpoint: &EndpointIdentity,
    id: &str,
) -> Result<Option<String>, MlflowError> {
    match tracking.get_experiment(id).await {
        Ok(e) if endpoint.owns(&e) && e.is_active() => {
            tracking.delete_experiment(id).await?;
            Ok(Some(id.to_string()))
        }
        Ok(_) => Ok(None),
        Err(e) if e.is_not_found() || is_invalid_id(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlflow::LifecycleStage;
    use std::cell::RefCell;

    /// An in-memory tracking server that behaves as MLflow does for these calls, and counts writes.
    #[derive(Default)]
    struct FakeTracking {
        experiments: RefCell<Vec<Experiment>>,
        writes: RefCell<Vec<String>>,
    }

    fn api_error(call: &'static str, status: u16, code: ErrorCode) -> MlflowError {
        MlflowError::Api {
            call,
            status,
            code,
            message: String::new(),
        }
    }

    impl FakeTracking {
        fn with(experiments: Vec<Experiment>) -> Self {
            FakeTracking {
                experiments: RefCell::new(experiments),
                ..Default::default()
            }
        }
        fn find(&self, id: &str) -> Option<Experiment> {
            self.experiments
                .borrow()
                .iter()
                .find(|e| e.experiment_id == id)
                .cloned()
        }
        fn update(&self, id: &str, f: impl FnOnce(&mut Experiment)) {
            let mut all = self.experiments.borrow_mut();
            if let Some(e) = all.iter_mut().find(|e| e.experiment_id == id) {
                f(e)
            }
        }
    }

    impl Tracking for FakeTracking {
        async fn create_experiment(
            &self,
            name: &str,
            tags: &[(String, String)],
        ) -> Result<String, MlflowError> {
            self.writes.borrow_mut().push(format!("create {name}"));
            if self.experiments.borrow().iter().any(|e| e.name == name) {
                return Err(api_error(
                    "experiments/create",
                    400,
                    ErrorCode::ResourceAlreadyExists,
                ));
            }
            let id = (self.experiments.borrow().len() + 1).to_string();
            self.experiments.borrow_mut().push(experiment(
                &id,
                name,
                tags.iter().cloned().collect(),
            ));
            Ok(id)
        }
        async fn get_experiment(&self, id: &str) -> Result<Experiment, MlflowError> {
            self.find(id)
                .ok_or_else(|| api_error("experiments/get", 404, ErrorCode::ResourceDoesNotExist))
        }
        async fn get_experiment_by_name(&self, name: &str) -> Result<Experiment, MlflowError> {
            let found = self
                .experiments
                .borrow()
                .iter()
                .find(|e| e.name == name)
                .cloned();
            found.ok_or_else(|| {
                api_error(
                    "experiments/get-by-name",
                    404,
                    ErrorCode::ResourceDoesNotExist,
                )
            })
        }
        async fn rename_experiment(&self, id: &str, new_name: &str) -> Result<(), MlflowError> {
            self.writes.borrow_mut().push(format!("rename {id}"));
            if self.experiments.borrow().iter().any(|e| e.name == new_name) {
                return Err(api_error("experiments/update", 400, ErrorCode::BadRequest));
            }
            self.update(id, |e| e.name = new_name.to_string());
            Ok(())
        }
        async fn delete_experiment(&self, id: &str) -> Result<(), MlflowError> {
            self.writes.borrow_mut().push(format!("delete {id}"));
            self.update(id, |e| e.lifecycle_stage = LifecycleStage::Deleted);
            Ok(())
        }
        async fn restore_experiment(&self, id: &str) -> Result<(), MlflowError> {
            self.writes.borrow_mut().push(format!("restore {id}"));
            self.update(id, |e| e.lifecycle_stage = LifecycleStage::Active);
            Ok(())
        }
        async fn set_experiment_tag(
            &self,
            id: &str,
            key: &str,
            value: &str,
        ) -> Result<(), MlflowError> {
            self.writes.borrow_mut().push(format!("tag {id} {key}"));
            self.update(id, |e| {
                e.tags.insert(key.to_string(), value.to_string());
            });
            Ok(())
        }
    }

    fn experiment(id: &str, name: &str, tags: BTreeMap<String, String>) -> Experiment {
        Experiment {
            experiment_id: id.to_string(),
            name: name.to_string(),
            lifecycle_stage: LifecycleStage::Active,
            tags,
            artifact_location: None,
            creation_time: None,
            last_update_time: None,
        }
    }

    fn endpoint() -> EndpointIdentity {
        EndpointIdentity {
            namespace: "team-a".into(),
            name: "chat".into(),
            uid: "uid-1".into(),
        }
    }

    fn managed() -> Declared {
        Declared::Managed {
            name: endpoint().default_experiment_name(),
        }
    }

    fn ready(outcome: Outcome) -> (Experiment, Vec<Change>) {
        match outcome {
            Outcome::Ready {
                experiment,
                changes,
            } => (experiment, changes),
            other => panic!("expected Ready, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn creates_the_experiment_with_mlflow_gateway_tags() {
        let t = FakeTracking::default();
        let (e, changes) = ready(ensure(&t, &endpoint(), &managed(), None).await.unwrap());
        assert_eq!(changes, vec![Change::Created]);
        assert_eq!(e.name, "gateway/team-a/chat");
        assert_eq!(e.tag(TAG_SOURCE_TYPE), Some("GATEWAY"));
        assert_eq!(e.tag(TAG_SOURCE_ID), Some("uid-1"));
        assert_eq!(e.tag(TAG_IS_GATEWAY), Some("true"));
        assert_eq!(e.tag(TAG_ENDPOINT), Some("team-a/chat"));
    }

    #[tokio::test]
    async fn steady_state_makes_no_write() {
        let t = FakeTracking::default();
        let (e, _) = ready(ensure(&t, &endpoint(), &managed(), None).await.unwrap());
        t.writes.borrow_mut().clear();
        let (again, changes) = ready(
            ensure(&t, &endpoint(), &managed(), Some(&e.experiment_id))
                .await
                .unwrap(),
        );
        assert!(changes.is_empty());
        assert_eq!(again.experiment_id, e.experiment_id);
        assert!(
            t.writes.borrow().is_empty(),
            "writes: {:?}",
            t.writes.borrow()
        );
    }

    #[tokio::test]
    async fn lost_status_adopts_the_experiment_it_created() {
        let t = FakeTracking::default();
        let (first, _) = ready(ensure(&t, &endpoint(), &managed(), None).await.unwrap());
        // The status write never happened: no known id.
        let (second, changes) = ready(ensure(&t, &endpoint(), &managed(), None).await.unwrap());
        assert_eq!(changes, vec![Change::Adopted]);
        assert_eq!(second.experiment_id, first.experiment_id);
        assert_eq!(t.experiments.borrow().len(), 1);
    }

    #[tokio::test]
    async fn recreated_resource_adopts_and_refreshes_source_id() {
        let t = FakeTracking::default();
        ready(ensure(&t, &endpoint(), &managed(), None).await.unwrap());
        let recreated = EndpointIdentity {
            uid: "uid-2".into(),
            ..endpoint()
        };
        let (e, changes) = ready(ensure(&t, &recreated, &managed(), None).await.unwrap());
        assert_eq!(changes, vec![Change::Adopted]);
        assert_eq!(e.tag(TAG_SOURCE_ID), Some("uid-2"));
        assert_eq!(
            t.find(&e.experiment_id).unwrap().tag(TAG_SOURCE_ID),
            Some("uid-2")
        );
    }

    #[tokio::test]
    async fn foreign_experiment_holding_the_name_is_a_conflict_and_untouched() {
        let t = FakeTracking::with(vec![experiment(
            "7",
            "gateway/team-a/chat",
            BTreeMap::from([("owner".into(), "someone".into())]),
        )]);
        let outcome = ensure(&t, &endpoint(), &managed(), None).await.unwrap();
        match outcome {
            Outcome::Blocked {
                reason, message, ..
            } => {
                assert_eq!(reason, BlockedReason::ExperimentNameConflict);
                assert!(message.contains("experiment 7"), "{message}");
            }
            other => panic!("expected conflict, got {other:?}"),
        }
        assert_eq!(t.writes.borrow().as_slice(), ["create gateway/team-a/chat"]);
        assert_eq!(t.find("7").unwrap().tags.len(), 1);
    }

    #[tokio::test]
    async fn experiment_of_another_endpoint_is_a_conflict() {
        let other = EndpointIdentity {
            namespace: "team-b".into(),
            ..endpoint()
        };
        let t = FakeTracking::default();
        ready(
            ensure(
                &t,
                &other,
                &Declared::Managed {
                    name: "shared".into(),
                },
                None,
            )
            .await
            .unwrap(),
        );
        let outcome = ensure(
            &t,
            &endpoint(),
            &Declared::Managed {
                name: "shared".into(),
            },
            None,
        )
        .await
        .unwrap();
        assert!(
            matches!(&outcome, Outcome::Blocked { message, .. } if message.contains("team-b/chat")),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn ours_deleted_in_mlflow_is_restored() {
        let t = FakeTracking::default();
        let (e, _) = ready(ensure(&t, &endpoint(), &managed(), None).await.unwrap());
        t.update(&e.experiment_id, |e| {
            e.lifecycle_stage = LifecycleStage::Deleted
        });
        let (e, changes) = ready(
            ensure(&t, &endpoint(), &managed(), Some(&e.experiment_id))
                .await
                .unwrap(),
        );
        assert_eq!(changes, vec![Change::Restored]);
        assert!(t.find(&e.experiment_id).unwrap().is_active());
    }

    #[tokio::test]
    async fn name_change_renames_ours() {
        let t = FakeTracking::default();
        let (e, _) = ready(ensure(&t, &endpoint(), &managed(), None).await.unwrap());
        let renamed = Declared::Managed {
            name: "gateway/new".into(),
        };
        let (after, changes) = ready(
            ensure(&t, &endpoint(), &renamed, Some(&e.experiment_id))
                .await
                .unwrap(),
        );
        assert_eq!(
            changes,
            vec![Change::Renamed {
                from: "gateway/team-a/chat".into()
            }]
        );
        assert_eq!(after.experiment_id, e.experiment_id);
        assert_eq!(t.find(&e.experiment_id).unwrap().name, "gateway/new");
    }

    #[tokio::test]
    async fn rename_onto_a_taken_name_keeps_the_current_experiment() {
        let t = FakeTracking::with(vec![experiment("1", "taken", BTreeMap::new())]);
        let (e, _) = ready(ensure(&t, &endpoint(), &managed(), None).await.unwrap());
        let outcome = ensure(
            &t,
            &endpoint(),
            &Declared::Managed {
                name: "taken".into(),
            },
            Some(&e.experiment_id),
        )
        .await
        .unwrap();
        assert!(matches!(
            outcome,
            Outcome::Blocked {
                reason: BlockedReason::ExperimentNameConflict,
                experiment_id: Some(ref id),
                ..
            } if *id == e.experiment_id
        ));
    }

    #[tokio::test]
    async fn user_experiment_is_verified_and_never_written() {
        let t = FakeTracking::with(vec![experiment("5", "mine", BTreeMap::new())]);
        let user = |id: &str| Declared::UserExperiment {
            id: id.into(),
            shared: false,
        };
        let (e, changes) = ready(ensure(&t, &endpoint(), &user("5"), None).await.unwrap());
        assert_eq!((e.experiment_id.as_str(), changes.len()), ("5", 0));
        let missing = ensure(&t, &endpoint(), &user("99"), None).await.unwrap();
        assert!(matches!(
            missing,
            Outcome::Blocked {
                reason: BlockedReason::ExperimentNotFound,
                ..
            }
        ));
        t.update("5", |e| e.lifecycle_stage = LifecycleStage::Deleted);
        let deleted = ensure(&t, &endpoint(), &user("5"), None).await.unwrap();
        assert!(matches!(
            deleted,
            Outcome::Blocked {
                reason: BlockedReason::ExperimentDeleted,
                ..
            }
        ));
        assert!(t.writes.borrow().is_empty());
    }

    #[tokio::test]
    async fn another_namespaces_prefix_or_experiment_is_refused_without_a_write() {
        let theirs = experiment("7", "gateway/team-b/chat", {
            let mut tags = endpoint().tags();
            tags.insert(TAG_ENDPOINT.into(), "team-b/chat".into());
            tags
        });
        let t = FakeTracking::with(vec![theirs]);
        let squat = Declared::Managed {
            name: "gateway/team-b/other".into(),
        };
        let outcome = ensure(&t, &endpoint(), &squat, None).await.unwrap();
        assert!(
            matches!(&outcome, Outcome::Blocked { reason: BlockedReason::ExperimentNameReserved, message, .. }
                if message.contains("spec.experimentName")),
            "{outcome:?}"
        );
        let user = |shared| Declared::UserExperiment {
            id: "7".into(),
            shared,
        };
        let outcome = ensure(&t, &endpoint(), &user(false), None).await.unwrap();
        assert!(
            matches!(&outcome, Outcome::Blocked { reason: BlockedReason::ExperimentNotShared, message, .. }
                if message.contains("spec.experimentId")),
            "{outcome:?}"
        );
        // Shared with team-a by its Namespace: used as is.
        let (e, _) = ready(ensure(&t, &endpoint(), &user(true), None).await.unwrap());
        assert_eq!(e.experiment_id, "7");
        assert!(t.writes.borrow().is_empty(), "{:?}", t.writes.borrow());
        assert_eq!(t.experiments.borrow().len(), 1);
    }

    #[tokio::test]
    async fn known_id_that_is_not_ours_is_never_touched() {
        // A reset tracking server: id 1 now belongs to someone else.
        let t = FakeTracking::with(vec![experiment("1", "someone", BTreeMap::new())]);
        let (e, changes) = ready(
            ensure(&t, &endpoint(), &managed(), Some("1"))
                .await
                .unwrap(),
        );
        assert_eq!(changes, vec![Change::Created]);
        assert_ne!(e.experiment_id, "1");
        assert!(t.find("1").unwrap().tags.is_empty());
    }

    #[tokio::test]
    async fn delete_policy_deletes_only_ours() {
        let t = FakeTracking::with(vec![experiment("1", "users", BTreeMap::new())]);
        let (e, _) = ready(ensure(&t, &endpoint(), &managed(), None).await.unwrap());
        assert_eq!(delete_owned(&t, &endpoint(), "1").await.unwrap(), None);
        assert_eq!(
            delete_owned(&t, &endpoint(), &e.experiment_id)
                .await
                .unwrap(),
            Some(e.experiment_id.clone())
        );
        assert!(t.find("1").unwrap().is_active());
        assert!(!t.find(&e.experiment_id).unwrap().is_active());
    }
}
