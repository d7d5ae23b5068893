//! Teams share one cluster and one MLflow: experiments belong to namespaces, and with a
//! workspace-enabled tracking server each namespace's endpoints live in its MLflow workspace.
//! The client against real MLflow servers (with and without workspaces), and end to end on the
//! real API server: two team namespaces, each with its operator, one MLflow.

use crate::support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use mlflow_gateway_operator::api::GatewayEndpoint;
use mlflow_gateway_operator::controller::experiment::{
    self, BlockedReason, Declared, EndpointIdentity, Outcome,
};
use mlflow_gateway_operator::mlflow::{MlflowClient, MlflowConfig};
use serde_json::{Value, json};
use support::fake_llm::FakeLlm;
use support::{Mlflow, Operator, apply, cluster, eventually};

const QUICK: &[(&str, &str)] = &[
    ("RESYNC_PERIOD_SECONDS", "3"),
    ("MAX_BACKOFF_SECONDS", "4"),
    ("GATEWAY_IMAGE", "registry.example.com/mgo:test"),
];
const API_KEY: &str = "sk-tenancy-0123456789";

/// A client with room for a loaded machine (the assertions are about answers, not speed).
fn client(uri: &str) -> MlflowClient {
    let config = MlflowConfig::builder(uri.parse().unwrap())
        .request_timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    MlflowClient::new(&config).unwrap()
}

/// A namespace of the test's own, with the LLM key Secret.
async fn team(kube: &kube::Client, prefix: &str) -> (String, Api<GatewayEndpoint>) {
    let ns = support::namespace(kube, prefix).await;
    support::secret(kube, &ns, "llm-keys", &[("openai", API_KEY)]).await;
    (ns.clone(), Api::namespaced(kube.clone(), &ns))
}

fn condition(ep: &GatewayEndpoint, type_: &str) -> (String, String) {
    let c = ep.status.as_ref().unwrap().condition(type_).unwrap();
    (c.reason.clone(), c.message.clone())
}

async fn annotate_namespace(kube: &kube::Client, ns: &str, key: &str, value: &str) {
    Api::<Namespace>::all(kube.clone())
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {key: value}}})),
        )
        .await
        .expect("annotate the namespace");
}

#[tokio::test]
async fn workspaces_scope_experiments_and_are_made_to_exist() {
    let plain = support::mlflow();
    assert!(
        !client(&plain.uri)
            .server_info()
            .await
            .unwrap()
            .workspaces_enabled
    );
    // A server without workspaces refuses the header: it must never get one.
    let e = client(&plain.uri)
        .in_workspace(Some("team-a".into()))
        .get_experiment("0")
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(500), "{e}");

    let ml = Mlflow::start_with_workspaces(false);
    let base = client(&ml.uri);
    assert!(base.server_info().await.unwrap().workspaces_enabled);
    let (a, b) = (
        format!("team-a-{}", support::suffix()),
        format!("team-b-{}", support::suffix()),
    );
    assert!(base.ensure_workspace(&a, "test").await.unwrap());
    assert!(!base.ensure_workspace(&a, "test").await.unwrap());
    assert!(base.ensure_workspace(&b, "test").await.unwrap());
    assert_eq!(base.get_workspace(&a).await.unwrap().name, a);
    assert!(
        base.get_workspace("team-nope")
            .await
            .unwrap_err()
            .is_not_found()
    );

    // The same name in two workspaces: two experiments, each seen only from its own.
    let in_a = base.in_workspace(Some(a.clone()));
    let in_b = base.in_workspace(Some(b.clone()));
    let id_a = in_a.create_experiment("gateway/ep", &[]).await.unwrap();
    let id_b = in_b.create_experiment("gateway/ep", &[]).await.unwrap();
    assert_ne!(id_a, id_b);
    assert_eq!(in_a.get_experiment(&id_a).await.unwrap().name, "gateway/ep");
    assert!(in_b.get_experiment(&id_a).await.unwrap_err().is_not_found());
    assert!(base.get_experiment(&id_a).await.unwrap_err().is_not_found());

    // The rules through a workspace client: team b cannot reach team a's experiment by id, and
    // the message names the workspace it looked in; team b's managed experiment lands in b.
    let ep_b = EndpointIdentity {
        namespace: b.clone(),
        name: "chat".into(),
        uid: "uid-b".into(),
    };
    let user = Declared::UserExperiment {
        id: id_a.clone(),
        shared: false,
    };
    match experiment::ensure(&in_b, &ep_b, &user, None).await.unwrap() {
        Outcome::Blocked {
            reason: BlockedReason::ExperimentNotFound,
            message,
            ..
        } => assert!(message.contains(&format!("workspace {b}")), "{message}"),
        other => panic!("expected ExperimentNotFound, got {other:?}"),
    }
    let managed = Declared::Managed {
        name: ep_b.default_experiment_name(),
    };
    let Outcome::Ready { experiment: e, .. } = experiment::ensure(&in_b, &ep_b, &managed, None)
        .await
        .unwrap()
    else {
        panic!("expected Ready");
    };
    assert_eq!(
        in_b.get_experiment(&e.experiment_id).await.unwrap().name,
        ep_b.default_experiment_name()
    );
    assert!(
        in_a.get_experiment(&e.experiment_id)
            .await
            .unwrap_err()
            .is_not_found()
    );
}

