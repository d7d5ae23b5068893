//! End-to-end: the operator binary against a real API server and a real MLflow server. Manifests
//! are applied with kubectl, as a user would; each test watches a namespace of its own.

use crate::support;

use kube::api::Api;
use mlflow_gateway_operator::api::GatewayEndpoint;
use mlflow_gateway_operator::controller::experiment::{self, Declared, EndpointIdentity};
use mlflow_gateway_operator::mlflow::{Auth, MlflowClient, MlflowConfig, ViewType};
use support::{Mlflow, Operator, apply, cluster, events, eventually, wait_condition, wait_events};

const QUICK: &[(&str, &str)] = &[("RESYNC_PERIOD_SECONDS", "2"), ("MAX_BACKOFF_SECONDS", "4")];

fn tracking(ml: &Mlflow) -> MlflowClient {
    let auth = match &ml.admin {
        Some((u, p)) => Auth::Basic {
            username: u.clone(),
            password: p.clone(),
        },
        None => Auth::None,
    };
    let config = MlflowConfig::builder(ml.uri.parse().unwrap())
        .auth(auth)
        .build()
        .unwrap();
    MlflowClient::new(&config).unwrap()
}

fn endpoint_yaml(name: &str, extra_spec: &str) -> String {
    format!(
        r#"apiVersion: mlflow-gateway.dev/v1alpha1
kind: GatewayEndpoint
metadata:
  name: {name}
spec:
  models:
    - name: mini
      provider: openai
      model: gpt-4o-mini
      apiKeySecretRef: {{name: llm-keys, key: openai}}
{extra_spec}"#
    )
}

async fn setup(prefix: &str) -> (kube::Client, String, Api<GatewayEndpoint>) {
    let client = cluster().client().await;
    let ns = support::namespace(&client, prefix).await;
    support::secret(&client, &ns, "llm-keys", &[("openai", "sk-test")]).await;
    let api = Api::namespaced(client.clone(), &ns);
    (client, ns, api)
}

async fn ready(api: &Api<GatewayEndpoint>, name: &str) -> GatewayEndpoint {
    wait_condition(api, name, "Ready", "True", None, 60).await
}

async fn experiments_of(t: &MlflowClient, ns: &str, name: &str) -> Vec<String> {
    let filter = format!("tags.`mlflow-gateway.dev/endpoint` = '{ns}/{name}'");
    let mut ids: Vec<_> = t
        .search_all_experiments(&filter, ViewType::All)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.experiment_id)
        .collect();
    ids.sort();
    ids
}

fn experiment_id(ep: &GatewayEndpoint) -> String {
    ep.status
        .as_ref()
        .and_then(|s| s.experiment_id.clone())
        .expect("status.experimentId")
}

#[tokio::test]
async fn creates_the_experiment_tagged_as_mlflow_tags_gateway_experiments() {
    let ml = support::mlflow();
    let (client, ns, api) = setup("e2e-create").await;
    let _op = Operator::start(&ns, &ml.uri, QUICK);
    apply(&ns, &endpoint_yaml("chat", ""));
    let ep = ready(&api, "chat").await;

    let status = ep.status.clone().unwrap();
    let id = experiment_id(&ep);
    assert_eq!(
        status.experiment_name.as_deref(),
        Some(format!("gateway/{ns}/chat").as_str())
    );
    assert_eq!(
        status.experiment_url.as_deref(),
        Some(format!("{}/#/experiments/{id}/traces", ml.uri).as_str())
    );
    assert_eq!(status.observed_generation, ep.metadata.generation);
    let e = tracking(ml).get_experiment(&id).await.unwrap();
    assert_eq!(e.name, format!("gateway/{ns}/chat"));
    assert_eq!(e.tag("mlflow.experiment.sourceType"), Some("GATEWAY"));
    assert_eq!(
        e.tag("mlflow.experiment.sourceId"),
        ep.metadata.uid.as_deref()
    );
    assert_eq!(e.tag("mlflow.experiment.isGateway"), Some("true"));
    assert_eq!(
        e.tag("mlflow-gateway.dev/endpoint"),
        Some(format!("{ns}/chat").as_str())
    );
    assert_eq!(
        ep.metadata.finalizers,
        Some(vec!["mlflow-gateway.dev/experiment".to_string()])
    );
    wait_events(&client, &ns, "chat", "ExperimentCreated", 1, 30).await;

    // What `kubectl get` shows.
    let (ok, out, err) = cluster().kubectl_run(&["get", "gwe", "-n", &ns], None);
    assert!(ok, "{err}");
    let header: Vec<_> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "EXPERIMENT", "URL", "AGE"]);
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .contains(&format!("chat   True    {id}")),
        "{out}"
    );
}

