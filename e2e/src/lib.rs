//! The end-to-end harness seen from Rust: a Kubernetes control plane started by
//! `e2e/cluster.sh` (stopped when dropped), `kubectl`/`helm` calls against it, and waiting for
//! conditions with a deadline and a useful failure message.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

/// Where the Go-built tools live (`e2e/cluster.sh build`).
pub fn tool(name: &str) -> PathBuf {
    let cache = std::env::var_os("RAFTKV_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/raftkv")
        });
    cache.join("bin").join(name)
}

/// A binary of this workspace, next to the test executable's directory.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (scripts/test.sh does)",
        path.display()
    );
    path
}

pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    pub fn up() -> ControlPlane {
        for t in [
            "kube-apiserver",
            "kube-controller-manager",
            "kubectl",
            "helm",
            "e2e-kubelet",
        ] {
            assert!(
                tool(t).exists(),
                "{} is missing: run e2e/cluster.sh build (scripts/test.sh does)",
                tool(t).display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("raftkv-e2e-")
            .tempdir()
            .expect("temp dir");
        let out = Command::new("bash")
            .arg(repo().join("e2e/cluster.sh"))
            .arg("up")
            .arg(dir.path())
            .env("RAFTKV_BIN", workspace_bin("raftkv"))
            .env("RAFTKV_OPERATOR_BIN", workspace_bin("raftkv-operator"))
            .output()
            .expect("run e2e/cluster.sh");
        let cp = ControlPlane {
            kubeconfig: dir.path().join("kubeconfig"),
            dir,
        };
        assert!(
            out.status.success(),
            "control plane did not start:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cp
    }

    fn run(&self, program: &Path, args: &[&str]) -> Result<String, String> {
        let out = Command::new(program)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .map_err(|e| format!("{}: {e}", program.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{} {}: {}{}",
                program.display(),
                args.join(" "),
                stdout,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.run(&tool("kubectl"), args)
    }

    /// kubectl that must succeed.
    pub fn k(&self, args: &[&str]) -> String {
        self.kubectl(args).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.k(&a)).expect("kubectl JSON")
    }

    pub fn helm(&self, args: &[&str]) -> Result<String, String> {
        self.run(&tool("helm"), args)
    }

    /// kubectl apply of a manifest given as text.
    pub fn apply(&self, manifest: &str) -> Result<String, String> {
        let path = self.dir.path().join(format!(
            "manifest-{}.yaml",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::write(&path, manifest).map_err(|e| e.to_string())?;
        self.kubectl(&["apply", "-f", path.to_str().unwrap_or_default()])
    }

    /// What the API server stores in: `raftkv` (the default) or `etcd`.
    pub fn store(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("store"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    fn cluster_sh(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("bash")
            .arg(repo().join("e2e/cluster.sh"))
            .args(args)
            .env("RAFTKV_BIN", workspace_bin("raftkv"))
            .output()
            .map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "cluster.sh {}: {stdout}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// etcdctl against the raftkv store, as its root user (by client certificate).
    pub fn store_etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let mut a = vec!["etcdctl", dir.as_str()];
        a.extend_from_slice(args);
        self.cluster_sh(&a)
    }

    /// SIGKILLs (`kill`) or starts again (`start`) member `n` (1-3) of the raftkv store.
    pub fn store_member(&self, n: u32, action: &str) -> Result<String, String> {
        let dir = self.dir.path().to_string_lossy().into_owned();
        self.cluster_sh(&["store-member", &dir, &n.to_string(), action])
    }

    /// The process logs of the control plane and the pods, for failure reports.
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("e2e/cluster.sh"))
            .arg("down")
            .arg(self.dir.path())
            .output();
        if std::thread::panicking() {
            // Keep the evidence.
            let kept = self.dir.path().with_extension("failed");
            let _ = std::fs::rename(self.dir.path(), &kept);
            eprintln!("e2e state and logs kept in {}", kept.display());
        }
    }
}

/// Polls `check` until it returns `Ok`, failing with its last error after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}
