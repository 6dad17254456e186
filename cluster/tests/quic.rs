//! Nodes in one process over real QUIC on loopback: remote send and call, the
//! errors callers see, and peers that break the protocol.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicClientConfig;
use runnel_cluster::protocol::{
    encode_frame, ClientEnvelope, Envelope, NodeRequest, NodeResponse, PeerFrame, ALPN_CLIENT, ALPN_PEER,
    PROTOCOL_VERSION,
};
use runnel_cluster::tls::{CertDir, TlsIdentity, CLUSTER_SERVER_NAME};
use runnel_cluster::{ClusterError, MemberState, MembershipEvent, Node, NodeConfig, NodeHandle, NodeId};
use runnel_verify::fixtures::free_addr;

const DEADLINE: Duration = Duration::from_secs(20);

struct TestCluster {
    _scratch: tempfile::TempDir,
    certs: CertDir,
    nodes: Vec<Node>,
    addrs: Vec<SocketAddr>,
}

/// `count` nodes, each seeded with node 1's address.
async fn start_cluster(count: u32) -> TestCluster {
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = CertDir::new(scratch.path().join("certs"));
    let ids: Vec<NodeId> = (1..=count + 1).map(NodeId).collect();
    certs.init(&ids, &[]).expect("certs");
    let addrs: Vec<SocketAddr> = (0..count).map(|_| free_addr().expect("a free loopback port")).collect();
    let mut nodes = Vec::new();
    for (i, &addr) in addrs.iter().enumerate() {
        let id = NodeId(i as u32 + 1);
        let config = NodeConfig::new(id, addr, vec![addrs[0]], 1);
        let identity = certs.node_identity(id).expect("identity");
        nodes.push(Node::start(config, &identity).await.expect("start"));
    }
    let cluster = TestCluster {
        _scratch: scratch,
        certs,
        nodes,
        addrs,
    };
    for node in &cluster.nodes {
        wait_all_alive(&node.handle(), count).await;
    }
    cluster
}

async fn wait_all_alive(handle: &NodeHandle, count: u32) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let members = handle.members();
        if members.len() == count as usize && members.iter().all(|m| m.state == MemberState::Alive) {
            return;
        }
        assert!(Instant::now() < deadline, "node {} sees {members:?}", handle.id());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_send_and_call_between_nodes() {
    let cluster = start_cluster(3).await;
    let (one, two, three) = (
        cluster.nodes[0].handle(),
        cluster.nodes[1].handle(),
        cluster.nodes[2].handle(),
    );

    tracing::info!("phase: an echo actor on node 3 answers calls from node 1");
    let mut echo = three.register("echo", 16).expect("register");
    tokio::spawn(async move {
        while let Some(message) = echo.recv().await {
            if let Some(reply) = message.reply {
                let mut answer = format!("from {}: ", message.from).into_bytes();
                answer.extend_from_slice(&message.payload);
                reply.reply(answer).expect("reply");
            }
        }
    });
    let answer = one
        .call(NodeId(3), "echo", b"hello".to_vec(), DEADLINE)
        .await
        .expect("call");
    assert_eq!(answer, b"from 1: hello");

    tracing::info!("phase: one-way sends arrive in order with the sender's id");
    let mut sink = two.register("sink", 1000).expect("register");
    for i in 0..100u32 {
        one.send(NodeId(2), "sink", i.to_le_bytes().to_vec()).expect("send");
    }
    for i in 0..100u32 {
        let message = tokio::time::timeout(DEADLINE, sink.recv())
            .await
            .expect("in time")
            .expect("message");
        assert_eq!((message.from, message.payload), (NodeId(1), i.to_le_bytes().to_vec()));
    }
    assert!(matches!(two.register("sink", 1), Err(ClusterError::NameTaken(_))));

    tracing::info!("phase: errors name what went wrong");
    let err = one
        .call(NodeId(3), "nobody", vec![], DEADLINE)
        .await
        .expect_err("unknown actor");
    assert!(
        matches!(err, ClusterError::UnknownActor { node: NodeId(3), .. }),
        "{err}"
    );
    let err = one.send(NodeId(9), "sink", vec![]).expect_err("unknown node");
    assert!(matches!(err, ClusterError::UnknownNode(NodeId(9))), "{err}");
    let mut silent = three.register("silent", 4).expect("register");
    let err = one
        .call(NodeId(3), "silent", vec![], Duration::from_millis(300))
        .await
        .expect_err("no answer");
    assert!(
        matches!(err, ClusterError::CallTimeout { timeout_ms: 300, .. }),
        "{err}"
    );
    let held = silent.recv().await.expect("the call arrived");
    drop(held);
    let local = three
        .call(NodeId(3), "echo", b"self".to_vec(), DEADLINE)
        .await
        .expect("local call");
    assert_eq!(local, b"from 3: self");

    tracing::info!("phase: subscribers hear NodeDown when a node stops");
    let mut events = one.subscribe();
    let mut cluster = cluster;
    cluster.nodes[2].shutdown();
    let down = tokio::time::timeout(DEADLINE, async {
        loop {
            match events.recv().await {
                Ok(MembershipEvent::NodeDown { node, .. }) => return node,
                Ok(_) => continue,
                Err(e) => panic!("event stream: {e}"),
            }
        }
    })
    .await
    .expect("NodeDown in time");
    assert_eq!(down, NodeId(3));
}

