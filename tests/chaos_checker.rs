//! The checker can fail: nodes built with a deliberately injected bug
//! (acks=all answered before the commit, behind a test-only flag) are cut
//! off from each other while producers run, and the harness must report
//! lost records and exit non-zero with the seed to replay.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn the_checker_reports_lost_records_when_acks_come_before_the_commit() {
    let (ok, output) = run_chaos(
        &[
            "--nodes",
            "3",
            "--duration",
            "20s",
            "--seed",
            "3",
            "--faults",
            "partition",
            "--rate",
            "1000",
            "--first-host",
            "127.0.2.1",
            "--test-ack-before-commit",
            "--json",
        ],
        Duration::from_secs(300),
    );
    let report = chaos_report(&output);
    eprintln!("{report:#}");
    assert!(
        !ok,
        "the harness passed a build that acknowledges before commit:\n{output}"
    );
    assert_eq!(report["ok"], false);
    let lost = report["verdict"]["anomaly_counts"]["lost"].as_u64().unwrap_or(0);
    assert!(lost > 0, "no lost records reported: {report}");
    assert_eq!(report["seed"], 3);
}
