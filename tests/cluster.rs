//! Real `runnel node` processes on 127.0.0.x forming a cluster over QUIC with
//! mutual TLS, watched through `runnel status --json` as a user would.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;

const FORM_TIMEOUT: Duration = Duration::from_secs(30);

fn all_alive(states: &Option<Vec<(u64, String, u64)>>, count: usize) -> bool {
    states
        .as_ref()
        .is_some_and(|s| s.len() == count && s.iter().all(|(_, state, _)| state == "alive"))
}

#[test]
fn five_node_processes_form_a_cluster_and_see_a_kill_and_a_restart() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = scratch.path().join("certs");
    certs_init(&certs, 5);
    let addrs: Vec<_> = (0..5)
        .map(|i| free_addr_on_host(10 + i).expect("a free loopback address"))
        .collect();
    let seeds = &addrs[..3];

    eprintln!("phase: start five nodes with the first three as seeds");
    let mut nodes: Vec<NodeProcess> = addrs
        .iter()
        .enumerate()
        .map(|(i, &a)| start_node(i as u32 + 1, a, seeds, &certs, scratch.path()))
        .collect();
    for node in &nodes {
        wait_for(
            &format!("node {} to see five alive nodes", node.id),
            FORM_TIMEOUT,
            || all_alive(&states(node.addr, &certs), 5),
        );
    }

    eprintln!("phase: SIGKILL node 5; the others mark it dead");
    nodes[4].kill();
    for node in &nodes[..4] {
        let took = wait_for(
            &format!("node {} to mark node 5 dead", node.id),
            Duration::from_millis(DEAD_MS) * 10,
            || states(node.addr, &certs).is_some_and(|s| s.iter().any(|(id, state, _)| *id == 5 && state == "dead")),
        );
        eprintln!(
            "node {} saw node 5 dead {took:?} after the kill was noticed here",
            node.id
        );
    }

    eprintln!("phase: restart node 5 with the same data directory");
    nodes[4] = start_node(5, addrs[4], seeds, &certs, scratch.path());
    for node in &nodes {
        wait_for(&format!("node {} to see node 5 back", node.id), FORM_TIMEOUT, || {
            let s = states(node.addr, &certs);
            all_alive(&s, 5) && s.is_some_and(|s| s.iter().any(|(id, _, incarnation)| *id == 5 && *incarnation == 2))
        });
    }

    a_client_waits_for_seeds_too_busy_to_answer(&nodes, seeds, &certs, scratch.path());
}

/// A command started while no seed can answer (every node SIGSTOPped, as a
/// machine too loaded to finish a handshake) keeps asking, says so, and
/// answers once the nodes run again, as a Kafka client waits for its
/// bootstrap servers.
fn a_client_waits_for_seeds_too_busy_to_answer(
    nodes: &[NodeProcess],
    seeds: &[std::net::SocketAddr],
    certs: &std::path::Path,
    scratch: &std::path::Path,
) {
    eprintln!("phase: a command started while every node is paused answers once they resume");
    for node in nodes {
        node.signal("-STOP").expect("SIGSTOP a node");
    }
    let stderr_path = scratch.join("waiting-client.stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let seeds: Vec<String> = seeds.iter().map(|s| s.to_string()).collect();
    let child = runnel()
        .args(["topic", "list", "--seeds", &seeds.join(","), "--certs"])
        .arg(certs)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn runnel topic list");
    let mut child = KilledOnDrop(Some(child));
    wait_for("the command to say it asks again", FORM_TIMEOUT, || {
        log_from(&stderr_path, 0).contains("no seed answered yet; asking again")
    });
    for node in nodes {
        node.signal("-CONT").expect("SIGCONT a node");
    }
    let mut status = None;
    wait_for("the command to finish", FORM_TIMEOUT, || {
        status = child.0.as_mut().and_then(|c| c.try_wait().expect("poll the command"));
        status.is_some()
    });
    let said = log_from(&stderr_path, 0);
    assert!(status.is_some_and(|s| s.success()), "topic list failed: {said}");
}

#[test]
fn a_node_from_another_ca_cannot_join_and_the_cluster_is_unaffected() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = scratch.path().join("certs");
    let foreign = scratch.path().join("foreign-certs");
    certs_init(&certs, 3);
    certs_init(&foreign, 4);
    let addrs: Vec<_> = (0..4)
        .map(|i| free_addr_on_host(20 + i).expect("a free loopback address"))
        .collect();
    let seeds = &addrs[..3];
    let nodes: Vec<NodeProcess> = (0..3)
        .map(|i| start_node(i as u32 + 1, addrs[i], seeds, &certs, scratch.path()))
        .collect();
    for node in &nodes {
        wait_for(&format!("node {} to see three alive", node.id), FORM_TIMEOUT, || {
            all_alive(&states(node.addr, &certs), 3)
        });
    }

    eprintln!("phase: node 4 with a certificate from another CA tries to join");
    let mut intruder = start_node(4, addrs[3], seeds, &foreign, scratch.path());
    wait_for("node 1 to refuse the intruder", FORM_TIMEOUT, || {
        nodes[0].log_text().contains("refused a connection")
    });
    assert!(intruder.is_running(), "the intruder keeps trying; nothing crashes");
    for node in &nodes {
        let s = states(node.addr, &certs);
        assert!(all_alive(&s, 3), "node {} sees {s:?}", node.id);
    }

    eprintln!("phase: a client with a foreign certificate gets a clear error");
    let output = status(addrs[0], &foreign);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("could not reach the cluster"), "{stderr}");
    assert!(
        stderr.contains("not signed by the cluster CA in this --certs directory"),
        "says what is wrong: {stderr}"
    );
}

