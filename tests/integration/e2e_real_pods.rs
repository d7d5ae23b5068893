//! End to end on real pods (issue #16.3): the Helm chart installs the operator, which runs as a
//! pod on the local stack's real node (kubelet, containerd, runc) under the chart's
//! ServiceAccount, from the image built from the repo's Dockerfile (hack/image.sh; imported into
//! the node's containerd, never pulled). The operator reaches the API server the way in-cluster
//! clients do (the `kubernetes` Service) and MLflow at the node's host address; it deploys an
//! endpoint whose gateway pods run there too.
//!
//! The fake provider and MLflow run on 127.0.0.1 as everywhere else; pods reach them through
//! forwarders on the node's host address (support::pods). The test client reaches the gateway
//! the way in-cluster clients do: through the Service's ClusterIP (kube-proxy), which the node
//! routes to its bridge. There is no cluster DNS, so URLs use addresses.

use crate::support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use mlflow_gateway_operator::api::GatewayEndpoint;
use serde_json::{Value, json};
use support::fake_llm::FakeLlm;
use support::pods::{api_server_for_pods, expose, product_image};
use support::{RealNode, cluster, eventually};

const KEY: &str = "sk-real-pods-0123456789";

fn socket_of(url: &str) -> SocketAddr {
    let u: url::Url = url.parse().expect("URL");
    let host: std::net::IpAddr = u.host_str().expect("host").parse().expect("an IP host");
    SocketAddr::new(host, u.port().expect("port"))
}

/// A client that opens a new connection per request, as short-lived callers do: a request never
/// rides a kept-alive connection the gateway is closing (the README's keep-alive limit).
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn chat(client: &reqwest::Client, url: &str, text: &str) -> Result<(String, String), String> {
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": text}]}))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let trace = resp
        .headers()
        .get("x-mlflow-trace-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body: Value = resp.json().await.map_err(|e| format!("{e:?}"))?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    Ok((
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        trace,
    ))
}

/// Pods of the endpoint that are Ready and not being deleted: (name, pod IP, container id).
async fn ready_pods(pods: &Api<Pod>, endpoint: &str) -> Vec<(String, String, String)> {
    let list = pods
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={endpoint}")))
        .await
        .unwrap();
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            let ready = status
                .conditions
                .as_ref()?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let cid = status
                .container_statuses
                .as_ref()?
                .first()?
                .container_id
                .clone()?;
            ready.then(|| {
                (
                    p.name_any(),
                    status.pod_ip.clone().unwrap_or_default(),
                    cid.trim_start_matches("containerd://").to_string(),
                )
            })
        })
        .collect()
}

/// The host pid of a container's process, from the node's containerd.
fn container_pid(node: &RealNode, id: &str) -> u32 {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(&node.containerd_sock)
        .args(["-n", &node.containerd_namespace, "tasks", "ls"])
        .output()
        .expect("ctr tasks ls");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(id))
                .then(|| f.next()?.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no task {id} in the node's containerd:\n{text}"))
}

/// What the kernel says about a container's process: (uid line, read-only root).
fn process_identity(pid: u32) -> (Vec<String>, bool) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect();
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let ro = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .and_then(|l| l.split_whitespace().nth(5))
        .is_some_and(|o| o.split(',').any(|x| x == "ro"));
    (uid, ro)
}

/// The experiment's traces; None when MLflow did not answer (polled: a loaded server may drop a
/// connection).
async fn search_traces(ml: &support::Mlflow, experiment_id: &str) -> Option<Vec<Value>> {
    let resp = ml
        .request(reqwest::Method::POST, "/api/3.0/mlflow/traces/search")
        .json(&json!({
            "locations": [{"type": "MLFLOW_EXPERIMENT",
                           "mlflow_experiment": {"experiment_id": experiment_id}}],
            "max_results": 50
        }))
        .send()
        .await
        .ok()?;
    let body: Value = resp.json().await.ok()?;
    Some(body["traces"].as_array().cloned().unwrap_or_default())
}

