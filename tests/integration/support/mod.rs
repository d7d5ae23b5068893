//! Test support: a real Kubernetes control plane and real MLflow tracking servers.
//!
//! `make test` starts one cluster and one MLflow server for the whole run and passes them in
//! (`MGO_CLUSTER_ENV`, `MGO_MLFLOW_ENV`: paths of the `env` files the hack/ scripts write). A test
//! binary run on its own starts what is missing, once per run, and a watchdog tears it down when
//! the binary exits. If anything cannot start, the test fails with the reason: nothing is skipped.
//! `make unit` sets `MGO_NO_SERVICES=1`: then a test that asks for a cluster or an MLflow server
//! fails at once instead of starting one (so the unit run needs neither Go nor MLflow).
//!
//! [`fake_llm`] serves local fakes of the LLM providers' APIs (started per test, nothing shared);
//! it and [`gateway_from_deployment`]'s reading of the Deployment live in tools/dev (`mgo_dev`),
//! which the demo runs too.
#![allow(dead_code)]

pub use mgo_dev::fake_llm;

pub mod image;
pub mod pods;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_env_file(path: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Panics when the run must not start outside services (`make unit`), naming what was asked for.
fn services_allowed(what: &str) {
    assert!(
        std::env::var_os("MGO_NO_SERVICES").is_none(),
        "this test needs {what}, and MGO_NO_SERVICES is set (`make unit` runs only the tests \
         that need no outside service: run it with `make test`, or drop it from the Makefile's \
         UNIT_TESTS)"
    );
}

/// Runs a hack/ script and panics with its output if it fails.
fn run_script(script: &str, args: &[&str]) {
    let out = Command::new("bash")
        .arg(repo_root().join("hack").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run hack/{script}: {e}"));
    assert!(
        out.status.success(),
        "hack/{script} {} failed ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn unique_dir(kind: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let base = std::env::temp_dir().join("mlflow-gateway-operator-tests");
    std::fs::create_dir_all(&base).expect("create test run directory");
    base.join(format!(
        "{kind}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

/// A short random suffix for names that must not collide between tests or runs.
pub fn suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    format!("{:08x}", h.finish() as u32)
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub api_url: String,
    pub bin_dir: PathBuf,
    pub admin_token: String,
    pub ca_file: PathBuf,
    /// The directory `hack/cluster.sh` runs it in (and writes `env` to).
    pub run_dir: PathBuf,
}

/// The cluster shared by this test binary.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        services_allowed("a Kubernetes cluster");
        let env_file = match std::env::var_os("MGO_CLUSTER_ENV") {
            Some(p) => PathBuf::from(p),
            None => {
                let dir = unique_dir("cluster");
                let pid = std::process::id().to_string();
                run_script(
                    "cluster.sh",
                    &["up", dir.to_str().unwrap(), "--owner-pid", &pid],
                );
                dir.join("env")
            }
        };
        let env = read_env_file(&env_file);
        let get = |k: &str| {
            env.get(k)
                .unwrap_or_else(|| panic!("{k} missing from {}", env_file.display()))
                .clone()
        };
        Cluster {
            kubeconfig: get("KUBECONFIG").into(),
            api_url: get("KUBE_APISERVER_URL"),
            bin_dir: get("KUBE_BIN_DIR").into(),
            admin_token: std::fs::read_to_string(get("KUBE_ADMIN_TOKEN_FILE"))
                .expect("admin token")
                .trim()
                .to_string(),
            ca_file: get("KUBE_CA_FILE").into(),
            run_dir: get("KUBE_RUN_DIR").into(),
        }
    })
}

/// The cluster's real node (hack/node.sh: kubelet on containerd + runc, CNI bridge, kube-proxy),
/// for tests whose pods must really run. kwok's fake node stays the default: the real node is
/// tainted, so only pods placed with [`RealNode::place`] land on it.
pub struct RealNode {
    pub name: String,
    /// The node's label and taint key (`<key>=true`; the taint's effect is NoSchedule).
    pub key: String,
    /// The bridge's address on the host: pods reach servers the tests bind to it (never to
    /// 127.0.0.1, which is the pod's own loopback). There is no cluster DNS: pods use addresses.
    pub host_ip: std::net::Ipv4Addr,
    pub pod_subnet: String,
    /// hack/node/echo-server.c, imported into the node's containerd (never pulled).
    pub test_image: String,
    pub containerd_sock: PathBuf,
    pub containerd_namespace: String,
}

/// The real node of [`cluster`], started on first use when the cluster runs without one
/// (`hack/node.sh up`; stopped with the cluster). Needs root; one real node per machine.
pub fn real_node() -> &'static RealNode {
    static NODE: OnceLock<RealNode> = OnceLock::new();
    NODE.get_or_init(|| {
        let c = cluster();
        let env_file = c.run_dir.join("env");
        if !read_env_file(&env_file).contains_key("KUBE_REAL_NODE") {
            run_script(
                "node.sh",
                &["up", c.run_dir.to_str().expect("UTF-8 run dir")],
            );
        }
        let env = read_env_file(&env_file);
        let get = |k: &str| {
            env.get(k)
                .unwrap_or_else(|| panic!("{k} missing from {}", env_file.display()))
                .clone()
        };
        let label = get("KUBE_REAL_NODE_LABEL");
        RealNode {
            name: get("KUBE_REAL_NODE"),
            key: label
                .strip_suffix("=true")
                .expect("KUBE_REAL_NODE_LABEL is KEY=true")
                .to_string(),
            host_ip: get("KUBE_NODE_HOST_IP").parse().expect("KUBE_NODE_HOST_IP"),
            pod_subnet: get("KUBE_NODE_POD_SUBNET"),
            test_image: get("KUBE_NODE_TEST_IMAGE"),
            containerd_sock: get("KUBE_CONTAINERD_SOCK").into(),
            containerd_namespace: get("KUBE_CONTAINERD_NAMESPACE"),
        }
    })
}

impl RealNode {
    /// Adds to a pod spec (JSON) the node selector and toleration that put it on this node.
    pub fn place(&self, pod_spec: &mut serde_json::Value) {
        pod_spec["nodeSelector"][&self.key] = "true".into();
        let toleration =
            serde_json::json!({"key": self.key, "operator": "Exists", "effect": "NoSchedule"});
        match pod_spec["tolerations"].as_array_mut() {
            Some(list) => list.push(toleration),
            None => pod_spec["tolerations"] = serde_json::json!([toleration]),
        }
    }

    /// Whether `ip` is a pod address of this node.
    pub fn owns_pod_ip(&self, ip: std::net::Ipv4Addr) -> bool {
        let (net, bits) = self.pod_subnet.split_once('/').expect("subnet a.b.c.d/n");
        let net: std::net::Ipv4Addr = net.parse().expect("subnet address");
        let bits: u32 = bits.parse().expect("subnet prefix");
        let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
        u32::from(ip) & mask == u32::from(net) & mask
    }
}

impl Cluster {
    pub async fn config(&self) -> kube::Config {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("kubeconfig is valid")
    }

    /// A client with the admin's client certificate.
    pub async fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config().await).expect("build client")
    }

    /// A client that impersonates `user` (RBAC is evaluated for that identity).
    pub async fn impersonating(&self, user: &str) -> kube::Client {
        let mut config = self.config().await;
        config.auth_info.impersonate = Some(user.to_string());
        kube::Client::try_from(config).expect("build impersonating client")
    }

    /// `kubectl` of the same version as the API server, pointed at this cluster.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.bin_dir.join("kubectl"));
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    /// Runs kubectl, returns (success, stdout, stderr).
    pub fn kubectl_run(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        use std::io::Write;
        let mut cmd = self.kubectl();
        cmd.args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kubectl");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        } else {
            drop(child.stdin.take());
        }
        let out = child.wait_with_output().expect("kubectl output");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Cluster {
    /// A kubeconfig of its own with the admin's credentials that impersonates `user` (`as:`), for
    /// processes (the operator, kubectl) that must be evaluated by RBAC as that identity.
    pub fn kubeconfig_as(&self, user: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.kubeconfig).expect("read kubeconfig");
        let mut kc: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
        for u in kc["users"].as_sequence_mut().expect("kubeconfig users") {
            u["user"]["as"] = serde_yaml::Value::String(user.to_string());
        }
        let path = unique_dir("kubeconfig-as");
        std::fs::write(&path, serde_yaml::to_string(&kc).unwrap()).expect("write kubeconfig");
        path
    }

    /// Runs helm (the pinned build beside kubectl) against this cluster: (success, stdout, stderr).
    pub fn helm(&self, args: &[&str]) -> (bool, String, String) {
        let path = format!(
            "{}:{}",
            self.bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let home = unique_dir("helm-home");
        let out = Command::new(self.bin_dir.join("helm"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("PATH", path)
            // Helm's caches and config of its own: nothing from the developer's ~/.config/helm.
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .output()
            .expect("run helm");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Creates a namespace of the test's own: `<prefix>-<random>`.
pub async fn namespace(client: &kube::Client, prefix: &str) -> String {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, PostParams};
    let name = format!("{prefix}-{}", suffix());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create test namespace");
    name
}

/// `kubectl apply -n ns -f -` of `yaml`, as a user applies a manifest; panics with kubectl's error.
pub fn apply(ns: &str, yaml: &str) {
    let (ok, _, err) = cluster().kubectl_run(&["apply", "-n", ns, "-f", "-"], Some(yaml));
    assert!(ok, "kubectl apply failed: {err}\n{yaml}");
}

/// Waits until the endpoint's condition `type_` has `status` (and `reason`, if given); returns the
/// endpoint.
pub async fn wait_condition(
    api: &kube::Api<mlflow_gateway_operator::api::GatewayEndpoint>,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
    secs: u64,
) -> mlflow_gateway_operator::api::GatewayEndpoint {
    let what = format!("{name}: {type_}={status} {reason:?}");
    eventually(secs, &what, || async {
        let ep = api.get(name).await.ok()?;
        let c = ep.status.as_ref()?.condition(type_)?;
        (c.status == status && reason.is_none_or(|r| c.reason == r)).then_some(ep.clone())
    })
    .await
}

/// The Events in `ns` about the object `name` with `reason`.
pub async fn events(
    client: &kube::Client,
    ns: &str,
    name: &str,
    reason: &str,
) -> Vec<k8s_openapi::api::events::v1::Event> {
    use k8s_openapi::api::events::v1::Event;
    kube::Api::<Event>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                && e.reason.as_deref() == Some(reason)
        })
        .collect()
}

/// Waits up to `secs` until there are `n` Events in `ns` about `name` with `reason`, and fails if
/// there are more: Events are written apart from (and often after) the status a test waited for.
pub async fn wait_events(
    client: &kube::Client,
    ns: &str,
    name: &str,
    reason: &str,
    n: usize,
    secs: u64,
) -> Vec<k8s_openapi::api::events::v1::Event> {
    let found = eventually(
        secs,
        &format!("{n} {reason} Event(s) about {name}"),
        || async {
            let found = events(client, ns, name, reason).await;
            (found.len() >= n).then_some(found)
        },
    )
    .await;
    assert_eq!(found.len(), n, "{reason} Events about {name}: {found:#?}");
    found
}

/// Creates or replaces the Secret `name` in `ns` with `data` (server-side apply).
pub async fn secret(client: &kube::Client, ns: &str, name: &str, data: &[(&str, &str)]) {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, Patch, PatchParams};
    let string_data: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect();
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "stringData": string_data,
    });
    // stringData is merged into data: replace the whole Secret so removed keys go.
    let api = Api::<Secret>::namespaced(client.clone(), ns);
    let _ = api.delete(name, &Default::default()).await;
    api.patch(
        name,
        &PatchParams::apply("tests").force(),
        &Patch::Apply(&body),
    )
    .await
    .expect("apply Secret");
}

