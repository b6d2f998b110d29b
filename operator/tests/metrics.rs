//! Every operator metric the shipped alert rules query is one the operator registers.

use std::collections::BTreeSet;

#[test]
fn alert_rules_query_only_metrics_the_operator_exports() {
    // Compiled in, so the test reads the rules of the checkout it was built from even when a
    // shared target directory hands it a binary built in another clone.
    let rules = include_str!("../../charts/raftkv-operator/files/prometheus-rules.yaml");
    let m = raftkv_operator::metrics::Metrics::new().unwrap();
    // Labelled families only show once they hold a series.
    m.backups.with_label_values(&["failed"]);
    m.backup_last_success.with_label_values(&["ns", "c"]);
    m.backup_interval.with_label_values(&["ns", "c"]);
    m.backup_last_size.with_label_values(&["ns", "c"]);
    let exported: BTreeSet<String> = m
        .registry
        .gather()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let mut queried = 0;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("raftkv_operator_") {
            queried += 1;
            assert!(
                exported.contains(word),
                "{word} is queried but not exported"
            );
        }
    }
    assert!(
        queried >= 3,
        "the backup alerts query the operator's metrics"
    );
    for alert in ["RaftkvBackupFailing", "RaftkvBackupTooOld"] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
    }
}