/// Sends requests through `url` one after another until stopped: (served, failures).
fn continuous_load(
    url: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let client = fresh_client();
        let served = AtomicUsize::new(0);
        let mut failures = vec![];
        // Bounded: at most 20,000 requests (a few minutes of this loop).
        for i in 0..20_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            match chat(&client, &url, &format!("load {i}")).await {
                Ok(_) => {
                    served.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => failures.push(e),
            }
        }
        (served.load(Ordering::Relaxed), failures)
    })
}

#[tokio::test]
async fn the_chart_runs_the_operator_and_the_gateway_as_real_pods() {
    let node = support::real_node();
    let image =
        tokio::task::spawn_blocking(|| product_image(&support::real_node().containerd_sock))
            .await
            .unwrap();
    let (repository, tag) = image.rsplit_once(':').unwrap();
    api_server_for_pods(node.host_ip);
    let ml = support::mlflow();
    let ml_for_pods = expose(node.host_ip, socket_of(&ml.uri));
    let fake = FakeLlm::start("openai", KEY).await;
    let fake_for_pods = expose(node.host_ip, socket_of(&fake.url));

    let c = cluster();
    let admin = c.client().await;
    let rel_ns = support::namespace(&admin, "real-op").await;
    let team = support::namespace(&admin, "real-team").await;
    support::secret(&admin, &team, "llm-keys", &[("openai", KEY)]).await;

    // The chart, as a user installs it, with the tests' image tag and the real node's placement.
    let release = format!("real-{}", support::suffix());
    let chart = support::repo_root().join("charts/mlflow-gateway-operator");
    let (ok, out, err) = c.helm(&[
        "install",
        &release,
        chart.to_str().unwrap(),
        "--namespace",
        &rel_ns,
        "--set",
        &format!("image.repository={repository}"),
        "--set",
        &format!("image.tag={tag}"),
        "--set",
        "image.pullPolicy=Never",
        "--set",
        &format!("mlflow.trackingUri=http://{}", ml_for_pods.addr),
        "--set",
        &format!("controller.watchNamespace={team}"),
        "--set",
        "replicaCount=1",
        "--set-json",
        &format!("nodeSelector={{\"{}\":\"true\"}}", node.key),
        "--set-json",
        &format!(
            "tolerations=[{{\"key\":\"{}\",\"operator\":\"Exists\",\"effect\":\"NoSchedule\"}}]",
            node.key
        ),
        "--wait",
        "--timeout",
        "180s",
    ]);
    assert!(ok, "helm install failed:\n{out}\n{err}");
    let fullname = format!("{release}-mlflow-gateway-operator");
    let op_pods: Api<Pod> = Api::namespaced(admin.clone(), &rel_ns);
    let op = op_pods
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={release}")))
        .await
        .unwrap();
    let op = op.items.first().expect("the operator's pod");
    let op_spec = op.spec.as_ref().unwrap();
    assert_eq!(op_spec.node_name.as_deref(), Some(node.name.as_str()));
    assert_eq!(
        op_spec.service_account_name.as_deref(),
        Some(fullname.as_str())
    );

    // An endpoint with two gateway pods on the real node.
    let name = "chat";
    let placement = format!(
        "  replicas: 2\n  gateway:\n    nodeSelector: {{\"{k}\": \"true\"}}\n    tolerations: [{{key: \"{k}\", operator: Exists, effect: NoSchedule}}]\n",
        k = node.key
    );
    support::apply(
        &team,
        &support::endpoint_yaml(
            name,
            &format!("http://{}/v1", fake_for_pods.addr),
            &placement,
        ),
    );
    let endpoints: Api<GatewayEndpoint> = Api::namespaced(admin.clone(), &team);
    let ep = support::wait_condition(&endpoints, name, "Ready", "True", None, 240).await;
    let experiment = ep.status.as_ref().unwrap().experiment_id.clone().unwrap();

    // Both pods Ready through their probes, each process 65532 on a read-only root.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &team);
    let ready = eventually(120, "2 Ready gateway pods", || async {
        let r = ready_pods(&pods, name).await;
        (r.len() == 2).then_some(r)
    })
    .await;
    for (pod, _, cid) in &ready {
        let p = pods.get(pod).await.unwrap();
        assert_eq!(
            p.spec.as_ref().unwrap().node_name.as_deref(),
            Some(node.name.as_str())
        );
        let (uid, ro) = process_identity(container_pid(node, cid));
        assert_eq!(uid, ["65532"; 4], "{pod} runs as 65532");
        assert!(ro, "{pod} has a read-only root");
    }

    // A client through the Service gets the fake provider's answer; the trace lands in MLflow.
    let services: Api<Service> = Api::namespaced(admin.clone(), &team);
    let ip = services
        .get(name)
        .await
        .unwrap()
        .spec
        .unwrap()
        .cluster_ip
        .unwrap();
    let url = format!("http://{ip}:8080");
    let client = fresh_client();
    let (answer, trace) = eventually(60, "an answer through the Service", || async {
        chat(&client, &url, "through the Service").await.ok()
    })
    .await;
    assert_eq!(answer, fake.reply_to("through the Service"));
    assert!(!trace.is_empty(), "the response names its trace");
    eventually(60, "the trace in the endpoint's experiment", || async {
        search_traces(ml, &experiment)
            .await?
            .iter()
            .any(|t| t["trace_id"] == trace.as_str())
            .then_some(())
    })
    .await;

    // A changed Secret rolls the pods while a client keeps sending requests: none fails.
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &team);
    let before = support::config_hash(&deployments.get(name).await.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let load = continuous_load(url.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    Api::<Secret>::namespaced(admin.clone(), &team)
        .patch(
            "llm-keys",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"rotated": "yes"}})),
        )
        .await
        .unwrap();
    let after = eventually(60, "a new config hash", || async {
        let h = support::config_hash(&deployments.get(name).await.ok()?);
        (h != before).then_some(h)
    })
    .await;
    eventually(
        240,
        "2 Ready pods of the new config, the old ones gone",
        || async {
            let all = pods
                .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}")))
                .await
                .ok()?;
            let r = ready_pods(&pods, name).await;
            let new = all
                .items
                .iter()
                .all(|p| p.annotations().get("mlflow-gateway.dev/config-hash") == Some(&after));
            (new && r.len() == 2 && all.items.len() == 2).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (served, failures) = load.await.unwrap();
    eprintln!(
        "rollout under load: {served} served, {} failed",
        failures.len()
    );
    assert!(served > 10, "the client kept being served ({served})");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the rollout: {:?}",
        failures.len(),
        served + failures.len(),
        &failures[..failures.len().min(5)]
    );

    // A killed pod is replaced while the other keeps serving.
    let ready = ready_pods(&pods, name).await;
    let (victim, _, _) = &ready[0];
    let (survivor, survivor_ip, _) = &ready[1];
    pods.delete(victim, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let direct = format!("http://{survivor_ip}:8080");
    for i in 0..5 {
        let r = chat(&client, &direct, &format!("survivor {i}")).await;
        assert!(
            r.is_ok(),
            "{survivor} serves while {victim} is replaced: {r:?}"
        );
    }
    eventually(120, "a replacement pod Ready", || async {
        let r = ready_pods(&pods, name).await;
        (r.len() == 2 && r.iter().all(|(p, _, _)| p != victim)).then_some(())
    })
    .await;
    eventually(60, "the Service answering again", || async {
        chat(&client, &url, "after the replacement").await.ok()
    })
    .await;

    // Deleting the endpoint removes its objects, its pods and their containers.
    endpoints
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), &team);
    eventually(120, "the endpoint's objects and pods gone", || async {
        let gone = deployments.get_opt(name).await.ok()?.is_none()
            && services.get_opt(name).await.ok()?.is_none()
            && config_maps.get_opt(name).await.ok()?.is_none()
            && pods
                .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}")))
                .await
                .ok()?
                .items
                .is_empty();
        gone.then_some(())
    })
    .await;

    let (ok, out, err) = c.helm(&["uninstall", &release, "--namespace", &rel_ns, "--wait"]);
    assert!(ok, "helm uninstall failed:\n{out}\n{err}");
    drop((ml_for_pods, fake_for_pods));
}