/// Polls `check` every 200 ms until it returns Some, or panics after `secs` with `what`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// MLflow

/// A real `mlflow server` (sqlite backend).
pub struct Mlflow {
    pub uri: String,
    /// `Some((user, password))` of the admin when the basic-auth app runs.
    pub admin: Option<(String, String)>,
    run_dir: PathBuf,
    /// Private servers are stopped when dropped; the shared one lives as long as the run.
    owned: bool,
}

impl Mlflow {
    /// Starts a private server for one test (use for auth or stop/start scenarios).
    pub fn start(auth: bool) -> Mlflow {
        Self::start_with(auth, false)
    }

    /// Starts a private server with MLflow workspaces (`MLFLOW_ENABLE_WORKSPACES=true`, sqlite).
    pub fn start_with_workspaces(auth: bool) -> Mlflow {
        Self::start_with(auth, true)
    }

    fn start_with(auth: bool, workspaces: bool) -> Mlflow {
        services_allowed("an MLflow server of its own");
        let dir = unique_dir("mlflow");
        let pid = std::process::id().to_string();
        // One worker: a private server serves one test, and each worker costs seconds of CPU.
        let mut args = vec![
            "up",
            dir.to_str().unwrap(),
            "--owner-pid",
            &pid,
            "--workers",
            "1",
        ];
        if auth {
            args.push("--auth");
        }
        if workspaces {
            args.push("--workspaces");
        }
        run_script("mlflow.sh", &args);
        let mut m = Self::from_env_file(&dir.join("env"));
        m.owned = true;
        m
    }

