//! `runnel bench transport`: remote `send` throughput and `call` round trips
//! between two nodes in separate processes, beside plain TCP on loopback.
//!
//! A `runnel node --bench-actors` child runs node 1; this process runs node 2
//! and sends to node 1's `bench.sink`. Sends go in windows closed by a call to
//! the sink (calls travel the same ordered stream, so its answer means every
//! earlier message was handled), which keeps the sink's bounded queue from
//! overflowing, as any sender must.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runnel_cluster::tls::CertDir;
use runnel_cluster::{ClusterError, MemberState, Node, NodeConfig, NodeHandle, NodeId};
use runnel_verify::fixtures::procs::NodeLog;
use runnel_verify::fixtures::{free_addr, init_certs, scratch_dir, NodeCommand, NodeProcess};
use serde_json::json;

use super::median;

pub const SINK: &str = "bench.sink";
pub const ECHO: &str = "bench.echo";
const SERVER: NodeId = NodeId(1);
const CLIENT: NodeId = NodeId(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct Args {
    /// 100-byte messages sent.
    #[arg(long, default_value_t = 300_000)]
    small_messages: u64,
    /// 16 KiB messages sent.
    #[arg(long, default_value_t = 30_000)]
    large_messages: u64,
    /// Call round trips timed.
    #[arg(long, default_value_t = 5_000)]
    calls: u64,
    /// Messages between two synchronising calls.
    #[arg(long, default_value_t = 8_192)]
    window: u64,
}

/// Registers the actors this benchmark talks to on a node (`runnel node
/// --bench-actors`): `bench.sink` counts messages and answers a call with
/// the count so far; `bench.echo` answers a call with its payload.
pub fn spawn_actors(node: &NodeHandle) -> Result<(), ClusterError> {
    let mut sink = node.register(SINK, 65536)?;
    tokio::spawn(async move {
        let mut count: u64 = 0;
        while let Some(message) = sink.recv().await {
            match message.reply {
                Some(reply) => {
                    let _ = reply.reply(count.to_le_bytes().to_vec());
                }
                None => count += 1,
            }
        }
    });
    let mut echo = node.register(ECHO, 4096)?;
    tokio::spawn(async move {
        while let Some(message) = echo.recv().await {
            if let Some(reply) = message.reply {
                let _ = reply.reply(message.payload);
            }
        }
    });
    Ok(())
}

/// Runs the benchmark; `exe` is the `runnel` binary the server node runs.
pub fn run(args: Args, exe: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.window >= 1 && args.window < 60_000,
        "--window must be in [1, 60000)"
    );
    let scratch = scratch_dir("runnel-bench-transport-", None)?;
    let certs = init_certs(scratch.path(), CLIENT.0)?;
    let (server_addr, client_addr) = (free_addr()?, free_addr()?);
    let _server = spawn_server(exe, scratch.path(), &certs, server_addr)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let figures = runtime.block_on(async {
        let identity = CertDir::new(&certs).node_identity(CLIENT)?;
        let config = NodeConfig::new(CLIENT, client_addr, vec![server_addr], 1);
        let node = Node::start(config, &identity).await?;
        let handle = node.handle();
        wait_until_alive(&handle, SERVER).await?;
        let small = send_throughput(&handle, 100, args.small_messages, args.window).await?;
        let large = send_throughput(&handle, 16 << 10, args.large_messages, args.window.min(2048)).await?;
        let calls = call_latencies(&handle, args.calls).await?;
        anyhow::Ok((small, large, calls))
    })?;
    let (small, large, (call_p50_us, call_p99_us)) = figures;
    let tcp_small = tcp_throughput(100, args.small_messages)?;
    let tcp_large = tcp_throughput(16 << 10, args.large_messages)?;
    let (tcp_p50_us, tcp_p99_us) = tcp_round_trips(args.calls)?;
    for (size, quic, tcp) in [(100, small, tcp_small), (16 << 10, large, tcp_large)] {
        println!(
            "{}",
            json!({"bench": "transport", "case": "send", "message_bytes": size, "messages_per_s": quic.0,
                "mb_per_s": quic.1, "tcp_messages_per_s": tcp.0, "tcp_mb_per_s": tcp.1, "ratio_to_tcp": quic.1 / tcp.1})
        );
    }
    println!(
        "{}",
        json!({"bench": "transport", "case": "call", "message_bytes": 100, "calls": args.calls,
            "p50_us": call_p50_us, "p99_us": call_p99_us, "tcp_p50_us": tcp_p50_us, "tcp_p99_us": tcp_p99_us})
    );
    println!("\ntransport benchmark: two nodes in separate processes over QUIC with mutual TLS, loopback");
    println!(
        "  send 100 B : {:>10.0} msg/s {:>8.1} MB/s | plain TCP {:>10.0} msg/s {:>8.1} MB/s",
        small.0, small.1, tcp_small.0, tcp_small.1
    );
    println!(
        "  send 16 KiB: {:>10.0} msg/s {:>8.1} MB/s | plain TCP {:>10.0} msg/s {:>8.1} MB/s",
        large.0, large.1, tcp_large.0, tcp_large.1
    );
    println!("  call 100 B round trip: p50 {call_p50_us:.0} µs, p99 {call_p99_us:.0} µs | plain TCP ping-pong p50 {tcp_p50_us:.0} µs, p99 {tcp_p99_us:.0} µs");
    Ok(())
}

