//! Proof that the local stack's real node runs pods (hack/node.sh): a kubelet on containerd + runc
//! starts the test image as user 65532 on a read-only root filesystem, kube-proxy routes a
//! Service from the host to its pods, `kubectl logs` reads them, pods reach servers on the node's
//! host address, and pods that do not ask for the real node stay on kwok's fake one.
//!
//! The workload is hack/node/echo-server.c (a static HTTP server imported into the node's
//! containerd), so these tests need no product image and no registry.

use crate::support::{self, RealNode};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("valid object")
}

/// A pod spec running the echo server as 65532 with a read-only root, on the real node.
fn echo_pod_spec(node: &RealNode, name: &str) -> Value {
    let mut spec = json!({
        "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": true},
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": "echo",
            "image": node.test_image,
            "imagePullPolicy": "Never",
            "args": ["8080", name],
            "ports": [{"containerPort": 8080}],
            "securityContext": {
                "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]}
            },
            "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
        }]
    });
    node.place(&mut spec);
    spec
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .expect("HTTP client")
}

async fn get_text(client: &reqwest::Client, url: &str) -> Option<String> {
    let r = client.get(url).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.text().await.ok()
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(p: &Pod) -> Option<Ipv4Addr> {
    p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

#[tokio::test]
async fn a_pod_runs_as_65532_on_a_read_only_root_and_a_service_routes_to_it() {
    let node = support::real_node();
    let cluster = support::cluster();
    let client = cluster.client().await;
    let ns = support::namespace(&client, "real-node-svc").await;
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &from_json(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "echo"},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": {"app": "echo"}},
                    "template": {
                        "metadata": {"labels": {"app": "echo"}},
                        "spec": echo_pod_spec(node, "echo")
                    }
                }
            })),
        )
        .await
        .expect("create Deployment");
    let svc = Api::<Service>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &from_json(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "echo"},
                "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]}
            })),
        )
        .await
        .expect("create Service");
    let cluster_ip = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("the Service has a ClusterIP");

    // Both pods Ready through their probes: the kubelet really ran them, on the real node.
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pods = support::eventually(120, "2 Ready echo pods", || async {
        let list = pods_api
            .list(&ListParams::default().labels("app=echo"))
            .await
            .ok()?;
        let ready: Vec<Pod> = list.items.into_iter().filter(is_ready).collect();
        (ready.len() == 2).then_some(ready)
    })
    .await;
    let names: BTreeSet<String> = pods
        .iter()
        .map(|p| p.metadata.name.clone().expect("pod name"))
        .collect();
    for p in &pods {
        let spec = p.spec.as_ref().expect("pod spec");
        assert_eq!(spec.node_name.as_deref(), Some(node.name.as_str()));
        let ip = pod_ip(p).expect("pod IP");
        assert!(
            node.owns_pod_ip(ip),
            "{ip} is not in the node's pod subnet {}",
            node.pod_subnet
        );
    }

    // From the host through the Service: kube-proxy spreads connections over both pods, each
    // answering with its own hostname (the pod's name) and the uid it runs as.
    let http = http();
    let url = format!("http://{cluster_ip}/");
    let seen = support::eventually(60, "answers from both pods through the Service", || {
        let (http, url, names) = (&http, &url, &names);
        async move {
            let mut seen = BTreeSet::new();
            for _ in 0..40 {
                let body = get_text(http, url).await?;
                let mut words = body.split_whitespace();
                assert_eq!(words.next(), Some("echo"), "{body}");
                let host = words.next().unwrap_or_default().to_string();
                assert!(
                    names.contains(&host),
                    "answer from {host}, not a pod of {names:?}"
                );
                assert_eq!(words.next(), Some("uid=65532"), "{body}");
                seen.insert(host);
                if seen.len() == 2 {
                    return Some(seen);
                }
            }
            None
        }
    })
    .await;
    assert_eq!(seen, names);

    // The root filesystem is read-only for the running process, not only in the spec.
    let body = get_text(&http, &format!("http://{cluster_ip}/write-root"))
        .await
        .expect("write-root answer");
    assert_eq!(body.trim(), "root-write=Read-only file system");

    // `kubectl logs` reaches the kubelet (the API server dials the node's InternalIP).
    let pod = names.iter().next().expect("a pod");
    let logs = support::eventually(30, "the pod's request log through kubectl logs", || async {
        let (ok, out, _) = cluster.kubectl_run(&["logs", "-n", &ns, pod], None);
        (ok && out.contains("request: GET / ")).then_some(out)
    })
    .await;
    assert!(logs.contains("listening on :8080 as uid 65532"), "{logs}");
}

#[tokio::test]
async fn a_pod_reaches_a_server_on_the_node_host_ip() {
    let node = support::real_node();
    let client = support::cluster().client().await;
    let ns = support::namespace(&client, "real-node-host").await;

    // A server on the host, bound to the bridge's address (loopback is the pod's own).
    let listener = tokio::net::TcpListener::bind((node.host_ip, 0))
        .await
        .expect("bind the node's host address");
    let port = listener.local_addr().expect("local address").port();
    let greeting = format!("hello-from-the-host-{}", support::suffix());
    let answer = format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{greeting}",
        greeting.len()
    );
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let _ = conn.write_all(answer.as_bytes()).await;
        }
    });

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &from_json(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "echo"},
            "spec": echo_pod_spec(node, "echo")
        })),
    )
    .await
    .expect("create Pod");
    let ip = support::eventually(120, "the echo pod Ready", || async {
        let p = pods.get("echo").await.ok()?;
        is_ready(&p).then(|| pod_ip(&p)).flatten()
    })
    .await;

    // Host -> pod directly, and pod -> host server through the bridge.
    let url = format!("http://{ip}:8080/fetch/{}/{port}", node.host_ip);
    let body = get_text(&http(), &url).await.expect("fetch answer");
    server.abort();
    assert_eq!(body.trim(), format!("fetched={greeting}"));
}

#[tokio::test]
async fn a_pod_that_does_not_ask_for_the_real_node_stays_on_kwok() {
    let node = support::real_node();
    let client = support::cluster().client().await;
    let ns = support::namespace(&client, "real-node-kwok").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &from_json(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "plain"},
            "spec": {"containers": [{"name": "c", "image": node.test_image, "imagePullPolicy": "Never"}]}
        })),
    )
    .await
    .expect("create Pod");
    let bound = support::eventually(60, "the pod scheduled", || async {
        pods.get("plain").await.ok()?.spec?.node_name
    })
    .await;
    assert_ne!(bound, node.name);
    let n = Api::<Node>::all(client.clone())
        .get(&bound)
        .await
        .expect("the pod's node");
    let labels = n.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("type").map(String::as_str), Some("kwok"));
}
