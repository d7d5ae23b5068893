//! Experiments belong to namespaces: the pure rules. `gateway/<namespace>/` is that namespace's
//! prefix of experiment names; an experiment whose ownership tag (or name) places it in another
//! namespace is that namespace's. A cluster admin may share given experiments with a namespace by
//! annotating the Namespace (cluster-scoped, so a team cannot grant itself), and may map a
//! namespace to another MLflow workspace the same way. Pure functions over the Namespace's
//! annotations, so every rule is unit-tested; the reconcile reads the Namespace and applies them
//! before any MLflow write.

use std::collections::{BTreeMap, BTreeSet};

use super::experiment::{Declared, EndpointIdentity, TAG_ENDPOINT};
use crate::mlflow::{Experiment, invalid_workspace_name};

/// On a Namespace: the MLflow workspace of its endpoints (default: the namespace's name).
pub const ANNOTATION_WORKSPACE: &str = "mlflow-gateway.dev/mlflow-workspace";
/// On a Namespace: experiment ids (comma- or space-separated) its endpoints may use through
/// `spec.experimentId` although another namespace owns them.
pub const ANNOTATION_SHARED_EXPERIMENTS: &str = "mlflow-gateway.dev/shared-experiments";

/// What a Namespace's annotations say about its endpoints' experiments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespacePolicy {
    /// The annotation's workspace, as written (validated by [`NamespacePolicy::workspace`]).
    pub workspace: Option<String>,
    /// Experiment ids shared with this namespace by an admin.
    pub shared_experiments: BTreeSet<String>,
}

impl NamespacePolicy {
    /// The policy the Namespace's annotations give (none: the defaults).
    pub fn from_annotations(annotations: Option<&BTreeMap<String, String>>) -> Self {
        let get = |key: &str| annotations.and_then(|a| a.get(key)).map(|v| v.trim());
        NamespacePolicy {
            workspace: get(ANNOTATION_WORKSPACE)
                .filter(|v| !v.is_empty())
                .map(str::to_string),
            shared_experiments: get(ANNOTATION_SHARED_EXPERIMENTS)
                .unwrap_or("")
                .split([',', ' ', '\n', '\t'])
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        }
    }

    /// The MLflow workspace of namespace `namespace`'s endpoints, or why there is none usable
    /// (the message says what to change).
    pub fn workspace(&self, namespace: &str) -> Result<String, String> {
        match &self.workspace {
            Some(w) => match invalid_workspace_name(w) {
                None => Ok(w.clone()),
                Some(why) => Err(format!(
                    "the annotation {ANNOTATION_WORKSPACE} of Namespace {namespace} names workspace {why}: \
                     a cluster admin must fix the annotation"
                )),
            },
            None => match invalid_workspace_name(namespace) {
                None => Ok(namespace.to_string()),
                Some(why) => Err(format!(
                    "the tracking server has workspaces and namespace {namespace} cannot name one: {why}; \
                     a cluster admin must annotate Namespace {namespace} with {ANNOTATION_WORKSPACE}: <workspace>"
                )),
            },
        }
    }

    pub fn shares(&self, experiment_id: &str) -> bool {
        self.shared_experiments.contains(experiment_id)
    }
}

/// The namespace whose prefix `gateway/<namespace>/` starts `name`, if any.
pub fn prefix_namespace(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("gateway/")?;
    let (namespace, tail) = rest.split_once('/')?;
    (!namespace.is_empty() && !tail.is_empty()).then_some(namespace)
}

/// Why the endpoint may not have a managed experiment of this name, if it may not: the name is
/// under another namespace's prefix. Checked before any call to MLflow.
pub fn refuse_name(endpoint: &EndpointIdentity, name: &str) -> Option<String> {
    let owner = prefix_namespace(name)?;
    (owner != endpoint.namespace).then(|| {
        format!(
            "experimentName {name:?} is under gateway/{owner}/, which belongs to namespace {owner}; \
             nothing was written to MLflow: set spec.experimentName to a name under gateway/{ns}/ \
             (or remove it for the default {default})",
            ns = endpoint.namespace,
            default = endpoint.default_experiment_name()
        )
    })
}

/// The namespace that owns `experiment`: the one its ownership tag (`<namespace>/<name>`) names,
/// else the one whose prefix its name is under.
pub fn owner_namespace(experiment: &Experiment) -> Option<&str> {
    match experiment.tag(TAG_ENDPOINT) {
        Some(owner) => owner.split_once('/').map(|(ns, _)| ns),
        None => prefix_namespace(&experiment.name),
    }
}

/// Why the endpoint may not use `experiment` given by `experimentId`, if it may not: another
/// namespace owns it and the endpoint's Namespace does not have it shared.
pub fn refuse_experiment(
    endpoint: &EndpointIdentity,
    experiment: &Experiment,
    shared: bool,
) -> Option<String> {
    let owner = owner_namespace(experiment)?;
    (owner != endpoint.namespace && !shared).then(|| {
        let id = &experiment.experiment_id;
        format!(
            "experiment {id} ({name}) given by experimentId belongs to namespace {owner}; it is left \
             untouched: remove spec.experimentId to let the operator manage {default}, or ask a \
             cluster admin to share it by annotating Namespace {ns} with {ANNOTATION_SHARED_EXPERIMENTS}: \"{id}\"",
            name = experiment.name,
            default = endpoint.default_experiment_name(),
            ns = endpoint.namespace,
        )
    })
}

