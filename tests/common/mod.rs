//! Helpers for tests that run `runnel` processes the way a user does.

#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn runnel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_runnel"))
}

/// A free UDP port on a loopback address of its own (127.0.0.x).
pub fn free_addr(host: u8) -> SocketAddr {
    let socket = UdpSocket::bind(("127.0.0.".to_string() + &host.to_string(), 0)).expect("bind a loopback address");
    socket.local_addr().expect("local addr")
}

/// A `runnel node` process, SIGKILLed when dropped, whatever the test did.
pub struct NodeProcess {
    pub id: u32,
    pub addr: SocketAddr,
    pub log: PathBuf,
    child: Option<Child>,
}

/// Failure detection timing for tests: dead after a second of silence.
pub const DEAD_MS: u64 = 1000;

impl NodeProcess {
    pub fn start(id: u32, addr: SocketAddr, seeds: &[SocketAddr], certs: &Path, scratch: &Path) -> NodeProcess {
        Self::start_with(id, addr, seeds, certs, scratch, &[])
    }

    /// As `start`, with extra environment variables for the node.
    pub fn start_with(
        id: u32,
        addr: SocketAddr,
        seeds: &[SocketAddr],
        certs: &Path,
        scratch: &Path,
        env: &[(&str, &str)],
    ) -> NodeProcess {
        let log = scratch.join(format!("node-{id}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let seeds: Vec<String> = seeds.iter().map(SocketAddr::to_string).collect();
        let child = runnel()
            .args(["node", "--id", &id.to_string(), "--listen", &addr.to_string()])
            .args(["--seeds", &seeds.join(",")])
            .args([
                "--heartbeat-ms",
                "100",
                "--suspect-ms",
                "400",
                "--dead-ms",
                &DEAD_MS.to_string(),
            ])
            .arg("--data")
            .arg(scratch.join(format!("data-{id}")))
            .arg("--certs")
            .arg(certs)
            .env("RUST_LOG", "info")
            .env("RUNNEL_TEST_FAULT_HOOKS", "true")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn runnel node");
        NodeProcess {
            id,
            addr,
            log,
            child: Some(child),
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
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
