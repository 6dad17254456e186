//! The `runnel` binary, run the way a user runs it.

use std::process::Command;

fn runnel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_runnel"))
}

#[test]
fn demo_survives_a_node_kill_and_matches_the_reference() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let dir = scratch.path().join("demo-log");
    let output = runnel()
        .arg("demo")
        .arg("--dir")
        .arg(&dir)
        .output()
        .expect("run runnel demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("sink equals the reference computed from the input")
            && stdout.contains("0 with a change lost or repeated): yes"),
        "{stdout}"
    );
    assert!(
        stdout.contains("GROUP BY card_number HAVING count(*) > 3;") && stdout.contains("query CSAS_POSSIBLE_FRAUD_0"),
        "the demo shows the statement it submitted: {stdout}"
    );
    // The killed node's tasks run elsewhere afterwards.
    let victim = stdout
        .split("; node ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the demo names the killed node");
    let after = stdout
        .lines()
        .find(|l| l.contains("tasks after the kill:"))
        .expect("placement after the kill");
    assert!(!after.contains(&format!("@{victim}")), "{after}");
    assert!(
        stderr.contains("killing node"),
        "the node kill was not logged:\n{stderr}"
    );
}

#[test]
fn a_wrong_flag_is_a_clear_error() {
    let output = runnel().args(["demo", "--no-such-flag"]).output().expect("run runnel");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}
