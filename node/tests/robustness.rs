//! The linearizability suite (robustness/) in its short form: 16 clients record every operation
//! while each kind of fault is injected once (kill -9 of a member and of the leader, SIGSTOP of
//! the leader and of a follower, the leader or a follower cut off, the leader unable to send,
//! a member replaced); porcupine then checks the history, and acknowledged writes, revisions,
//! read values and two watch streams are checked against what the cluster stored. Longer runs,
//! and the same run against etcd: see robustness/README.md.

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

#[test]
fn histories_recorded_under_every_fault_are_linearizable() {
    let artifacts = tempfile::tempdir().unwrap();
    let mut args: Vec<OsString> = [
        "run",
        ".",
        "--target",
        "raftkv",
        "--rounds",
        "9",
        "--require-partitions",
        "--bin",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.push(raftkv_testkit::bin().into());
    args.push("--artifacts".into());
    args.push(artifacts.path().into());
    go(&args, "the robustness suite");
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