    fn from_env_file(path: &Path) -> Mlflow {
        let env = read_env_file(path);
        Mlflow {
            uri: env["MLFLOW_TRACKING_URI"].clone(),
            admin: env
                .get("MLFLOW_ADMIN_PASSWORD")
                .map(|p| ("admin".to_string(), p.clone())),
            run_dir: PathBuf::from(&env["MLFLOW_RUN_DIR"]),
            owned: false,
        }
    }

    /// Stops the server; its port and database are kept for `resume`.
    pub fn stop(&self) {
        run_script("mlflow.sh", &["stop", self.run_dir.to_str().unwrap()]);
    }

    /// Starts a stopped server again, same port, same database.
    pub fn resume(&self) {
        run_script("mlflow.sh", &["resume", self.run_dir.to_str().unwrap()]);
    }

    /// A reqwest client and request builder helper for the REST API (admin credentials if any).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = reqwest::Client::new().request(method, format!("{}{}", self.uri, path));
        match &self.admin {
            Some((u, p)) => rb.basic_auth(u, Some(p)),
            None => rb,
        }
    }
}

impl Drop for Mlflow {
    fn drop(&mut self) {
        if self.owned {
            let _ = Command::new("bash")
                .arg(repo_root().join("hack/mlflow.sh"))
                .args(["down", self.run_dir.to_str().unwrap_or_default()])
                .output();
        }
    }
}

