//! The harness's cluster: `runnel node` processes on 127.0.0.x, killed,
//! paused, restarted and cut off. Every process is killed when this is
//! dropped, however the run ends.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};
use runnel::cluster::tls::CertDir;
use runnel::cluster::NodeId;

/// Settings every node of the run gets.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// Seconds a node stays dead before its replicas are re-created elsewhere.
    pub replace_after_s: u64,
    /// The test-only injected bug (acks=all answered before the commit).
    pub ack_before_commit: bool,
}

pub struct ChaosCluster {
    pub certs: PathBuf,
    pub addrs: Vec<SocketAddr>,
    dir: PathBuf,
    exe: PathBuf,
    settings: NodeSettings,
    /// Index = node id - 1; `None` while killed.
    children: Vec<Option<Child>>,
    paused: BTreeSet<u32>,
}

impl ChaosCluster {
    /// Issues certificates and starts `nodes` nodes on consecutive addresses
    /// from `first_host`.
    pub fn start(dir: &Path, nodes: u32, first_host: Ipv4Addr, settings: NodeSettings) -> anyhow::Result<ChaosCluster> {
        let certs = dir.join("certs");
        let ids: Vec<NodeId> = (1..=nodes).map(NodeId).collect();
        CertDir::new(&certs).init(&ids)?;
        let base = u32::from(first_host);
        let addrs = (0..nodes)
            .map(|i| {
                let ip = Ipv4Addr::from(base + i);
                let socket = UdpSocket::bind((ip, 0)).with_context(|| format!("binding a UDP port on {ip}"))?;
                Ok(socket.local_addr()?)
            })
            .collect::<anyhow::Result<Vec<SocketAddr>>>()?;
        let mut cluster = ChaosCluster {
            certs,
            addrs,
            dir: dir.to_path_buf(),
            exe: std::env::current_exe().context("finding the runnel binary")?,
            settings,
            children: (0..nodes).map(|_| None).collect(),
            paused: BTreeSet::new(),
        };
        for id in 1..=nodes {
            cluster.spawn(id)?;
        }
        Ok(cluster)
    }

    pub fn node_count(&self) -> u32 {
        self.children.len() as u32
    }

    fn fault_file(&self, id: u32) -> PathBuf {
        self.dir.join(format!("faults-{id}"))
    }

    pub fn log_file(&self, id: u32) -> PathBuf {
        self.dir.join(format!("node-{id}.log"))
    }

    fn spawn(&mut self, id: u32) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file(id))
            .context("opening a node log")?;
        let seeds: Vec<String> = self.addrs.iter().map(SocketAddr::to_string).collect();
        let mut command = Command::new(&self.exe);
        command
            .args(["node", "--id", &id.to_string()])
            .args(["--listen", &self.addrs[id as usize - 1].to_string()])
            .args(["--seeds", &seeds.join(",")])
            .args(["--heartbeat-ms", "100", "--suspect-ms", "500", "--dead-ms", "2000"])
            .args(["--replace-after", &self.settings.replace_after_s.to_string()])
            .arg("--data")
            .arg(self.dir.join(format!("data-{id}")))
            .arg("--certs")
            .arg(&self.certs)
            .arg("--fault-control")
            .arg(self.fault_file(id));
        if self.settings.ack_before_commit {
            command.arg("--test-ack-before-commit");
        }
        let child = command
            .env(
                "RUST_LOG",
                std::env::var("RUNNEL_CHAOS_NODE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting a node")?;
        self.children[id as usize - 1] = Some(child);
        Ok(())
    }

    fn child(&mut self, id: u32) -> anyhow::Result<&mut Option<Child>> {
        match self.children.get_mut((id as usize).wrapping_sub(1)) {
            Some(child) => Ok(child),
            None => bail!("there is no node {id}"),
        }
    }

    /// Nodes whose process is running (paused ones included).
    pub fn running(&self) -> Vec<u32> {
        (1..=self.node_count())
            .filter(|id| self.children[*id as usize - 1].is_some())
            .collect()
    }

    pub fn is_paused(&self, id: u32) -> bool {
        self.paused.contains(&id)
    }

    pub fn kill(&mut self, id: u32) -> anyhow::Result<()> {
        self.paused.remove(&id);
        if let Some(mut child) = self.child(id)?.take() {
            child.kill().context("SIGKILL")?;
            child.wait().context("reaping a killed node")?;
        }
        Ok(())
    }

    pub fn restart(&mut self, id: u32) -> anyhow::Result<()> {
        if self.child(id)?.is_none() {
            self.spawn(id)?;
        }
        Ok(())
    }

    fn signal(&self, id: u32, signal: &str) -> anyhow::Result<()> {
        let Some(child) = self.children.get(id as usize - 1).and_then(Option::as_ref) else {
            bail!("node {id} is not running");
        };
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill {signal} {} failed", child.id());
        }
        Ok(())
    }

    pub fn pause(&mut self, id: u32) -> anyhow::Result<()> {
        self.signal(id, "-STOP")?;
        self.paused.insert(id);
        Ok(())
    }

    pub fn resume(&mut self, id: u32) -> anyhow::Result<()> {
        if self.paused.remove(&id) {
            self.signal(id, "-CONT")?;
        }
        Ok(())
    }

    /// Cuts every link between `side` and the other nodes (both directions:
    /// each node drops the frames of the nodes on the other side).
    pub fn cut(&mut self, side: &[u32]) -> anyhow::Result<()> {
        for id in 1..=self.node_count() {
            let inside = side.contains(&id);
            let blocked: Vec<String> = (1..=self.node_count())
                .filter(|other| side.contains(other) != inside)
                .map(|other| other.to_string())
                .collect();
            self.write_fault_file(id, &blocked.join("\n"))?;
        }
        Ok(())
    }

    pub fn heal_network(&mut self) -> anyhow::Result<()> {
        for id in 1..=self.node_count() {
            self.write_fault_file(id, "")?;
        }
        Ok(())
    }

    /// Written whole and renamed, so a node never reads half a file.
    fn write_fault_file(&self, id: u32, text: &str) -> anyhow::Result<()> {
        let path = self.fault_file(id);
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, text).context("writing a fault-control file")?;
        std::fs::rename(&temporary, &path).context("installing a fault-control file")?;
        Ok(())
    }

    /// Undoes every fault: resumes paused nodes, heals the network and
    /// restarts killed nodes.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        let paused: Vec<u32> = self.paused.iter().copied().collect();
        for id in paused {
            self.resume(id)?;
        }
        self.heal_network()?;
        for id in 1..=self.node_count() {
            self.restart(id)?;
        }
        Ok(())
    }
}

impl Drop for ChaosCluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            // SIGKILL ends a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
