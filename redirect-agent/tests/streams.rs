//! Byte streams through redirection: whatever an application does with a TCP connection, the
//! proxy between it and its peer (the pod's outbound capture, and inbound capture with
//! delivery to the pod address) carries every byte, in order, with its ends as they were.
//!
//! Both directions are covered: the application's outbound connection to a server in another
//! pod, and a client in another pod calling the application. The workload is
//! `redirect-testbed stream` / `stream-server` (redirect-testbed/src/stream.rs): random message
//! sizes from 1 byte to 4 MiB with every byte checked, half-close in both directions, a reset
//! from either end, a slow reader (the writer blocks and resumes), `MSG_PEEK`, `sendfile`
//! (and the proxy's `splice`: Rust's `io::copy` between sockets), poll readiness on every read
//! and write of the client, and 1 000 concurrent connections. It was built for sk_msg
//! acceleration (issue 14), which it showed to lose data (docs/ACCELERATION.md).
//!
//! Needs root and the datapath; skips say why, except under `CI=true`.

mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use redirect_testbed::stream::{Case, Outcome};

const SERVER_PORT: u16 = 19_000;

/// Message sizes of the echo case: the edges around a page and the socket buffers, and a few
/// drawn from a fixed seed between 1 byte and 4 MiB.
fn echo_sizes() -> Vec<u64> {
    let mut sizes = vec![1, 2, 100, 4096, 65_535, 65_536, 65_537, 1_000_000, 4 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..6 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sizes.push(1 + x % (4 << 20));
    }
    sizes
}

/// (case, size, connections at once).
fn plan() -> Vec<(Case, u64, u32)> {
    let mut p: Vec<(Case, u64, u32)> = echo_sizes()
        .into_iter()
        .map(|s| (Case::Echo, s, 1))
        .collect();
    p.extend([
        (Case::ServerFirst, 1, 1),
        (Case::ServerFirst, 300_000, 1),
        (Case::ServerReset, 10_000, 1),
        (Case::ClientReset, 10_000, 1),
        (Case::SlowReader, 8 << 20, 1),
        (Case::Peek, 1_000_000, 1),
        (Case::Sendfile, 3_000_000, 1),
        (Case::Echo, 2_000, 1000),
    ]);
    p
}

/// A stream server in a pod, its outcome lines collected as they come.
struct Server {
    _process: PodProcess,
    lines: Arc<Mutex<Vec<Outcome>>>,
}

impl Server {
    fn start(node: &Node, pod: &Pod, listen: &[SocketAddr], name: &str) -> Server {
        let dir = node.scratch_dir().join(name);
        std::fs::create_dir(&dir).expect("server dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let mut cmd = Command::new(testbed_bin());
        cmd.arg("stream-server")
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for a in listen {
            cmd.arg("--listen").arg(a.to_string());
        }
        let mut process = pod.spawn(APP_UID, cmd).expect("spawn stream-server");
        for a in listen {
            process
                .wait_for_listen(*a, LISTEN_WAIT)
                .expect("stream-server listens");
        }
        let out = process.child_mut().stdout.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if let Ok(o) = serde_json::from_str::<Outcome>(&l) {
                    sink.lock().unwrap().push(o);
                }
            }
        });
        Server {
            _process: process,
            lines,
        }
    }

    /// Waits for `n` outcomes more than `seen` and returns them, sorted by seed.
    fn take(&self, seen: &mut usize, n: usize) -> Vec<Outcome> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let lines = self.lines.lock().unwrap();
            if lines.len() >= *seen + n || Instant::now() > deadline {
                let mut got: Vec<Outcome> = lines[*seen..].to_vec();
                *seen = lines.len();
                got.sort_by_key(|o| o.seed);
                return got;
            }
            drop(lines);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs the stream client in `pod` as the application; its outcomes, sorted by seed.
