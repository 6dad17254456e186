//! The QUIC transport: one quinn endpoint per node, mutual TLS, and two kinds
//! of traffic told apart by ALPN:
//!
//! - peers (`runnel-peer/1`): each node opens one long-lived unidirectional
//!   stream to each peer it sends to and writes length-prefixed envelopes on
//!   it, several frames per write when they queue up. The receiving side
//!   learns the sender's node id from its certificate and drops any envelope
//!   claiming another sender.
//! - clients (`runnel-client/1`): one bidirectional stream per request.
//!
//! Queues are bounded at both ends: [`Transport::send`] fails with
//! `Backpressure` when a peer's queue is full, and a reader waits for room in
//! the node's inbound queue, which stalls the stream and, through QUIC flow
//! control, the sender.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use rustls_pki_types::CertificateDer;
use tokio::sync::mpsc;

use crate::error::{ClusterError, Result};
use crate::protocol::{
    decode_body, decode_envelope, encode_frame, frame_body_len, ClientEnvelope, Envelope, NodeRequest, NodeResponse,
    ALPN_CLIENT, ALPN_PEER, PROTOCOL_VERSION,
};
use crate::tls::{node_id_from_cert, TlsIdentity, CLUSTER_SERVER_NAME};
use crate::{Inbound, NodeId, Transport};

/// Limits and timeouts of the QUIC transport.
#[derive(Clone, Debug)]
pub struct QuicConfig {
    /// Frames queued towards one peer before `send` reports backpressure.
    pub peer_queue_frames: usize,
    /// Bytes gathered into one stream write when frames queue up.
    pub write_batch_bytes: usize,
    pub keep_alive_ms: u64,
    pub idle_timeout_ms: u64,
    pub socket_buffer_bytes: usize,
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    /// Connections served at once; more are refused.
    pub connections_max: usize,
    /// Reconnect back-off bounds towards an unreachable peer.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            peer_queue_frames: 4096,
            write_batch_bytes: 1 << 20,
            keep_alive_ms: 1000,
            idle_timeout_ms: 5000,
            socket_buffer_bytes: 8 << 20,
            stream_window_bytes: 8 << 20,
            connection_window_bytes: 32 << 20,
            connections_max: 1024,
            reconnect_min_ms: 50,
            reconnect_max_ms: 2000,
        }
    }
}

/// The answer to a client request, computed asynchronously.
pub type ClientFuture = std::pin::Pin<Box<dyn std::future::Future<Output = NodeResponse> + Send + 'static>>;

/// Answers client requests; the node layer implements it.
pub trait ClientService: Send + Sync + 'static {
    fn handle(&self, request: NodeRequest) -> ClientFuture;
}

pub struct QuicTransport {
    me: NodeId,
    endpoint: quinn::Endpoint,
    config: QuicConfig,
    peer_client: quinn::ClientConfig,
    /// Writer queues by peer address.
    peers: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
}

impl QuicTransport {
    /// Binds the endpoint and starts serving. Must run inside a tokio runtime.
    pub fn bind(
        me: NodeId,
        listen: SocketAddr,
        identity: &TlsIdentity,
        config: QuicConfig,
        inbound: mpsc::Sender<Inbound>,
        clients: Arc<dyn ClientService>,
    ) -> Result<Arc<QuicTransport>> {
        let transport_config = Arc::new(transport_config(&config, listen.ip().is_loopback()));
        let server_crypto = QuicServerConfig::try_from(identity.server_config()?)
            .map_err(|e| ClusterError::Tls(format!("QUIC server crypto: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport_config.clone());
        server.max_incoming(config.connections_max);
        let socket = bind_socket(listen, config.socket_buffer_bytes)?;
        let endpoint = quinn::Endpoint::new(endpoint_config()?, Some(server), socket, Arc::new(quinn::TokioRuntime))
            .map_err(|source| ClusterError::Bind { addr: listen, source })?;
        let peer_client = client_config(identity, ALPN_PEER, transport_config)?;
        let transport = Arc::new(QuicTransport {
            me,
            endpoint: endpoint.clone(),
            config,
            peer_client,
            peers: Mutex::new(HashMap::new()),
        });
        let acceptor = Acceptor {
            inbound,
            clients,
            refusals_logged: Arc::new(Mutex::new(HashSet::new())),
        };
        tokio::spawn(acceptor.run(endpoint));
        Ok(transport)
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint.local_addr().map_err(|source| ClusterError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })
    }

    /// Closes every connection; queued frames are dropped.
    pub fn close(&self) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"node shutting down");
        if let Ok(mut peers) = self.peers.lock() {
            peers.clear();
        }
    }

