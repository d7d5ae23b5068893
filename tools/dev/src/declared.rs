//! An endpoint's gateway as its Deployment declares it, to run on this machine: the container's
//! arguments, its environment with the Secret references resolved through the API server, and the
//! ConfigMap its `config` volume mounts written to a local directory that stands for the mount.
//!
//! kwok pods run no process, so the tests and the demo run the gateway here instead, and this is
//! what makes that run the same as a pod's: nothing is taken from the GatewayEndpoint, only from
//! what the operator rendered. Environment values that are paths under the mount (the endpoint
//! file, the CA bundle) are pointed at the local directory; Secret volumes (callers' API keys)
//! are written under it too, and emptyDir volumes (the trace queue) are directories there, with
//! the variables that name their directories pointed there.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Secret};
use kube::api::Api;

/// The name of the gateway's container in the Deployment.
const CONTAINER: &str = "gateway";
/// The volume that mounts the endpoint's ConfigMap.
const CONFIG_VOLUME: &str = "config";

/// What one gateway pod of an endpoint runs.
#[derive(Clone, Debug)]
pub struct DeclaredGateway {
    /// The container's arguments (`["gateway"]`).
    pub args: Vec<String>,
    /// The container's environment, Secret references resolved and paths under the ConfigMap's
    /// mount pointed at `config_dir`. Holds secrets: keep it out of logs and files.
    pub env: Vec<(String, String)>,
    /// The local directory holding the ConfigMap's files.
    pub config_dir: PathBuf,
}

impl DeclaredGateway {
    /// Reads the Deployment `name` in `ns`, resolves its gateway container's environment, and
    /// writes the ConfigMap its `config` volume mounts into `config_dir` (created if missing).
    pub async fn read(
        client: &kube::Client,
        ns: &str,
        name: &str,
        config_dir: &Path,
    ) -> Result<DeclaredGateway> {
        let deployment = Api::<Deployment>::namespaced(client.clone(), ns)
            .get(name)
            .await
            .with_context(|| format!("reading the Deployment {ns}/{name}"))?;
        let pod = deployment
            .spec
            .and_then(|s| s.template.spec)
            .with_context(|| format!("the Deployment {ns}/{name} has no pod template"))?;
        let container = pod
            .containers
            .iter()
            .find(|c| c.name == CONTAINER)
            .with_context(|| format!("the Deployment {ns}/{name} has no container {CONTAINER}"))?;
        let config_map = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == CONFIG_VOLUME)
            .and_then(|v| v.config_map.as_ref())
            .map(|c| c.name.clone())
            .with_context(|| {
                format!("the Deployment {ns}/{name} mounts no ConfigMap as {CONFIG_VOLUME}")
            })?;
        let mount_path = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == CONFIG_VOLUME)
            .map(|m| m.mount_path.trim_end_matches('/').to_string())
            .with_context(|| format!("the container {CONTAINER} does not mount {CONFIG_VOLUME}"))?;

        let files = Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get(&config_map)
            .await
            .with_context(|| format!("reading the ConfigMap {ns}/{config_map}"))?
            .data
            .unwrap_or_default();
        std::fs::create_dir_all(config_dir)
            .with_context(|| format!("creating {}", config_dir.display()))?;
        for (key, text) in &files {
            let path = config_dir.join(key);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }

        // Secret volumes (the callers' API keys): each mount's items written under a local root
        // that stands for `/`, and variables naming a directory at or above a mount pointed there.
        // emptyDir volumes (the trace queue) are empty directories under that root, kept across
        // runs from the same `config_dir`, as a pod's emptyDir outlives its container's restarts.
        let root = config_dir.join("root");
        let mut mounts = Vec::new();
        for v in pod.volumes.iter().flatten() {
            if v.empty_dir.is_some() {
                let Some(mount) = container
                    .volume_mounts
                    .iter()
                    .flatten()
                    .find(|m| m.name == v.name)
                else {
                    continue;
                };
                let dir = root.join(mount.mount_path.trim_start_matches('/'));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                mounts.push(mount.mount_path.trim_end_matches('/').to_string());
                continue;
            }
            let Some(src) = &v.secret else { continue };
            let Some(mount) = container
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == v.name)
            else {
                continue;
            };
            let dir = root.join(mount.mount_path.trim_start_matches('/'));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            mounts.push(mount.mount_path.trim_end_matches('/').to_string());
            let secret_name = src.secret_name.clone().unwrap_or_default();
            let data = match Api::<Secret>::namespaced(client.clone(), ns)
                .get_opt(&secret_name)
                .await
                .with_context(|| format!("reading the Secret {ns}/{secret_name}"))?
            {
                Some(secret) => secret.data.unwrap_or_default(),
                None if src.optional == Some(true) => continue,
                None => bail!("the Secret {ns}/{secret_name} a volume mounts does not exist"),
            };
            let items: Vec<(String, String)> = match &src.items {
                Some(items) => items
                    .iter()
                    .map(|i| (i.key.clone(), i.path.clone()))
                    .collect(),
                None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (key, path) in items {
                if let Some(bytes) = data.get(&key) {
                    std::fs::write(dir.join(&path), &bytes.0)
                        .with_context(|| format!("writing {}", dir.join(&path).display()))?;
                }
            }
        }

        let local = config_dir.to_string_lossy();
        let env = container_env(client, ns, container, name)
            .await?
            .into_iter()
            .map(|(k, v)| match v.strip_prefix(&format!("{mount_path}/")) {
                Some(file) => (k, format!("{local}/{file}")),
                None if v.starts_with('/')
                    && mounts.iter().any(|m| {
                        *m == v || m.starts_with(&format!("{}/", v.trim_end_matches('/')))
                    }) =>
                {
                    (
                        k,
                        root.join(v.trim_start_matches('/'))
                            .to_string_lossy()
                            .into_owned(),
                    )
                }
                None => (k, v),
            })
            .collect();
        Ok(DeclaredGateway {
            args: container.args.clone().unwrap_or_default(),
            env,
            config_dir: config_dir.to_path_buf(),
        })
    }

    /// `binary` with the container's arguments, listening on `listen` instead of the container's
    /// port, with exactly the declared environment (plus `PATH`, and `RUST_LOG` from this process
    /// or `info`).
    pub fn command(&self, binary: &Path, listen: std::net::SocketAddr) -> std::process::Command {
        let mut cmd = std::process::Command::new(binary);
        cmd.args(&self.args)
            .arg("--listen")
            .arg(listen.to_string())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var_os("RUST_LOG").unwrap_or_else(|| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }
}