#[tokio::test]
async fn another_namespaces_experiment_or_prefix_is_refused_until_an_admin_shares_it() {
    let ml = support::mlflow();
    let tracking = client(&ml.uri);
    let kube = cluster().client().await;
    let (ns_a, eps_a) = team(&kube, "tenancy-a").await;
    let (ns_b, eps_b) = team(&kube, "tenancy-b").await;
    let _op_a = Operator::start(&ns_a, &ml.uri, QUICK);
    let _op_b = Operator::start(&ns_b, &ml.uri, QUICK);

    // Team b's endpoint and its experiment.
    apply(
        &ns_b,
        &support::endpoint_yaml("chat", "https://api.openai.com/v1", ""),
    );
    let chat_b = support::wait_condition(&eps_b, "chat", "ExperimentReady", "True", None, 90).await;
    let id_b = chat_b.status.unwrap().experiment_id.unwrap();
    let before = tracking.get_experiment(&id_b).await.unwrap();

    // Team a squats team b's prefix: refused, nothing created.
    let squatted = format!("gateway/{ns_b}/later");
    apply(
        &ns_a,
        &support::endpoint_yaml(
            "squat",
            "https://api.openai.com/v1",
            &format!("  experimentName: {squatted}\n"),
        ),
    );
    let squat = support::wait_condition(
        &eps_a,
        "squat",
        "ExperimentReady",
        "False",
        Some("ExperimentNameReserved"),
        90,
    )
    .await;
    let (_, message) = condition(&squat, "ExperimentReady");
    assert!(
        message.contains("spec.experimentName") && message.contains(&format!("gateway/{ns_a}/")),
        "{message}"
    );
    assert!(squat.status.as_ref().unwrap().experiment_id.is_none());
    assert!(
        tracking
            .get_experiment_by_name(&squatted)
            .await
            .unwrap_err()
            .is_not_found()
    );

    // Team a points experimentId at team b's experiment: refused, the experiment untouched.
    apply(
        &ns_a,
        &support::endpoint_yaml(
            "borrow",
            "https://api.openai.com/v1",
            &format!("  experimentId: \"{id_b}\"\n"),
        ),
    );
    let borrow = support::wait_condition(
        &eps_a,
        "borrow",
        "ExperimentReady",
        "False",
        Some("ExperimentNotShared"),
        90,
    )
    .await;
    let (_, message) = condition(&borrow, "ExperimentReady");
    assert!(
        message.contains("spec.experimentId")
            && message.contains(&format!("namespace {ns_b}"))
            && message.contains("mlflow-gateway.dev/shared-experiments"),
        "{message}"
    );
    let status = borrow.status.as_ref().unwrap();
    assert!(status.experiment_id.is_none() && status.experiment_name.is_none());
    let deployments: Api<Deployment> = Api::namespaced(kube.clone(), &ns_a);
    assert!(deployments.get_opt("borrow").await.unwrap().is_none());
    assert_eq!(tracking.get_experiment(&id_b).await.unwrap(), before);

    // A cluster admin shares it with team a's namespace: the endpoint uses it as is.
    annotate_namespace(&kube, &ns_a, "mlflow-gateway.dev/shared-experiments", &id_b).await;
    let borrow = support::wait_condition(
        &eps_a,
        "borrow",
        "ExperimentReady",
        "True",
        Some("ExistingExperiment"),
        90,
    )
    .await;
    assert_eq!(
        borrow.status.unwrap().experiment_id.as_deref(),
        Some(id_b.as_str())
    );
    assert_eq!(tracking.get_experiment(&id_b).await.unwrap(), before);
    // The squatting endpoint is still refused.
    let squat = eps_a.get("squat").await.unwrap();
    assert_eq!(
        condition(&squat, "ExperimentReady").0,
        "ExperimentNameReserved"
    );
}

