//! Helpers for tests that run `runnel` processes the way a user does. Free
//! addresses and node processes come from `runnel_verify::fixtures`; these
//! wrap them with this package's `runnel` binary.

// Each test binary uses a part of these helpers and re-exports.
#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use runnel::cluster::NodeId;

pub use runnel_verify::fixtures::{free_addr_on_host, NodeCommand, NodeProcess, TEST_DEAD_MS as DEAD_MS};

pub fn runnel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_runnel"))
}

/// Starts `runnel node` as the tests run it ([`NodeCommand::for_tests`]),
/// logging to `scratch/node-<id>.log`; SIGKILLed when dropped.
pub fn start_node(id: u32, addr: SocketAddr, seeds: &[SocketAddr], certs: &Path, scratch: &Path) -> NodeProcess {
    start_node_with(id, addr, seeds, certs, scratch, &[])
}

/// As `start_node`, with extra environment variables for the node.
pub fn start_node_with(
    id: u32,
    addr: SocketAddr,
    seeds: &[SocketAddr],
    certs: &Path,
    scratch: &Path,
    env: &[(&str, &str)],
) -> NodeProcess {
    let command = NodeCommand::for_tests(env!("CARGO_BIN_EXE_runnel"), scratch, certs, seeds);
    let command = env
        .iter()
        .fold(command, |command, (name, value)| command.env(name, value));
    command.spawn(NodeId(id), addr).expect("spawn runnel node")
}

pub fn certs_init(dir: &Path, nodes: u32) {
    let output = runnel()
        .args(["certs", "init", "--nodes", &nodes.to_string(), "--dir"])
        .arg(dir)
        .output()
        .expect("runnel certs init");
    assert!(
        output.status.success(),
        "certs init: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn status(seed: SocketAddr, certs: &Path) -> Output {
    runnel()
        .args([
            "status",
            "--json",
            "--timeout-ms",
            "2000",
            "--seeds",
            &seed.to_string(),
            "--certs",
        ])
        .arg(certs)
        .output()
        .expect("runnel status")
}

/// `runnel status --json` from `seed` as (node id → state, incarnation), or
/// `None` when the node does not answer.
pub fn states(seed: SocketAddr, certs: &Path) -> Option<Vec<(u64, String, u64)>> {
    let output = status(seed, certs);
    if !output.status.success() {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let nodes = json["nodes"].as_array()?;
    Some(
        nodes
            .iter()
            .map(|n| {
                (
                    n["id"].as_u64().unwrap_or_default(),
                    n["state"].as_str().unwrap_or_default().to_string(),
                    n["incarnation"].as_u64().unwrap_or_default(),
                )
            })
            .collect(),
    )
}

/// Polls `condition` until it holds or `timeout` passes; returns how long it took.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if condition() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `runnel chaos` process: on drop, if still running, it gets SIGTERM (the
/// harness then kills its node processes), and SIGKILL if it lingers.
struct ChaosProcess(Child);

impl Drop for ChaosProcess {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `runnel chaos ARGS` with its output in a file; returns whether it
/// succeeded and what it printed. Gives up (and stops it) after `limit`.
pub fn run_chaos(args: &[&str], limit: Duration) -> (bool, String) {
    let scratch = tempfile::tempdir().expect("tempdir");
    let out_path = scratch.path().join("chaos.out");
    let out = std::fs::File::create(&out_path).expect("output file");
    let child = runnel()
        .arg("chaos")
        .args(args)
        .arg("--dir")
        .arg(scratch.path().join("run"))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn runnel chaos");
    let mut process = ChaosProcess(child);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = process.0.try_wait().expect("wait for runnel chaos") {
            break status;
        }
        assert!(
            started.elapsed() < limit,
            "runnel chaos still running after {limit:?}; output so far:\n{}",
            std::fs::read_to_string(&out_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    (status.success(), std::fs::read_to_string(&out_path).unwrap_or_default())
}

/// The `report` object of `runnel chaos --json` output.
pub fn chaos_report(output: &str) -> serde_json::Value {
    output
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find_map(|value| value.get("report").cloned())
        .unwrap_or_else(|| panic!("no report in the chaos output:\n{output}"))
}
