//! `runnel certs`, `runnel node` and `runnel status`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use runnel::broker::{Broker, BrokerConfig, Controller, ControllerConfig};
use runnel::client::protocol::{ClientRequest, ClientResponse, ReplicaHealthInfo, CLIENT_ACTOR};
use runnel::cluster::protocol::{NodeRequest, NodeResponse};
use runnel::cluster::quic::ClusterClient;
use runnel::cluster::tls::CertDir;
use runnel::cluster::{MembershipConfig, Node, NodeConfig, NodeHandle, NodeId};
use runnel::storage::DurableKv;
use serde::Deserialize;

#[derive(clap::Subcommand)]
pub enum CertsCommand {
    /// Create a cluster CA, node certificates and a client certificate.
    Init {
        /// The directory to write ca.pem/.key, node-N.pem/.key and client.pem/.key to.
        #[arg(long)]
        dir: PathBuf,
        /// Node certificates to issue, for ids 1..=N.
        #[arg(long, default_value_t = 5)]
        nodes: u32,
        /// A host name or IP address every node certificate also names
        /// (repeatable): what TLS Kafka clients dial and check.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Issue a certificate for one more node (or a new one for a node) with
    /// the existing CA.
    Issue {
        /// The certificate directory holding the cluster CA (ca.pem, ca.key).
        #[arg(long)]
        dir: PathBuf,
        /// The node id the certificate names.
        #[arg(long)]
        node: u32,
        /// A host name or IP address the certificate also names
        /// (repeatable), such as the node's `--kafka-advertise` host.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

pub fn certs(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init { dir, nodes, hosts } => {
            let ids: Vec<NodeId> = (1..=nodes).map(NodeId).collect();
            CertDir::new(&dir).init(&ids, &hosts)?;
            println!(
                "created a cluster CA, {nodes} node certificates and a client certificate in {}",
                dir.display()
            );
        }
        CertsCommand::Issue { dir, node, hosts } => {
            CertDir::new(&dir).issue_node(NodeId(node), &hosts)?;
            println!("issued a certificate for node {node} in {}", dir.display());
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct NodeArgs {
    /// This node's id; its certificate must name it.
    #[arg(long)]
    id: Option<u32>,
    /// UDP address to listen on, which peers also use to reach this node.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (remembers the id and counts restarts).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Certificate directory from `runnel certs init`.
    #[arg(long, env = "RUNNEL_CERTS")]
    certs: Option<PathBuf>,
    /// Comma-separated seed addresses; any one reachable seed is enough to join.
    #[arg(long, env = "RUNNEL_SEEDS", value_delimiter = ',', value_parser = crate::broker_cli::seed_addr)]
    seeds: Option<Vec<SocketAddr>>,
    /// TOML file with the same settings (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Milliseconds between heartbeats to peers.
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Silence after which a peer is suspect.
    #[arg(long)]
    suspect_ms: Option<u64>,
    /// Silence after which a peer is dead.
    #[arg(long)]
    dead_ms: Option<u64>,
    /// Node ids of the controller voters (default: the seeds' ids).
    #[arg(long, value_delimiter = ',')]
    controllers: Option<Vec<NodeId>>,
    /// Seconds a node must stay dead before its replicas are re-created on
    /// other nodes (0 = at once).
    #[arg(long, env = "RUNNEL_REPLACE_AFTER", default_value_t = 30)]
    replace_after: u64,
    /// Accept test-only fault injection requests (tests only, never production).
    #[arg(long, hide = true, env = "RUNNEL_TEST_FAULT_HOOKS")]
    test_fault_hooks: bool,
    /// Test-only: a file of peer node ids whose frames this node drops (the
    /// chaos harness's network partitions).
    #[arg(long, hide = true)]
    fault_control: Option<PathBuf>,
    /// Test-only injected bug: answer acks=all before the commit (proves the
    /// chaos checker catches lost records). Never use it otherwise.
    #[arg(long, hide = true)]
    test_ack_before_commit: bool,
    /// Register the actors `runnel bench transport` talks to.
    #[arg(long, hide = true)]
    bench_actors: bool,
    /// When replicas fsync their logs: `every-batch` (before each vote and
    /// acknowledgement; the default) or `never` (left to the OS: an
    /// acknowledged record survives crashes of processes, not a power loss
    /// of a majority of its replicas' machines).
    #[arg(long, value_enum)]
    fsync: Option<FsyncMode>,
    /// Bytes a replica's log segment holds before the next one starts
    /// (Kafka's `log.segment.bytes`; default 1 GiB).
    #[arg(long, env = "RUNNEL_SEGMENT_BYTES", value_parser = clap::value_parser!(u64).range(1024..=u64::from(u32::MAX)))]
    segment_bytes: Option<u64>,
    /// TCP address to serve the Kafka protocol on, so Kafka clients and
    /// tools (kcat, kafka-python, Java clients, …) can produce and consume.
    /// Plaintext on a loopback address only, unless --kafka-tls.
    #[arg(long)]
    kafka_listen: Option<SocketAddr>,
    /// Serve Kafka over TLS (1.3) with this node's certificate; clients must
    /// present a certificate signed by the cluster CA (`client.pem`). Needed
    /// to listen on any address other than loopback.
    #[arg(long)]
    kafka_tls: bool,
    /// The `host:port` Kafka clients are told to reach this node at
    /// (default: the --kafka-listen address).
    #[arg(long)]
    kafka_advertise: Option<String>,
}

/// `runnel node --fsync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsyncMode {
    EveryBatch,
    Never,
}

/// The `--config` file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    id: Option<u32>,
    listen: Option<SocketAddr>,
    data: Option<PathBuf>,
    certs: Option<PathBuf>,
    seeds: Option<Vec<SocketAddr>>,
    heartbeat_ms: Option<u64>,
    suspect_ms: Option<u64>,
    dead_ms: Option<u64>,
    fsync: Option<FsyncMode>,
    kafka_listen: Option<SocketAddr>,
    kafka_advertise: Option<String>,
    kafka_tls: Option<bool>,
}

fn read_config(path: &Path) -> anyhow::Result<NodeFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{} is not a valid node configuration", path.display()))
}

/// What `runnel node` runs with: each flag, else the config file's setting.
struct NodeSetup {
    id: NodeId,
    listen: SocketAddr,
    data: PathBuf,
    certs: PathBuf,
    seeds: Vec<SocketAddr>,
    membership: MembershipConfig,
    sync_log: bool,
    kafka: Option<runnel_kafka::KafkaListenerConfig>,
    kafka_tls: bool,
}

impl NodeSetup {
    fn resolve(args: &NodeArgs) -> anyhow::Result<NodeSetup> {
        let file = match &args.config {
            Some(path) => read_config(path)?,
            None => NodeFile::default(),
        };
        let id = NodeId(args.id.or(file.id).context("--id is required (or `id` in --config)")?);
        let listen = args.listen.or(file.listen).context("--listen is required")?;
        let data = args.data.clone().or(file.data).context("--data is required")?;
        let certs = args
            .certs
            .clone()
            .or(file.certs)
            .context("--certs (or RUNNEL_CERTS) is required")?;
        let seeds = args.seeds.clone().or(file.seeds).unwrap_or_default();
        let defaults = MembershipConfig::default();
        let membership = MembershipConfig {
            heartbeat_interval_ms: args
                .heartbeat_ms
                .or(file.heartbeat_ms)
                .unwrap_or(defaults.heartbeat_interval_ms),
            suspect_after_ms: args.suspect_ms.or(file.suspect_ms).unwrap_or(defaults.suspect_after_ms),
            dead_after_ms: args.dead_ms.or(file.dead_ms).unwrap_or(defaults.dead_after_ms),
        };
        let sync_log = args.fsync.or(file.fsync).unwrap_or(FsyncMode::EveryBatch) == FsyncMode::EveryBatch;
        let kafka_advertise = args.kafka_advertise.clone().or(file.kafka_advertise);
        let kafka_tls = args.kafka_tls || file.kafka_tls.unwrap_or(false);
        let kafka = match args.kafka_listen.or(file.kafka_listen) {
            Some(listen) => Some(runnel_kafka::KafkaListenerConfig {
                listen,
                advertised: kafka_advertise.unwrap_or_else(|| listen.to_string()),
                tls: None,
            }),
            None if kafka_advertise.is_some() => bail!("--kafka-advertise needs --kafka-listen"),
            None if kafka_tls => bail!("--kafka-tls needs --kafka-listen"),
            None => None,
        };
        Ok(NodeSetup {
            id,
            listen,
            data,
            certs,
            seeds,
            membership,
            sync_log,
            kafka,
            kafka_tls,
        })
    }
}

pub fn node(args: NodeArgs) -> anyhow::Result<()> {
    let setup = NodeSetup::resolve(&args)?;
    let certificate = setup.certs.join(format!("node-{}.pem", setup.id.0));
    if !certificate.exists() {
        bail!(
            "{} does not exist: issue this node a certificate with `runnel certs issue --dir {} --node {}`",
            certificate.display(),
            setup.certs.display(),
            setup.id.0
        );
    }
    let identity = CertDir::new(&setup.certs).node_identity(setup.id)?;
    let incarnation = next_incarnation(&setup.data, setup.id)?;
    let mut config = NodeConfig::new(setup.id, setup.listen, setup.seeds.clone(), incarnation);
    config.membership = setup.membership.clone();
    config.fault_control = args.fault_control.clone();
    let runtime = crate::node_runtime()?;
    runtime.block_on(serve_node(args, setup, config, identity))
}

/// Runs the node until a shutdown signal: its transport, the controller
/// voters, the broker, the dataflow host and the controller, in that order.
async fn serve_node(
    args: NodeArgs,
    setup: NodeSetup,
    config: NodeConfig,
    identity: runnel::cluster::tls::TlsIdentity,
) -> anyhow::Result<()> {
    let id = setup.id;
    let mut node = Node::start(config, &identity).await?;
    if args.bench_actors {
        runnel_bench::transport::spawn_actors(&node.handle())?;
    }
    let handle = node.handle();
    // One listener from here on: a signal while the broker or controller
    // starts is kept for the wait below, not lost between two listeners.
    let stop = shutdown_signal()?;
    tokio::pin!(stop);
    let controllers = tokio::select! {
        found = controller_voters(&handle, &setup.data, &setup.seeds, args.controllers.clone()) => found?,
        () = &mut stop => {
            node.shutdown();
            return Ok(());
        }
    };
    tracing::info!(node = %id, ?controllers, "controller voters");
    let broker = Broker::start(node.handle(), broker_config(&args, &setup)).await?;
    let mut controller_config = ControllerConfig::new(controllers);
    controller_config.test_fault_hooks = args.test_fault_hooks;
    controller_config.replace_after = Duration::from_secs(args.replace_after);
    let host = start_dataflow_host(&node, &setup).await?;
    let tasks: Arc<dyn runnel::client::tasks::TaskHost> = host.clone();
    let controller = Controller::start_with_tasks(Arc::new(broker), controller_config, Some(tasks)).await?;
    let kafka = match setup.kafka.clone() {
        Some(mut config) => {
            if setup.kafka_tls {
                config.tls = Some(Arc::new(identity.tcp_server_config()?));
            }
            Some(runnel_kafka::KafkaListener::start(config, controller.service()).await?)
        }
        None => None,
    };
    stop.await;
    if let Some(kafka) = kafka {
        kafka.shutdown();
    }
    host.shutdown();
    tracing::info!(node = %id, "shutting down");
    controller.shutdown().await;
    node.shutdown();
    Ok(())
}

/// The broker's settings, logging the ones that weaken durability.
fn broker_config(args: &NodeArgs, setup: &NodeSetup) -> BrokerConfig {
    let id = setup.id;
    let mut broker_config = BrokerConfig::new(setup.data.join("broker"));
    broker_config.sync_log = setup.sync_log;
    if let Some(bytes) = args.segment_bytes {
        broker_config.log_config.segment_bytes_max = bytes;
    }
    if !broker_config.sync_log {
        tracing::info!(node = %id, "replica logs are not fsynced (--fsync never)");
    }
    if args.test_ack_before_commit {
        tracing::warn!(node = %id, "TEST ONLY: acks=all is answered before the commit (injected bug)");
        broker_config.test_ack_before_commit = true;
    }
    broker_config
}

/// Starts the node's dataflow host. Dataflow tasks reach the cluster as
/// clients of this very node.
async fn start_dataflow_host(node: &Node, setup: &NodeSetup) -> anyhow::Result<Arc<runnel::dataflow::DataflowHost>> {
    let listen = setup.listen;
    let own_addr = match listen.ip() {
        ip if ip.is_unspecified() => std::net::SocketAddr::new([127, 0, 0, 1].into(), listen.port()),
        _ => listen,
    };
    let settings = runnel::dataflow::ClientSettings {
        seeds: vec![own_addr],
        certs: setup.certs.clone(),
        local: Some(runnel::client::LocalNode {
            handle: node.handle(),
            addr: listen,
        }),
    };
    runnel::dataflow::DataflowHost::start(runnel::dataflow::builtin(), setup.id, settings)
        .await
        .map_err(|e| anyhow::anyhow!(e))
}

/// The controller voters: given, remembered from an earlier start, or the
/// ids of the seed nodes (by default the seeds are the controllers), learned
/// as their heartbeats arrive. Every node computes the same set.
async fn controller_voters(
    node: &NodeHandle,
    data: &Path,
    seeds: &[SocketAddr],
    given: Option<Vec<NodeId>>,
) -> anyhow::Result<Vec<NodeId>> {
    let mut meta = DurableKv::open(data.join("node.meta"))?;
    if let Some(bytes) = meta.get("controllers") {
        let remembered: Vec<NodeId> = serde_json::from_slice(bytes).context("node.meta: controllers")?;
        if given.as_ref().is_some_and(|g| *g != remembered) {
            bail!("this node was started with controllers {remembered:?}; they cannot change to {given:?}");
        }
        return Ok(remembered);
    }
    let voters = match given {
        Some(voters) => voters,
        None if seeds.is_empty() => vec![node.id()],
        None => {
            let mut last_report = std::time::Instant::now();
            loop {
                let members = node.members();
                let found: Vec<NodeId> = seeds
                    .iter()
                    .filter_map(|seed| members.iter().find(|m| m.addr == *seed).map(|m| m.node))
                    .collect();
                if found.len() == seeds.len() {
                    let mut found = found;
                    found.sort_unstable();
                    found.dedup();
                    break found;
                }
                if last_report.elapsed() > Duration::from_secs(5) {
                    tracing::info!(known = ?found, seeds = ?seeds, "waiting to hear from every seed to form the controller");
                    last_report = std::time::Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    meta.set("controllers", serde_json::to_vec(&voters)?)?;
    Ok(voters)
}

/// Checks the data directory belongs to `id` and records one more start.
fn next_incarnation(data: &Path, id: NodeId) -> anyhow::Result<u64> {
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let mut meta = DurableKv::open(data.join("node.meta"))?;
    if let Some(owner) = meta.get_u64("node_id")? {
        if owner != u64::from(id.0) {
            bail!("{} belongs to node {owner}, not node {id}", data.display());
        }
    }
    let incarnation = meta.get_u64("incarnation")?.unwrap_or(0) + 1;
    meta.update(|entries| {
        entries.insert("node_id".to_string(), u64::from(id.0).to_le_bytes().to_vec());
        entries.insert("incarnation".to_string(), incarnation.to_le_bytes().to_vec());
    })?;
    Ok(incarnation)
}

pub async fn wait_for_shutdown_signal() -> anyhow::Result<()> {
    shutdown_signal()?.await;
    Ok(())
}

/// Listens for SIGTERM and SIGINT from this call on (not from the first
/// poll, as an `async fn` would): the future ends at the first of them.
/// Must be called inside the runtime.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    connect: crate::broker_cli::ConnectArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// How long to wait for an answer, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Keep refreshing a live view, with an event line for every change
    /// (with --json, or off a terminal: the event lines only).
    #[arg(long)]
    watch: bool,
    /// With --watch: milliseconds between refreshes.
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    /// With --watch: stop after this many refreshes (default: until stopped).
    #[arg(long)]
    count: Option<u64>,
}

/// A replica that restarted or failed, with the node holding it.
type TroubledReplica = (NodeId, ReplicaHealthInfo);
/// An under-replicated partition, with its topic.
type UnderReplicated = (String, runnel::client::protocol::PartitionInfo);

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let (seeds, certs) = args.connect.resolve()?;
    if args.watch {
        let output = crate::watch::Output::choose(args.json);
        return crate::watch::run(
            seeds,
            certs,
            Duration::from_millis(args.interval_ms),
            args.count,
            output,
        );
    }
    let identity = CertDir::new(&certs).client_identity()?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let (response, replicas, (under, controller)) = runtime.block_on(async {
        let client = ClusterClient::new(&identity, seeds.clone())?;
        let response = client.request(NodeRequest::Status, timeout).await?;
        let replicas = match &response {
            NodeResponse::Status { members, .. } => replica_health(&client, members, timeout).await,
            _ => Vec::new(),
        };
        let under = match &response {
            NodeResponse::Status { members, .. } => under_replicated(&seeds, &certs, members).await,
            _ => (Vec::new(), None),
        };
        anyhow::Ok((response, replicas, under))
    })?;
    let (node, members) = match response {
        NodeResponse::Status { node, members } => (node, members),
        NodeResponse::Error(e) => bail!("the node refused the request: {e}"),
        NodeResponse::Service(_) => bail!("the node answered a status request with a service response"),
    };
    if args.json {
        print_status_json(node, controller, &members, &replicas, &under);
        return Ok(());
    }
    print_members(node, &members);
    match controller {
        Some(leader) => println!("controller leader: node {leader}"),
        None => println!("controller leader: none known (the controller may be electing one)"),
    }
    print_under_replicated(&under);
    print_troubled_replicas(&replicas);
    Ok(())
}

/// `runnel status --json`: one JSON object on one line.
fn print_status_json(
    node: NodeId,
    controller: Option<NodeId>,
    members: &[runnel::cluster::MemberStatus],
    replicas: &[TroubledReplica],
    under: &[UnderReplicated],
) {
    let nodes: Vec<serde_json::Value> = members
        .iter()
        .map(|m| {
            serde_json::json!({"id": m.node.0, "address": m.addr.to_string(), "state": m.state.to_string(),
                "incarnation": m.incarnation, "since_unix_ms": m.since_unix_ms})
        })
        .collect();
    let troubled: Vec<serde_json::Value> = replicas
        .iter()
        .map(|(node, h)| {
            serde_json::json!({"node": node.0, "group": h.group, "restarts": h.restarts, "failed": h.failed,
                "last_failure": h.last_failure})
        })
        .collect();
    let under: Vec<serde_json::Value> = under
        .iter()
        .map(|(topic, p)| {
            serde_json::json!({"topic": topic, "partition": p.partition, "leader": p.leader,
                "replicas": p.replicas, "voters": p.voters})
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({"answered_by": node.0, "controller_leader": controller.map(|c| c.0), "nodes": nodes,
            "replica_restarts": troubled, "under_replicated": under})
    );
}

/// The members table, as the answering node sees them.
fn print_members(node: NodeId, members: &[runnel::cluster::MemberStatus]) {
    println!("cluster as seen by node {node}:");
    println!(
        "{:>6}  {:<22} {:<8} {:>12}  since (unix ms)",
        "node", "address", "state", "incarnation"
    );
    for m in members {
        println!(
            "{:>6}  {:<22} {:<8} {:>12}  {}",
            m.node.0,
            m.addr.to_string(),
            m.state.to_string(),
            m.incarnation,
            m.since_unix_ms
        );
    }
}

/// Under-replicated partitions, if any.
fn print_under_replicated(under: &[UnderReplicated]) {
    if under.is_empty() {
        return;
    }
    println!("under-replicated partitions:");
    for (topic, p) in under {
        let leader = p.leader.map_or("none".to_string(), |l| l.to_string());
        println!(
            "  {topic}/{}: leader {leader}, replicas {:?}, voters {:?}",
            p.partition, p.replicas, p.voters
        );
        // Alive-ness and failed replicas are in the lists printed apart.
        let everyone: std::collections::BTreeSet<NodeId> = p.replicas.iter().copied().collect();
        for problem in crate::broker_cli::partition_problems(topic, p, &everyone, &[]) {
            println!("    {problem}");
        }
    }
}

/// Replicas that restarted or failed, if any.
fn print_troubled_replicas(replicas: &[TroubledReplica]) {
    if replicas.is_empty() {
        return;
    }
    println!("replicas that restarted or failed:");
    for (node, h) in replicas {
        let state = if h
            .last_failure
            .as_deref()
            .is_some_and(|f| f.starts_with("damaged files"))
        {
            "DAMAGED (files kept; not restarted)"
        } else if h.last_failure.as_deref().is_some_and(|f| f.starts_with("repaired")) {
            "REPAIRED (rebuilt from its peers)"
        } else if h.failed {
            "FAILED (no longer restarted)"
        } else {
            "running"
        };
        let reason = h.last_failure.as_deref().unwrap_or("-");
        println!(
            "  node {node} group {}: {} restarts, {state}; last failure: {reason}",
            h.group, h.restarts
        );
    }
}

/// Partitions with no leader, or with a replica on a node that is not alive.
/// The partitions with problems, and the controller leader, as the
/// cluster's client service reports them (nothing when it does not answer).
async fn under_replicated(
    seeds: &[SocketAddr],
    certs: &Path,
    members: &[runnel::cluster::MemberStatus],
) -> (Vec<UnderReplicated>, Option<NodeId>) {
    let alive: Vec<NodeId> = members
        .iter()
        .filter(|m| m.state == runnel::cluster::MemberState::Alive)
        .map(|m| m.node)
        .collect();
    let Ok(client) = runnel::client::Client::connect(seeds.to_vec(), certs).await else {
        return (Vec::new(), None);
    };
    let alive_set: std::collections::BTreeSet<NodeId> = alive.iter().copied().collect();
    let failed = crate::broker_cli::failed_replicas(&client, &alive_set).await;
    let mut out = Vec::new();
    for topic in client.topics().await.unwrap_or_default() {
        let Ok(info) = client.describe_topic(&topic.name).await else {
            continue;
        };
        for p in info.partitions {
            if !crate::broker_cli::partition_problems(&info.name, &p, &alive_set, &failed).is_empty() {
                out.push((info.name.clone(), p));
            }
        }
    }
    (out, client.controller_leader())
}

/// Replicas that restarted or failed, from every alive node's supervisor.
async fn replica_health(
    client: &ClusterClient,
    members: &[runnel::cluster::MemberStatus],
    timeout: Duration,
) -> Vec<TroubledReplica> {
    let Ok(payload) = runnel::client::protocol::encode_payload(&ClientRequest::ReplicaHealth) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for member in members
        .iter()
        .filter(|m| m.state == runnel::cluster::MemberState::Alive)
    {
        let request = NodeRequest::Service {
            name: CLIENT_ACTOR.to_string(),
            payload: payload.clone(),
        };
        let Ok(NodeResponse::Service(bytes)) = client.request_to(member.addr, request, timeout).await else {
            continue;
        };
        if let Ok(ClientResponse::Health(health)) = runnel::client::protocol::decode_payload::<ClientResponse>(&bytes) {
            out.extend(
                health
                    .into_iter()
                    .filter(|h| h.restarts > 0 || h.failed || h.last_failure.is_some())
                    .map(|h| (member.node, h)),
            );
        }
    }
    out
}
