//! The product image as the tests build and read it: built from the repo's Dockerfile by
//! hack/image.sh (buildah, no pulls) with this test binary's own build of the operator through
//! the Dockerfile's `prebuilt` stage (seconds, not a release build in a container), unpacked
//! into an OCI runtime bundle by umoci exactly as the image's config declares it (user,
//! entrypoint, environment, working directory), and run by runc.
//!
//! Needs root and the Debian packages hack/image.sh installs when missing (CI runs as root).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use super::{repo_root, services_allowed, suffix, unique_dir};

/// The operator binary this test run was built with: what the images carry.
pub fn test_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mlflow-gateway-operator"))
}

/// Runs `hack/image.sh ARGS` and returns its stdout, trimmed; panics with its output on failure.
pub fn script(args: &[&str]) -> String {
    services_allowed("buildah, umoci and runc (hack/image.sh)");
    let out = Command::new("bash")
        .arg(repo_root().join("hack/image.sh"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run hack/image.sh: {e}"));
    assert!(
        out.status.success(),
        "hack/image.sh {} failed ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An image in hack/image.sh's private store, removed from it when dropped.
pub struct Image {
    pub reference: String,
    /// Removed on drop (false for images the test did not make, such as the base).
    owned: bool,
}

impl Image {
    /// Builds the Dockerfile with this run's binary under a new tag; `extra` are more
    /// `hack/image.sh build` options (e.g. `--published-names`, `--containerd SOCK`).
    pub fn build(extra: &[&str]) -> Image {
        let tag = format!("localhost/mlflow-gateway-operator:test-{}", suffix());
        let mut args = vec![
            "build",
            "--tag",
            &tag,
            "--binary",
            test_binary().to_str().expect("UTF-8 path"),
        ];
        args.extend_from_slice(extra);
        let printed = script(&args);
        assert_eq!(printed, tag, "hack/image.sh prints the image's reference");
        Image {
            reference: tag,
            owned: true,
        }
    }

    /// The local runtime base (built once, then cached).
    pub fn base() -> Image {
        Image {
            reference: script(&["base"]),
            owned: false,
        }
    }

    /// `buildah inspect` of the image.
    pub fn inspect(&self) -> Value {
        let text = script(&["buildah", "inspect", "--type", "image", &self.reference]);
        serde_json::from_str(&text).expect("buildah inspect prints JSON")
    }

    /// The OCI image config's `config` (Entrypoint, Cmd, User, WorkingDir, Env, Labels).
    pub fn config(&self) -> Value {
        self.inspect()["OCIv1"]["config"].clone()
    }

    /// The digests of the layers' uncompressed contents, base first: equal lists are the same
    /// files, bit for bit, with the same owners, modes and times.
    pub fn diff_ids(&self) -> Vec<String> {
        serde_json::from_value(self.inspect()["OCIv1"]["rootfs"]["diff_ids"].clone())
            .expect("rootfs.diff_ids")
    }

    /// The image unpacked by umoci into a runtime bundle in a directory of its own.
    pub fn unpack(&self) -> Bundle {
        let dir = unique_dir("image");
        std::fs::create_dir_all(&dir).expect("create bundle directory");
        let layout = dir.join("layout");
        script(&[
            "buildah",
            "push",
            "--quiet",
            &self.reference,
            &format!("oci:{}:image", layout.display()),
        ]);
        let bundle = dir.join("bundle");
        run_ok(
            Command::new("umoci")
                .arg("unpack")
                .arg("--image")
                .arg(format!("{}:image", layout.display()))
                .arg(&bundle),
        );
        Bundle { dir, bundle }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.owned {
            let _ = Command::new("bash")
                .arg(repo_root().join("hack/image.sh"))
                .args(["buildah", "rmi", "--force", &self.reference])
                .output();
        }
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An OCI runtime bundle (config.json + rootfs) umoci made from an image; removed when dropped.
pub struct Bundle {
    dir: PathBuf,
    pub bundle: PathBuf,
}

impl Bundle {
    pub fn rootfs(&self) -> PathBuf {
        self.bundle.join("rootfs")
    }

    /// The runtime config umoci derived from the image's config.
    pub fn runtime_config(&self) -> Value {
        let text = std::fs::read_to_string(self.bundle.join("config.json")).expect("config.json");
        serde_json::from_str(&text).expect("config.json is JSON")
    }

    /// Rewrites config.json for a run as a gateway pod runs: the image's user, entrypoint and
    /// environment, a read-only root file system, no capabilities, no terminal; `args` after the
    /// entrypoint; `env` added; `mounts` as (host file, container path) read-only bind mounts;
    /// `host_network`: share the host's network (the test's client and fakes on 127.0.0.1).
    pub fn configure(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        mounts: &[(&Path, &str)],
        host_network: bool,
    ) {
        let mut c = self.runtime_config();
        c["root"]["readonly"] = Value::Bool(true);
        c["process"]["terminal"] = Value::Bool(false);
        let p = &mut c["process"];
        let mut argv: Vec<Value> = p["args"].as_array().expect("process.args").clone();
        // umoci's args are ENTRYPOINT + CMD: keep the entrypoint only.
        argv.truncate(1);
        argv.extend(args.iter().map(|a| Value::String(a.to_string())));
        p["args"] = Value::Array(argv);
        for (k, v) in env {
            p["env"]
                .as_array_mut()
                .expect("process.env")
                .push(Value::String(format!("{k}={v}")));
        }
        for set in [
            "bounding",
            "effective",
            "inheritable",
            "permitted",
            "ambient",
        ] {
            p["capabilities"][set] = Value::Array(vec![]);
        }
        for (src, dst) in mounts {
            c["mounts"]
                .as_array_mut()
                .expect("mounts")
                .push(serde_json::json!({
                    "destination": dst, "type": "bind", "source": src,
                    "options": ["bind", "ro", "nosuid", "nodev"]
                }));
        }
        if host_network {
            c["linux"]["namespaces"]
                .as_array_mut()
                .expect("linux.namespaces")
                .retain(|n| n["type"] != "network");
        }
        std::fs::write(
            self.bundle.join("config.json"),
            serde_json::to_vec_pretty(&c).unwrap(),
        )
        .expect("write config.json");
    }

    /// Runs the bundle to its end under runc: (exit code, stdout, stderr).
    pub fn run(&self) -> (Option<i32>, String, String) {
        let id = format!("mgo-test-{}", suffix());
        let out = runc(&self.dir.join("runc"))
            .args(["run", "--bundle"])
            .arg(&self.bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .output()
            .expect("run runc");
        let _ = runc(&self.dir.join("runc"))
            .args(["delete", "--force", &id])
            .output();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts the bundle under runc in the background; its output goes to a log file.
    pub fn start(&self) -> Container {
        let id = format!("mgo-test-{}", suffix());
        let log = self.dir.join(format!("{id}.log"));
        let file = std::fs::File::create(&log).expect("create container log");
        let child = runc(&self.dir.join("runc"))
            .args(["run", "--bundle"])
            .arg(&self.bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start runc");
        Container {
            id,
            state_root: self.dir.join("runc"),
            child,
            log,
        }
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A container runc runs; killed and deleted when dropped.
pub struct Container {
    pub id: String,
    state_root: PathBuf,
    child: std::process::Child,
    pub log: PathBuf,
}

impl Container {
    /// The container's init process as the host sees it (None until runc has started it).
    pub fn pid(&self) -> Option<u32> {
        let out = runc(&self.state_root)
            .args(["state", &self.id])
            .output()
            .ok()?;
        let state: Value = serde_json::from_slice(&out.stdout).ok()?;
        (state["status"] == "running")
            .then(|| state["pid"].as_u64())
            .flatten()
            .map(|p| p as u32)
    }

    /// Whether runc has exited (the container's process ended).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let runc = |args: &[&str]| {
            let _ = runc(&self.state_root).args(args).output();
        };
        runc(&["kill", &self.id, "KILL"]);
        let _ = self.child.wait();
        runc(&["delete", "--force", &self.id]);
        if std::thread::panicking() {
            eprintln!("--- container log ---\n{}", self.log_text());
        }
    }
}

/// `runc --root STATE_ROOT`: every runc call here keeps its state under the test's own root.
fn runc(state_root: &Path) -> Command {
    let mut cmd = Command::new("runc");
    cmd.arg("--root").arg(state_root);
    cmd
}
