//! What real pods need from this machine: the product image in the node's containerd, and the
//! servers the tests run on 127.0.0.1 (the API server, MLflow, fake providers) reachable from
//! pods, which cannot reach the host's loopback.
//!
//! Servers stay on 127.0.0.1; a forwarder listens on the real node's host address (the CNI
//! bridge the stack creates, never any other interface) and relays each connection. One
//! forwarder per server, so a test can start and stop its own. They run on a runtime of their
//! own thread: a forwarder outlives the test runtime that asked for it when it is shared.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::OnceLock;

/// A forwarder from `addr` (on the node's host address) to a server on 127.0.0.1; stops when
/// dropped.
pub struct Exposed {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Exposed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn forwarder_runtime() -> &'static tokio::runtime::Handle {
    static RT: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    RT.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pod-forwarder")
            .enable_all()
            .build()
            .expect("forwarder runtime");
        let handle = rt.handle().clone();
        std::thread::spawn(move || rt.block_on(std::future::pending::<()>()));
        handle
    })
}

/// Makes `target` (a server on this machine) reachable from pods at the returned address on
/// `host_ip`, a free port.
pub fn expose(host_ip: Ipv4Addr, target: SocketAddr) -> Exposed {
    let std_listener = std::net::TcpListener::bind((host_ip, 0))
        .unwrap_or_else(|e| panic!("listen on the node's host address {host_ip}: {e}"));
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let rt = forwarder_runtime();
    let _guard = rt.enter();
    let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
    let task = rt.spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                // Out of descriptors and the like: pause rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Exposed { addr, task }
}

/// The product image built from the Dockerfile with this run's binary (hack/image.sh, no
/// registry) and imported into the containerd at `sock`, once per test binary: a tag of this run,
/// which the tests set in the chart and the endpoints (pods never pull it). The copy in
/// hack/image.sh's store is removed once imported.
pub fn product_image(sock: &Path) -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let tag = format!(
            "localhost/mlflow-gateway-operator:e2e-{}-{}",
            std::process::id(),
            super::suffix()
        );
        let sock = sock.to_str().expect("UTF-8 socket path");
        let binary = super::image::test_binary()
            .to_str()
            .expect("UTF-8 path")
            .to_string();
        let printed = super::image::script(&[
            "build",
            "--tag",
            &tag,
            "--binary",
            &binary,
            "--containerd",
            sock,
        ]);
        assert_eq!(printed, tag);
        super::image::script(&["buildah", "rmi", &tag]);
        tag
    })
}

/// Makes the API server reachable from pods the way in-cluster clients find it: the `kubernetes`
/// Service (10.96.0.1:443, whose address the serving certificate names) gets an EndpointSlice
/// pointing at a forwarder on the node's host address (the control plane runs with
/// `--endpoint-reconciler-type none` and listens on 127.0.0.1 only). Once per test binary.
pub fn api_server_for_pods(host_ip: Ipv4Addr) -> SocketAddr {
    static FORWARDER: OnceLock<Exposed> = OnceLock::new();
    FORWARDER
        .get_or_init(|| {
            let c = super::cluster();
            let url: url::Url = c.api_url.parse().expect("API server URL");
            let port = url.port().expect("API server port");
            let exposed = expose(host_ip, SocketAddr::from(([127, 0, 0, 1], port)));
            let slice = format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: kubernetes-for-pods\n  \
                 namespace: default\n  labels:\n    kubernetes.io/service-name: kubernetes\n    \
                 endpointslice.kubernetes.io/managed-by: mlflow-gateway-operator-tests\naddressType: IPv4\n\
                 endpoints:\n- addresses: [\"{}\"]\n  conditions: {{ready: true}}\nports:\n- name: https\n  port: {}\n  protocol: TCP\n",
                exposed.addr.ip(),
                exposed.addr.port()
            );
            let (ok, _, err) = c.kubectl_run(&["apply", "-f", "-"], Some(&slice));
            assert!(ok, "apply the kubernetes Service's EndpointSlice: {err}");
            exposed
        })
        .addr
}