fn quic_client(identity: &TlsIdentity, alpn: &[u8]) -> (quinn::Endpoint, quinn::ClientConfig) {
    let crypto = QuicClientConfig::try_from(identity.client_config(alpn).expect("rustls config")).expect("quic crypto");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    (endpoint, quinn::ClientConfig::new(Arc::new(crypto)))
}

fn envelope_from(from: u32, payload: &[u8]) -> Vec<u8> {
    let envelope = Envelope {
        version: PROTOCOL_VERSION,
        from: NodeId(from),
        frame: PeerFrame::Send {
            to: "sink".to_string(),
            payload: payload.to_vec(),
        },
    };
    encode_frame(&envelope).expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_break_the_protocol_are_cut_off_and_the_node_keeps_serving() {
    let cluster = start_cluster(2).await;
    let one = cluster.nodes[0].handle();
    let mut sink = one.register("sink", 100).expect("register");
    // Node 3 has a valid certificate but is not otherwise part of the cluster.
    let (endpoint, config) = quic_client(&cluster.certs.node_identity(NodeId(3)).expect("identity"), ALPN_PEER);

    tracing::info!("phase: a garbage frame is dropped and the stream goes on");
    let connection = endpoint
        .connect_with(config.clone(), cluster.addrs[0], CLUSTER_SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    let mut stream = connection.open_uni().await.expect("stream");
    stream
        .write_all(&[5, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0x99])
        .await
        .expect("write garbage");
    stream
        .write_all(&envelope_from(3, b"after garbage"))
        .await
        .expect("write");
    let message = tokio::time::timeout(DEADLINE, sink.recv())
        .await
        .expect("in time")
        .expect("message");
    assert_eq!(
        (message.from, message.payload.as_slice()),
        (NodeId(3), &b"after garbage"[..])
    );

    tracing::info!("phase: a frame claiming another sender closes the connection");
    stream.write_all(&envelope_from(2, b"forged")).await.expect("write");
    let closed = tokio::time::timeout(DEADLINE, connection.closed())
        .await
        .expect("connection closed in time");
    assert!(closed.to_string().contains("bad frame"), "{closed}");

    tracing::info!("phase: an oversized length prefix closes the connection");
    let connection = endpoint
        .connect_with(config, cluster.addrs[0], CLUSTER_SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    let mut stream = connection.open_uni().await.expect("stream");
    stream.write_all(&u32::MAX.to_le_bytes()).await.expect("write");
    tokio::time::timeout(DEADLINE, connection.closed())
        .await
        .expect("connection closed in time");

    tracing::info!("phase: a client certificate cannot speak the peer protocol");
    let (client_endpoint, client_config) = quic_client(&cluster.certs.client_identity().expect("client"), ALPN_PEER);
    let connecting = client_endpoint
        .connect_with(client_config, cluster.addrs[0], CLUSTER_SERVER_NAME)
        .expect("connect");
    if let Ok(connection) = connecting.await {
        if let Ok(mut stream) = connection.open_uni().await {
            let _ = stream.write_all(&envelope_from(3, b"from a client")).await;
        }
        let closed = tokio::time::timeout(DEADLINE, connection.closed())
            .await
            .expect("closed in time");
        assert!(closed.to_string().contains("not a node certificate"), "{closed}");
    }

    tracing::info!("phase: a malformed client request gets an error answer");
    let (client_endpoint, client_config) = quic_client(&cluster.certs.client_identity().expect("client"), ALPN_CLIENT);
    let connection = client_endpoint
        .connect_with(client_config, cluster.addrs[0], CLUSTER_SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, mut recv) = connection.open_bi().await.expect("stream");
    send.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).await.expect("write");
    send.finish().expect("finish");
    let answer = recv.read_to_end(1 << 20).await.expect("answer");
    let response: ClientEnvelope<NodeResponse> = postcard::from_bytes(&answer[4..]).expect("decodes");
    assert!(
        matches!(response.body, NodeResponse::Error(ref e) if e.contains("malformed")),
        "{:?}",
        response.body
    );

    tracing::info!("phase: the node still serves the cluster");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sink.recv())
            .await
            .is_err(),
        "no forged message arrived"
    );
    let two = cluster.nodes[1].handle();
    two.send(NodeId(1), "sink", b"still here".to_vec()).expect("send");
    let message = tokio::time::timeout(DEADLINE, sink.recv())
        .await
        .expect("in time")
        .expect("message");
    assert_eq!(message.payload, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reach_client_services_and_nothing_else() {
    let cluster = start_cluster(1).await;
    let one = cluster.nodes[0].handle();
    let mut service = one.register("client.echo", 8).expect("register");
    let _internal = one.register("internal", 8).expect("register");
    tokio::spawn(async move {
        while let Some(message) = service.recv().await {
            if let Some(reply) = message.reply {
                let _ = reply.reply(message.payload);
            }
        }
    });
    let client = runnel_cluster::quic::ClusterClient::new(
        &cluster.certs.client_identity().expect("client"),
        cluster.addrs.clone(),
    )
    .expect("client");
    for i in 0..3u8 {
        let request = NodeRequest::Service {
            name: "client.echo".to_string(),
            payload: vec![i],
        };
        let response = client.request(request, DEADLINE).await.expect("request");
        assert_eq!(
            response,
            NodeResponse::Service(vec![i]),
            "the connection is reused across requests"
        );
    }
    let request = NodeRequest::Service {
        name: "internal".to_string(),
        payload: vec![],
    };
    let response = client.request(request, DEADLINE).await.expect("request");
    assert_eq!(
        response,
        NodeResponse::Error("no client service named \"internal\"".to_string())
    );
}
