//! The chaos harness at `--intensity high` on real processes (a test file
//! of its own, so its five nodes do not share the machine with another
//! chaos run's).

mod common;

use std::time::Duration;

use common::*;

/// `--intensity high`: overlapping faults up to a minority of 5 nodes,
/// bursts of leader kills, pause-then-kill, kills while replicas move, and
/// a flipped byte or a deleted segment in killed nodes' files; nothing
/// acknowledged lost or duplicated, and every partition back on its
/// assigned voters with identical replicas after the heal.
#[test]
fn a_high_intensity_chaos_run_with_overlapping_faults_and_disk_damage_finds_no_anomaly() {
    let (ok, output) = run_chaos(
        &[
            "--nodes",
            "5",
            "--duration",
            "60s",
            "--seed",
            "5",
            "--intensity",
            "high",
            "--topic-partitions",
            "6",
            "--rate",
            "600",
            "--first-host",
            "127.0.4.1",
            "--json",
        ],
        Duration::from_secs(900),
    );
    let report = chaos_report(&output);
    eprintln!("{report:#}");
    assert!(ok, "the chaos run failed:\n{output}");
    let verdict = &report["verdict"];
    assert!(verdict["acknowledged"].as_u64().unwrap_or(0) > 3_000, "{verdict}");
    assert_eq!(
        verdict["records_read"],
        verdict["acknowledged"].as_u64().unwrap_or(0) + verdict["unknown_present"].as_u64().unwrap_or(0)
    );
    let injected = report["faults_injected"].as_object().cloned().unwrap_or_default();
    let total: u64 = injected.values().filter_map(|v| v.as_u64()).sum();
    assert!(total >= 15, "only {total} faults injected: {report}");
    let scheduled = report["faults_scheduled"].as_object().cloned().unwrap_or_default();
    assert_eq!(scheduled.len(), 8, "every kind of fault in the schedule: {report}");
    assert!(
        injected.keys().any(|k| k.starts_with("kill_")),
        "disk damage among the faults injected: {report}"
    );
    let convergence = report["convergence"].as_str().unwrap_or_default();
    assert!(convergence.starts_with("replicas identical"), "{convergence}");
}
