//! The TCP listener: one task per connection, each reading size-prefixed
//! frames (bounded), answering them in order, one at a time, as Kafka
//! brokers do, so responses never overtake each other.
//!
//! With TLS (`--kafka-tls`) a connection first completes a TLS 1.3
//! handshake (bounded by [`TLS_HANDSHAKE`]) in which the client presents a
//! certificate signed by the cluster CA; without it the listener is
//! plaintext and binds loopback addresses only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::api::{self, Context};
use crate::BrokerService;

/// A request frame's bytes at most (Runnel's batch limit plus room for the
/// request around it). Kafka's own default is 100 MiB.
pub const FRAME_BYTES_MAX: usize = runnel_storage::batch::BATCH_BYTES_HARD_LIMIT + (1 << 20);
/// Open Kafka connections per node at most; more are closed at once.
pub const CONNECTIONS_MAX: usize = 1024;
/// A connection with no request for this long is closed (Kafka's
/// `connections.max.idle.ms`).
pub const IDLE_CONNECTION: Duration = Duration::from_secs(600);
/// Bytes asked of the socket at least per read (small requests arrive
/// several to a read).
const READ_BYTES_MIN: usize = 64 << 10;
/// Produce requests of one connection whose batches are with the replicas
/// at once, at most (librdkafka's `max.in.flight` for an idempotent
/// producer, and Java's `max.in.flight.requests.per.connection`, are 5).
pub const IN_FLIGHT_MAX: usize = 5;
/// A connection's produce answers to come, in request order.
type Pending = FuturesOrdered<
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<BytesMut>, api::RequestError>> + Send>>,
>;
/// A TLS handshake that takes longer than this is abandoned.
pub const TLS_HANDSHAKE: Duration = Duration::from_secs(10);
/// How often a node retries recording its advertised address while the
/// controller is not reachable.
const REGISTER_RETRY: Duration = Duration::from_millis(500);