#[tokio::test]
async fn quiet_resyncs_write_nothing_to_kubernetes_or_mlflow() {
    let ml = support::mlflow();
    let (_client, ns, api) = setup("e2e-idle").await;
    let op = Operator::start(&ns, &ml.uri, QUICK);
    apply(&ns, &endpoint_yaml("chat", ""));
    ready(&api, "chat").await;
    // Let the reconcile triggered by our own status write settle.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let ep = api.get("chat").await.unwrap();
    let writes = op
        .metric("mlflow_gateway_operator_mlflow_writes_total", &[])
        .await;
    let reconciles = op
        .metric("mlflow_gateway_operator_reconciles_total", &[])
        .await;
    let kube_writes = op
        .metric("mlflow_gateway_operator_kube_writes_total", &[])
        .await;

    // At least two resyncs (every 2 s, +10% jitter) must run, however slow the machine.
    eventually(30, "two resyncs", || async {
        (op.metric("mlflow_gateway_operator_reconciles_total", &[])
            .await
            >= reconciles + 2.0)
            .then_some(())
    })
    .await;
    let after = api.get("chat").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, ep.metadata.resource_version,
        "no status patch"
    );
    assert_eq!(
        op.metric("mlflow_gateway_operator_mlflow_writes_total", &[])
            .await,
        writes,
        "no MLflow write"
    );
    assert_eq!(
        op.metric("mlflow_gateway_operator_kube_writes_total", &[])
            .await,
        kube_writes,
        "no Kubernetes write (status, ConfigMap, Deployment, Service, Event)"
    );
    assert_eq!(
        experiments_of(&tracking(ml), &ns, "chat").await,
        vec![experiment_id(&after)]
    );
}

#[tokio::test]
async fn a_crash_between_create_and_status_write_still_leaves_one_experiment() {
    let ml = support::mlflow();
    let (_client, ns, api) = setup("e2e-crash").await;
    // The resource exists, and its experiment was created, but the operator died before it wrote
    // status: exactly the state such a crash leaves.
    apply(&ns, &endpoint_yaml("chat", ""));
    let ep = api.get("chat").await.unwrap();
    let id = EndpointIdentity {
        namespace: ns.clone(),
        name: "chat".into(),
        uid: ep.metadata.uid.clone().unwrap(),
    };
    let declared = Declared::Managed {
        name: id.default_experiment_name(),
    };
    let t = tracking(ml);
    let first = experiment::ensure(&t, &id, &declared, None).await.unwrap();
    let experiment::Outcome::Ready {
        experiment: created,
        ..
    } = first
    else {
        panic!("{first:?}")
    };

    let _op = Operator::start(&ns, &ml.uri, QUICK);
    let ep = ready(&api, "chat").await;
    assert_eq!(experiment_id(&ep), created.experiment_id);
    assert_eq!(
        experiments_of(&t, &ns, "chat").await,
        vec![created.experiment_id]
    );
}

