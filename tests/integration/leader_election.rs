//! Leader election on a real API server: several operator processes, one Lease, one reconciler.

use crate::support;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, PostParams};
use mlflow_gateway_operator::api::GatewayEndpoint;
use mlflow_gateway_operator::mlflow::{MlflowClient, MlflowConfig, ViewType};
use support::{Operator, cluster, eventually};

const LEASE: &str = "mlflow-gateway-operator";
const LEASE_SECONDS: u64 = 6;

/// Operator settings with leader election over a short lease in `ns`, as pod `pod`.
fn elected(ns: &str, pod: &str) -> Vec<(&'static str, String)> {
    vec![
        ("LEADER_ELECTION", "true".into()),
        ("LEADER_ELECTION_NAMESPACE", ns.into()),
        (
            "LEADER_ELECTION_LEASE_DURATION_SECONDS",
            LEASE_SECONDS.to_string(),
        ),
        ("LEADER_ELECTION_RENEW_DEADLINE_SECONDS", "4".into()),
        ("LEADER_ELECTION_RETRY_PERIOD_SECONDS", "1".into()),
        ("POD_NAME", pod.into()),
        ("RESYNC_PERIOD_SECONDS", "2".into()),
    ]
}

fn start(ns: &str, pod: &str) -> Operator {
    let env = elected(ns, pod);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Operator::start(ns, &support::mlflow().uri, &env)
}

async fn lease_spec(api: &Api<Lease>) -> Option<LeaseSpec> {
    api.get_opt(LEASE).await.ok().flatten()?.spec
}

async fn holder(api: &Api<Lease>) -> Option<String> {
    lease_spec(api).await?.holder_identity
}

fn apply_endpoint(ns: &str, name: &str) {
    let yaml = format!(
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
"#
    );
    let (ok, _, err) = cluster().kubectl_run(&["apply", "-n", ns, "-f", "-"], Some(&yaml));
    assert!(ok, "{err}");
}

async fn ready(api: &Api<GatewayEndpoint>, name: &str) {
    eventually(90, &format!("{name} Ready"), || async {
        let ep = api.get(name).await.ok()?;
        (ep.status?.condition("Ready")?.status == "True").then_some(())
    })
    .await;
}

/// Experiments in MLflow that carry this endpoint's ownership tag, deleted ones included.
async fn experiments(ns: &str, name: &str) -> usize {
    let t = MlflowClient::new(&MlflowConfig::new(support::mlflow().uri.parse().unwrap()).unwrap())
        .unwrap();
    t.search_all_experiments(
        &format!("tags.`mlflow-gateway.dev/endpoint` = '{ns}/{name}'"),
        ViewType::All,
    )
    .await
    .unwrap()
    .len()
}

fn seconds_between(
    earlier: &k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime,
    later: &k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime,
) -> f64 {
    (later.0.as_millisecond() - earlier.0.as_millisecond()) as f64 / 1000.0
}

#[tokio::test]
async fn one_leader_reconciles_and_a_follower_takes_over_on_sigterm_and_on_a_crash() {
    let client = cluster().client().await;
    let ns = support::namespace(&client, "leader").await;
    support::secret(&client, &ns, "llm-keys", &[("openai", "sk-test")]).await;
    let leases = Api::<Lease>::namespaced(client.clone(), &ns);
    let endpoints = Api::<GatewayEndpoint>::namespaced(client.clone(), &ns);

    let a = start(&ns, "op-a");
    let b = start(&ns, "op-b");
    let first = eventually(30, "a leader", || holder(&leases)).await;
    let (mut leader, mut follower, follower_name) = if first == "op-a" {
        (a, b, "op-b")
    } else {
        (b, a, "op-a")
    };
    for name in ["one", "two", "three"] {
        apply_endpoint(&ns, name);
    }
    for name in ["one", "two", "three"] {
        ready(&endpoints, name).await;
    }
    // Only the leader reconciles; the follower serves its metrics and waits. (A reconcile is
    // counted after its status write, so the metrics may trail what the test saw.)
    eventually(20, "the leader's gauge and its 3 reconciles", || async {
        let gauge = leader.metric("mlflow_gateway_operator_leader", &[]).await;
        let reconciles = leader
            .metric("mlflow_gateway_operator_reconciles_total", &[])
            .await;
        (gauge == 1.0 && reconciles >= 3.0).then_some(())
    })
    .await;
    assert_eq!(
        follower.metric("mlflow_gateway_operator_leader", &[]).await,
        0.0
    );
    assert_eq!(
        follower
            .metric("mlflow_gateway_operator_reconciles_total", &[])
            .await,
        0.0,
        "the follower reconciled"
    );
    let transitions = lease_spec(&leases).await.unwrap().lease_transitions;

    // SIGTERM: the leader exits cleanly and releases the Lease; the follower takes it at once.
    leader.terminate();
    let status = leader.wait_exit(60).await;
    assert!(status.success(), "{status}\n{}", leader.log_text());
    assert!(leader.log_text().contains("released the leader lease"));
    let taken = eventually(
        LEASE_SECONDS + 10,
        "the follower takes over after SIGTERM",
        || async {
            let spec = lease_spec(&leases).await?;
            (spec.holder_identity.as_deref() == Some(follower_name)).then_some(spec)
        },
    )
    .await;
    assert!(taken.lease_transitions > transitions);
    eventually(20, "the new leader's gauge", || async {
        (follower.metric("mlflow_gateway_operator_leader", &[]).await == 1.0).then_some(())
    })
    .await;
    // No endpoint is lost: a new one and the old ones are reconciled by the new leader.
    apply_endpoint(&ns, "four");
    ready(&endpoints, "four").await;
    eventually(30, "the new leader re-checks the old endpoints", || async {
        (follower
            .metric("mlflow_gateway_operator_reconciles_total", &[])
            .await
            >= 4.0)
            .then_some(())
    })
    .await;

    // A crash (SIGKILL): nothing is released; a third candidate takes over only once the lease
    // has expired, measured from the last renewal.
    std::mem::swap(&mut leader, &mut follower);
    let c = start(&ns, "op-c");
    eventually(20, "op-c follows", || async {
        (c.log_text().contains("another instance is the leader")).then_some(())
    })
    .await;
    leader.kill();
    let before = lease_spec(&leases).await.unwrap();
    assert_eq!(before.holder_identity.as_deref(), Some(follower_name));
    let after = eventually(
        LEASE_SECONDS * 3 + 10,
        "op-c takes over after the crash",
        || async {
            let spec = lease_spec(&leases).await?;
            (spec.holder_identity.as_deref() == Some("op-c")).then_some(spec)
        },
    )
    .await;
    let waited = seconds_between(
        before.renew_time.as_ref().unwrap(),
        after.acquire_time.as_ref().unwrap(),
    );
    assert!(
        waited >= LEASE_SECONDS as f64,
        "op-c took the lease {waited}s after the last renewal, before it expired"
    );
    apply_endpoint(&ns, "five");
    ready(&endpoints, "five").await;
    eventually(20, "op-c's leader gauge", || async {
        (c.metric("mlflow_gateway_operator_leader", &[]).await == 1.0).then_some(())
    })
    .await;

    // Exactly one experiment per endpoint, whatever the handovers.
    for name in ["one", "two", "three", "four", "five"] {
        assert_eq!(experiments(&ns, name).await, 1, "experiments of {name}");
    }
    drop(c);
    drop(follower);
}