/// The MLflow server shared by this test binary (no auth).
pub fn mlflow() -> &'static Mlflow {
    static MLFLOW: OnceLock<Mlflow> = OnceLock::new();
    services_allowed("an MLflow server");
    MLFLOW.get_or_init(|| match std::env::var_os("MGO_MLFLOW_ENV") {
        Some(p) => Mlflow::from_env_file(Path::new(&p)),
        None => {
            let mut m = Mlflow::start(false);
            // Lives for the whole binary; the watchdog stops it when the binary exits.
            m.owned = false;
            m
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The operator

/// Applies crds/ to the cluster once per test binary and waits until the API serves it.
pub fn install_crds() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let c = cluster();
        let dir = repo_root().join("crds");
        let (ok, _, err) = c.kubectl_run(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "-f",
                dir.to_str().unwrap(),
            ],
            None,
        );
        assert!(ok, "kubectl apply crds/: {err}");
        wait_crd_established(c, "gatewayendpoints.mlflow-gateway.dev");
    });
}

/// Waits, up to 60 s, until the API server serves the CRD `name`. (`kubectl wait --for
/// condition=Established` fails at once, instead of waiting, while a new CRD has no
/// status.conditions yet.)
pub fn wait_crd_established(c: &Cluster, name: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, out, err) = c.kubectl_run(
            &[
                "get",
                &format!("crd/{name}"),
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#,
            ],
            None,
        );
        if out.trim() == "True" {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "CRD {name} not established within 60 s: {out} {err}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The operator binary, run as a user runs it, watching one namespace. Killed when dropped.
pub struct Operator {
    child: std::process::Child,
    pub metrics_url: String,
    pub log: PathBuf,
}

impl Operator {
    /// `env`: extra variables (MLFLOW_TRACKING_USERNAME, RESYNC_PERIOD_SECONDS, ...).
    pub fn start(namespace: &str, tracking_uri: &str, env: &[(&str, &str)]) -> Operator {
        install_crds();
        let port = free_port();
        let log = unique_dir("operator-log");
        let file = std::fs::File::create(&log).expect("operator log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mlflow-gateway-operator"));
        cmd.arg("controller")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("KUBECONFIG", &cluster().kubeconfig)
            .env("MLFLOW_TRACKING_URI", tracking_uri)
            .env("WATCH_NAMESPACE", namespace)
            .env("METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info,mlflow_gateway_operator=debug,kube=warn")
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start the operator");
        Operator {
            child,
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
            log,
        }
    }

    /// The operator binary with exactly `env` (plus PATH and a RUST_LOG default), using
    /// `kubeconfig`: for tests that configure it as the Helm chart does. `METRICS_ADDR` is set to
    /// a free loopback port unless given.
    pub fn start_with(kubeconfig: &Path, env: &[(String, String)]) -> Operator {
        install_crds();
        let port = free_port();
        let log = unique_dir("operator-log");
        let file = std::fs::File::create(&log).expect("operator log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mlflow-gateway-operator"));
        cmd.arg("controller")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,mlflow_gateway_operator=debug,kube=warn")
            .env("METRICS_ADDR", format!("127.0.0.1:{port}"))
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("KUBECONFIG", kubeconfig)
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let metrics_addr = env
            .iter()
            .find(|(k, _)| k == "METRICS_ADDR")
            .map_or_else(|| format!("127.0.0.1:{port}"), |(_, v)| v.clone());
        let child = cmd.spawn().expect("start the operator");
        Operator {
            child,
            metrics_url: format!("http://{metrics_addr}/metrics"),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the process to stop (SIGTERM), as the kubelet does.
    pub fn terminate(&self) {
        terminate_child(&self.child);
    }

    /// Waits up to `secs` for the process to exit and returns its status.
    pub async fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        wait_child_exit(&mut self.child, secs, || "the operator".to_string()).await
    }

    /// Ends the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sum of a metric's samples whose labels contain every `label="value"` given.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = reqwest::get(&self.metrics_url)
            .await
            .expect("scrape operator metrics")
            .text()
            .await
            .unwrap();
        sum_metric(&text, name, labels)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- operator log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway

/// `mlflow-gateway-operator gateway` run as a process, serving `manifest`. Killed when dropped.
pub struct GatewayProcess {
    child: std::process::Child,
    pub url: String,
    pub log: PathBuf,
}

impl GatewayProcess {
    fn command(manifest: &str, env: &[(&str, &str)]) -> (Command, PathBuf, u16) {
        let dir = unique_dir("gateway");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("endpoint.yaml");
        std::fs::write(&file, manifest).unwrap();
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mlflow-gateway-operator"));
        cmd.arg("gateway")
            .arg("--endpoint")
            .arg(&file)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        (cmd, dir.join("gateway.log"), port)
    }

    /// Starts the gateway and waits until it answers /readyz.
    pub async fn start(manifest: &str, env: &[(&str, &str)]) -> GatewayProcess {
        let (cmd, log, port) = Self::command(manifest, env);
        Self::spawn(cmd, log, port).await
    }

    /// Starts `cmd` (a gateway listening on 127.0.0.1:`port`), logging to `log`, and waits until
    /// it answers /readyz.
    async fn spawn(mut cmd: Command, log: PathBuf, port: u16) -> GatewayProcess {
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(file.try_clone().unwrap()).stderr(file);
        let mut child = cmd.spawn().expect("start the gateway");
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "gateway exited ({status}) during start:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if client
                .get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return GatewayProcess { child, url, log };
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("gateway did not become ready in 10 s");
    }

    /// Runs the gateway expecting it to refuse to start: returns (exit code, stderr).
    pub fn refuse(manifest: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
        let (mut cmd, _, _) = Self::command(manifest, env);
        let out = cmd.output().expect("run the gateway");
        assert!(
            !out.status.success(),
            "the gateway started but should have refused"
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id (e.g. to read its peak memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the gateway to stop (SIGTERM), as the kubelet does.
    pub fn terminate(&self) {
        terminate_child(&self.child);
    }

    /// Waits up to `secs` for the process to exit and returns its status.
    pub async fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let log = self.log.clone();
        wait_child_exit(&mut self.child, secs, move || {
            format!(
                "the gateway (log:\n{})",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
        .await
    }

    /// Ends the process at once (SIGKILL), as a crash (or the kubelet after the grace period) does.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The sum of a metric's samples whose labels contain every `label="value"` given.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .expect("scrape gateway metrics")
            .text()
            .await
            .unwrap();
        sum_metric(&text, name, labels)
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- gateway log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// A container's environment as its pod `pod_name` in `ns` would get it: plain values, the pod's
/// name and namespace (`fieldRef`), and Secret references read through the API server (a missing
/// key must be `optional`).
pub async fn container_env(
    client: &kube::Client,
    ns: &str,
    container: &k8s_openapi::api::core::v1::Container,
    pod_name: &str,
) -> Vec<(String, String)> {
    mgo_dev::declared::container_env(client, ns, container, pod_name)
        .await
        .unwrap_or_else(|e| panic!("the environment of {ns}/{pod_name}: {e:#}"))
}

/// Runs the gateway locally exactly as the endpoint's Deployment declares it (kwok pods run no
/// process), as `make demo` does ([`mgo_dev::declared`]): its container's arguments and
/// environment with every Secret reference resolved through the API server, and the ConfigMap its
/// `config` volume mounts; `extra_env` on top.
pub async fn gateway_from_deployment(
    client: &kube::Client,
    ns: &str,
    name: &str,
    extra_env: &[(&str, &str)],
) -> GatewayProcess {
    let dir = unique_dir("gateway");
    let declared = mgo_dev::declared::DeclaredGateway::read(client, ns, name, &dir.join("config"))
        .await
        .unwrap_or_else(|e| panic!("the gateway of {ns}/{name}: {e:#}"));
    assert_eq!(declared.args, ["gateway"]);
    let port = free_port();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = declared.command(
        Path::new(env!("CARGO_BIN_EXE_mlflow-gateway-operator")),
        listen,
    );
    cmd.env("RUST_LOG", "info").envs(extra_env.iter().copied());
    GatewayProcess::spawn(cmd, dir.join("gateway.log"), port).await
}

/// The sum of a metric's samples (Prometheus text) whose labels contain every `label="value"`.
pub fn sum_metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name && labels.iter().all(|lab| series.contains(lab)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The Python of the cached MLflow venv (it also has the official `openai` SDK, an MLflow
/// dependency).
pub fn python() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        services_allowed("the MLflow venv's Python");
        let out = Command::new("bash")
            .arg(repo_root().join("hack/mlflow.sh"))
            .arg("install")
            .output()
            .expect("hack/mlflow.sh install");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("python")
    })
    .clone()
}

/// Creates an experiment of a new, unique name and returns its id. On a loaded machine an
/// attempt can be stored while its answer times out, and the client's retry then hears "already
/// exists": with a name nobody else uses, that experiment is this call's own.
pub async fn new_experiment(
    client: &mlflow_gateway_operator::mlflow::MlflowClient,
    name: &str,
) -> String {
    use mlflow_gateway_operator::mlflow::{ErrorCode, MlflowError};
    match client.create_experiment(name, &[]).await {
        Ok(id) => id,
        Err(MlflowError::Api {
            code: ErrorCode::ResourceAlreadyExists,
            ..
        }) => {
            client
                .get_experiment_by_name(name)
                .await
                .expect("the experiment a timed-out attempt created")
                .experiment_id
        }
        Err(e) => panic!("creating experiment {name}: {e:?}"),
    }
}

/// An endpoint with one OpenAI-style model at `base` (key in the Secret `llm-keys`), open to any
/// caller, plus `extra_spec` lines under `spec`.
pub fn endpoint_yaml(name: &str, base: &str, extra_spec: &str) -> String {
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
      apiBase: "{base}"
      apiKeySecretRef: {{name: llm-keys, key: openai}}
  access: {{open: true}}
{extra_spec}"#
    )
}

/// The config hash of a gateway Deployment's pod template (what rolls the pods).
pub fn config_hash(d: &k8s_openapi::api::apps::v1::Deployment) -> String {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()["mlflow-gateway.dev/config-hash"]
        .clone()
}

/// The gateway container's environment, by variable name.
pub fn env_of(
    d: &k8s_openapi::api::apps::v1::Deployment,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name.clone(), serde_json::to_value(&e).unwrap()))
        .collect()
}

/// SIGTERM to a child process, as the kubelet sends it.
fn terminate_child(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {} failed", child.id());
}

/// Waits up to `secs` for a child process to exit and returns its status; `what` names it (and
/// whatever helps) in the failure.
async fn wait_child_exit(
    child: &mut std::process::Child,
    secs: u64,
    what: impl Fn() -> String,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().expect("child status") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} did not exit within {secs}s",
            what()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