    fn writer_for(&self, to: SocketAddr) -> mpsc::Sender<Vec<u8>> {
        let mut peers = self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(queue) = peers.get(&to) {
            if !queue.is_closed() {
                return queue.clone();
            }
        }
        let (tx, rx) = mpsc::channel(self.config.peer_queue_frames);
        let writer = PeerWriter {
            addr: to,
            endpoint: self.endpoint.clone(),
            client: self.peer_client.clone(),
            config: self.config.clone(),
        };
        tokio::spawn(writer.run(rx));
        peers.insert(to, tx.clone());
        tx
    }
}

impl Transport for QuicTransport {
    fn send(&self, to: SocketAddr, envelope: Envelope) -> Result<()> {
        debug_assert_eq!(envelope.from, self.me, "a node sends only as itself");
        let frame = encode_frame(&envelope)?;
        self.writer_for(to).try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ClusterError::Backpressure(to.to_string()),
            mpsc::error::TrySendError::Closed(_) => ClusterError::ShuttingDown,
        })
    }
}

/// The round-trip time QUIC assumes before it has measured one.
const INITIAL_RTT: Duration = Duration::from_millis(100);

fn transport_config(config: &QuicConfig, loopback: bool) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_millis(config.keep_alive_ms)))
        .max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_millis(config.idle_timeout_ms)).ok())
        .stream_receive_window(quinn::VarInt::from_u32(config.stream_window_bytes))
        .receive_window(quinn::VarInt::from_u32(config.connection_window_bytes))
        .send_window(u64::from(config.connection_window_bytes))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(256))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(256))
        // Before a first RTT sample, QUIC assumes 333 ms and resends a lost
        // handshake packet after about a second: a client that dials a node
        // still starting would wait that long. Nodes and their clients sit
        // close together; 100 ms resends after about 0.3 s.
        .initial_rtt(INITIAL_RTT);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    if loopback {
        // Loopback always carries 64 KiB datagrams: start there. Under load
        // a receiver starved of CPU loses bursts of packets, which discovery
        // takes for a black hole; it then falls back to `min_mtu` until the
        // cooldown ends. Left at 1,200 bytes, that costs ten times the system
        // calls per megabyte, most of the CPU replication has.
        // (Handshake packets are padded to `min_mtu` and a long-header
        // packet holds at most 16 KiB, so the floor stays below that.)
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window(10 * u64::from(LOOPBACK_MTU));
        mtu.upper_bound(LOOPBACK_MTU)
            .black_hole_cooldown(Duration::from_secs(5));
        // One 64 KiB datagram per system call already; segmentation offload
        // would try to send several in one, over what a UDP send may hold.
        transport
            .initial_mtu(LOOPBACK_MTU)
            .min_mtu(LOOPBACK_MTU_MIN)
            .enable_segmentation_offload(false)
            .congestion_controller_factory(Arc::new(cubic));
    } else {
        mtu.upper_bound(1452);
    }
    transport.mtu_discovery_config(Some(mtu));
    transport
}

/// The UDP payload used on loopback: a 64 KiB datagram less IP and UDP headers, with room to spare.
const LOOPBACK_MTU: u16 = 65000;
/// What loopback falls back to after losses look like a black hole.
const LOOPBACK_MTU_MIN: u16 = 16000;

/// Accepts datagrams as large as UDP allows, so a peer may send loopback-sized packets.
fn endpoint_config() -> Result<quinn::EndpointConfig> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(65527)
        .map_err(|e| ClusterError::InvalidConfig(format!("UDP payload size: {e}")))?;
    Ok(config)
}

