//! The CRD files in the repository are generated from the operator's types: regenerate them
//! with `scripts/gen-crds.sh` when the types change; this test fails when they drift.

use std::path::PathBuf;

fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

#[test]
fn committed_crds_match_the_operator_types() {
    let kvcluster = raftkv_operator::crd::crd_yaml().expect("render CRD");
    let backup = raftkv_operator::crd::backup_crd_yaml().expect("render CRD");
    for (file, generated) in [
        ("crds/kvclusters.raftkv.io.yaml", &kvcluster),
        (
            "charts/raftkv-operator/files/crds/kvclusters.raftkv.io.yaml",
            &kvcluster,
        ),
        ("crds/kvclusterbackups.raftkv.io.yaml", &backup),
        (
            "charts/raftkv-operator/files/crds/kvclusterbackups.raftkv.io.yaml",
            &backup,
        ),
    ] {
        let committed =
            std::fs::read_to_string(repo().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            &committed == generated,
            "{file} is out of date with the operator's types: run scripts/gen-crds.sh"
        );
    }
}

#[test]
fn the_crd_is_structural_with_status_and_scale() {
    let v: serde_json::Value =
        serde_yaml::from_str(&raftkv_operator::crd::crd_yaml().unwrap()).unwrap();
    let version = &v["spec"]["versions"][0];
    assert_eq!(v["spec"]["names"]["shortNames"][0], "kvc");
    assert_eq!(v["spec"]["scope"], "Namespaced");
    assert!(version["subresources"]["status"].is_object());
    assert_eq!(
        version["subresources"]["scale"]["specReplicasPath"],
        ".spec.replicas"
    );
    let text = serde_json::to_string(&v).unwrap();
    // Structural schemas forbid these at the top of properties; untagged enums produce them.
    assert!(!text.contains("\"oneOf\"") && !text.contains("\"anyOf\""));
    let replicas =
        &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["replicas"];
    assert_eq!(replicas["minimum"].as_f64(), Some(1.0));
    assert_eq!(replicas["maximum"].as_f64(), Some(9.0));
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for c in ["Replicas", "Ready", "Leader", "Phase", "Age"] {
        assert!(columns.contains(&c), "printer column {c}");
    }
}
