//! The node agent's capabilities: the DaemonSet grants exactly those the agent checks at start,
//! an agent missing any one of them refuses to start naming it, and an agent holding only
//! them enrolls a pod with both address families and adopts a proxy that listened before.
//!
//! The agent runs under `setpriv --bounding-set -all,+...` (util-linux): as root, a process's
//! capabilities after exec are its bounding set, as in a container given `capabilities.add`.

mod common;

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::*;
use redirect_agent::caps::{self, Capability};

const PATIENCE: Duration = Duration::from_secs(30);

/// `setpriv`'s spelling of a capability: `CAP_SYS_ADMIN` -> `sys_admin`.
fn setpriv_name(c: &Capability) -> String {
    c.name.trim_start_matches("CAP_").to_ascii_lowercase()
}

/// The node agent holding exactly `caps` (and nothing else), with its own socket, HTTP port,
/// pin root and state directory.
fn agent_with(agent: &Agent, caps: &[Capability], socket: &Path, http: SocketAddr) -> Child {
    let set: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", setpriv_name(c)))
        .collect();
    let bounding = if set.is_empty() {
        "-all".to_owned()
    } else {
        format!("-all,{}", set.join(","))
    };
    Command::new("setpriv")
        .args(["--bounding-set", &bounding, "--inh-caps", "-all", "--"])
        .arg(agent_bin())
        .env("REDIRECT_PIN_ROOT", &agent.pin_root)
        .env("REDIRECT_STATE_DIR", &agent.state_dir)
        .env("RUST_LOG", "info")
        .args(["run", "--node-name", "caps-test", "--socket"])
        .arg(socket)
        .arg("--http-address")
        .arg(http.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn setpriv redirect-agent run")
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind port 0")
}

fn status_of(addr: SocketAddr, path: &str) -> Option<u16> {
    redirect_testbed::http::get(addr, path)
        .ok()
        .map(|(status, _)| status)
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_agent_missing_one_capability_refuses_to_start_naming_it() {
    require!(Need::Root);
    for missing in caps::REQUIRED {
        let others: Vec<Capability> = caps::REQUIRED
            .into_iter()
            .filter(|c| *c != missing)
            .collect();
        let agent = Agent::new();
        let socket = agent.state_dir.with_extension("sock");
        let mut child = agent_with(&agent, &others, &socket, free_addr());
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if start.elapsed() > PATIENCE {
                let _ = child.kill();
                panic!("the agent without {} kept running", missing.name);
            }
            thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(!status.success(), "without {}: {status}", missing.name);
        let line = format!("missing capability {} (", missing.name);
        assert!(
            stderr.contains(&line),
            "without {}, stderr does not say {line:?}:\n{stderr}",
            missing.name
        );
        // Refused before touching anything.
        assert!(
            !agent.pin_root.exists(),
            "pin root created without {}",
            missing.name
        );
        assert!(!socket.exists(), "socket created without {}", missing.name);
    }
}

/// Sufficiency: holding only the DaemonSet's set, the agent reaches ready, enrolls a pod with
/// an IPv4 and an IPv6 address (`::6` on its `lo`, a netns entered, programs loaded, bpffs
/// pinned) and adopts its proxy's listeners (pidfd_getfd on uid 1337's sockets); capture works.
#[test]
fn an_agent_with_only_the_daemonsets_capabilities_enrolls_and_adopts() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    let socket = agent.state_dir.with_extension("sock");
    let http = free_addr();
    let mut daemon = Running(agent_with(&agent, &caps::REQUIRED, &socket, http));
    let start = Instant::now();
    while status_of(http, "/readyz") != Some(200) {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            let mut err = String::new();
            daemon
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the agent exited ({s}):\n{err}");
        }
        assert!(start.elapsed() < PATIENCE, "the agent never became ready");
        thread::sleep(Duration::from_millis(50));
    }
    let args = Agent::enroll_args(&server, &server.name);
    let out = agent
        .cmd()
        .env("REDIRECT_SOCKET", &socket)
        .args(&args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "enroll through the agent: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("adopted 2 running proxy listener(s)"),
        "enroll output: {stdout}"
    );
    assert!(
        lo_addresses(&server).contains("::6"),
        "{}",
        lo_addresses(&server)
    );
    if let Some(why) = captured_inbound(&client, &server, &proxy) {
        panic!("enrolled by the reduced agent: {why}");
    }
    let out = agent
        .cmd()
        .env("REDIRECT_SOCKET", &socket)
        .args(["unenroll", "--name", &server.name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(daemon);
    let _ = std::fs::remove_file(&socket);
}

/// The DaemonSet (deploy/redirect.yaml, rendered from deploy/) grants exactly what the agent
/// checks: no capability missing, none extra, nothing privileged.
#[test]
fn the_daemonset_grants_exactly_the_checked_capabilities() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/redirect.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<serde_json::Value> = serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
        .collect();
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "redirect-agent")
        .expect("the agent's DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("the agent container");
    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"], false, "{sc}");
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{sc}"
    );
    let mut granted: Vec<String> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("CAP_{}", c.as_str().unwrap()))
        .collect();
    let mut checked: Vec<String> = caps::REQUIRED.iter().map(|c| c.name.to_owned()).collect();
    granted.sort();
    checked.sort();
    assert_eq!(granted, checked);
}
