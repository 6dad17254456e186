//! A running cluster node: the thin tokio shell around [`Membership`], the
//! QUIC transport and the per-node actor directory.
//!
//! Actors register a name and get a bounded [`Mailbox`]; anyone holding a
//! [`NodeHandle`] can `send` to or `call` a `(node, name)` anywhere in the
//! cluster. The directory belongs to the node, not the process, so several
//! nodes can share one process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::{ClusterError, Result};
use crate::membership::{Membership, MembershipConfig, MembershipEvent};
use crate::protocol::{Envelope, MemberStatus, NodeRequest, NodeResponse, PeerFrame, RemoteError, PROTOCOL_VERSION};
use crate::quic::{ClientService, QuicConfig, QuicTransport};
use crate::tls::TlsIdentity;
use crate::{Inbound, NodeId, Transport};

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    pub listen: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    /// Larger on every start of the same node id, so peers tell a restart
    /// from stale traffic.
    pub incarnation: u64,
    pub membership: MembershipConfig,
    pub quic: QuicConfig,
    /// Frames from the network waiting for the dispatcher.
    pub inbound_queue_frames: usize,
    /// Outstanding remote calls from this node.
    pub calls_in_flight_max: usize,
    /// Membership events buffered per subscriber before it lags.
    pub event_buffer: usize,
    /// Test-only network fault control: a file naming peer node ids (one per
    /// line) whose frames this node drops, re-read every 100 ms. The chaos
    /// harness cuts links with it; a node started without it has no such
    /// control at all.
    pub fault_control: Option<std::path::PathBuf>,
}

impl NodeConfig {
    pub fn new(id: NodeId, listen: SocketAddr, seeds: Vec<SocketAddr>, incarnation: u64) -> NodeConfig {
        NodeConfig {
            id,
            listen,
            seeds,
            incarnation,
            membership: MembershipConfig::default(),
            quic: QuicConfig::default(),
            inbound_queue_frames: 8192,
            calls_in_flight_max: 4096,
            event_buffer: 1024,
            fault_control: None,
        }
    }
}

/// A message delivered to a registered actor.
#[derive(Debug)]
pub struct Message {
    pub from: NodeId,
    pub payload: Vec<u8>,
    /// Present for a call: answer through it (dropping it answers `Dropped`).
    pub reply: Option<ReplyTo>,
}

/// The way back to a caller.
#[derive(Debug)]
pub struct ReplyTo {
    call_id: u64,
    caller: NodeId,
    to_actor: String,
    node: Weak<Shared>,
    answered: bool,
}

impl ReplyTo {
    pub fn reply(mut self, payload: Vec<u8>) -> Result<()> {
        self.answered = true;
        self.send(Ok(payload))
    }

    fn send(&self, result: std::result::Result<Vec<u8>, RemoteError>) -> Result<()> {
        let node = self.node.upgrade().ok_or(ClusterError::ShuttingDown)?;
        node.deliver_reply(self.caller, self.call_id, result)
    }
}

impl Drop for ReplyTo {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.send(Err(RemoteError::Dropped(self.to_actor.clone())));
        }
    }
}

/// A registered actor's inbox. Dropping it frees the name.
pub struct Mailbox {
    name: String,
    receiver: mpsc::Receiver<Message>,
    node: Weak<Shared>,
}

impl Mailbox {
    pub async fn recv(&mut self) -> Option<Message> {
        self.receiver.recv().await
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        if let Some(node) = self.node.upgrade() {
            node.directory
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.name);
        }
    }
}

type PendingCall = oneshot::Sender<std::result::Result<Vec<u8>, RemoteError>>;

struct Shared {
    me: NodeId,
    config: NodeConfig,
    membership: Mutex<Membership>,
    started: Instant,
    started_unix_ms: u64,
    directory: Mutex<HashMap<String, mpsc::Sender<Message>>>,
    pending_calls: Mutex<HashMap<u64, PendingCall>>,
    next_call_id: AtomicU64,
    events: broadcast::Sender<MembershipEvent>,
    transport: std::sync::OnceLock<Arc<dyn Transport>>,
    /// Peers cut off by the test-only fault control: their frames are dropped.
    cut_off: Mutex<std::collections::BTreeSet<NodeId>>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn to_unix_ms(&self, node_ms: u64) -> u64 {
        self.started_unix_ms + node_ms
    }

