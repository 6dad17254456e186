//! The chaos harness on real processes: 5 nodes under kills, pauses,
//! partitions and restarts for 60 s while producers, consumers and the fraud
//! dataflow run; the checker must find nothing lost, duplicated or out of
//! place, and the dataflow's results must equal the reference.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_short_chaos_run_with_kills_pauses_and_partitions_finds_no_anomaly() {
    let (ok, output) = run_chaos(
        &[
            "--nodes",
            "5",
            "--duration",
            "60s",
            "--seed",
            "11",
            "--faults",
            "kill,pause,partition,restart",
            "--topic-partitions",
            "6",
            "--rate",
            "600",
            "--dataflow",
            "fraud",
            "--first-host",
            "127.0.1.1",
            "--json",
        ],
        Duration::from_secs(600),
    );
    let report = chaos_report(&output);
    eprintln!("{report:#}");
    assert!(ok, "the chaos run failed:\n{output}");
    assert_eq!(report["ok"], true);
    let verdict = &report["verdict"];
    assert!(verdict["acknowledged"].as_u64().unwrap_or(0) > 5_000, "{verdict}");
    assert_eq!(
        verdict["records_read"],
        verdict["acknowledged"].as_u64().unwrap_or(0) + verdict["unknown_present"].as_u64().unwrap_or(0)
    );
    let injected: u64 = report["faults_injected"]
        .as_object()
        .map(|kinds| kinds.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    assert!(injected >= 4, "only {injected} faults injected: {report}");
    let dataflow = report["dataflow"].as_str().unwrap_or_default();
    assert!(
        dataflow.contains("missing 0, extra 0, wrong count 0, duplicated 0"),
        "{dataflow}"
    );
}
