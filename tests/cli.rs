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
    assert!(!after.contains(&format!("on node {victim}")), "{after}");
    assert!(
        stdout.contains("…and ") && stdout.contains("T00:"),
        "UTC windows, the rest counted: {stdout}"
    );
    assert!(!stdout.contains("runnel-demo-"), "no deleted directory named: {stdout}");
    assert!(
        stderr.contains("killing node") && stdout.contains("was killed half-way (SIGKILL)"),
        "the node kill was not logged:\n{stderr}"
    );
    assert!(
        stdout.contains("the first write to partition 0 after the kill was acknowledged")
            && stdout.contains("tasks were placed on the survivors"),
        "failover times: {stdout}"
    );
}

#[test]
fn a_wrong_flag_is_a_clear_error() {
    let output = runnel().args(["demo", "--no-such-flag"]).output().expect("run runnel");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}

#[test]
fn a_node_without_a_certificate_is_told_how_to_issue_one() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = scratch.path().join("certs");
    let init = runnel()
        .args(["certs", "init", "--nodes", "3", "--dir"])
        .arg(&certs)
        .output()
        .expect("certs init");
    assert!(init.status.success());
    let output = runnel()
        .args(["node", "--id", "9", "--listen", "127.0.0.1:7999", "--data"])
        .arg(scratch.path().join("data"))
        .arg("--certs")
        .arg(&certs)
        .output()
        .expect("run runnel node");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("node-9.pem does not exist"), "{stderr}");
    assert!(
        stderr.contains("runnel certs issue --dir") && stderr.contains("--node 9"),
        "{stderr}"
    );
}

#[test]
fn seeds_may_name_hosts_and_a_bad_one_is_named() {
    let output = runnel()
        .args(["topic", "list", "--seeds", "localhost", "--certs", "certs"])
        .output()
        .expect("run runnel");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\"localhost\" is not a node address (host:port"),
        "{stderr}"
    );
}

#[test]
fn completions_are_printed_for_each_shell_and_logs_can_be_json() {
    for shell in ["bash", "zsh", "fish"] {
        let output = runnel().args(["completions", shell]).output().expect("run runnel");
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(
            script.contains("reset-offsets") && script.contains("--kafka-listen"),
            "{shell}"
        );
    }
    // A node logging in JSON: its first line is one JSON object.
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = scratch.path().join("certs");
    let init = runnel()
        .args(["certs", "init", "--nodes", "1", "--dir"])
        .arg(&certs)
        .output();
    assert!(init.expect("certs init").status.success());
    let addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .to_string();
    let mut node = runnel()
        .args([
            "--log-format",
            "json",
            "node",
            "--id",
            "1",
            "--listen",
            &addr,
            "--seeds",
            &addr,
            "--data",
        ])
        .arg(scratch.path().join("data"))
        .arg("--certs")
        .arg(&certs)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn runnel node");
    let stderr = node.stderr.take().expect("stderr");
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut line);
        let _ = line_tx.send(line);
    });
    let first = line_rx.recv_timeout(std::time::Duration::from_secs(30));
    let _ = node.kill();
    let _ = node.wait();
    let first = first.expect("a log line within 30 s");
    let parsed: serde_json::Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(parsed["level"], "INFO", "{parsed}");
    let bad = runnel()
        .args(["--log-format", "xml", "demo"])
        .output()
        .expect("run runnel");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid value 'xml'"));
}