#[test]
fn a_garbage_datagram_flood_does_not_crash_a_node() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = scratch.path().join("certs");
    certs_init(&certs, 2);
    let addrs: Vec<_> = (0..2)
        .map(|i| free_addr_on_host(30 + i).expect("a free loopback address"))
        .collect();
    let mut nodes: Vec<NodeProcess> = (0..2)
        .map(|i| start_node(i as u32 + 1, addrs[i], &addrs[..1], &certs, scratch.path()))
        .collect();
    for addr in &addrs {
        wait_for("two nodes to form", FORM_TIMEOUT, || {
            all_alive(&states(*addr, &certs), 2)
        });
    }

    eprintln!("phase: 20,000 datagrams of garbage, some shaped like QUIC long headers");
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    for i in 0..20_000u32 {
        let len = 1 + (i as usize * 7919) % 1400;
        let mut datagram: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        if i % 3 == 0 {
            datagram[0] = 0xc0; // long header, initial packet
            if len > 5 {
                datagram[1..5].copy_from_slice(&1u32.to_be_bytes()); // QUIC v1
            }
        }
        let _ = socket.send_to(&datagram, addrs[0]);
    }

    eprintln!("phase: the node is still running and serving");
    assert!(nodes[0].is_running(), "node 1 died:\n{}", nodes[0].log_text());
    wait_for("node 1 to answer status after the flood", FORM_TIMEOUT, || {
        all_alive(&states(addrs[0], &certs), 2)
    });
    assert!(nodes[1].is_running());
}

