//! The operator on a real Kubernetes control plane (kube-apiserver, kube-controller-manager,
//! real helm, the process kubelet): install, create, scale under load, lose pods and volumes,
//! upgrade, reject bad specs, delete. The scenarios share one control plane and run in order;
//! each prints its time.

use base64::Engine;
use raftkv_client::{Client, ConnectOptions, GetOptions};
use raftkv_e2e::{ControlPlane, tool, wait_for, workspace_bin};
use serde_json::Value;
use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NS: &str = "apps";
const OPERATOR_NS: &str = "raftkv-system";

struct Env {
    cp: ControlPlane,
    rt: tokio::runtime::Runtime,
}

impl Env {
    fn kvc(&self) -> Value {
        self.cp.json(&["get", "kvc", "kv", "-n", NS])
    }

    fn condition(&self, kvc: &Value, type_: &str) -> Option<String> {
        kvc["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .and_then(|c| c["status"].as_str().map(str::to_string))
    }

    /// Waits until the cluster reports Running with `n` healthy members and a leader.
    fn wait_running(&self, n: usize, timeout: Duration) -> Value {
        wait_for(&format!("{n} healthy members, Running"), timeout, || {
            let kvc = self.kvc();
            let st = &kvc["status"];
            let members = st["members"].as_array().cloned().unwrap_or_default();
            let healthy = members.iter().filter(|m| m["healthy"] == true).count();
            let voters = members.iter().filter(|m| m["role"] != "learner").count();
            if st["phase"] == "Running"
                && healthy == n
                && voters == n
                && st["leader"].is_string()
                && st["readyReplicas"] == n as i64
                && self.condition(&kvc, "Available").as_deref() == Some("True")
            {
                Ok(kvc)
            } else {
                Err(format!("status: {st}"))
            }
        })
    }

    fn pod_ips(&self) -> Vec<(String, String)> {
        let pods = self.cp.json(&[
            "get",
            "pods",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/instance=kv",
        ]);
        pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p["metadata"]["name"].as_str()?.to_string(),
                    p["status"]["podIP"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    /// Client URLs of the member pods.
    fn endpoints(&self) -> Vec<String> {
        self.pod_ips()
            .into_iter()
            .map(|(_, ip)| format!("http://{ip}:2379"))
            .collect()
    }

    /// A merge patch of the cluster's spec.
    fn patch_spec(&self, spec: &str) -> Result<String, String> {
        let body = format!("{{\"spec\":{spec}}}");
        self.cp.kubectl(&[
            "patch", "kvc", "kv", "-n", NS, "--type", "merge", "-p", &body,
        ])
    }

    fn secret(&self, name: &str, key: &str) -> Vec<u8> {
        let s = self.cp.json(&["get", "secret", name, "-n", NS]);
        let b64 = s["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no {key}"));
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("secret base64")
    }

    /// A root token signed by `kvctl token create` with the cluster's generated secret.
    fn token(&self) -> String {
        self.token_for("kv")
    }

    fn token_for(&self, cluster: &str) -> String {
        let path = self.cp.dir.path().join(format!("{cluster}-jwt-secret"));
        std::fs::write(&path, self.secret(&format!("{cluster}-jwt"), "secret")).unwrap();
        let out = Command::new(workspace_bin("kvctl"))
            .args([
                "token",
                "create",
                "--subject",
                "e2e",
                "--role",
                "root",
                "--ttl",
                "1h",
            ])
            .arg("--secret-file")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn client(&self, endpoints: Vec<String>) -> Client {
        self.client_for("kv", endpoints)
    }

    fn client_for(&self, cluster: &str, endpoints: Vec<String>) -> Client {
        let token = self.token_for(cluster);
        self.rt
            .block_on(Client::connect(
                endpoints,
                ConnectOptions::default()
                    .with_token(token)
                    .with_timeout(Duration::from_secs(5))
                    .without_discovery(),
            ))
            .expect("connect")
    }

    fn events(&self) -> Vec<(String, String)> {
        self.events_about("KVCluster")
    }

    /// (reason, note) of the events about objects of one kind, oldest first: by their
    /// microsecond event time, since steps of one reconcile after another often share the
    /// second that `creationTimestamp` resolves to.
    fn events_about(&self, kind: &str) -> Vec<(String, String)> {
        let ev = self.cp.json(&["get", "events.events.k8s.io", "-n", NS]);
        let mut items: Vec<&Value> = ev["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["regarding"]["kind"] == kind)
            .collect();
        // RFC 3339 with a fixed-width fraction: text order is time order.
        items.sort_by_key(|e| {
            e["eventTime"]
                .as_str()
                .or_else(|| e["metadata"]["creationTimestamp"].as_str())
                .unwrap_or_default()
                .to_string()
        });
        items
            .into_iter()
            .map(|e| {
                (
                    e["reason"].as_str().unwrap_or_default().to_string(),
                    e["note"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }
}

/// Writes `w/<n>` as fast as it can until stopped; remembers what was acknowledged.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(env: &Env, client: Client, prefix: &str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, a, f, prefix) = (
            stop.clone(),
            acked.clone(),
            failures.clone(),
            prefix.to_string(),
        );
        let task = env.rt.spawn(async move {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let key = format!("{prefix}/{n:08}");
                match client.set(&key, format!("v{n}")).await {
                    Ok(_) => a.lock().unwrap().push(key),
                    Err(e) => {
                        f.lock().unwrap().push(format!("{key}: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Writer {
            stop,
            acked,
            failures,
            task,
        }
    }

    /// Stops and checks that every acknowledged write is readable.
    fn finish(self, env: &Env, client: &Client, prefix: &str) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        env.rt.block_on(self.task).unwrap();
        let acked = self.acked.lock().unwrap().clone();
        let stored: BTreeSet<String> = env
            .rt
            .block_on(client.get_prefix(format!("{prefix}/")))
            .expect("read back")
            .into_iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect();
        let lost: Vec<&String> = acked.iter().filter(|k| !stored.contains(*k)).collect();
        assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
        assert!(!acked.is_empty(), "the writer got nothing acknowledged");
        (acked.len(), self.failures.lock().unwrap().clone())
    }
}

fn cluster_manifest(replicas: i32, version: &str) -> String {
    format!(
        "apiVersion: raftkv.io/v1alpha1\nkind: KVCluster\nmetadata:\n  name: kv\n  namespace: {NS}\n\
         spec:\n  replicas: {replicas}\n  version: \"{version}\"\n  storage:\n    size: 64Mi\n    whenScaled: Delete\n    whenDeleted: Retain\n"
    )
}

fn helm_install_runs_the_operator_under_its_own_rbac(env: &Env) {
    let chart = raftkv_e2e::repo().join("charts/raftkv-operator");
    let chart = chart.to_str().unwrap();
    let lint = env
        .cp
        .helm(&["lint", chart])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    env.cp
        .helm(&[
            "install",
            "raftkv-operator",
            chart,
            "-n",
            OPERATOR_NS,
            "--create-namespace",
            "--wait",
            "--timeout",
            "120s",
        ])
        .unwrap_or_else(|e| panic!("helm install: {e}"));
    env.cp.k(&[
        "wait",
        "--for",
        "condition=established",
        "crd/kvclusters.raftkv.io",
        "--timeout",
        "30s",
    ]);
    let pods = env.cp.json(&["get", "pods", "-n", OPERATOR_NS]);
    let pod = &pods["items"][0];
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(pod["spec"]["serviceAccountName"], "raftkv-operator");
    // It acts as its ServiceAccount: exactly what the chart's RBAC grants.
    let sa = format!("system:serviceaccount:{OPERATOR_NS}:raftkv-operator");
    for (verb, what, allowed) in [
        ("patch", "statefulsets.apps", true),
        ("delete", "pods", true),
        ("create", "secrets", true),
        ("update", "secrets", false),
        ("delete", "secrets", false),
        ("create", "jobs.batch", true),
        ("delete", "kvclusters.raftkv.io", false),
        ("create", "clusterroles.rbac.authorization.k8s.io", false),
    ] {
        let out = env
            .cp
            .kubectl(&["auth", "can-i", verb, what, "-n", NS, "--as", &sa]);
        let yes = matches!(out.as_deref().map(str::trim), Ok("yes"));
        assert_eq!(yes, allowed, "{sa} can {verb} {what}: {out:?}");
    }
    let lease = env
        .cp
        .json(&["get", "lease", "raftkv-operator", "-n", OPERATOR_NS]);
    assert_eq!(lease["spec"]["holderIdentity"], pod["metadata"]["name"]);
}

/// kube-apiserver with raftkv as its store (over TLS, identified by its client certificate):
/// paginated lists, watches from a resourceVersion, 410 once the store compacted, Events on
/// leases that expire, and a store member killed under it.
fn the_api_server_keeps_its_guarantees_on_raftkv(env: &Env) {
    let cp = &env.cp;
    if cp.store() != "raftkv" {
        println!("    skipped: the API server stores in {}", cp.store());
        return;
    }
    let ns = "on-raftkv";
    cp.k(&["create", "namespace", ns]);
    let items: Vec<String> = (0..120)
        .map(|i| {
            format!(
                "{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{{\"name\":\"cm-{i}\",\"namespace\":\"{ns}\"}},\"data\":{{\"n\":\"{i}\"}}}}"
            )
        })
        .collect();
    cp.apply(&format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[{}]}}",
        items.join(",")
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    // kubectl pages through with limit and continue tokens.
    let listed = cp.k(&[
        "get",
        "configmaps",
        "-n",
        ns,
        "--chunk-size",
        "25",
        "-o",
        "name",
    ]);
    let names: Vec<&str> = listed
        .lines()
        .filter(|l| l.starts_with("configmap/cm-"))
        .collect();
    assert_eq!(names.len(), 120, "{listed}");
    // A watch from a resourceVersion sees exactly what came after it.
    // (kubectl get -o json wraps lists in a List without a resourceVersion: ask the API.)
    let list: Value = serde_json::from_str(&cp.k(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/{ns}/configmaps?limit=1"),
    ]))
    .unwrap();
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!rv.is_empty(), "{list}");
    cp.k(&["create", "configmap", "after-rv", "-n", ns]);
    let watched = cp.k(&[
        "get",
        "--raw",
        &format!(
            "/api/v1/namespaces/{ns}/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=2"
        ),
    ]);
    assert!(watched.contains("after-rv"), "{watched}");
    assert!(
        !watched.contains("\"cm-7\""),
        "only what came after: {watched}"
    );
    // Pod templates bypass the API server's watch cache (--watch-cache-sizes podtemplates#0):
    // their watches and exact-revision lists come from the store, so its compaction shows as
    // 410 Gone, and a watch from the compaction revision itself still gets its events.
    let template = |name: &str| {
        format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"PodTemplate\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"{ns}\"}},\"template\":{{\"spec\":{{\"containers\":[{{\"name\":\"c\",\"image\":\"x\"}}]}}}}}}"
        )
    };
    cp.apply(&template("pt-1"))
        .unwrap_or_else(|e| panic!("{e}"));
    let list: Value = serde_json::from_str(&cp.k(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/{ns}/podtemplates?limit=1"),
    ]))
    .unwrap();
    let old_rv: i64 = list["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    cp.apply(&template("pt-2"))
        .unwrap_or_else(|e| panic!("{e}"));
    // Compact exactly at pt-2's revision (other writers keep the store moving meanwhile).
    let now: i64 =
        cp.json(&["get", "podtemplate", "pt-2", "-n", ns])["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
    assert!(now > old_rv);
    cp.store_etcdctl(&["compaction", &now.to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    let watch_from = |rv: i64| {
        cp.k(&[
            "get",
            "--raw",
            &format!(
                "/api/v1/namespaces/{ns}/podtemplates?watch=1&resourceVersion={rv}&timeoutSeconds=1"
            ),
        ])
    };
    let gone = watch_from(old_rv - 1);
    assert!(gone.contains("\"code\":410"), "{gone}");
    let latest = watch_from(now - 1);
    assert!(
        latest.contains("pt-2") && !latest.contains("410"),
        "{latest}"
    );
    let expired = cp
        .kubectl(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/{ns}/podtemplates?resourceVersion={old_rv}&resourceVersionMatch=Exact"),
        ])
        .expect_err("a list at a compacted revision");
    assert!(
        expired.contains("Expired") || expired.contains("too old"),
        "{expired}"
    );
    // Paging through the store itself (pod templates bypass the cache): limit and continue.
    let page = |query: &str| -> Value {
        serde_json::from_str(&cp.k(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/{ns}/podtemplates?limit=1{query}"),
        ]))
        .unwrap()
    };
    let first = page("");
    let token = first["metadata"]["continue"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!token.is_empty(), "a continue token: {first}");
    let second = page(&format!("&continue={token}"));
    let mut paged: Vec<&str> = [&first, &second]
        .iter()
        .flat_map(|p| p["items"].as_array().into_iter().flatten())
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    paged.sort();
    assert_eq!(paged, ["pt-1", "pt-2"], "{first} {second}");
    assert!(
        second["metadata"]["continue"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "the last page: {second}"
    );
    // Events live on store leases (--event-ttl 45s) and go when those expire.
    cp.apply(&format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"Event\",\"metadata\":{{\"name\":\"ttl-event\",\"namespace\":\"{ns}\"}},\"involvedObject\":{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"name\":\"cm-0\",\"namespace\":\"{ns}\"}},\"reason\":\"Testing\",\"message\":\"lives on a lease\",\"type\":\"Normal\"}}"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let stored: Value = serde_json::from_str(
        &cp.store_etcdctl(&[
            "get",
            &format!("/registry/events/{ns}/ttl-event"),
            "-w",
            "json",
        ])
        .unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap();
    assert!(
        stored["kvs"][0]["lease"].as_i64().unwrap_or(0) != 0,
        "the event is attached to a lease: {stored}"
    );
    wait_for(
        "the event to expire with its lease",
        Duration::from_secs(150),
        || match cp.kubectl(&["get", "event", "ttl-event", "-n", ns]) {
            Err(e) if e.contains("NotFound") || e.contains("not found") => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Err("still there".to_string()),
        },
    );
    // The store's leader dies under the API server: it keeps serving reads and writes.
    let endpoints: Vec<String> = std::fs::read_to_string(cp.dir.path().join("store-endpoints"))
        .unwrap()
        .trim()
        .split(',')
        .map(String::from)
        .collect();
    let status: Value = serde_json::from_str(
        &cp.store_etcdctl(&["endpoint", "status", "-w", "json"])
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap();
    let leader = status
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["Status"]["header"]["member_id"] == s["Status"]["leader"])
        .and_then(|s| s["Endpoint"].as_str())
        .and_then(|e| endpoints.iter().position(|x| x == e))
        .map(|i| i as u32 + 1)
        .unwrap_or_else(|| panic!("the store's leader: {status}"));
    cp.store_member(leader, "kill")
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    for i in 0..10 {
        let name = format!("during-outage-{i}");
        wait_for(
            "a write with a store member down",
            Duration::from_secs(30),
            || cp.kubectl(&["create", "configmap", &name, "-n", ns]),
        );
    }
    let listed = cp.k(&["get", "configmaps", "-n", ns, "-o", "name"]);
    assert!(listed.contains("during-outage-9"));
    println!(
        "    10 writes through the API server with the store's leader (member {leader}) down in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    cp.store_member(leader, "start")
        .unwrap_or_else(|e| panic!("{e}"));
    // It comes back as a member that follows the new leader.
    let back = endpoints[leader as usize - 1].clone();
    wait_for(
        "the killed store member to rejoin",
        Duration::from_secs(60),
        || {
            let out =
                cp.store_etcdctl(&["endpoint", "status", "-w", "json", "--endpoints", &back])?;
            let st: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
            match st[0]["Status"]["leader"].as_u64() {
                Some(l) if l != 0 => Ok(()),
                _ => Err(out),
            }
        },
    );
    cp.k(&["delete", "namespace", ns, "--wait=false"]);
}

fn a_kvcluster_becomes_an_available_cluster_clients_can_use(env: &Env) {
    env.cp.k(&["create", "namespace", NS]);
    env.cp
        .apply(&cluster_manifest(3, "0.1.0"))
        .unwrap_or_else(|e| panic!("{e}"));
    let kvc = env.wait_running(3, Duration::from_secs(120));
    assert_eq!(kvc["status"]["currentVersion"], "0.1.0");
    for (kind, name) in [
        ("secret", "kv-jwt"),
        ("secret", "kv-keyring"),
        ("secret", "kv-root"),
        ("secret", "kv-peer-ca"),
        ("secret", "kv-peer-tls"),
        ("service", "kv"),
        ("service", "kv-peer"),
        ("configmap", "kv-config"),
        ("statefulset", "kv"),
        ("poddisruptionbudget", "kv"),
    ] {
        let obj = env.cp.json(&["get", kind, name, "-n", NS]);
        assert_eq!(
            obj["metadata"]["ownerReferences"][0]["kind"], "KVCluster",
            "{kind}/{name}"
        );
    }
    let pdb = env.cp.json(&["get", "pdb", "kv", "-n", NS]);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    // kvctl, with a token signed by the generated secret, writes and reads.
    let eps: Vec<String> = env.endpoints();
    let token = env.token();
    let kvctl = |args: &[&str]| {
        let out = Command::new(workspace_bin("kvctl"))
            .args(["--endpoints", &eps.join(","), "--token", &token])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kvctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    kvctl(&["put", "hello", "kubernetes"]);
    assert!(kvctl(&["get", "hello"]).contains("kubernetes"));
    let members = kvctl(&["members", "-o", "json"]);
    let members: Value = serde_json::from_str(&members).unwrap();
    assert_eq!(members.as_array().map(Vec::len), Some(3));
    // Members talk over mutual TLS with the certificates the operator generated: one per pod,
    // the CA key never mounted.
    for m in members.as_array().unwrap() {
        let url = m["peer_urls"][0].as_str().unwrap_or_default();
        assert!(url.starts_with("https://kv-"), "peer URL {url}");
    }
    let tls = env.cp.json(&["get", "secret", "kv-peer-tls", "-n", NS]);
    for key in ["ca.crt", "kv-0.crt", "kv-0.key", "kv-8.crt"] {
        assert!(tls["data"][key].is_string(), "kv-peer-tls has {key}");
    }
    assert!(tls["data"]["ca.key"].is_null());
    assert!(
        tls["metadata"]["annotations"]["raftkv.io/certificates-not-after"].is_string(),
        "the expiry the operator renews by"
    );
}

/// The S3 server the backup scenario writes to (e2e/s3server: gofakes3 behind a check of every
/// request's SigV4 signature with the AWS SDK's signer); stopped when dropped.
struct S3Server {
    child: std::process::Child,
    endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const S3_ACCESS: &str = "e2e-access-key";
const S3_SECRET: &str = "e2e-secret-key-0123456789";
const S3_BUCKET: &str = "raftkv-backups";

fn start_s3(env: &Env) -> S3Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(env.cp.logs_dir().join("s3.log")).unwrap();
    let child = Command::new(tool("e2e-s3"))
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .args(["--access-key", S3_ACCESS, "--secret-key", S3_SECRET])
        .args(["--bucket", S3_BUCKET])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("e2e-s3 (built by e2e/cluster.sh build)");
    let endpoint = format!("http://127.0.0.1:{port}");
    wait_for("the S3 server", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    S3Server { child, endpoint }
}

fn backups(env: &Env) -> Vec<Value> {
    env.cp.json(&[
        "get",
        "kvcb",
        "-n",
        NS,
        "-l",
        "raftkv.io/cluster=kv,raftkv.io/scheduled=true",
    ])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn phase(b: &Value) -> &str {
    b["status"]["phase"].as_str().unwrap_or_default()
}

/// An on-demand KVClusterBackup `name` of kv to `destination` (JSON).
fn backup_of_kv(env: &Env, name: &str, destination: &str) {
    env.cp
        .apply(&format!(
            r#"{{"apiVersion":"raftkv.io/v1alpha1","kind":"KVClusterBackup","metadata":{{"name":"{name}","namespace":"{NS}"}},"spec":{{"cluster":"kv","destination":{destination}}}}}"#
        ))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Forms KVCluster `name` from `backup` (with kv's keyring), reads `key` from it, and deletes
/// the cluster and its volumes again.
fn restored_cluster_reads(env: &Env, name: &str, backup: &str, key: &str) -> Option<String> {
    env.cp
        .apply(&format!(
            r#"{{"apiVersion":"raftkv.io/v1alpha1","kind":"KVCluster","metadata":{{"name":"{name}","namespace":"{NS}"}},"spec":{{"replicas":3,"version":"0.1.0","encryption":{{"keyringSecretName":"kv-keyring"}},"storage":{{"whenDeleted":"Delete"}},"restore":{{"backup":"{backup}"}}}}}}"#
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let eps = wait_for(
        &format!("the cluster restored from {backup} to run"),
        Duration::from_secs(180),
        || {
            let st = env.cp.json(&["get", "kvc", name, "-n", NS])["status"].clone();
            if st["phase"] != "Running" || st["readyReplicas"] != 3 {
                return Err(format!("status {st}"));
            }
            let selector = format!("app.kubernetes.io/instance={name}");
            let pods = env.cp.json(&["get", "pods", "-n", NS, "-l", &selector]);
            Ok(pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| Some(format!("http://{}:2379", p["status"]["podIP"].as_str()?)))
                .collect::<Vec<_>>())
        },
    );
    let restored = env.client_for(name, eps);
    let got = env
        .rt
        .block_on(restored.get(key))
        .expect("read from the restored cluster")
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
    drop(restored);
    env.cp.k(&["delete", "kvc", name, "-n", NS, "--wait=true"]);
    // Its volumes go with it (whenDeleted: Delete), so later scenarios count only kv's.
    let selector = format!("app.kubernetes.io/instance={name}");
    wait_for(
        "the restored cluster's volumes to go",
        Duration::from_secs(120),
        || {
            let _ = env
                .cp
                .kubectl(&["delete", "pvc", "-n", NS, "-l", &selector, "--wait=false"]);
            let left = env.cp.json(&["get", "pvc", "-n", NS, "-l", &selector]);
            match left["items"].as_array().map(Vec::len) {
                Some(0) => Ok(()),
                n => Err(format!("{n:?} left")),
            }
        },
    );
    got
}

fn backups_land_in_s3_on_schedule_verified_and_past_retention_deleted(env: &Env) {
    let s3 = start_s3(env);
    env.cp.k(&[
        "create",
        "secret",
        "generic",
        "s3-creds",
        "-n",
        NS,
        &format!("--from-literal=accessKeyId={S3_ACCESS}"),
        &format!("--from-literal=secretAccessKey={S3_SECRET}"),
    ]);
    env.cp.k(&[
        "create",
        "secret",
        "generic",
        "s3-wrong",
        "-n",
        NS,
        &format!("--from-literal=accessKeyId={S3_ACCESS}"),
        "--from-literal=secretAccessKey=not-the-secret",
    ]);
    let client = env.client(env.endpoints());
    let rev = env
        .rt
        .block_on(client.set("backup/before", "in the backup"))
        .expect("write before the backup");
    let destination = |secret: &str| {
        format!(
            r#"{{"s3":{{"endpoint":"{}","bucket":"{S3_BUCKET}","prefix":"e2e/","credentialsSecretName":"{secret}"}}}}"#,
            s3.endpoint
        )
    };

    // A wrongly signed upload is refused by the server, and the backup says why.
    backup_of_kv(env, "kv-wrong-key", &destination("s3-wrong"));
    wait_for(
        "the wrongly signed backup to fail its attempt",
        Duration::from_secs(90),
        || {
            let b = env.cp.json(&["get", "kvcb", "kv-wrong-key", "-n", NS]);
            let msg = b["status"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if b["status"]["attempts"].as_i64().unwrap_or(0) >= 1
                && msg.contains("SignatureDoesNotMatch")
            {
                Ok(())
            } else {
                Err(format!("status {}", b["status"]))
            }
        },
    );
    let failures: Vec<(String, String)> = env
        .events_about("KVClusterBackup")
        .into_iter()
        .filter(|(reason, _)| reason == "BackupFailed")
        .collect();
    assert!(
        failures
            .iter()
            .any(|(_, note)| note.contains("SignatureDoesNotMatch")),
        "a BackupFailed event says why: {failures:?}"
    );
    env.cp.k(&["delete", "kvcb", "kv-wrong-key", "-n", NS]);

    // An on-demand backup: the object is a whole backup, the one its status describes.
    backup_of_kv(env, "kv-manual", &destination("s3-creds"));
    let manual = wait_for(
        "the on-demand backup to succeed",
        Duration::from_secs(90),
        || {
            let b = env.cp.json(&["get", "kvcb", "kv-manual", "-n", NS]);
            match phase(&b) {
                "Succeeded" => Ok(b),
                "Failed" => panic!("the backup failed: {}", b["status"]),
                _ => Err(format!("status {}", b["status"])),
            }
        },
    );
    let bucket = raftkv_operator::s3::Bucket::new(
        &s3.endpoint,
        S3_BUCKET,
        "us-east-1",
        true,
        S3_ACCESS,
        S3_SECRET,
        None,
    )
    .unwrap();
    let check_object = |b: &Value| {
        let st = &b["status"];
        let name = b["metadata"]["name"].as_str().unwrap();
        assert!(
            st["revision"].as_i64().unwrap() >= rev,
            "the backup holds the write: {st}"
        );
        let key = format!("e2e/{NS}/kv/{name}.rkvbackup");
        assert_eq!(st["location"], format!("s3://{S3_BUCKET}/{key}"));
        let body = env
            .rt
            .block_on(bucket.get_object(&key, 512 << 20))
            .expect("download the backup");
        let file = env.cp.dir.path().join(format!("{name}.rkvbackup"));
        std::fs::write(&file, &body).unwrap();
        let info = raftkv_client::backup::inspect(&file).expect("a whole backup");
        assert_eq!(Some(info.sha256.as_str()), st["sha256"].as_str());
        assert_eq!(Some(info.bytes as i64), st["sizeBytes"].as_i64());
        assert_eq!(Some(info.revision), st["revision"].as_i64());
        key
    };
    check_object(&manual);

    // A new cluster formed from it holds the data (its values sealed with the source's keyring).
    assert_eq!(
        restored_cluster_reads(env, "kvr", "kv-manual", "backup/before").as_deref(),
        Some("in the backup")
    );

    // Every minute, keep one — first to a destination that refuses the operator's signature:
    // the failure shows on the KVCluster, which keeps serving.
    let schedule = |secret: &str| {
        env.patch_spec(&format!(
            r#"{{"backup":{{"schedule":"* * * * *","keep":1,"destination":{}}}}}"#,
            destination(secret)
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    };
    schedule("s3-wrong");
    wait_for(
        "a failing scheduled backup to show on the cluster",
        Duration::from_secs(150),
        || {
            let kvc = env.kvc();
            match env.condition(&kvc, "LastBackupSucceeded").as_deref() {
                Some("False") => Ok(()),
                other => Err(format!("LastBackupSucceeded {other:?}: {}", kvc["status"])),
            }
        },
    );
    assert_eq!(
        env.condition(&env.kvc(), "Available").as_deref(),
        Some("True")
    );
    env.rt
        .block_on(client.set("backup/while-failing", "still serving"))
        .expect("the cluster serves while its backups fail");
    schedule("s3-creds");
    let first = wait_for(
        "a scheduled backup to succeed",
        Duration::from_secs(150),
        || {
            backups(env)
                .into_iter()
                .find(|b| phase(b) == "Succeeded")
                .ok_or_else(|| {
                    format!(
                        "backups: {:?}",
                        backups(env)
                            .iter()
                            .map(|b| b["status"].clone())
                            .collect::<Vec<_>>()
                    )
                })
        },
    );
    let name = first["metadata"]["name"].as_str().unwrap().to_string();
    let key = check_object(&first);
    let kvc = env.kvc();
    assert_eq!(
        env.condition(&kvc, "BackupScheduled").as_deref(),
        Some("True")
    );
    assert!(
        kvc["status"]["backup"]["nextScheduleTime"].is_string(),
        "{}",
        kvc["status"]
    );

    // The next one succeeds, and the first goes: its object and its KVClusterBackup.
    wait_for(
        "the first backup to be deleted past retention",
        Duration::from_secs(150),
        || {
            let all = backups(env);
            let names: Vec<&str> = all
                .iter()
                .filter_map(|b| b["metadata"]["name"].as_str())
                .collect();
            if !names.contains(&name.as_str()) && all.iter().any(|b| phase(b) == "Succeeded") {
                Ok(())
            } else {
                Err(format!("backups: {names:?}"))
            }
        },
    );
    match env.rt.block_on(bucket.get_object(&key, 1 << 20)) {
        Err(raftkv_operator::s3::S3Error::Refused { status: 404, .. }) => {}
        other => panic!("the pruned backup's object is still there: {other:?}"),
    }
    let kvc = env.kvc();
    assert_ne!(
        kvc["status"]["backup"]["lastSuccessfulBackup"],
        name.as_str()
    );
    assert_eq!(
        env.condition(&kvc, "LastBackupSucceeded").as_deref(),
        Some("True"),
        "{}",
        kvc["status"]
    );

    // Off again for the scenarios that follow.
    env.patch_spec(r#"{"backup":null}"#)
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = env
        .cp
        .kubectl(&["delete", "kvcb", "kv-manual", "-n", NS, "--wait=false"]);
    for b in backups(env) {
        if let Some(n) = b["metadata"]["name"].as_str() {
            let _ = env
                .cp
                .kubectl(&["delete", "kvcb", n, "-n", NS, "--wait=false"]);
        }
    }
}

/// The host directory behind a claim of the process kubelet (`<state>/node/volumes/<uid>`).
fn claim_dir(env: &Env, claim: &str) -> std::path::PathBuf {
    let uid = env.cp.json(&["get", "pvc", claim, "-n", NS])["metadata"]["uid"]
        .as_str()
        .expect("the claim's uid")
        .to_string();
    env.cp.dir.path().join("node").join("volumes").join(uid)
}

fn backups_land_on_a_volume_verified_pruned_and_restore_a_new_cluster(env: &Env) {
    env.cp
        .apply(&format!(
            r#"{{"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{{"name":"backups","namespace":"{NS}"}},"spec":{{"accessModes":["ReadWriteOnce"],"resources":{{"requests":{{"storage":"1Gi"}}}}}}}}"#
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let client = env.client(env.endpoints());
    let rev = env
        .rt
        .block_on(client.set("volume/before", "on the volume"))
        .expect("write before the backup");
    let destination = |claim: &str| format!(r#"{{"pvc":{{"claimName":"{claim}"}}}}"#);

    // A claim that does not exist: the backup says so, and an event does too.
    backup_of_kv(env, "kv-no-claim", &destination("no-such-claim"));
    wait_for(
        "the backup to a missing claim to fail its attempt",
        Duration::from_secs(60),
        || {
            let b = env.cp.json(&["get", "kvcb", "kv-no-claim", "-n", NS]);
            let msg = b["status"]["message"].as_str().unwrap_or_default();
            if b["status"]["attempts"].as_i64().unwrap_or(0) >= 1 && msg.contains("no-such-claim") {
                Ok(())
            } else {
                Err(format!("status {}", b["status"]))
            }
        },
    );
    assert!(
        env.events_about("KVClusterBackup")
            .iter()
            .any(|(reason, note)| reason == "BackupFailed" && note.contains("no-such-claim")),
        "a BackupFailed event names the missing claim"
    );
    env.cp.k(&["delete", "kvcb", "kv-no-claim", "-n", NS]);

    // Every minute, keep one, on the claim.
    env.patch_spec(&format!(
        r#"{{"backup":{{"schedule":"* * * * *","keep":1,"destination":{}}}}}"#,
        destination("backups")
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let dir = claim_dir(env, "backups");
    let check_file = |b: &Value| {
        let st = &b["status"];
        let name = b["metadata"]["name"].as_str().unwrap();
        let rel = format!("{NS}/kv/{name}.rkvbackup");
        assert_eq!(st["location"], format!("pvc://backups/{rel}"));
        assert!(st["revision"].as_i64().unwrap() >= rev, "{st}");
        let info = raftkv_client::backup::inspect(&dir.join(&rel)).expect("a whole backup file");
        assert_eq!(Some(info.sha256.as_str()), st["sha256"].as_str());
        assert_eq!(Some(info.bytes as i64), st["sizeBytes"].as_i64());
        assert_eq!(Some(info.revision), st["revision"].as_i64());
        dir.join(rel)
    };
    let first = wait_for(
        "a scheduled backup to the claim to succeed",
        Duration::from_secs(150),
        || {
            let all = backups(env);
            if let Some(f) = all.iter().find(|b| phase(b) == "Failed") {
                panic!("a backup to the claim failed: {}", f["status"]);
            }
            all.into_iter()
                .find(|b| phase(b) == "Succeeded")
                .ok_or_else(|| "no backup has succeeded yet".to_string())
        },
    );
    let first_name = first["metadata"]["name"].as_str().unwrap().to_string();
    let first_file = check_file(&first);

    // The next one succeeds and the first goes, its file with it.
    let newest = wait_for(
        "the first backup on the claim to be deleted past retention",
        Duration::from_secs(180),
        || {
            let all = backups(env);
            let gone = !all
                .iter()
                .any(|b| b["metadata"]["name"] == first_name.as_str());
            match all.into_iter().find(|b| phase(b) == "Succeeded") {
                Some(b) if gone && !first_file.exists() => Ok(b),
                _ => Err(format!(
                    "{first_name} listed: {}, file there: {}",
                    !gone,
                    first_file.exists()
                )),
            }
        },
    );
    check_file(&newest);
    let newest_name = newest["metadata"]["name"].as_str().unwrap().to_string();
    env.patch_spec(r#"{"backup":null}"#)
        .unwrap_or_else(|e| panic!("{e}"));

    // A new cluster formed from the file on the claim holds the data.
    assert_eq!(
        restored_cluster_reads(env, "kvv", &newest_name, "volume/before").as_deref(),
        Some("on the volume")
    );

    // Cleaned up, so later scenarios count only kv's claims.
    for b in backups(env) {
        if let Some(n) = b["metadata"]["name"].as_str() {
            let _ = env
                .cp
                .kubectl(&["delete", "kvcb", n, "-n", NS, "--wait=false"]);
        }
    }
    wait_for("the backup claim to go", Duration::from_secs(120), || {
        let _ = env
            .cp
            .kubectl(&["delete", "pvc", "backups", "-n", NS, "--wait=false"]);
        let left: Vec<String> = env.cp.json(&["get", "pvc", "-n", NS])["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
            .filter(|n| !n.starts_with("data-kv-"))
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?} left"))
        }
    });
}

fn scaling_3_to_5_to_3_under_writes_loses_nothing(env: &Env) {
    // kv-0..2 live through the whole scenario; the writer talks to them.
    let stable: Vec<String> = env.endpoints();
    let client = env.client(stable);
    let writer = Writer::start(env, client.clone(), "scale");
    let unavailable = Arc::new(AtomicBool::new(false));
    for target in [5, 3] {
        env.patch_spec(&format!("{{\"replicas\":{target}}}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let kvc = env.kvc();
            if env.condition(&kvc, "Available").as_deref() == Some("False") {
                unavailable.store(true, Ordering::Relaxed);
            }
            let st = &kvc["status"];
            let members = st["members"].as_array().cloned().unwrap_or_default();
            if st["phase"] == "Running"
                && members.len() == target
                && members
                    .iter()
                    .all(|m| m["healthy"] == true && m["role"] != "learner")
                && st["readyReplicas"] == target as i64
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "scaling to {target} did not finish: {st}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        let sts = env.cp.json(&["get", "statefulset", "kv", "-n", NS]);
        assert_eq!(sts["spec"]["replicas"], target as i64);
    }
    assert!(
        !unavailable.load(Ordering::Relaxed),
        "the cluster lost its quorum while scaling"
    );
    let (acked, failures) = writer.finish(env, &client, "scale");
    println!(
        "    {acked} writes acknowledged while scaling, {} failed calls",
        failures.len()
    );
    // whenScaled: Delete — the removed members' claims go with them.
    wait_for(
        "claims of removed members deleted",
        Duration::from_secs(60),
        || {
            let pvcs = env.cp.json(&["get", "pvc", "-n", NS]);
            let names: Vec<String> = pvcs["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
                .collect();
            if names.iter().any(|n| n == "data-kv-3" || n == "data-kv-4") {
                Err(format!("{names:?}"))
            } else {
                Ok(())
            }
        },
    );
    let reasons: Vec<String> = env.events().into_iter().map(|(r, _)| r).collect();
    for r in ["MemberAdded", "MemberPromoted", "MemberRemoved"] {
        assert!(
            reasons.contains(&r.to_string()),
            "no {r} event: {reasons:?}"
        );
    }
}

fn a_deleted_pod_comes_back_with_its_data(env: &Env) {
    let client = env.client(env.endpoints());
    env.rt
        .block_on(client.set("survives/restart", "yes"))
        .unwrap();
    let before = env.cp.json(&["get", "pvc", "data-kv-1", "-n", NS])["metadata"]["uid"].clone();
    env.cp
        .k(&["delete", "pod", "kv-1", "-n", NS, "--wait=true"]);
    env.wait_running(3, Duration::from_secs(120));
    let after = env.cp.json(&["get", "pvc", "data-kv-1", "-n", NS])["metadata"]["uid"].clone();
    assert_eq!(before, after, "kv-1 must keep its volume");
    // Read from kv-1 alone, without a quorum round: its own data.
    let ip = env
        .pod_ips()
        .into_iter()
        .find(|(n, _)| n == "kv-1")
        .unwrap()
        .1;
    let one = env.client(vec![format!("http://{ip}:2379")]);
    let got = wait_for(
        "kv-1 serves the write made before its restart",
        Duration::from_secs(30),
        || {
            let r = env
                .rt
                .block_on(one.get_with(
                    "survives/restart",
                    GetOptions {
                        serializable: true,
                        ..Default::default()
                    },
                ))
                .map_err(|e| e.to_string())?;
            r.kvs
                .first()
                .map(|kv| kv.value.clone())
                .ok_or("not there yet".to_string())
        },
    );
    assert_eq!(got, b"yes");
}

fn a_member_that_lost_its_volume_is_replaced(env: &Env) {
    let old = env.cp.json(&["get", "pvc", "data-kv-2", "-n", NS])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    env.cp
        .k(&["delete", "pvc", "data-kv-2", "-n", NS, "--wait=false"]);
    env.cp
        .k(&["delete", "pod", "kv-2", "-n", NS, "--wait=true"]);
    let kvc = wait_for("member 3 on a new volume", Duration::from_secs(180), || {
        let kvc = env.kvc();
        let m3 = kvc["status"]["members"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["id"] == 3)
            .cloned();
        match m3 {
            Some(m)
                if m["volumeUid"].as_str().is_some_and(|u| u != old)
                    && m["healthy"] == true
                    && m["role"] != "learner" =>
            {
                Ok(kvc)
            }
            other => Err(format!("member 3: {other:?}; status {}", kvc["status"])),
        }
    });
    assert_eq!(kvc["status"]["members"].as_array().map(Vec::len), Some(3));
    let events = env.events();
    assert!(
        events
            .iter()
            .any(|(r, n)| r == "MemberRemoved" && n.contains("Replace")),
        "no replacement event: {events:?}"
    );
    env.wait_running(3, Duration::from_secs(60));
}

fn a_version_change_rolls_one_pod_at_a_time_leader_last(env: &Env) {
    let client = env.client(env.endpoints());
    let writer = Writer::start(env, client.clone(), "upgrade");
    let leader_before = env.kvc()["status"]["leader"].as_str().unwrap().to_string();
    env.patch_spec("{\"version\":\"0.1.1\"}")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut max_unready = 0;
    wait_for("every member at 0.1.1", Duration::from_secs(240), || {
        let kvc = env.kvc();
        let st = &kvc["status"];
        max_unready = max_unready.max(3 - st["readyReplicas"].as_i64().unwrap_or(0));
        if st["currentVersion"] == "0.1.1" && st["phase"] == "Running" {
            Ok(())
        } else {
            Err(format!("{st}"))
        }
    });
    assert!(max_unready <= 1, "{max_unready} members were down at once");
    let (acked, failures) = writer.finish(env, &client, "upgrade");
    println!(
        "    {acked} writes acknowledged during the upgrade, {} failed calls",
        failures.len()
    );
    let events = env.events();
    let restarts: Vec<&String> = events
        .iter()
        .filter(|(r, _)| r == "MemberRestarted")
        .map(|(_, n)| n)
        .collect();
    assert_eq!(restarts.len(), 3, "{events:?}");
    assert!(
        restarts[2].contains(&leader_before),
        "the leader ({leader_before}) must restart last: {restarts:?}"
    );
    let moved = events.iter().position(|(r, _)| r == "LeaderMoved");
    let last_restart = events.iter().rposition(|(r, _)| r == "MemberRestarted");
    assert!(
        moved.is_some() && moved < last_restart,
        "leadership moves before the leader restarts: {events:?}"
    );
}

fn invalid_specs_are_rejected_without_touching_the_cluster(env: &Env) {
    let even = env.patch_spec("{\"replicas\":4}");
    let err = even.expect_err("even replicas accepted");
    assert!(err.contains("replicas must be odd"), "{err}");
    let bad_size = env.cp.apply(
        &cluster_manifest(3, "0.1.1")
            .replace("kv\n  namespace", "bad\n  namespace")
            .replace("64Mi", "lots"),
    );
    let err = bad_size.expect_err("bad storage size accepted");
    assert!(err.contains("size must be a quantity"), "{err}");
    let ten = env.patch_spec("{\"replicas\":11}");
    assert!(ten.is_err(), "11 replicas accepted");
    // Members would refuse to start with fewer than five heartbeats per election timeout.
    let timers = env.patch_spec(r#"{"raft":{"electionTimeoutMs":400,"heartbeatIntervalMs":100}}"#);
    let err = timers.expect_err("an election timeout of 4 heartbeats accepted");
    assert!(err.contains("at least 5 heartbeatIntervalMs"), "{err}");
    // A restore is for a new cluster only.
    let restore = env.patch_spec(r#"{"restore":{"backup":"kv-manual"}}"#);
    let err = restore.expect_err("restore added to a running cluster");
    assert!(err.contains("restore can only be given"), "{err}");
    let kvc = env.wait_running(3, Duration::from_secs(30));
    assert_eq!(kvc["spec"]["replicas"], 3);
}

fn deleting_the_kvcluster_collects_its_objects_and_keeps_volumes(env: &Env) {
    env.cp.k(&["delete", "kvc", "kv", "-n", NS, "--wait=true"]);
    wait_for(
        "owned objects garbage-collected",
        Duration::from_secs(120),
        || {
            let left: Vec<String> = [
                "statefulset",
                "service",
                "configmap",
                "secret",
                "pdb",
                "pod",
            ]
            .iter()
            .flat_map(|kind| {
                let list =
                    env.cp
                        .json(&["get", kind, "-n", NS, "-l", "app.kubernetes.io/instance=kv"]);
                list["items"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |o| {
                        format!("{kind}/{}", o["metadata"]["name"].as_str().unwrap_or("?"))
                    })
            })
            .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("still there: {left:?}"))
            }
        },
    );
    // whenDeleted: Retain — the data stays for a re-created cluster.
    let pvcs = env.cp.json(&["get", "pvc", "-n", NS]);
    assert_eq!(pvcs["items"].as_array().map(Vec::len), Some(3), "{pvcs}");
}

/// A scenario: its name (the behaviour it proves) and its body.
type Scenario = (&'static str, fn(&Env));

#[test]
fn operator_end_to_end() {
    let started = Instant::now();
    let env = Env {
        cp: ControlPlane::up(),
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    };
    println!(
        "control plane up in {:.1}s (logs under {})",
        started.elapsed().as_secs_f64(),
        env.cp.logs_dir().display()
    );
    let scenarios: [Scenario; 11] = [
        (
            "helm_install_runs_the_operator_under_its_own_rbac",
            helm_install_runs_the_operator_under_its_own_rbac,
        ),
        (
            "a_kvcluster_becomes_an_available_cluster_clients_can_use",
            a_kvcluster_becomes_an_available_cluster_clients_can_use,
        ),
        (
            "backups_land_in_s3_on_schedule_verified_and_past_retention_deleted",
            backups_land_in_s3_on_schedule_verified_and_past_retention_deleted,
        ),
        (
            "backups_land_on_a_volume_verified_pruned_and_restore_a_new_cluster",
            backups_land_on_a_volume_verified_pruned_and_restore_a_new_cluster,
        ),
        (
            "scaling_3_to_5_to_3_under_writes_loses_nothing",
            scaling_3_to_5_to_3_under_writes_loses_nothing,
        ),
        (
            "a_deleted_pod_comes_back_with_its_data",
            a_deleted_pod_comes_back_with_its_data,
        ),
        (
            "a_member_that_lost_its_volume_is_replaced",
            a_member_that_lost_its_volume_is_replaced,
        ),
        (
            "a_version_change_rolls_one_pod_at_a_time_leader_last",
            a_version_change_rolls_one_pod_at_a_time_leader_last,
        ),
        (
            "invalid_specs_are_rejected_without_touching_the_cluster",
            invalid_specs_are_rejected_without_touching_the_cluster,
        ),
        (
            "deleting_the_kvcluster_collects_its_objects_and_keeps_volumes",
            deleting_the_kvcluster_collects_its_objects_and_keeps_volumes,
        ),
        // Last: events expire after 45 s here (--event-ttl), which it waits for.
        (
            "the_api_server_keeps_its_guarantees_on_raftkv",
            the_api_server_keeps_its_guarantees_on_raftkv,
        ),
    ];
    // While working on one scenario: RAFTKV_E2E_ONLY=name,name runs just those (in suite order;
    // include the ones they build on, e.g. the helm install).
    let only = std::env::var("RAFTKV_E2E_ONLY").ok();
    for (name, run) in scenarios {
        if let Some(only) = &only
            && !only.split(',').any(|n| n.trim() == name)
        {
            println!("e2e scenario {name}: skipped (RAFTKV_E2E_ONLY)");
            continue;
        }
        let t = Instant::now();
        println!("e2e scenario {name} ...");
        run(&env);
        println!(
            "e2e scenario {name}: ok in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    println!("e2e total {:.1}s", started.elapsed().as_secs_f64());
}
