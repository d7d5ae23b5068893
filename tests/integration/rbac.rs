//! The operator's RBAC in both install modes, as the API server grants it to the chart's
//! ServiceAccount (`kubectl auth can-i --as=system:serviceaccount:<ns>:<sa>`): with one watched
//! namespace, Roles there and, cluster-wide, only reading that Namespace; with all namespaces, the same requests in
//! every namespace. That these grants suffice to run the operator is shown by the helm module's
//! install test, which runs it as that ServiceAccount. The rendered rules are checked here too
//! (and, for the all-namespaces ClusterRole, by the helm module).

use crate::admission_policy::{Release, can_i, install};
use crate::helm::{ci_values, documents, find, template};
use crate::support;

use support::{cluster, eventually};

/// The requests the operator makes in a namespace whose endpoints it reconciles.
const GRANTED: &[(&str, &str)] = &[
    ("get", "gatewayendpoints.mlflow-gateway.dev"),
    ("list", "gatewayendpoints.mlflow-gateway.dev"),
    ("watch", "gatewayendpoints.mlflow-gateway.dev"),
    ("patch", "gatewayendpoints.mlflow-gateway.dev"),
    ("update", "gatewayendpoints.mlflow-gateway.dev"),
    ("patch", "gatewayendpoints.mlflow-gateway.dev/status"),
    ("update", "gatewayendpoints.mlflow-gateway.dev/finalizers"),
    ("get", "secrets"),
    ("list", "secrets"),
    ("watch", "secrets"),
    ("create", "secrets"),
    ("patch", "secrets"),
    ("get", "configmaps"),
    ("create", "configmaps"),
    ("patch", "services"),
    ("watch", "services"),
    ("create", "deployments.apps"),
    ("update", "deployments.apps"),
    ("create", "events.events.k8s.io"),
    ("list", "pods"),
    ("create", "networkpolicies.networking.k8s.io"),
    ("delete", "networkpolicies.networking.k8s.io"),
    ("create", "serviceaccounts"),
];