fn client_config(
    identity: &TlsIdentity,
    alpn: &[u8],
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig> {
    let crypto = QuicClientConfig::try_from(identity.client_config(alpn)?)
        .map_err(|e| ClusterError::Tls(format!("QUIC client crypto: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport);
    Ok(client)
}

fn bind_socket(addr: SocketAddr, buffer_bytes: usize) -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_err = |source| ClusterError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(bind_err)?;
    // Buffers are a hint: the kernel caps them at net.core.[rw]mem_max.
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    socket.bind(&addr.into()).map_err(bind_err)?;
    Ok(socket.into())
}

/// Serves incoming connections.
#[derive(Clone)]
struct Acceptor {
    inbound: mpsc::Sender<Inbound>,
    clients: Arc<dyn ClientService>,
    /// Remote addresses whose refusal was already logged: log once, bounded.
    refusals_logged: Arc<Mutex<HashSet<SocketAddr>>>,
}

const REFUSALS_LOGGED_MAX: usize = 1024;

impl Acceptor {
    async fn run(self, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let acceptor = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                if let Err(reason) = acceptor.serve(incoming).await {
                    acceptor.log_refusal(remote, &reason);
                }
            });
        }
    }

    fn log_refusal(&self, remote: SocketAddr, reason: &str) {
        let mut logged = self.refusals_logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.len() < REFUSALS_LOGGED_MAX && logged.insert(remote) {
            tracing::warn!(%remote, reason, "refused a connection");
        } else {
            tracing::debug!(%remote, reason, "refused a connection");
        }
    }

    async fn serve(&self, incoming: quinn::Incoming) -> std::result::Result<(), String> {
        let connection = match incoming.await {
            Ok(connection) => connection,
            // A peer (or this node) stopping closes its handshakes: not a
            // refusal worth a warning.
            Err(e) if closed_while_stopping(&e) => {
                tracing::debug!(error = %e, "a connection closed during its handshake");
                return Ok(());
            }
            Err(e) => return Err(format!("handshake failed: {e}")),
        };
        let alpn = connection
            .handshake_data()
            .and_then(|data| data.downcast::<HandshakeData>().ok())
            .and_then(|data| data.protocol)
            .ok_or("no application protocol negotiated")?;
        let certs = connection
            .peer_identity()
            .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
            .ok_or("no client certificate")?;
        if alpn == ALPN_PEER {
            let Some(node) = certs.first().and_then(node_id_from_cert) else {
                connection.close(quinn::VarInt::from_u32(1), b"not a node certificate");
                return Err("peer protocol without a node certificate".to_string());
            };
            self.serve_peer(connection, node).await;
        } else if alpn == ALPN_CLIENT {
            self.serve_clients(connection).await;
        }
        Ok(())
    }

    async fn serve_peer(&self, connection: quinn::Connection, node: NodeId) {
        while let Ok(stream) = connection.accept_uni().await {
            let inbound = self.inbound.clone();
            let connection = connection.clone();
            tokio::spawn(async move {
                match read_peer_stream(stream, node, inbound).await {
                    Ok(()) => {}
                    Err(StreamError::Lost(reason)) => tracing::debug!(%node, reason, "peer stream ended"),
                    Err(StreamError::Bad(reason)) => {
                        tracing::warn!(%node, reason, "closing a peer connection after a bad stream");
                        connection.close(quinn::VarInt::from_u32(2), b"bad frame");
                    }
                }
            });
        }
    }

    async fn serve_clients(&self, connection: quinn::Connection) {
        while let Ok((send, recv)) = connection.accept_bi().await {
            let clients = self.clients.clone();
            tokio::spawn(async move {
                if let Err(reason) = serve_client_request(send, recv, clients).await {
                    tracing::debug!(reason, "client request failed");
                }
            });
        }
    }
}

/// Why a stream stopped being read.
enum StreamError {
    /// The connection went away: normal when a peer stops or restarts.
    Lost(String),
    /// The peer broke the protocol.
    Bad(String),
}

impl From<StreamError> for String {
    fn from(error: StreamError) -> String {
        match error {
            StreamError::Lost(reason) | StreamError::Bad(reason) => reason,
        }
    }
}

/// Reads one frame body; `Ok(None)` when the stream ended cleanly between frames.
async fn read_frame(stream: &mut quinn::RecvStream) -> std::result::Result<Option<Vec<u8>>, StreamError> {
    let mut prefix = [0u8; 4];
    match stream.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            return Err(StreamError::Bad("stream ended inside a frame length".to_string()))
        }
        Err(quinn::ReadExactError::ReadError(e)) => {
            return Err(StreamError::Lost(format!("reading a frame length: {e}")))
        }
    }
    let len = frame_body_len(prefix).map_err(|e| StreamError::Bad(e.to_string()))?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => StreamError::Bad("stream ended inside a frame body".to_string()),
        quinn::ReadExactError::ReadError(e) => StreamError::Lost(format!("reading a frame body: {e}")),
    })?;
    Ok(Some(body))
}