#[test]
fn config_file_and_environment_variables_work_and_bad_input_is_named() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = scratch.path().join("certs");
    certs_init(&certs, 2);
    let addr = free_addr_on_host(40).expect("a free loopback address");

    eprintln!("phase: a node configured by a TOML file, watched through RUNNEL_SEEDS/RUNNEL_CERTS");
    let config = scratch.path().join("node.toml");
    let text = format!(
        "id = 1\nlisten = \"{addr}\"\ndata = \"{}\"\ncerts = \"{}\"\nseeds = [\"{addr}\"]\n",
        scratch.path().join("data-1").display(),
        certs.display()
    );
    std::fs::write(&config, text).expect("write config");
    let log = std::fs::File::create(scratch.path().join("node-1.log")).expect("log");
    let mut child = runnel()
        .arg("node")
        .arg("--config")
        .arg(&config)
        .stderr(log)
        .spawn()
        .expect("spawn");
    let guard = scopeguard(&mut child);
    wait_for("the configured node to answer", FORM_TIMEOUT, || {
        runnel()
            .args(["status", "--json"])
            .env("RUNNEL_SEEDS", addr.to_string())
            .env("RUNNEL_CERTS", &certs)
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("\"alive\""))
    });
    eprintln!("phase: a client config file (a relative certs directory is the file's)");
    let client_config = scratch.path().join("client.toml");
    std::fs::write(&client_config, format!("seeds = [\"{addr}\"]\ncerts = \"certs\"\n")).expect("write");
    let output = runnel()
        .args(["status", "--json", "--client-config"])
        .arg(&client_config)
        .env_remove("RUNNEL_SEEDS")
        .env_remove("RUNNEL_CERTS")
        .output()
        .expect("run");
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("\"alive\""),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    drop(guard);

    eprintln!("phase: bad input gets errors that name the problem");
    let data = scratch.path().join("data-2");
    let run = |args: &[&str]| {
        let output = runnel().args(args).output().expect("run");
        assert!(!output.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    let certs_arg = certs.to_str().expect("utf-8 path");
    let data_arg = data.to_str().expect("utf-8 path");
    let err = run(&[
        "node",
        "--id",
        "7",
        "--listen",
        "127.0.0.1:0",
        "--data",
        data_arg,
        "--certs",
        certs_arg,
    ]);
    assert!(err.contains("node-7.pem"), "{err}");
    let err = run(&[
        "node",
        "--id",
        "2",
        "--listen",
        "not-an-address",
        "--data",
        data_arg,
        "--certs",
        certs_arg,
    ]);
    assert!(err.contains("--listen"), "{err}");
    let data_1 = scratch.path().join("data-1");
    let err = run(&[
        "node",
        "--id",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--certs",
        certs_arg,
        "--data",
        data_1.to_str().expect("utf-8"),
    ]);
    assert!(err.contains("belongs to node 1"), "{err}");
    let client_run = |args: &[&str]| {
        let output = runnel()
            .args(args)
            .env_remove("RUNNEL_SEEDS")
            .env_remove("RUNNEL_CERTS")
            .env_remove("RUNNEL_CLIENT_CONFIG")
            .output()
            .expect("run");
        assert!(!output.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    let err = client_run(&["topic", "list"]);
    assert!(err.contains("no seeds: give --seeds, set RUNNEL_SEEDS"), "{err}");
    std::fs::write(&client_config, "seeds = [\"localhost:1\"]\nbogus = 1\n").expect("write");
    let err = client_run(&[
        "topic",
        "list",
        "--client-config",
        client_config.to_str().expect("utf-8"),
    ]);
    assert!(
        err.contains("client.toml") && err.contains("unknown field `bogus`"),
        "{err}"
    );
    std::fs::write(&config, "id = 1\nbogus = true\n").expect("write config");
    let err = run(&["node", "--config", config.to_str().expect("utf-8")]);
    assert!(err.contains("not a valid node configuration"), "{err}");
}

/// Kills the child when dropped, so a failing assertion cannot leak it.
fn scopeguard(child: &mut std::process::Child) -> impl Drop + '_ {
    struct Guard<'a>(&'a mut std::process::Child);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    Guard(child)
}

/// A child process SIGKILLed when dropped unless taken out first.
struct KilledOnDrop(Option<std::process::Child>);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A node's log from byte `from` on.
fn log_from(log: &std::path::Path, from: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.get(from..).unwrap_or_default().to_string()
}

#[test]
fn a_clean_restart_logs_no_warning_and_names_partitions_and_a_create_waits_for_the_third_node() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let certs = scratch.path().join("certs");
    certs_init(&certs, 3);
    let addrs: Vec<_> = (0..3)
        .map(|i| free_addr_on_host(44 + i).expect("a free loopback address"))
        .collect();
    let start = |i: usize| start_node(i as u32 + 1, addrs[i], &addrs, &certs, scratch.path());
    let mut nodes: Vec<NodeProcess> = (0..3).map(start).collect();
    wait_for("the topic to be created", FORM_TIMEOUT, || {
        runnel()
            .args([
                "topic",
                "create",
                "named",
                "-p",
                "2",
                "-r",
                "3",
                "--seeds",
                &addrs[0].to_string(),
            ])
            .arg("--certs")
            .arg(&certs)
            .status()
            .is_ok_and(|s| s.success())
    });
    let stop_all = |nodes: &mut Vec<NodeProcess>| {
        for node in nodes.iter_mut() {
            assert!(
                node.stop(Duration::from_secs(10)).expect("stop"),
                "node {} stops on SIGTERM",
                node.id
            );
        }
    };
    stop_all(&mut nodes);

    let first_run: Vec<usize> = nodes
        .iter()
        .map(|n| std::fs::read_to_string(&n.log).map_or(0, |t| t.len()))
        .collect();
    // Nodes 1 and 2 first, and a create with replication 3 at once: the
    // controller leader waits a moment for the third node instead of
    // refusing (a cluster just started has not heard from every node yet).
    nodes = (0..2).map(start).collect();
    let create = runnel()
        .args([
            "topic",
            "create",
            "second",
            "-p",
            "1",
            "-r",
            "3",
            "--seeds",
            &addrs[0].to_string(),
        ])
        .arg("--certs")
        .arg(&certs)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runnel topic create");
    let mut create = KilledOnDrop(Some(create));
    wait_for("the controller leader to wait for a third node", FORM_TIMEOUT, || {
        nodes
            .iter()
            .zip(&first_run)
            .any(|(n, &from)| log_from(&n.log, from).contains("placement waits for more live nodes"))
    });
    nodes.push(start(2));
    let created = create
        .0
        .take()
        .expect("spawned")
        .wait_with_output()
        .expect("runnel topic create");
    assert!(created.status.success(), "{created:?}");
    for (node, &from) in nodes.iter().zip(&first_run) {
        wait_for(
            &format!("node {} to host its replicas again", node.id),
            FORM_TIMEOUT,
            || {
                let log = log_from(&node.log, from);
                log.contains("replica started partition=named/0") && log.contains("replica started partition=named/1")
            },
        );
    }
    stop_all(&mut nodes);
    for (node, &from) in nodes.iter().zip(&first_run) {
        let whole = std::fs::read_to_string(&node.log).expect("log");
        let noisy: Vec<&str> = whole
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        assert!(
            noisy.is_empty(),
            "node {}: warnings on a clean start and stop: {noisy:#?}",
            node.id
        );
        let restart = log_from(&node.log, from);
        assert!(restart.contains("node started"), "{restart}");
        let replayed: Vec<String> = restart
            .lines()
            // `named` was created in the first run: history; `second` is new.
            .filter(|l| l.contains(" INFO ") && l.contains("metadata applied") && l.contains("\"named\""))
            .map(String::from)
            .collect();
        assert!(
            replayed.is_empty(),
            "node {}: history re-logged at INFO: {replayed:#?}",
            node.id
        );
    }
}