    fn membership(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.membership.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn transport(&self) -> Result<&Arc<dyn Transport>> {
        self.transport.get().ok_or(ClusterError::ShuttingDown)
    }

    fn send_frame(&self, to: NodeId, frame: PeerFrame) -> Result<()> {
        let addr = self.membership().addr_of(to).ok_or(ClusterError::UnknownNode(to))?;
        let envelope = Envelope {
            version: PROTOCOL_VERSION,
            from: self.me,
            frame,
        };
        self.transport()?.send(addr, envelope)
    }

    fn publish(&self, events: Vec<MembershipEvent>) {
        for event in events {
            tracing::info!(node = %self.me, ?event, "membership changed");
            let _ = self.events.send(event);
        }
    }

    fn deliver_local(&self, name: &str, message: Message) -> std::result::Result<(), RemoteError> {
        let queue = self
            .directory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned();
        let queue = queue.ok_or_else(|| RemoteError::UnknownActor(name.to_string()))?;
        queue.try_send(message).map_err(|_| RemoteError::Busy(name.to_string()))
    }

    fn deliver_reply(
        &self,
        caller: NodeId,
        call_id: u64,
        result: std::result::Result<Vec<u8>, RemoteError>,
    ) -> Result<()> {
        if caller == self.me {
            if let Some(waiter) = self
                .pending_calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&call_id)
            {
                let _ = waiter.send(result);
            }
            return Ok(());
        }
        let result = result.map(serde_bytes::ByteBuf::from);
        self.send_frame(caller, PeerFrame::Reply { call_id, result })
    }

    fn dispatch(self: &Arc<Self>, inbound: Inbound) {
        let from = inbound.from;
        if self.cut_off.lock().unwrap_or_else(|p| p.into_inner()).contains(&from) {
            return;
        }
        match inbound.envelope.frame {
            PeerFrame::Heartbeat {
                incarnation,
                addr,
                members,
            } => {
                let now = self.now_ms();
                let events = self.membership().on_heartbeat(now, from, incarnation, addr, &members);
                self.publish(events);
            }
            PeerFrame::Send { to, payload } => {
                let message = Message {
                    from,
                    payload,
                    reply: None,
                };
                if let Err(e) = self.deliver_local(&to, message) {
                    // An actor not (or no longer) registered: this node is
                    // starting or stopping, and the sender will retry.
                    tracing::debug!(node = %self.me, %from, error = %e, "dropped a message");
                }
            }
            PeerFrame::Call { call_id, to, payload } => {
                let reply = ReplyTo {
                    call_id,
                    caller: from,
                    to_actor: to.clone(),
                    node: Arc::downgrade(self),
                    answered: false,
                };
                let message = Message {
                    from,
                    payload,
                    reply: Some(reply),
                };
                if let Err(e) = self.deliver_local(&to, message) {
                    // The ReplyTo inside the undelivered message answers `Dropped`;
                    // say precisely why instead.
                    let _ = self.send_frame(
                        from,
                        PeerFrame::Reply {
                            call_id,
                            result: Err(e),
                        },
                    );
                }
            }
            PeerFrame::Reply { call_id, result } => {
                let waiter = self
                    .pending_calls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&call_id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(result.map(serde_bytes::ByteBuf::into_vec));
                }
            }
        }
    }

    fn tick(&self) {
        let now = self.now_ms();
        let (output, heartbeat) = {
            let mut membership = self.membership();
            let output = membership.tick(now);
            (output, membership.heartbeat())
        };
        self.publish(output.events);
        let Ok(transport) = self.transport() else { return };
        for addr in output.heartbeat_to {
            let envelope = Envelope {
                version: PROTOCOL_VERSION,
                from: self.me,
                frame: heartbeat.clone(),
            };
            if let Err(e) = transport.send(addr, envelope) {
                tracing::debug!(node = %self.me, %addr, error = %e, "heartbeat not queued");
            }
        }
    }
}

/// Serves clients: status directly, service requests by calling the named
/// local actor.
struct ClientGateway(Weak<Shared>);

/// Actors whose names start with this are reachable by clients; no other is.
pub const CLIENT_SERVICE_PREFIX: &str = "client.";