/// Requests it never makes, anywhere.
const REFUSED: &[(&str, &str)] = &[
    ("delete", "secrets"),
    ("deletecollection", "secrets"),
    ("create", "gatewayendpoints.mlflow-gateway.dev"),
    ("delete", "gatewayendpoints.mlflow-gateway.dev"),
    ("delete", "deployments.apps"),
    ("delete", "pods"),
    ("create", "pods"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("create", "leases.coordination.k8s.io"),
    ("use-custom-image", "gatewayendpoints.mlflow-gateway.dev"),
];

fn service_account(release: &Release) -> String {
    format!(
        "system:serviceaccount:{}:{}",
        release.namespace, release.fullname
    )
}

/// The ServiceAccount's Lease rights: create in the release namespace, get/update its own Lease.
fn assert_lease_rights(sa: &str, release: &Release) {
    let rel_ns = Some(release.namespace.as_str());
    let lease = format!("leases.coordination.k8s.io/{}", release.fullname);
    assert!(can_i(sa, rel_ns, "create", "leases.coordination.k8s.io"));
    assert!(can_i(sa, rel_ns, "get", &lease));
    assert!(can_i(sa, rel_ns, "update", &lease));
    assert!(!can_i(
        sa,
        rel_ns,
        "get",
        "leases.coordination.k8s.io/another"
    ));
    assert!(!can_i(sa, rel_ns, "delete", &lease));
}

/// Waits until RBAC grants `sa` a request of each of the release's bindings (they were just
/// created, and the authorizer's cache follows them).
async fn rbac_ready(sa: &str, ns: &str, release: &Release) {
    eventually(30, "the chart's RBAC", || async {
        (can_i(sa, Some(ns), "watch", "gatewayendpoints.mlflow-gateway.dev")
            && can_i(
                sa,
                Some(&release.namespace),
                "create",
                "leases.coordination.k8s.io",
            ))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_one_namespace_install_grants_roles_there_and_reads_only_its_namespace_cluster_wide() {
    let client = cluster().client().await;
    let team = support::namespace(&client, "rbac-team").await;
    let other = support::namespace(&client, "rbac-other").await;
    let rel_ns = support::namespace(&client, "rbac-op").await;
    let release = install(
        &rel_ns,
        &[
            &format!("controller.watchNamespace={team}"),
            "gateway.credentialsSecret=trace-writer",
            "admission.enabled=false",
        ],
    );
    let sa = service_account(&release);
    rbac_ready(&sa, &team, &release).await;

    for (verb, resource) in GRANTED {
        assert!(
            can_i(&sa, Some(&team), verb, resource),
            "{verb} {resource} in the watched namespace"
        );
        assert!(
            !can_i(&sa, Some(&other), verb, resource),
            "{verb} {resource} in another namespace"
        );
        assert!(
            !can_i(&sa, None, verb, resource),
            "{verb} {resource} in all namespaces"
        );
    }
    for (verb, resource) in REFUSED {
        assert!(
            !can_i(&sa, Some(&team), verb, resource),
            "{verb} {resource} in the watched namespace"
        );
    }
    // Cluster-scoped objects: only the watched Namespace itself, read by name (its annotations
    // choose the MLflow workspace and the experiments shared with it).
    for verb in ["get", "list", "watch"] {
        assert!(
            can_i(&sa, None, verb, &format!("namespaces/{team}")),
            "{verb} its Namespace"
        );
        assert!(
            !can_i(&sa, None, verb, &format!("namespaces/{other}")),
            "{verb} another Namespace"
        );
    }
    for (verb, resource) in [
        ("get", "namespaces"),
        ("update", "namespaces"),
        ("list", "nodes"),
        ("get", "customresourcedefinitions.apiextensions.k8s.io"),
        ("list", "clusterroles.rbac.authorization.k8s.io"),
        ("create", "tokenreviews.authentication.k8s.io"),
    ] {
        assert!(
            !can_i(&sa, None, verb, resource),
            "cluster-wide {verb} {resource}"
        );
    }
    // The ClusterRoleBindings naming the ServiceAccount: the Namespace reader's and the
    // token-review binder's.
    let (ok, out, err) = cluster().kubectl_run(&["get", "clusterrolebindings", "-o", "json"], None);
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let naming: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| {
            b["subjects"].as_array().is_some_and(|subjects| {
                subjects.iter().any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["namespace"] == rel_ns.as_str()
                        && s["name"] == release.fullname.as_str()
                })
            })
        })
        .map(|b| b["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        naming,
        vec![
            format!("{}-namespace", release.fullname),
            format!("{}-tokenreview-binder", release.fullname),
        ]
    );

    // In its own namespace: its Lease, and the one Secret it mirrors (get, and list/watch by
    // name); no other Secret.
    let rel = Some(rel_ns.as_str());
    assert_lease_rights(&sa, &release);
    eventually(30, "the credential Secret's Role", || async {
        can_i(&sa, rel, "get", "secrets/trace-writer").then_some(())
    })
    .await;
    for verb in ["get", "list", "watch"] {
        assert!(
            can_i(&sa, rel, verb, "secrets/trace-writer"),
            "{verb} its trace credential"
        );
        assert!(
            !can_i(&sa, rel, verb, "secrets/mlflow-operator"),
            "{verb} another Secret"
        );
    }
    assert!(!can_i(&sa, rel, "list", "secrets"));
    assert!(!can_i(&sa, rel, "update", "secrets/trace-writer"));
    assert!(!can_i(&sa, rel, "get", "configmaps"));
    release.uninstall();
}

#[tokio::test]
async fn an_all_namespaces_install_grants_the_operators_requests_in_every_namespace() {
    let client = cluster().client().await;
    let team = support::namespace(&client, "rbac-all").await;
    let rel_ns = support::namespace(&client, "rbac-all-op").await;
    let release = install(&rel_ns, &["admission.enabled=false"]);
    let sa = service_account(&release);
    rbac_ready(&sa, &team, &release).await;
    for (verb, resource) in GRANTED {
        assert!(
            can_i(&sa, Some(&team), verb, resource),
            "{verb} {resource} in a namespace"
        );
        assert!(
            can_i(&sa, None, verb, resource),
            "{verb} {resource} in all namespaces"
        );
    }
    for (verb, resource) in REFUSED {
        assert!(
            !can_i(&sa, Some(&team), verb, resource),
            "{verb} {resource}"
        );
        assert!(
            !can_i(&sa, None, verb, resource),
            "{verb} {resource} in all namespaces"
        );
    }
    // Namespaces are read (their annotations), never written.
    assert!(can_i(&sa, None, "watch", "namespaces"));
    assert!(!can_i(&sa, None, "update", "namespaces"));
    assert!(!can_i(&sa, None, "list", "nodes"));
    assert_lease_rights(&sa, &release);
    assert!(!can_i(
        &sa,
        Some(&team),
        "get",
        "leases.coordination.k8s.io"
    ));
    release.uninstall();
    // Uninstalled: nothing is left granted.
    eventually(30, "the grants gone with the release", || async {
        (!can_i(&sa, Some(&team), "get", "secrets")).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The rendered RBAC

pub(crate) fn named<'a>(
    docs: &'a [serde_yaml::Value],
    kind: &str,
    name: &str,
) -> &'a serde_yaml::Value {
    find(docs, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

pub(crate) type Rule = (Vec<String>, Vec<String>, Vec<String>);

/// A Role's or ClusterRole's rules as (apiGroups, resources, verbs).
pub(crate) fn rules(role: &serde_yaml::Value) -> Vec<Rule> {
    role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| {
            let list = |k: &str| -> Vec<String> {
                r[k].as_sequence()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            (list("apiGroups"), list("resources"), list("verbs"))
        })
        .collect()
}

pub(crate) fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

/// Exactly the requests the operator makes in a namespace it watches.
pub(crate) fn operator_rules() -> Vec<Rule> {
    let v = strings;
    let crud = ["get", "list", "watch", "create", "patch", "update"];
    vec![
        (
            v(&["mlflow-gateway.dev"]),
            v(&["gatewayendpoints"]),
            v(&["get", "list", "watch", "patch", "update"]),
        ),
        (
            v(&["mlflow-gateway.dev"]),
            v(&["gatewayendpoints/status"]),
            v(&["get", "patch", "update"]),
        ),
        (
            v(&["mlflow-gateway.dev"]),
            v(&["gatewayendpoints/finalizers"]),
            v(&["update"]),
        ),
        (v(&[""]), v(&["configmaps", "services"]), v(&crud)),
        (v(&[""]), v(&["secrets"]), v(&crud)),
        (v(&["apps"]), v(&["deployments"]), v(&crud)),
        (
            v(&["events.k8s.io"]),
            v(&["events"]),
            v(&["create", "patch"]),
        ),
        (v(&[""]), v(&["pods"]), v(&["list"])),
        (
            v(&["networking.k8s.io"]),
            v(&["networkpolicies"]),
            v(&["get", "create", "patch", "delete"]),
        ),
        (
            v(&[""]),
            v(&["serviceaccounts"]),
            v(&["get", "create", "patch"]),
        ),
    ]
}

/// Cluster-wide, for endpoints with ServiceAccount callers: their token-review bindings, and
/// `bind` on the token-review role only.
pub(crate) fn token_review_binder_rules() -> Vec<Rule> {
    let v = strings;
    vec![
        (
            v(&["rbac.authorization.k8s.io"]),
            v(&["clusterrolebindings"]),
            v(&["get", "create", "patch", "delete"]),
        ),
        (
            v(&["rbac.authorization.k8s.io"]),
            v(&["clusterroles"]),
            v(&["bind"]),
        ),
    ]
}

/// With one watched namespace: the operator's rules as a Role there, its one credential Secret
/// in the release namespace, and no ClusterRole or ClusterRoleBinding for it (the chart's
/// ClusterRoles are only the aggregated view/edit/admin ones, bound to nobody).
#[test]
fn a_one_namespace_install_renders_namespaced_roles_only() {
    let out = template(
        "ops",
        &[
            "-f",
            &ci_values("default-values.yaml"),
            "--set",
            "controller.watchNamespace=team-a",
            "--set",
            "gateway.credentialsSecret=trace-writer",
        ],
    )
    .unwrap();
    let docs = documents(&out);
    // The cluster-wide grants: reading the watched Namespace, by name; binding the token-review
    // role (and only it) for endpoints with ServiceAccount callers.
    let mut bound: Vec<_> = find(&docs, "ClusterRoleBinding")
        .iter()
        .map(|b| b["roleRef"]["name"].as_str().unwrap().to_string())
        .collect();
    bound.sort();
    assert_eq!(
        bound,
        strings(&[
            "rel-mlflow-gateway-operator-namespace",
            "rel-mlflow-gateway-operator-tokenreview-binder",
        ])
    );
    let binder = named(
        &docs,
        "ClusterRole",
        "rel-mlflow-gateway-operator-tokenreview-binder",
    );
    assert_eq!(rules(binder), token_review_binder_rules());
    let reader = named(
        &docs,
        "ClusterRole",
        "rel-mlflow-gateway-operator-namespace",
    );
    assert_eq!(
        serde_yaml::to_string(&reader["rules"]).unwrap(),
        "- apiGroups:\n  - ''\n  resources:\n  - namespaces\n  resourceNames:\n  - team-a\n  verbs:\n  - get\n  - list\n  - watch\n"
    );
    let mut cluster_roles: Vec<_> = find(&docs, "ClusterRole")
        .iter()
        .map(|r| r["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    cluster_roles.sort();
    assert_eq!(
        cluster_roles,
        strings(&[
            "rel-mlflow-gateway-operator-admin",
            "rel-mlflow-gateway-operator-edit",
            "rel-mlflow-gateway-operator-gateway-tokenreview",
            "rel-mlflow-gateway-operator-namespace",
            "rel-mlflow-gateway-operator-tokenreview-binder",
            "rel-mlflow-gateway-operator-view",
        ])
    );
    let role = named(&docs, "Role", "rel-mlflow-gateway-operator");
    assert_eq!(role["metadata"]["namespace"].as_str(), Some("team-a"));
    assert_eq!(rules(role), operator_rules());
    let binding = named(&docs, "RoleBinding", "rel-mlflow-gateway-operator");
    assert_eq!(binding["metadata"]["namespace"].as_str(), Some("team-a"));
    assert_eq!(binding["subjects"][0]["namespace"].as_str(), Some("ops"));
    let credential = named(
        &docs,
        "Role",
        "rel-mlflow-gateway-operator-gateway-credentials",
    );
    assert_eq!(credential["metadata"]["namespace"].as_str(), Some("ops"));
    assert_eq!(
        serde_yaml::to_string(&credential["rules"]).unwrap(),
        "- apiGroups:\n  - ''\n  resources:\n  - secrets\n  resourceNames:\n  - trace-writer\n  verbs:\n  - get\n  - list\n  - watch\n"
    );
    // The admission policy's binding is limited to the watched namespace.
    let vapb = find(&docs, "ValidatingAdmissionPolicyBinding")[0];
    assert_eq!(
        vapb["spec"]["matchResources"]["namespaceSelector"]["matchLabels"]
            ["kubernetes.io/metadata.name"]
            .as_str(),
        Some("team-a")
    );
    // Watching the release namespace itself: no separate credential Role.
    let out = template(
        "ops",
        &[
            "-f",
            &ci_values("default-values.yaml"),
            "--set",
            "controller.watchNamespace=ops",
            "--set",
            "gateway.credentialsSecret=trace-writer",
        ],
    )
    .unwrap();
    let docs = documents(&out);
    assert!(
        find(&docs, "Role")
            .iter()
            .all(|r| r["metadata"]["name"].as_str()
                != Some("rel-mlflow-gateway-operator-gateway-credentials"))
    );
}