/// `runnel node --kafka-listen ADDR [--kafka-advertise HOST:PORT]`.
#[derive(Clone, Debug)]
pub struct KafkaListenerConfig {
    pub listen: SocketAddr,
    /// What Kafka clients are told to connect to (`host:port`).
    pub advertised: String,
    /// TLS settings (the node's certificate, client certificates required),
    /// or plaintext.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

/// A node's running Kafka listener.
pub struct KafkaListener {
    local_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl KafkaListener {
    /// Binds the listener, serves connections, and records the advertised
    /// address in the cluster's metadata (retrying until the controller
    /// answers), so every node's Metadata answers name this node.
    pub async fn start(config: KafkaListenerConfig, service: BrokerService) -> anyhow::Result<KafkaListener> {
        if config.tls.is_none() && !config.listen.ip().is_loopback() {
            bail!(
                "--kafka-listen {}: a plaintext Kafka listener binds a loopback address only (such as \
                 127.0.0.1:9092); add --kafka-tls to serve other addresses over TLS",
                config.listen
            );
        }
        runnel_actors::metadata::validate_advertised(&config.advertised)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("--kafka-listen {}: cannot listen", config.listen))?;
        let local_addr = listener.local_addr()?;
        let context = Arc::new(Context::new(service.clone()));
        let tls = config.tls.map(tokio_rustls::TlsAcceptor::from);
        tracing::info!(listen = %local_addr, advertised = %config.advertised, tls = tls.is_some(), "serving the Kafka protocol");
        let accept = tokio::spawn(accept_loop(listener, context, tls));
        let register = tokio::spawn(register(service, config.advertised));
        Ok(KafkaListener {
            local_addr,
            tasks: vec![accept, register],
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn shutdown(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for KafkaListener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn register(service: BrokerService, advertised: String) {
    let mut attempts = 0u64;
    loop {
        match service.register_kafka_listener(Some(advertised.clone())).await {
            Ok(()) => return,
            Err(e) => {
                attempts += 1;
                if attempts % 20 == 1 {
                    tracing::info!(error = %e, "recording this node's Kafka address; retrying");
                }
            }
        }
        tokio::time::sleep(REGISTER_RETRY).await;
    }
}

async fn accept_loop(listener: TcpListener, context: Arc<Context>, tls: Option<tokio_rustls::TlsAcceptor>) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a Kafka connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = CONNECTIONS_MAX, "too many Kafka connections; closing the new one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let context = Context {
            peer: Some(peer),
            ..Context::clone(&context)
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_stream(&context, stream, tls).await {
                match e.downcast_ref::<std::io::Error>().map(std::io::Error::kind) {
                    // The client went away: its own business.
                    Some(std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) => {
                        tracing::debug!(%peer, error = %e, "Kafka client disconnected")
                    }
                    _ => tracing::warn!(%peer, error = %format!("{e:#}"), "closing a Kafka connection"),
                }
            }
            drop(slot);
        });
    }
}

/// Serves a connection, after a TLS handshake when the listener has TLS.
async fn serve_stream(
    context: &Context,
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> anyhow::Result<()> {
    let Some(tls) = tls else {
        return serve_connection(context, stream).await;
    };
    let stream = match tokio::time::timeout(TLS_HANDSHAKE, tls.accept(stream)).await {
        Err(_) => bail!("no TLS handshake within {} s", TLS_HANDSHAKE.as_secs()),
        Ok(handshake) => handshake.context("TLS handshake (a client needs a certificate signed by the cluster CA)")?,
    };
    serve_connection(context, stream).await
}

/// Answers one connection's requests, in order, until it closes. Produce
/// requests are pipelined: up to [`IN_FLIGHT_MAX`] have their batches with
/// the replicas at once (handed over in request order, so each partition
/// keeps its order), while the next frames are read; their answers leave in
/// request order. Any other request waits until those are answered, then is
/// answered on its own, as before.
async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(context: &Context, stream: S) -> anyhow::Result<()> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut buffer = BytesMut::new();
    let mut pending = FuturesOrdered::new();
    loop {
        let frame = tokio::select! {
            // Biased: answers go out before more requests are read.
            biased;
            Some(answer) = pending.next(), if !pending.is_empty() => {
                if let Some(response) = answer? {
                    write_frame(&mut writer, response).await?;
                }
                continue;
            }
            frame = read_frame(&mut reader, &mut buffer), if pending.len() < IN_FLIGHT_MAX => frame?,
        };
        let Some(frame) = frame else {
            return drain(&mut pending, &mut writer).await;
        };
        if !api::is_produce(&frame) {
            drain(&mut pending, &mut writer).await?;
        }
        match api::accept(context, frame).await? {
            api::Accepted::Answered(Some(response)) => write_frame(&mut writer, response).await?,
            api::Accepted::Answered(None) => {}
            api::Accepted::Pending(answer) => pending.push_back(answer),
        }
    }
}

/// Writes every pending answer, in order.
async fn drain<W: AsyncWrite + Unpin>(pending: &mut Pending, writer: &mut W) -> anyhow::Result<()> {
    while let Some(answer) = pending.next().await {
        if let Some(response) = answer? {
            write_frame(writer, response).await?;
        }
    }
    Ok(())
}

/// The next request frame, or none at a clean end of stream. Frames are cut
/// from one buffer per connection, whose memory is reused once the frames
/// cut from it are dropped (a frame is handled before the next is read).
async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S, buffer: &mut BytesMut) -> anyhow::Result<Option<Bytes>> {
    while buffer.len() < 4 {
        let read = match tokio::time::timeout(IDLE_CONNECTION, fill(stream, buffer, 4)).await {
            Err(_) => bail!("idle for {} s", IDLE_CONNECTION.as_secs()),
            Ok(read) => read.context("reading a frame size")?,
        };
        if read == 0 && buffer.is_empty() {
            return Ok(None);
        }
        if read == 0 {
            bail!("the connection closed inside a frame size");
        }
    }
    let size = frame_size(i32::from_be_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]))?;
    while buffer.len() < 4 + size {
        if fill(stream, buffer, 4 + size).await.context("reading a frame")? == 0 {
            bail!("the connection closed inside a frame of {size} bytes");
        }
    }
    buffer.advance(4);
    Ok(Some(buffer.split_to(size).freeze()))
}

/// Reads what the stream has into `buffer`, with room for `wanted` bytes.
async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buffer: &mut BytesMut, wanted: usize) -> std::io::Result<usize> {
    buffer.reserve(wanted.saturating_sub(buffer.len()).max(READ_BYTES_MIN));
    stream.read_buf(buffer).await
}

/// A frame size from the wire, checked against [`FRAME_BYTES_MAX`].
pub fn frame_size(size: i32) -> anyhow::Result<usize> {
    match usize::try_from(size) {
        Ok(size) if size <= FRAME_BYTES_MAX => Ok(size),
        _ => bail!("a request frame of {size} bytes is outside [0, {FRAME_BYTES_MAX}] (is this a Kafka client?)"),
    }
}

async fn write_frame<S: AsyncWrite + Unpin>(stream: &mut S, body: BytesMut) -> anyhow::Result<()> {
    let size = u32::try_from(body.len()).context("response too large")?;
    stream.write_all(&size.to_be_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await?;
    Ok(())
}