/// Delivers a peer's frames upward. A frame that does not decode is dropped
/// with a log line; a broken length prefix or a forged sender ends the stream.
async fn read_peer_stream(
    mut stream: quinn::RecvStream,
    node: NodeId,
    inbound: mpsc::Sender<Inbound>,
) -> std::result::Result<(), StreamError> {
    while let Some(body) = read_frame(&mut stream).await? {
        let envelope = match decode_envelope(&body) {
            Ok(envelope) => envelope,
            Err(e) => {
                tracing::warn!(%node, error = %e, "dropped an undecodable frame");
                continue;
            }
        };
        if envelope.from != node {
            return Err(StreamError::Bad(format!(
                "node {node} sent a frame claiming to be from {}",
                envelope.from
            )));
        }
        if inbound.send(Inbound { from: node, envelope }).await.is_err() {
            return Ok(()); // the node is shutting down
        }
    }
    Ok(())
}

async fn serve_client_request(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    clients: Arc<dyn ClientService>,
) -> std::result::Result<(), String> {
    let response = match read_frame(&mut recv).await.map_err(String::from)? {
        None => return Err("empty request stream".to_string()),
        Some(body) => match decode_body::<ClientEnvelope<NodeRequest>>(&body) {
            Ok(request) if request.version == PROTOCOL_VERSION => clients.handle(request.body).await,
            Ok(request) => NodeResponse::Error(format!(
                "protocol version {} is not {PROTOCOL_VERSION}",
                request.version
            )),
            Err(e) => NodeResponse::Error(format!("malformed request: {e}")),
        },
    };
    let frame = encode_frame(&ClientEnvelope {
        version: PROTOCOL_VERSION,
        body: response,
    })
    .map_err(|e| e.to_string())?;
    send.write_chunk(Bytes::from(frame)).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    Ok(())
}

/// Owns the connection towards one peer and writes queued frames to it.
struct PeerWriter {
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    config: QuicConfig,
}

impl PeerWriter {
    async fn run(self, mut queue: mpsc::Receiver<Vec<u8>>) {
        let mut backoff_ms = self.config.reconnect_min_ms;
        while let Some(first) = queue.recv().await {
            let mut stream = match self.connect().await {
                Ok(stream) => {
                    backoff_ms = self.config.reconnect_min_ms;
                    stream
                }
                Err(reason) => {
                    tracing::debug!(peer = %self.addr, reason, backoff_ms, "peer unreachable; dropping a frame");
                    tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                    backoff_ms = (backoff_ms * 2).min(self.config.reconnect_max_ms);
                    continue;
                }
            };
            // Queued frames go out together, each handed to QUIC as it is.
            let mut batch = vec![Bytes::from(first)];
            loop {
                let mut bytes = batch.iter().map(Bytes::len).sum::<usize>();
                while bytes < self.config.write_batch_bytes {
                    match queue.try_recv() {
                        Ok(frame) => {
                            bytes += frame.len();
                            batch.push(Bytes::from(frame));
                        }
                        Err(_) => break,
                    }
                }
                if let Err(e) = stream.write_all_chunks(&mut batch).await {
                    tracing::debug!(peer = %self.addr, error = %e, "peer stream broke; reconnecting");
                    break;
                }
                batch.clear();
                match queue.recv().await {
                    Some(frame) => batch.push(Bytes::from(frame)),
                    None => return,
                }
            }
        }
    }

    async fn connect(&self) -> std::result::Result<quinn::SendStream, String> {
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), self.addr, CLUSTER_SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let connection = connecting.await.map_err(|e| e.to_string())?;
        connection.open_uni().await.map_err(|e| e.to_string())
    }
}

/// Whether a failure to connect is a handshake one side refused (a
/// certificate, TLS or QUIC version, or protocol the other does not take):
/// trying again cannot help, unlike a handshake that timed out.
pub fn is_handshake_refusal(error: &str) -> bool {
    refused_node_certificate(error)
        || refused_client_certificate(error)
        || error.contains("the cryptographic handshake failed")
        || error.contains("doesn't implement any supported version")
}

fn refused_node_certificate(error: &str) -> bool {
    error.contains("UnknownIssuer") || error.contains("invalid peer certificate")
}

fn refused_client_certificate(error: &str) -> bool {
    error.contains("UnknownCA") || error.contains("BadCertificate") || error.contains("CertificateRequired")
}