fn client(pod: &Pod, to: SocketAddr, case: Case, size: u64, conns: u32, seed: u64) -> Vec<Outcome> {
    let mut cmd = Command::new(testbed_bin());
    cmd.arg("stream")
        .args(["--to", &to.to_string()])
        .args(["--case", case.name()])
        .args(["--size", &size.to_string()])
        .args(["--seed", &seed.to_string()])
        .args(["--conns", &conns.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = pod.spawn(APP_UID, cmd).expect("spawn stream client");
    let out = p.child_mut().stdout.take().expect("piped");
    let mut got: Vec<Outcome> = BufReader::new(out)
        .lines()
        .map(|l| serde_json::from_str(&l.expect("read client output")).expect("outcome line"))
        .collect();
    let status = p.child_mut().wait().expect("wait stream client");
    assert!(status.success(), "stream client {case:?} {size}: {status}");
    got.sort_by_key(|o| o.seed);
    got
}

/// Every outcome of the suite for one mode: `direction case size` -> the client's and the
/// server's outcomes.
type Results = BTreeMap<String, (Vec<Outcome>, Vec<Outcome>)>;

/// Builds a node (the application's pod with its proxy and a stream server, a remote pod with
/// a stream server), enrolls the application's pod, runs the plan both ways and
/// returns the outcomes and the pod's counters.
fn run_suite() -> (Results, BTreeMap<String, u64>) {
    let node = Node::new().unwrap();
    let app = node.add_pod("app").unwrap();
    let remote = node.add_pod("remote").unwrap();
    let _proxy = Proxy::start(&node, &app, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(&app, &[]);
    let remote_at = sock(remote.ip4, SERVER_PORT);
    let app_at = sock(app.ip4, SERVER_PORT);
    let remote_server = Server::start(&node, &remote, &[remote_at], "remote-server");
    let app_server = Server::start(
        &node,
        &app,
        &[sock(Family::V4.unspecified(), SERVER_PORT)],
        "app-server",
    );
    let mut results = Results::new();
    let (mut seen_remote, mut seen_app) = (0, 0);
    for (i, (case, size, conns)) in plan().into_iter().enumerate() {
        let seed = 1 + 10_000 * i as u64;
        // Outbound: the application calls the remote pod through its proxy.
        let c = client(&app, remote_at, case, size, conns, seed);
        let s = remote_server.take(&mut seen_remote, conns as usize);
        results.insert(format!("outbound {case:?} {size} x{conns}"), (c, s));
        // Inbound: the remote pod calls the application, delivered by the proxy.
        let c = client(&remote, app_at, case, size, conns, seed);
        let s = app_server.take(&mut seen_app, conns as usize);
        results.insert(format!("inbound {case:?} {size} x{conns}"), (c, s));
    }
    let stats = agent.stats(&app.name);
    (results, stats.into_iter().collect())
}

#[test]
fn every_byte_stream_arrives_whole_through_redirection() {
    require!(Need::Root, datapath());
    let (results, stats) = run_suite();
    let mut failures = Failures::default();
    let mut connections = 0u64;
    for (cell, (clients, servers)) in &results {
        if clients.len() != servers.len() || clients.is_empty() {
            failures.push(format!(
                "{cell}: {} client and {} server outcomes",
                clients.len(),
                servers.len()
            ));
        }
        connections += clients.len() as u64;
        for o in clients.iter().chain(servers) {
            if let Some(f) = &o.failure {
                failures.push(format!("{cell} ({} seed {}): {f}", o.side, o.seed));
            }
        }
    }
    // A reset on either side ends the other side's copy: what the far end sees is the proxy's
    // close, as under iptables with the same proxy.
    let ends: std::collections::BTreeSet<&str> = results
        .values()
        .flat_map(|(c, s)| c.iter().chain(s))
        .map(|o| o.end.as_str())
        .collect();
    assert!(
        ends.contains("eof") && ends.contains("reset sent"),
        "{ends:?}"
    );
    // Every connection went through the datapath: the outbound half captured to the proxy,
    // the inbound half handed to its listener and delivered to the pod address.
    let count = |name: &str| stats.get(name).copied().unwrap_or(0);
    for name in ["outbound_captured", "inbound_captured", "delivered_pod_ip"] {
        if count(name) < connections / 2 {
            failures.push(format!(
                "{name} {} < {} connections: {stats:?}",
                count(name),
                connections / 2
            ));
        }
    }
    failures.assert_none("byte streams");
}