/// How long a client's service request may take on the node.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(30);

impl ClientService for ClientGateway {
    fn handle(&self, request: NodeRequest) -> crate::quic::ClientFuture {
        let Some(node) = self.0.upgrade() else {
            return Box::pin(async { NodeResponse::Error("node is shutting down".to_string()) });
        };
        match request {
            NodeRequest::Status => {
                let now = node.now_ms();
                let members = node.membership().status(now, |ms| node.to_unix_ms(ms));
                let response = NodeResponse::Status { node: node.me, members };
                Box::pin(async move { response })
            }
            NodeRequest::Service { name, payload } => {
                // Only actors meant for clients: a client must never reach, say,
                // a Raft inbox and speak as this node.
                if !name.starts_with(CLIENT_SERVICE_PREFIX) {
                    let response = NodeResponse::Error(format!("no client service named {name:?}"));
                    return Box::pin(async move { response });
                }
                let handle = NodeHandle { shared: node };
                Box::pin(async move {
                    match handle.call(handle.id(), &name, payload, SERVICE_TIMEOUT).await {
                        Ok(answer) => NodeResponse::Service(answer),
                        Err(e) => NodeResponse::Error(e.to_string()),
                    }
                })
            }
        }
    }
}

/// A cheap, cloneable way to use a running node.
#[derive(Clone)]
pub struct NodeHandle {
    shared: Arc<Shared>,
}

impl NodeHandle {
    pub fn id(&self) -> NodeId {
        self.shared.me
    }

    /// Every member this node knows, itself included.
    pub fn members(&self) -> Vec<MemberStatus> {
        let now = self.shared.now_ms();
        self.shared.membership().status(now, |ms| self.shared.to_unix_ms(ms))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<MembershipEvent> {
        self.shared.events.subscribe()
    }

    /// Registers an actor under `name` on this node with a queue of `capacity`.
    pub fn register(&self, name: &str, capacity: usize) -> Result<Mailbox> {
        let mut directory = self.shared.directory.lock().unwrap_or_else(|p| p.into_inner());
        if directory.get(name).is_some_and(|queue| !queue.is_closed()) {
            return Err(ClusterError::NameTaken(name.to_string()));
        }
        let (tx, rx) = mpsc::channel(capacity.max(1));
        directory.insert(name.to_string(), tx);
        Ok(Mailbox {
            name: name.to_string(),
            receiver: rx,
            node: Arc::downgrade(&self.shared),
        })
    }

    /// Sends `payload` to actor `name` on `node`, without waiting for it to arrive.
    pub fn send(&self, node: NodeId, name: &str, payload: Vec<u8>) -> Result<()> {
        if node == self.shared.me {
            let message = Message {
                from: node,
                payload,
                reply: None,
            };
            return self
                .shared
                .deliver_local(name, message)
                .map_err(|e| local_error(node, e));
        }
        let frame = PeerFrame::Send {
            to: name.to_string(),
            payload,
        };
        self.shared.send_frame(node, frame)
    }

    /// Sends `payload` to actor `name` on `node` and waits for its answer.
    pub async fn call(&self, node: NodeId, name: &str, payload: Vec<u8>, timeout: Duration) -> Result<Vec<u8>> {
        let call_id = self.shared.next_call_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.shared.pending_calls.lock().unwrap_or_else(|p| p.into_inner());
            if pending.len() >= self.shared.config.calls_in_flight_max {
                return Err(ClusterError::TooManyCalls(self.shared.config.calls_in_flight_max));
            }
            pending.insert(call_id, tx);
        }
        let sent = if node == self.shared.me {
            let reply = ReplyTo {
                call_id,
                caller: node,
                to_actor: name.to_string(),
                node: Arc::downgrade(&self.shared),
                answered: false,
            };
            let message = Message {
                from: node,
                payload,
                reply: Some(reply),
            };
            self.shared
                .deliver_local(name, message)
                .map_err(|e| local_error(node, e))
        } else {
            let frame = PeerFrame::Call {
                call_id,
                to: name.to_string(),
                payload,
            };
            self.shared.send_frame(node, frame)
        };
        let outcome = match sent {
            Ok(()) => tokio::time::timeout(timeout, rx).await,
            Err(e) => {
                self.forget_call(call_id);
                return Err(e);
            }
        };
        match outcome {
            Ok(Ok(Ok(payload))) => Ok(payload),
            Ok(Ok(Err(remote))) => Err(local_error(node, remote)),
            Ok(Err(_)) => Err(ClusterError::ShuttingDown),
            Err(_) => {
                self.forget_call(call_id);
                Err(ClusterError::CallTimeout {
                    node,
                    name: name.to_string(),
                    timeout_ms: timeout.as_millis() as u64,
                })
            }
        }
    }

