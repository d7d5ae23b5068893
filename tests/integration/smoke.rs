//! Proof that the test stack is the real thing: a real API server with RBAC, a controller-manager,
//! a scheduler and kwok moving Pods to Running, and a real MLflow tracking server.

use crate::support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use serde_json::json;

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("valid object")
}

#[tokio::test]
async fn api_server_reports_the_pinned_version_to_both_auth_methods() {
    let cluster = support::cluster();
    let client = cluster.client().await;
    let version = client.apiserver_version().await.expect("version");
    assert_eq!(version.git_version, "v1.34.4");

    // Token authentication, through the kubeconfig's second context.
    let (ok, out, err) = cluster.kubectl_run(
        &[
            "--context",
            "local-token",
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(out, "admin-token");
    let (ok, out, err) = cluster.kubectl_run(&["version", "-o", "json"], None);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["clientVersion"]["gitVersion"], "v1.34.4");
}

#[tokio::test]
async fn a_deployment_becomes_a_running_pod() {
    let cluster = support::cluster();
    let client = cluster.client().await;
    let ns = support::namespace(&client, "smoke-deploy").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .create(
            &PostParams::default(),
            &from_json(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web"},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}
                    }
                }
            })),
        )
        .await
        .expect("create deployment");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let running = support::eventually(90, "2 Running pods on the kwok node", || async {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let running: Vec<_> = list
            .items
            .into_iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .collect();
        (running.len() == 2).then_some(running)
    })
    .await;
    for pod in running {
        let spec = pod.spec.unwrap();
        assert_eq!(
            spec.node_name.as_deref(),
            Some("kwok-node-0"),
            "bound by the scheduler"
        );
        assert!(pod.status.unwrap().pod_ip.is_some(), "kwok gave it an IP");
    }
    let available = support::eventually(60, "the Deployment to report 2 available", || async {
        let d = deployments.get("web").await.ok()?;
        (d.status?.available_replicas? == 2).then_some(())
    })
    .await;
    assert_eq!(available, ());
}

#[tokio::test]
async fn a_crd_is_served_and_its_schema_rejects_a_bad_object() {
    let cluster = support::cluster();
    let client = cluster.client().await;
    let group = format!("smoke{}.example.com", support::suffix());
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(
        &PostParams::default(),
        &from_json(json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("widgets.{group}")},
            "spec": {
                "group": group, "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {"type": "object", "required": ["size"],
                        "properties": {"size": {"type": "integer", "minimum": 1}}}}
                }}}]
            }
        })),
    )
    .await
    .expect("create CRD");
    let ns = support::namespace(&client, "smoke-crd").await;
    let widget = |size: i64| {
        format!(
            "apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: w{size}\n  namespace: {ns}\nspec:\n  size: {size}\n"
        )
    };
    // Established takes a moment: retry the good object until it is served.
    support::eventually(30, "the CRD to be served", || async {
        let (ok, _, _) = cluster.kubectl_run(&["apply", "-f", "-"], Some(&widget(3)));
        ok.then_some(())
    })
    .await;
    let (ok, _, err) = cluster.kubectl_run(&["apply", "-f", "-"], Some(&widget(0)));
    assert!(!ok, "a size of 0 must be rejected");
    assert!(
        err.contains(
            "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1"
        ),
        "API server's own message expected, got: {err}"
    );
    let gvk = GroupVersionKind::gvk(&group, "v1", "Widget");
    let widgets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &ApiResource::from_gvk(&gvk));
    let names: Vec<_> = widgets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|w| w.metadata.name.unwrap())
        .collect();
    assert_eq!(names, vec!["w3".to_string()]);
}

#[tokio::test]
async fn rbac_denies_a_service_account_until_a_role_allows_it() {
    let cluster = support::cluster();
    let admin = cluster.client().await;
    let ns = support::namespace(&admin, "smoke-rbac").await;
    let user = format!("system:serviceaccount:{ns}:reader");
    let as_reader = cluster.impersonating(&user).await;
    let pods: Api<Pod> = Api::namespaced(as_reader, &ns);
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(
            &PostParams::default(),
            &from_json(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "pod-reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
            })),
        )
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(
            &PostParams::default(),
            &from_json(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]
            })),
        )
        .await
        .unwrap();
    // The authorizer sees a new RoleBinding through its informer: a moment later.
    let list = support::eventually(30, "the RoleBinding to allow listing pods", || async {
        pods.list(&ListParams::default()).await.ok()
    })
    .await;
    assert!(list.items.is_empty());
    // Only what the Role grants: get is still denied.
    match pods.get("anything").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn mlflow_creates_and_returns_an_experiment() {
    let mlflow = support::mlflow();
    let name = format!("smoke-{}", support::suffix());
    let created: serde_json::Value = mlflow
        .request(reqwest::Method::POST, "/api/2.0/mlflow/experiments/create")
        .json(&json!({"name": name, "tags": [{"key": "k", "value": "v"}]}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["experiment_id"]
        .as_str()
        .expect("an id")
        .to_string();
    let got: serde_json::Value = mlflow
        .request(reqwest::Method::GET, "/api/2.0/mlflow/experiments/get")
        .query(&[("experiment_id", &id)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["experiment"]["name"], name.as_str());
    assert_eq!(got["experiment"]["lifecycle_stage"], "active");
    assert_eq!(got["experiment"]["tags"][0]["key"], "k");
}
