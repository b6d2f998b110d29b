//! The linearizability suite (robustness/) in its short form: 16 clients record every operation
//! while each kind of fault is injected once (kill -9 of a member and of the leader, SIGSTOP of
//! the leader and of a follower, the leader or a follower cut off, the leader unable to send,
//! a member and the leader replaced); porcupine then checks the history, and acknowledged
//! writes, revisions, read values and two watch streams are checked against what the cluster
//! stored. The same short run against etcd 3.6 shows the checker is right. Longer runs:
//! robustness/README.md.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

/// Runs `go` in robustness/ and fails the test, with everything it printed, if it fails.
fn go(args: &[OsString], what: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../robustness");
    let out = Command::new("go")
        .current_dir(&dir)
        .args(args)
        .output()
        .expect("go is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "{what} failed:\n{text}");
}

/// One suite at a time: each makes the same network namespaces and bridge.
static NETWORK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the short suite (each fault once) against `target` with member binary `bin`.
fn short_suite(target: &str, bin: OsString) {
    let _network = NETWORK.lock().unwrap_or_else(|p| p.into_inner());
    let artifacts = tempfile::tempdir().unwrap();
    let mut args: Vec<OsString> = [
        "run",
        ".",
        "--target",
        target,
        "--rounds",
        "9",
        "--require-partitions",
        "--bin",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.push(bin);
    args.push("--artifacts".into());
    args.push(artifacts.path().into());
    go(&args, &format!("the robustness suite against {target}"));
}

#[test]
fn histories_recorded_under_every_fault_are_linearizable() {
    short_suite("raftkv", raftkv_testkit::bin().into());
}

/// The same suite, checker and faults against etcd 3.6: what shows the checker is right.
#[test]
fn the_same_suite_passes_against_etcd() {
    short_suite("etcd", "etcd-3.6".into());
}

/// The checker's own tests (robustness/patch_test.go): an indeterminate write that never reached
/// the store is dropped and a read of it is caught; one that did is closed at the first response
/// that saw its revision, so a later stale read is caught too.
#[test]
fn the_checker_resolves_indeterminate_writes_soundly() {
    let args: Vec<OsString> = ["test", "-count=1", "./..."]
        .iter()
        .map(OsString::from)
        .collect();
    go(&args, "the checker's tests");
}