/// The refusal that needs no MLflow call: a declared name under another namespace's prefix.
pub fn refuse_declared(endpoint: &EndpointIdentity, declared: &Declared) -> Option<String> {
    match declared {
        Declared::Managed { name } => refuse_name(endpoint, name),
        Declared::Disabled | Declared::UserExperiment { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlflow::LifecycleStage;

    fn team_a() -> EndpointIdentity {
        EndpointIdentity {
            namespace: "team-a".into(),
            name: "chat".into(),
            uid: "u1".into(),
        }
    }

    fn experiment(id: &str, name: &str, owner: Option<&str>) -> Experiment {
        Experiment {
            experiment_id: id.into(),
            name: name.into(),
            lifecycle_stage: LifecycleStage::Active,
            tags: owner
                .map(|o| BTreeMap::from([(TAG_ENDPOINT.to_string(), o.to_string())]))
                .unwrap_or_default(),
            artifact_location: None,
            creation_time: None,
            last_update_time: None,
        }
    }

    #[test]
    fn a_namespace_has_its_prefix() {
        assert_eq!(prefix_namespace("gateway/team-b/chat"), Some("team-b"));
        assert_eq!(prefix_namespace("gateway/team-b/x/y"), Some("team-b"));
        assert_eq!(prefix_namespace("gateway/chat"), None);
        assert_eq!(prefix_namespace("gateway/team-b/"), None);
        assert_eq!(prefix_namespace("gateway//x"), None);
        assert_eq!(prefix_namespace("team-b/chat"), None);
        assert_eq!(prefix_namespace("my-experiments"), None);
    }

    #[test]
    fn names_under_another_namespaces_prefix_are_refused() {
        let ep = team_a();
        let message = refuse_name(&ep, "gateway/team-b/chat").unwrap();
        assert!(message.contains("spec.experimentName"), "{message}");
        assert!(message.contains("gateway/team-a/"), "{message}");
        assert!(message.contains("namespace team-b"), "{message}");
        for ok in [
            "gateway/team-a/chat",
            "gateway/team-a/other/x",
            "gateway/chat",
            "anything",
        ] {
            assert_eq!(refuse_name(&ep, ok), None, "{ok}");
        }
        assert!(
            refuse_declared(
                &ep,
                &Declared::Managed {
                    name: "gateway/team-b/chat".into()
                }
            )
            .is_some()
        );
        assert_eq!(
            refuse_declared(
                &ep,
                &Declared::UserExperiment {
                    id: "1".into(),
                    shared: false
                }
            ),
            None
        );
    }

    #[test]
    fn another_namespaces_experiment_is_refused_unless_shared() {
        let ep = team_a();
        let theirs = experiment("7", "gateway/team-b/chat", Some("team-b/chat"));
        let message = refuse_experiment(&ep, &theirs, false).unwrap();
        assert!(message.contains("spec.experimentId"), "{message}");
        assert!(message.contains("namespace team-b"), "{message}");
        assert!(
            message.contains(&format!("{ANNOTATION_SHARED_EXPERIMENTS}: \"7\"")),
            "{message}"
        );
        assert_eq!(refuse_experiment(&ep, &theirs, true), None);
        // Renamed out of the prefix: the tag still says whose it is.
        let renamed = experiment("7", "prod", Some("team-b/chat"));
        assert!(refuse_experiment(&ep, &renamed, false).is_some());
        // Untagged, under another prefix: that namespace's too.
        let untagged = experiment("8", "gateway/team-b/x", None);
        assert!(refuse_experiment(&ep, &untagged, false).is_some());
        // Ours, or nobody's: allowed.
        let ours = experiment("9", "gateway/team-a/chat", Some("team-a/chat"));
        assert_eq!(refuse_experiment(&ep, &ours, false), None);
        let plain = experiment("10", "shared-evals", None);
        assert_eq!(refuse_experiment(&ep, &plain, false), None);
    }

    #[test]
    fn the_namespace_annotations() {
        let none = NamespacePolicy::from_annotations(None);
        assert_eq!(none, NamespacePolicy::default());
        assert_eq!(none.workspace("team-a").unwrap(), "team-a");
        assert_eq!(none.workspace("default").unwrap(), "default");
        let e = none.workspace("x").unwrap_err();
        assert!(e.contains(ANNOTATION_WORKSPACE), "{e}");
        assert!(none.workspace("api").is_err());

        let annotations = BTreeMap::from([
            (ANNOTATION_WORKSPACE.to_string(), " shared-ml ".to_string()),
            (
                ANNOTATION_SHARED_EXPERIMENTS.to_string(),
                "7, 12 ,,42".to_string(),
            ),
        ]);
        let p = NamespacePolicy::from_annotations(Some(&annotations));
        assert_eq!(p.workspace("team-a").unwrap(), "shared-ml");
        assert!(p.shares("7") && p.shares("12") && p.shares("42"));
        assert!(!p.shares("1") && !p.shares(""));

        let bad = BTreeMap::from([(ANNOTATION_WORKSPACE.to_string(), "Team_A".to_string())]);
        let e = NamespacePolicy::from_annotations(Some(&bad))
            .workspace("team-a")
            .unwrap_err();
        assert!(
            e.contains("Team_A") && e.contains(ANNOTATION_WORKSPACE),
            "{e}"
        );
    }
}