#[tokio::test]
async fn an_operator_killed_and_restarted_mid_flight_keeps_one_experiment_per_endpoint() {
    let ml = support::mlflow();
    let (_client, ns, api) = setup("e2e-kill").await;
    let mut op = Operator::start(&ns, &ml.uri, QUICK);
    let names: Vec<String> = (0..8).map(|i| format!("ep{i}")).collect();
    let all: String = names
        .iter()
        .map(|n| endpoint_yaml(n, "") + "---\n")
        .collect();
    apply(&ns, &all);
    // Kill it while it works through them, then start a new one.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    op.kill();
    let _op = Operator::start(&ns, &ml.uri, QUICK);
    let t = tracking(ml);
    for name in &names {
        let ep = ready(&api, name).await;
        assert_eq!(
            experiments_of(&t, &ns, name).await,
            vec![experiment_id(&ep)],
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_foreign_experiment_holding_the_name_is_a_conflict_and_stays_untouched() {
    let ml = support::mlflow();
    let t = tracking(ml);
    let (client, ns, api) = setup("e2e-conflict").await;
    let foreign = t
        .create_experiment(
            &format!("gateway/{ns}/chat"),
            &[("team".to_string(), "someone-else".to_string())],
        )
        .await
        .unwrap();
    let before = t.get_experiment(&foreign).await.unwrap();
    let _op = Operator::start(&ns, &ml.uri, QUICK);
    apply(&ns, &endpoint_yaml("chat", ""));
    let ep = wait_condition(
        &api,
        "chat",
        "ExperimentReady",
        "False",
        Some("ExperimentNameConflict"),
        60,
    )
    .await;
    let status = ep.status.clone().unwrap();
    let msg = &status.condition("ExperimentReady").unwrap().message;
    assert!(
        msg.contains(&format!("experiment {foreign}")) && msg.contains("experimentName"),
        "{msg}"
    );
    assert_eq!(status.condition("Ready").unwrap().status, "False");
    assert_eq!(status.experiment_id, None);
    wait_events(&client, &ns, "chat", "ExperimentNameConflict", 1, 30).await;
    // Resyncs neither write to it nor repeat the Warning.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert_eq!(t.get_experiment(&foreign).await.unwrap(), before);
    assert_eq!(
        events(&client, &ns, "chat", "ExperimentNameConflict")
            .await
            .len(),
        1
    );

    // The fix the message suggests works.
    apply(
        &ns,
        &endpoint_yaml("chat", &format!("  experimentName: gateway/{ns}/chat-2\n")),
    );
    let ep = ready(&api, "chat").await;
    assert_ne!(experiment_id(&ep), foreign);
}

#[tokio::test]
async fn ours_deleted_in_mlflow_is_restored() {
    let ml = support::mlflow();
    let t = tracking(ml);
    let (client, ns, api) = setup("e2e-restore").await;
    let _op = Operator::start(&ns, &ml.uri, QUICK);
    apply(&ns, &endpoint_yaml("chat", ""));
    let id = experiment_id(&ready(&api, "chat").await);
    t.delete_experiment(&id).await.unwrap();
    eventually(30, "the experiment to be restored", || async {
        t.get_experiment(&id).await.ok()?.is_active().then_some(())
    })
    .await;
    eventually(10, "an ExperimentRestored event", || async {
        (!events(&client, &ns, "chat", "ExperimentRestored")
            .await
            .is_empty())
        .then_some(())
    })
    .await;
    assert_eq!(experiment_id(&api.get("chat").await.unwrap()), id);
}

#[tokio::test]
async fn a_given_experiment_id_that_is_missing_or_deleted_is_reported_not_repaired() {
    let ml = support::mlflow();
    let t = tracking(ml);
    let (client, ns, api) = setup("e2e-userid").await;
    let _op = Operator::start(&ns, &ml.uri, QUICK);

    apply(
        &ns,
        &endpoint_yaml("missing", "  experimentId: \"987654321\"\n"),
    );
    let ep = wait_condition(
        &api,
        "missing",
        "ExperimentReady",
        "False",
        Some("ExperimentNotFound"),
        60,
    )
    .await;
    assert!(
        ep.status
            .unwrap()
            .condition("Ready")
            .unwrap()
            .message
            .contains("987654321")
    );
    wait_events(&client, &ns, "missing", "ExperimentNotFound", 1, 30).await;

    let name = format!("users-own-{ns}");
    let id = t.create_experiment(&name, &[]).await.unwrap();
    apply(
        &ns,
        &endpoint_yaml("given", &format!("  experimentId: \"{id}\"\n")),
    );
    let ep = ready(&api, "given").await;
    assert_eq!(experiment_id(&ep), id);
    assert_eq!(
        ep.status
            .unwrap()
            .condition("ExperimentReady")
            .unwrap()
            .reason,
        "ExistingExperiment"
    );
    assert!(
        t.get_experiment(&id).await.unwrap().tags.is_empty(),
        "a given experiment is never tagged"
    );

    t.delete_experiment(&id).await.unwrap();
    wait_condition(
        &api,
        "given",
        "ExperimentReady",
        "False",
        Some("ExperimentDeleted"),
        30,
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert!(
        !t.get_experiment(&id).await.unwrap().is_active(),
        "never restored by the operator"
    );
}

#[tokio::test]
async fn changing_experiment_name_renames_ours_and_keeps_its_id() {
    let ml = support::mlflow();
    let t = tracking(ml);
    let (client, ns, api) = setup("e2e-rename").await;
    let _op = Operator::start(&ns, &ml.uri, QUICK);
    apply(&ns, &endpoint_yaml("chat", ""));
    let id = experiment_id(&ready(&api, "chat").await);
    let new_name = format!("gateway/{ns}/renamed");
    apply(
        &ns,
        &endpoint_yaml("chat", &format!("  experimentName: {new_name}\n")),
    );
    let ep = eventually(30, "status to show the new name", || async {
        let ep = api.get("chat").await.ok()?;
        (ep.status.as_ref()?.experiment_name.as_deref() == Some(new_name.as_str())).then_some(ep)
    })
    .await;
    assert_eq!(experiment_id(&ep), id);
    assert_eq!(t.get_experiment(&id).await.unwrap().name, new_name);
    wait_events(&client, &ns, "chat", "ExperimentRenamed", 1, 30).await;
}

#[tokio::test]
async fn usage_tracking_off_means_no_experiment_and_ready() {
    let ml = support::mlflow();
    let (_client, ns, api) = setup("e2e-notrack").await;
    let _op = Operator::start(&ns, &ml.uri, QUICK);
    apply(&ns, &endpoint_yaml("quiet", "  usageTracking: false\n"));
    let ep = ready(&api, "quiet").await;
    let status = ep.status.unwrap();
    assert_eq!(status.experiment_id, None);
    assert_eq!(
        status.condition("ExperimentReady").unwrap().reason,
        "UsageTrackingDisabled"
    );
    assert!(experiments_of(&tracking(ml), &ns, "quiet").await.is_empty());
}

#[tokio::test]
async fn deletion_retains_or_soft_deletes_the_experiment_per_policy() {
    let ml = support::mlflow();
    let t = tracking(ml);
    let (client, ns, api) = setup("e2e-delete").await;
    let _op = Operator::start(&ns, &ml.uri, QUICK);
    apply(&ns, &endpoint_yaml("keep", ""));
    apply(
        &ns,
        &endpoint_yaml("drop", "  experimentDeletionPolicy: Delete\n"),
    );
    let keep = experiment_id(&ready(&api, "keep").await);
    let drop = experiment_id(&ready(&api, "drop").await);
    let (ok, _, err) = cluster().kubectl_run(
        &[
            "delete",
            "gwe",
            "keep",
            "drop",
            "-n",
            &ns,
            "--wait=true",
            "--timeout=60s",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(api.get_opt("keep").await.unwrap().is_none());
    assert!(api.get_opt("drop").await.unwrap().is_none());
    assert!(
        t.get_experiment(&keep).await.unwrap().is_active(),
        "Retain keeps it"
    );
    assert!(
        !t.get_experiment(&drop).await.unwrap().is_active(),
        "Delete soft-deletes it"
    );
    wait_events(&client, &ns, "drop", "ExperimentDeleted", 1, 30).await;
}

#[tokio::test]
async fn tracking_server_down_shows_in_status_then_recovers_by_itself() {
    let ml = Mlflow::start(false);
    let (client, ns, api) = setup("e2e-outage").await;
    let _op = Operator::start(&ns, &ml.uri, QUICK);
    apply(&ns, &endpoint_yaml("before", ""));
    ready(&api, "before").await;

    ml.stop();
    apply(&ns, &endpoint_yaml("during", ""));
    let ep = wait_condition(
        &api,
        "during",
        "ExperimentReady",
        "False",
        Some("TrackingServerUnavailable"),
        60,
    )
    .await;
    let msg = ep
        .status
        .unwrap()
        .condition("Ready")
        .unwrap()
        .message
        .clone();
    assert!(msg.contains("retrying"), "{msg}");
    wait_events(&client, &ns, "during", "TrackingServerUnavailable", 1, 30).await;

    ml.resume();
    let ep = ready(&api, "during").await;
    assert!(
        tracking(&ml)
            .get_experiment(&experiment_id(&ep))
            .await
            .unwrap()
            .is_active()
    );
    ready(&api, "before").await;
}

#[tokio::test]
async fn wrong_credentials_give_a_clear_condition_and_no_hot_loop() {
    let ml = Mlflow::start(true);
    let (client, ns, api) = setup("e2e-auth").await;
    let env = [
        ("MLFLOW_TRACKING_USERNAME", "admin"),
        ("MLFLOW_TRACKING_PASSWORD", "not-the-password"),
        ("RESYNC_PERIOD_SECONDS", "2"),
        ("MAX_BACKOFF_SECONDS", "300"),
    ];
    let op = Operator::start(&ns, &ml.uri, &env);
    apply(&ns, &endpoint_yaml("chat", ""));
    let ep = wait_condition(
        &api,
        "chat",
        "ExperimentReady",
        "False",
        Some("TrackingServerUnauthorized"),
        60,
    )
    .await;
    let msg = ep
        .status
        .unwrap()
        .condition("ExperimentReady")
        .unwrap()
        .message
        .clone();
    assert!(
        msg.contains("MLFLOW_TRACKING_USERNAME"),
        "says what to check: {msg}"
    );
    assert!(
        !msg.contains("not-the-password"),
        "no secret in status: {msg}"
    );
    wait_events(&client, &ns, "chat", "TrackingServerUnauthorized", 1, 30).await;
    let first = op
        .metric("mlflow_gateway_operator_mlflow_requests_total", &[])
        .await;
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    let later = op
        .metric("mlflow_gateway_operator_mlflow_requests_total", &[])
        .await;
    // Backoff 2 s, 4 s, 8 s...: a handful of attempts in 10 s, not hundreds.
    assert!(later - first <= 4.0, "{first} -> {later} requests in 10 s");
    assert_eq!(
        events(&client, &ns, "chat", "TrackingServerUnauthorized")
            .await
            .len(),
        1
    );
    assert!(
        !op.log_text().contains("not-the-password"),
        "no secret in logs"
    );

    // With the right credentials, a new operator gets it Ready.
    drop(op);
    let (u, p) = ml.admin.clone().unwrap();
    let _op = Operator::start(
        &ns,
        &ml.uri,
        &[
            ("MLFLOW_TRACKING_USERNAME", &u),
            ("MLFLOW_TRACKING_PASSWORD", &p),
            // About the operator's own credential: no per-endpoint MLflow user (e2e_credential),
            // whose password hashing makes a loaded basic-auth server slower still.
            ("GATEWAY_TRACE_CREDENTIALS", "mirrored"),
        ],
    );
    ready(&api, "chat").await;
}