/// A TLS failure with what to do about it: the two sides hold certificates
/// of different clusters (a CA that did not sign the other's certificate).
fn with_tls_hint(error: String) -> String {
    if refused_node_certificate(&error) {
        format!(
            "{error}: the node's certificate is not signed by the cluster CA in this --certs directory \
             (ca.pem); use the certificate directory the cluster was made with"
        )
    } else if refused_client_certificate(&error) {
        format!(
            "{error}: the node refused this certificate (client.pem), which the cluster's CA did not sign; \
             use the certificate directory the cluster was made with"
        )
    } else {
        error
    }
}

/// A client of the cluster (the CLI, the client library): talks to nodes over
/// the client ALPN with a client certificate.
pub struct ClusterClient {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    seeds: Vec<SocketAddr>,
    /// One connection per node, reused across requests.
    connections: tokio::sync::Mutex<HashMap<SocketAddr, quinn::Connection>>,
    /// The seed that answered last, tried first next time.
    last_answered: tokio::sync::Mutex<Option<SocketAddr>>,
    /// Nodes whose last request failed, and when (see [`FAILED_MEMORY`]).
    failed: tokio::sync::Mutex<HashMap<SocketAddr, std::time::Instant>>,
}

/// How long establishing a connection may take: a dead node must not hold a
/// request for the whole request timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a node that failed a request is tried after the others (and
/// passed over by partition routing while another replica may serve).
const FAILED_MEMORY: Duration = Duration::from_secs(2);

/// Connections a client keeps open at most.
const CLIENT_CONNECTIONS_MAX: usize = 256;