/// Node 1 alone (no seeds), with the benchmark's actors; killed when dropped.
fn spawn_server(exe: &Path, scratch: &Path, certs: &Path, listen: std::net::SocketAddr) -> anyhow::Result<NodeProcess> {
    let command = NodeCommand::new(exe, scratch, certs, &[])
        .flags(["--bench-actors"])
        .env("RUST_LOG", "warn")
        .log(NodeLog::Inherit);
    command.spawn(SERVER, listen).context("starting the server node")
}

async fn wait_until_alive(handle: &NodeHandle, node: NodeId) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let alive = handle
            .members()
            .iter()
            .any(|m| m.node == node && m.state == MemberState::Alive);
        if alive && handle.call(node, ECHO, vec![1], CALL_TIMEOUT).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("node {node} did not come up within 20 s")
}

/// A call that waits for room when the queue towards the peer is full.
async fn call_with_backpressure(handle: &NodeHandle, name: &str, payload: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let deadline = Instant::now() + CALL_TIMEOUT;
    loop {
        match handle.call(SERVER, name, payload.clone(), CALL_TIMEOUT).await {
            Err(ClusterError::Backpressure(_)) if Instant::now() < deadline => tokio::task::yield_now().await,
            other => return Ok(other?),
        }
    }
}

async fn sink_count(handle: &NodeHandle) -> anyhow::Result<u64> {
    let bytes = call_with_backpressure(handle, SINK, Vec::new()).await?;
    let word: [u8; 8] = bytes
        .as_slice()
        .try_into()
        .context("sink answered with a malformed count")?;
    Ok(u64::from_le_bytes(word))
}

/// (messages/s, MB/s) of sending `count` messages of `size` bytes.
async fn send_throughput(handle: &NodeHandle, size: usize, count: u64, window: u64) -> anyhow::Result<(f64, f64)> {
    let payload = vec![0xabu8; size];
    let before = sink_count(handle).await?;
    let started = Instant::now();
    let mut sent = 0;
    while sent < count {
        let batch_end = (sent + window).min(count);
        while sent < batch_end {
            match handle.send(SERVER, SINK, payload.clone()) {
                Ok(()) => sent += 1,
                Err(ClusterError::Backpressure(_)) => tokio::task::yield_now().await,
                Err(e) => return Err(e.into()),
            }
        }
        let received = sink_count(handle).await? - before;
        if received != sent {
            bail!("the sink received {received} of {sent} messages");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((count as f64 / seconds, (count * size as u64) as f64 / 1e6 / seconds))
}

/// p50 and p99 in microseconds of `calls` 100-byte echo calls.
async fn call_latencies(handle: &NodeHandle, calls: u64) -> anyhow::Result<(f64, f64)> {
    let mut micros = Vec::with_capacity(calls as usize);
    for _ in 0..calls {
        let started = Instant::now();
        handle.call(SERVER, ECHO, vec![7u8; 100], CALL_TIMEOUT).await?;
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(percentiles(&mut micros))
}

fn percentiles(values: &mut [f64]) -> (f64, f64) {
    let p99_index = ((values.len() as f64 * 0.99) as usize).min(values.len().saturating_sub(1));
    let p50 = median(values);
    (p50, values.get(p99_index).copied().unwrap_or(f64::NAN))
}

/// The same messages, length-prefixed over one buffered TCP connection.
fn tcp_throughput(size: usize, count: u64) -> anyhow::Result<(f64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (stream, _) = listener.accept()?;
        let mut reader = BufReader::with_capacity(1 << 20, stream);
        let mut body = vec![0u8; size];
        let mut received = 0;
        let mut prefix = [0u8; 4];
        while reader.read_exact(&mut prefix).is_ok() {
            reader.read_exact(&mut body[..u32::from_le_bytes(prefix) as usize])?;
            received += 1;
        }
        Ok(received)
    });
    let payload = vec![0xabu8; size];
    let started = Instant::now();
    let mut writer = BufWriter::with_capacity(1 << 20, TcpStream::connect(addr)?);
    for _ in 0..count {
        writer.write_all(&(size as u32).to_le_bytes())?;
        writer.write_all(&payload)?;
    }
    drop(writer);
    let received = reader.join().map_err(|_| anyhow::anyhow!("TCP reader panicked"))??;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(received == count, "TCP reader got {received} of {count}");
    Ok((count as f64 / seconds, (count * size as u64) as f64 / 1e6 / seconds))
}

/// p50/p99 microseconds of 100-byte ping-pongs over TCP.
fn tcp_round_trips(count: u64) -> anyhow::Result<(f64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut buf = [0u8; 100];
        while stream.read_exact(&mut buf).is_ok() {
            stream.write_all(&buf)?;
        }
        Ok(())
    });
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut buf = [7u8; 100];
    let mut micros = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let started = Instant::now();
        stream.write_all(&buf)?;
        stream.read_exact(&mut buf)?;
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    drop(stream);
    echo.join().map_err(|_| anyhow::anyhow!("TCP echo panicked"))??;
    Ok(percentiles(&mut micros))
}