    fn forget_call(&self, call_id: u64) {
        self.shared
            .pending_calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&call_id);
    }
}

fn local_error(node: NodeId, error: RemoteError) -> ClusterError {
    match error {
        RemoteError::UnknownActor(name) => ClusterError::UnknownActor { node, name },
        RemoteError::Busy(name) => ClusterError::Backpressure(format!("actor {name:?} on node {node}")),
        RemoteError::Dropped(name) => ClusterError::UnknownActor { node, name },
    }
}

/// Keeps the set of cut-off peers equal to the fault-control file's contents
/// (a missing or unreadable file cuts nothing; a line that is not a node id is
/// ignored with a warning).
async fn follow_fault_control(shared: Arc<Shared>, path: std::path::PathBuf) {
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        interval.tick().await;
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut wanted = std::collections::BTreeSet::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match line.parse::<u32>() {
                Ok(id) => {
                    wanted.insert(NodeId(id));
                }
                Err(_) => tracing::warn!(path = %path.display(), line, "fault control: not a node id"),
            }
        }
        let mut cut_off = shared.cut_off.lock().unwrap_or_else(|p| p.into_inner());
        if *cut_off != wanted {
            tracing::warn!(node = %shared.me, peers = ?wanted, "fault control: peers cut off");
            *cut_off = wanted;
        }
    }
}

/// A started node. Dropping it stops the node.
pub struct Node {
    handle: NodeHandle,
    transport: Arc<QuicTransport>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Binds the endpoint and starts heartbeating the seeds. Must run inside a
    /// tokio runtime.
    pub async fn start(config: NodeConfig, identity: &TlsIdentity) -> Result<Node> {
        config.membership.validate()?;
        let membership = Membership::new(
            config.id,
            config.incarnation,
            config.listen,
            config.seeds.clone(),
            config.membership.clone(),
        );
        let (events, _) = broadcast::channel(config.event_buffer.max(1));
        let shared = Arc::new(Shared {
            me: config.id,
            membership: Mutex::new(membership),
            started: Instant::now(),
            started_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            directory: Mutex::new(HashMap::new()),
            pending_calls: Mutex::new(HashMap::new()),
            next_call_id: AtomicU64::new(1),
            events,
            transport: std::sync::OnceLock::new(),
            cut_off: Mutex::new(Default::default()),
            config: config.clone(),
        });
        let (inbound_tx, mut inbound_rx) = mpsc::channel(config.inbound_queue_frames.max(1));
        let service = Arc::new(ClientGateway(Arc::downgrade(&shared)));
        let transport = QuicTransport::bind(
            config.id,
            config.listen,
            identity,
            config.quic.clone(),
            inbound_tx,
            service,
        )?;
        let _ = shared.transport.set(transport.clone() as Arc<dyn Transport>);
        let dispatcher = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Some(inbound) = inbound_rx.recv().await {
                    shared.dispatch(inbound);
                }
            })
        };
        let ticker = {
            let shared = shared.clone();
            let period = Duration::from_millis((config.membership.heartbeat_interval_ms / 2).max(1));
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(period);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    shared.tick();
                }
            })
        };
        let mut tasks = vec![dispatcher, ticker];
        if let Some(path) = config.fault_control.clone() {
            tracing::warn!(node = %config.id, path = %path.display(), "test-only network fault control is on");
            tasks.push(tokio::spawn(follow_fault_control(shared.clone(), path)));
        }
        tracing::info!(node = %config.id, listen = %config.listen, seeds = ?config.seeds, incarnation = config.incarnation, "node started");
        Ok(Node {
            handle: NodeHandle { shared },
            transport,
            tasks,
        })
    }

    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.transport.local_addr()
    }

    /// Stops the node's tasks and closes its connections.
    pub fn shutdown(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        self.transport.close();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown();
    }
}