async fn search_traces_in(ml: &Mlflow, workspace: &str, experiment_id: &str) -> Vec<Value> {
    let resp = ml
        .request(reqwest::Method::POST, "/api/3.0/mlflow/traces/search")
        .header("X-MLFLOW-WORKSPACE", workspace)
        .json(&json!({
            "locations": [{"type": "MLFLOW_EXPERIMENT",
                           "mlflow_experiment": {"experiment_id": experiment_id}}],
            "max_results": 50
        }))
        .send()
        .await
        .expect("search traces");
    if !resp.status().is_success() {
        return Vec::new();
    }
    let body: Value = resp.json().await.unwrap();
    body["traces"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn with_workspaces_an_endpoint_and_its_traces_live_in_its_namespaces_workspace() {
    let ml = Mlflow::start_with_workspaces(false);
    let tracking = client(&ml.uri);
    let kube = cluster().client().await;
    let (ns, eps) = team(&kube, "tenancy-ws").await;
    // An admin maps this namespace to another workspace, which does not exist yet.
    let workspace = format!("ws-{}", support::suffix());
    annotate_namespace(
        &kube,
        &ns,
        "mlflow-gateway.dev/mlflow-workspace",
        &workspace,
    )
    .await;
    let fake = FakeLlm::start("openai-fake", API_KEY).await;
    let _op = Operator::start(&ns, &ml.uri, QUICK);
    apply(
        &ns,
        &support::endpoint_yaml("chat", &format!("{}/v1", fake.url), ""),
    );
    // Generous: a private MLflow on a loaded machine may take minutes to answer its first writes.
    let ep = support::wait_condition(&eps, "chat", "Ready", "True", None, 300).await;
    let status = ep.status.clone().unwrap();
    let experiment_id = status.experiment_id.clone().unwrap();
    let (_, message) = condition(&ep, "ExperimentReady");
    assert!(
        message.contains(&format!("workspace {workspace}")),
        "{message}"
    );

    // The workspace was created, the experiment is there and only there.
    assert_eq!(
        tracking.get_workspace(&workspace).await.unwrap().name,
        workspace
    );
    let in_ws = tracking.in_workspace(Some(workspace.clone()));
    let e = in_ws.get_experiment(&experiment_id).await.unwrap();
    assert_eq!(e.name, format!("gateway/{ns}/chat"));
    assert!(
        tracking
            .get_experiment(&experiment_id)
            .await
            .unwrap_err()
            .is_not_found()
    );

    // The pods are told the workspace.
    let d = Api::<Deployment>::namespaced(kube.clone(), &ns)
        .get("chat")
        .await
        .unwrap();
    let env = &d.spec.unwrap().template.spec.unwrap().containers[0].env;
    let value = env
        .iter()
        .flatten()
        .find(|e| e.name == "MLFLOW_WORKSPACE")
        .and_then(|e| e.value.clone());
    assert_eq!(value.as_deref(), Some(workspace.as_str()));

    // The gateway, run as its Deployment declares it, traces into the workspace's experiment.
    let gw = support::gateway_from_deployment(&kube, &ns, "chat", &[]).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(
            &json!({"model": "chat", "messages": [{"role": "user", "content": "hello workspace"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let trace_id = resp.headers()["x-mlflow-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    let uid = ep.uid().unwrap();
    eventually(60, "the trace in the workspace's experiment", || async {
        search_traces_in(&ml, &workspace, &experiment_id)
            .await
            .into_iter()
            .find(|t| {
                t["trace_id"] == trace_id.as_str()
                    // Trace metadata or tags, by the gateway's export mode.
                    && ["trace_metadata", "tags"]
                        .iter()
                        .any(|k| t[k]["mlflow.gateway.endpointId"] == uid.as_str())
                    && t["request_preview"]
                        .as_str()
                        .is_some_and(|p| p.contains("hello workspace"))
            })
    })
    .await;
    assert!(
        search_traces_in(&ml, "default", &experiment_id)
            .await
            .is_empty()
    );
}
