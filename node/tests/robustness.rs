//! The linearizability suite (robustness/) in its short form: 16 clients record every operation
//! while each kind of fault is injected once (kill -9 of a member and of the leader, SIGSTOP of
//! the leader and of a follower, the leader or a follower cut off, the leader unable to send,
//! a member replaced); porcupine then checks the history, and acknowledged writes, revisions,
//! read values and two watch streams are checked against what the cluster stored. Longer runs,
//! and the same run against etcd: see robustness/README.md.

use std::path::Path;
use std::process::Command;

#[test]
fn histories_recorded_under_every_fault_are_linearizable() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../robustness");
    let artifacts = tempfile::tempdir().unwrap();
    let out = Command::new("go")
        .current_dir(&dir)
        .args([
            "run",
            ".",
            "--target",
            "raftkv",
            "--rounds",
            "8",
            "--require-partitions",
        ])
        .arg("--bin")
        .arg(raftkv_testkit::bin())
        .arg("--artifacts")
        .arg(artifacts.path())
        .output()
        .expect("go is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "the robustness suite failed:\n{text}");
}