impl ClusterClient {
    /// Must run inside a tokio runtime.
    pub fn new(identity: &TlsIdentity, seeds: Vec<SocketAddr>) -> Result<ClusterClient> {
        if seeds.is_empty() {
            return Err(ClusterError::InvalidConfig("no seed addresses given".to_string()));
        }
        let bind: SocketAddr = if seeds[0].is_ipv6() {
            "[::]:0".parse()
        } else {
            "0.0.0.0:0".parse()
        }
        .map_err(|e| ClusterError::InvalidConfig(format!("{e}")))?;
        let loopback = seeds.iter().all(|s| s.ip().is_loopback());
        // A client must notice a dead node quickly to fail over to the new
        // leader: short keep-alive, short idle timeout.
        let quick = QuicConfig {
            keep_alive_ms: 200,
            idle_timeout_ms: 800,
            ..QuicConfig::default()
        };
        let transport = Arc::new(transport_config(&quick, loopback));
        let client = client_config(identity, ALPN_CLIENT, transport)?;
        let socket = bind_socket(bind, QuicConfig::default().socket_buffer_bytes)?;
        let endpoint = quinn::Endpoint::new(endpoint_config()?, None, socket, Arc::new(quinn::TokioRuntime))
            .map_err(|source| ClusterError::Bind { addr: bind, source })?;
        Ok(ClusterClient {
            endpoint,
            client,
            seeds,
            connections: tokio::sync::Mutex::new(HashMap::new()),
            last_answered: tokio::sync::Mutex::new(None),
            failed: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Sends a request to the first seed that answers within `timeout`,
    /// starting with the one that answered last.
    pub async fn request(&self, request: NodeRequest, timeout: Duration) -> Result<NodeResponse> {
        let mut last_error = String::from("no seed tried");
        let preferred = *self.last_answered.lock().await;
        let mut seeds: Vec<SocketAddr> = preferred
            .into_iter()
            .chain(self.seeds.iter().copied().filter(|s| Some(*s) != preferred))
            .collect();
        {
            let failed = self.failed.lock().await;
            seeds.sort_by_key(|s| failed.get(s).is_some_and(|at| at.elapsed() < FAILED_MEMORY));
        }
        for seed in seeds {
            match self.request_ref(seed, &request, timeout).await {
                Ok(response) => {
                    *self.last_answered.lock().await = Some(seed);
                    return Ok(response);
                }
                // One node's `Unreachable` names it already: only its cause.
                // A refused handshake is kept over what later seeds say:
                // it is what the user must fix.
                Err(_) if is_handshake_refusal(&last_error) => {}
                Err(ClusterError::Unreachable { last_error: cause, .. }) => last_error = format!("{seed}: {cause}"),
                Err(e) => last_error = format!("{seed}: {e}"),
            }
        }
        Err(ClusterError::Unreachable {
            addrs: self.seeds.clone(),
            last_error,
        })
    }

    /// Sends a request to one node. `Unreachable` means the request was
    /// certainly not delivered; `NoAnswer` means it may have been.
    pub async fn request_to(&self, addr: SocketAddr, request: NodeRequest, timeout: Duration) -> Result<NodeResponse> {
        self.request_ref(addr, &request, timeout).await
    }

    /// Whether the last request to `addr` failed, less than
    /// [`FAILED_MEMORY`] ago.
    pub async fn failed_recently(&self, addr: SocketAddr) -> bool {
        self.failed
            .lock()
            .await
            .get(&addr)
            .is_some_and(|at| at.elapsed() < FAILED_MEMORY)
    }

    async fn request_ref(&self, addr: SocketAddr, request: &NodeRequest, timeout: Duration) -> Result<NodeResponse> {
        let answer = self.request_timed(addr, request, timeout).await;
        let mut failed = self.failed.lock().await;
        match &answer {
            Ok(_) => {
                failed.remove(&addr);
            }
            Err(_) => {
                if failed.len() >= CLIENT_CONNECTIONS_MAX {
                    failed.clear();
                }
                failed.insert(addr, std::time::Instant::now());
            }
        }
        answer
    }

    async fn request_timed(&self, addr: SocketAddr, request: &NodeRequest, timeout: Duration) -> Result<NodeResponse> {
        match tokio::time::timeout(timeout, self.request_one(addr, request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(failure)) => {
                self.connections.lock().await.remove(&addr);
                Err(match failure {
                    RequestFailure::NotSent(last_error) => ClusterError::Unreachable {
                        addrs: vec![addr],
                        last_error,
                    },
                    RequestFailure::Sent(reason) => ClusterError::NoAnswer { addr, reason },
                })
            }
            Err(_) => Err(ClusterError::NoAnswer {
                addr,
                reason: format!("no answer within {} ms", timeout.as_millis()),
            }),
        }
    }

    /// The open connection to `addr`, or a new one. The map is not held
    /// while connecting: a dead node's connect timeout must not hold up
    /// requests to the others.
    async fn connection(&self, addr: SocketAddr) -> std::result::Result<quinn::Connection, String> {
        if let Some(connection) = self.connections.lock().await.get(&addr) {
            if connection.close_reason().is_none() {
                return Ok(connection.clone());
            }
        }
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, CLUSTER_SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("no connection within {} ms", CONNECT_TIMEOUT.as_millis()))?
            .map_err(|e| with_tls_hint(e.to_string()))?;
        let mut connections = self.connections.lock().await;
        if connections.len() >= CLIENT_CONNECTIONS_MAX {
            connections.clear();
        }
        connections.insert(addr, connection.clone());
        Ok(connection)
    }

    async fn request_one(
        &self,
        addr: SocketAddr,
        request: &NodeRequest,
    ) -> std::result::Result<NodeResponse, RequestFailure> {
        let connection = self.connection(addr).await.map_err(RequestFailure::NotSent)?;
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| RequestFailure::NotSent(e.to_string()))?;
        let frame = encode_frame(&ClientEnvelope {
            version: PROTOCOL_VERSION,
            body: request,
        })
        .map_err(|e| RequestFailure::NotSent(e.to_string()))?;
        // A frame cut short is never processed: the node reads whole frames.
        // (A chunk is handed over as it is; `write_all` would copy it.)
        send.write_chunk(Bytes::from(frame))
            .await
            .map_err(|e| RequestFailure::NotSent(e.to_string()))?;
        let sent = |e: String| RequestFailure::Sent(e);
        send.finish().map_err(|e| sent(e.to_string()))?;
        let body = read_frame(&mut recv)
            .await
            .map_err(|e| sent(String::from(e)))?
            .ok_or_else(|| sent("the node closed the stream without answering".to_string()))?;
        let response: ClientEnvelope<NodeResponse> = decode_body(&body).map_err(|e| sent(e.to_string()))?;
        Ok(response.body)
    }
}

/// How a request failed, as far as the client can tell.
enum RequestFailure {
    /// The request never reached the node.
    NotSent(String),
    /// The request may have reached the node and taken effect.
    Sent(String),
}

/// Whether a handshake ended because an application closed it (a node
/// stopping closes its endpoint; during a handshake QUIC sends that as
/// `APPLICATION_ERROR`), not because of a certificate or protocol problem.
fn closed_while_stopping(error: &quinn::ConnectionError) -> bool {
    match error {
        quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed => true,
        quinn::ConnectionError::ConnectionClosed(close) => {
            close.error_code == quinn::TransportErrorCode::APPLICATION_ERROR
        }
        _ => false,
    }
}