/// A container's environment as its pod `pod_name` in `ns` would get it: plain values, the pod's
/// name and namespace (`fieldRef`), a declared limit (`resourceFieldRef`), and Secret keys read
/// through the API server (a missing
/// Secret or key is skipped when the reference is `optional`, an error otherwise).
pub async fn container_env(
    client: &kube::Client,
    ns: &str,
    container: &Container,
    pod_name: &str,
) -> Result<Vec<(String, String)>> {
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    let mut env = Vec::new();
    for e in container.env.iter().flatten() {
        if let Some(v) = &e.value {
            env.push((e.name.clone(), v.clone()));
            continue;
        }
        let Some(from) = &e.value_from else {
            // Declared without a value: the empty string, as the kubelet sets it.
            env.push((e.name.clone(), String::new()));
            continue;
        };
        if let Some(f) = &from.field_ref {
            let v = match f.field_path.as_str() {
                "metadata.name" => pod_name.to_string(),
                "metadata.namespace" => ns.to_string(),
                other => bail!("{}: unsupported fieldRef {other}", e.name),
            };
            env.push((e.name.clone(), v));
        } else if let Some(r) = &from.secret_key_ref {
            let optional = r.optional == Some(true);
            let secret = secrets
                .get_opt(&r.name)
                .await
                .with_context(|| format!("reading the Secret {ns}/{}", r.name))?;
            let value = secret.and_then(|s| s.data?.remove(&r.key));
            match value {
                Some(v) => {
                    let text = String::from_utf8(v.0).with_context(|| {
                        format!("the Secret {ns}/{} key {:?} is not UTF-8", r.name, r.key)
                    })?;
                    env.push((e.name.clone(), text));
                }
                None if optional => {}
                None => bail!(
                    "the Secret {ns}/{} has no key {:?} (variable {})",
                    r.name,
                    r.key,
                    e.name
                ),
            }
        } else if let Some(r) = &from.resource_field_ref {
            // A limit the container declares, in bytes (divisor 1); undeclared, the variable is
            // left out (the kubelet would give the node's capacity).
            let limit = container
                .resources
                .as_ref()
                .and_then(|res| res.limits.as_ref())
                .and_then(|l| l.get(r.resource.trim_start_matches("limits.")))
                .and_then(|q| quantity_bytes(&q.0));
            if let Some(v) = limit {
                env.push((e.name.clone(), v.to_string()));
            }
        } else {
            bail!("{}: unsupported valueFrom", e.name);
        }
    }
    Ok(env)
}

/// A memory quantity (`256Mi`, `1G`, `1048576`) in bytes; `None` for other forms.
fn quantity_bytes(q: &str) -> Option<u64> {
    const UNITS: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, factor) in UNITS {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().ok()?.checked_mul(*factor);
        }
    }
    q.parse().ok()
}