#[tokio::test]
async fn a_leader_that_sees_another_holder_stops_reconciling_and_exits_non_zero() {
    let client = cluster().client().await;
    let ns = support::namespace(&client, "leader-lost").await;
    support::secret(&client, &ns, "llm-keys", &[("openai", "sk-test")]).await;
    let leases = Api::<Lease>::namespaced(client.clone(), &ns);
    let mut op = start(&ns, "op-a");
    eventually(30, "op-a leads", || async {
        (holder(&leases).await.as_deref() == Some("op-a")).then_some(())
    })
    .await;
    // Someone else writes the Lease (as a candidate with a skewed view could).
    let mut lease = leases.get(LEASE).await.unwrap();
    lease.spec.as_mut().unwrap().holder_identity = Some("intruder".into());
    leases
        .replace(LEASE, &PostParams::default(), &lease)
        .await
        .unwrap();
    let status = op.wait_exit(30).await;
    assert!(!status.success(), "the operator kept running as leader");
    assert!(
        op.log_text().contains("lost leadership") && op.log_text().contains("held by intruder"),
        "{}",
        op.log_text()
    );
}

#[tokio::test]
async fn a_leader_that_cannot_renew_within_the_deadline_exits_non_zero() {
    let client = cluster().client().await;
    let ns = support::namespace(&client, "leader-deadline").await;
    support::secret(&client, &ns, "llm-keys", &[("openai", "sk-test")]).await;
    let leases = Api::<Lease>::namespaced(client.clone(), &ns);
    // A ServiceAccount allowed only its Lease: revoking that makes every renewal fail.
    let sa = "elector";
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": sa}})).unwrap(),
        )
        .await
        .unwrap();
    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "lease"},
        "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                   "verbs": ["get", "create", "update"]}]
    }))
    .unwrap();
    Api::<Role>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "lease"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lease"},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]
    }))
    .unwrap();
    let bindings = Api::<RoleBinding>::namespaced(client.clone(), &ns);
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    let kubeconfig = cluster().kubeconfig_as(&format!("system:serviceaccount:{ns}:{sa}"));
    let mut env: Vec<(String, String)> = elected(&ns, "op-a")
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    env.push(("MLFLOW_TRACKING_URI".into(), support::mlflow().uri.clone()));
    env.push(("WATCH_NAMESPACE".into(), ns.clone()));
    let mut op = Operator::start_with(&kubeconfig, &env);
    eventually(30, "op-a leads", || async {
        (holder(&leases).await.as_deref() == Some("op-a")).then_some(())
    })
    .await;
    bindings
        .delete("lease", &DeleteParams::default())
        .await
        .unwrap();
    let status = op.wait_exit(30).await;
    assert!(!status.success(), "the operator kept running as leader");
    assert!(
        op.log_text()
            .contains("could not renew the lease within the renew deadline"),
        "{}",
        op.log_text()
    );
    // It never released (it could not); the Lease still names it and expires on its own.
    assert_eq!(holder(&leases).await.as_deref(), Some("op-a"));
}
