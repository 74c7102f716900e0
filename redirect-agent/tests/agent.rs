//! The node agent, `redirect-agent run`, as a real process: its own socket, HTTP port, pin root
//! and state directory per test, killed when the test ends, whatever happens.
//!
//! Waits in these tests are bounded loops for something to become true (a process to listen, a
//! scrape to land); the limits are generous and never what a test asserts.

mod common;

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::*;
use redirect_agent::{
    agent::proto::{self, Request, Response},
    spec::PodSpec,
    state::StateStore,
};

/// How long anything the tests wait for may take before the test gives up.
const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `f` until it returns `Some`, or panics after [`PATIENCE`] naming `what`.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A free TCP port on loopback (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind port 0")
        .port()
}

/// A plain HTTP/1.1 exchange: (status, headers, body).
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let r = redirect_testbed::http::request(addr, method, path)
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"));
    (r.status, r.head, r.body)
}

/// `redirect-agent run` for an [`Agent`]'s pin root and state directory, with its own socket
/// and HTTP port. Killed (SIGKILL) and reaped on drop; its log is printed if the test failed.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    http: SocketAddr,
    log: PathBuf,
    pin_root: PathBuf,
    state_dir: PathBuf,
}

impl Daemon {
    /// Starts the agent and waits until `/readyz` says 200.
    fn start(agent: &Agent) -> Daemon {
        let d = Daemon::spawn(agent, free_port());
        d.wait_ready();
        d
    }

    /// Starts the agent without waiting for anything.
    fn spawn(agent: &Agent, port: u16) -> Daemon {
        let mut d = Daemon::new(agent, port);
        d.restart();
        d
    }

    /// The agent's socket, port, log and directories; no process yet.
    fn new(agent: &Agent, port: u16) -> Daemon {
        let name = agent.state_dir.file_name().unwrap().to_string_lossy();
        Daemon {
            child: None,
            socket: std::env::temp_dir().join(format!("{name}.sock")),
            http: SocketAddr::from(([127, 0, 0, 1], port)),
            log: std::env::temp_dir().join(format!("{name}.agent.log")),
            pin_root: agent.pin_root.clone(),
            state_dir: agent.state_dir.clone(),
        }
    }

    /// Starts a new agent process on the same socket, port and directories (the previous one
    /// must be gone), appending to the same log.
    fn restart(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let child = Command::new(agent_bin())
            .env("REDIRECT_PIN_ROOT", &self.pin_root)
            .env("REDIRECT_STATE_DIR", &self.state_dir)
            .env("RUST_LOG", "info,redirect_agent::agent::watch=debug")
            .args(["run", "--node-name", "test-node", "--socket"])
            .arg(&self.socket)
            .arg("--http-address")
            .arg(self.http.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn redirect-agent run");
        self.child = Some(child);
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// SIGKILL, reaped.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn wait_ready(&self) {
        wait_for("the agent's /readyz to say 200", || {
            TcpStream::connect(self.http).ok()?;
            (http(self.http, "GET", "/readyz").0 == 200).then_some(())
        });
    }

    fn get(&self, path: &str) -> (u16, String) {
        let (status, _, body) = http(self.http, "GET", path);
        (status, body)
    }

    fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    /// The CLI talking to this agent.
    fn cli(&self, agent: &Agent, args: &[&str]) -> Output {
        agent
            .cmd()
            .env("REDIRECT_SOCKET", &self.socket)
            .args(args)
            .output()
            .expect("run redirect-agent")
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log_text());
        }
        let _ = fs::remove_file(&self.log);
        let _ = fs::remove_file(&self.socket);
    }
}

/// The CLI with no agent to talk to (a socket path where nothing is).
fn direct(agent: &Agent, args: &[&str]) -> Output {
    agent
        .cmd()
        .env(
            "REDIRECT_SOCKET",
            agent.state_dir.with_extension("no-agent.sock"),
        )
        .args(args)
        .output()
        .expect("run redirect-agent")
}

/// What a command printed and how it ended, for comparing two runs.
fn printed(o: &Output) -> (Option<i32>, String, String) {
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn args_of(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The same command through the agent and directly prints the same, for every command and for
/// their errors. Mutating commands are compared over the same state: run one way, undone, run
/// the other way.
#[test]
fn cli_through_the_agent_prints_what_it_prints_without() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let agent = Agent::new();
    let daemon = Daemon::start(&agent);
    let mut diffs = Vec::new();
    let mut same = |what: &str, through: Output, without: Output| {
        let (t, w) = (printed(&through), printed(&without));
        if t != w {
            diffs.push(format!(
                "{what}:\n  through the agent: {t:?}\n  without:           {w:?}"
            ));
        }
        t
    };

    // enroll, first and again (updated), then unenroll: each way over the same state.
    let enroll_a = Agent::enroll_args(&a, &a.name);
    let t = daemon.cli(&agent, &args_of(&enroll_a));
    let again_t = daemon.cli(&agent, &args_of(&enroll_a));
    let un_t = daemon.cli(&agent, &["unenroll", "--name", &a.name]);
    let w = direct(&agent, &args_of(&enroll_a));
    let again_w = direct(&agent, &args_of(&enroll_a));
    let un_w = direct(&agent, &["unenroll", "--name", &a.name]);
    let (code, out, _) = same("enroll", t, w);
    assert_eq!(code, Some(0), "enroll: {out}");
    assert!(out.starts_with("enrolled "), "{out}");
    let (_, out, _) = same("enroll again", again_t, again_w);
    assert!(out.starts_with("updated "), "{out}");
    let (_, out, _) = same("unenroll", un_t, un_w);
    assert!(out.starts_with("unenrolled "), "{out}");

    // Reads over two enrolled pods, with an unusable record beside them.
    daemon.cli(&agent, &args_of(&Agent::enroll_args(&a, &a.name)));
    let mut enroll_b = Agent::enroll_args(&b, &b.name);
    enroll_b.extend(["--inbound-policy".into(), "localhost".into()]);
    direct(&agent, &args_of(&enroll_b));
    let bad = agent.state_dir.join("pods").join("broken.json");
    fs::write(&bad, "{ not json").unwrap();
    fs::set_permissions(&bad, fs::Permissions::from_mode(0o644)).unwrap();
    for args in [
        vec!["list"],
        vec!["list", "--output", "json"],
        vec!["stats"],
        vec!["stats", "--output", "json"],
        vec!["stats", "--name", &b.name],
        vec!["stats", "--name", "nobody"],
    ] {
        let t = daemon.cli(&agent, &args);
        let w = direct(&agent, &args);
        let (code, out, err) = same(&args.join(" "), t, w);
        if args.contains(&"nobody") {
            assert_eq!(code, Some(1), "{out}{err}");
        } else {
            assert_eq!(code, Some(0), "{args:?}: {err}");
            assert!(out.contains(&b.name), "{args:?}: {out}");
            assert_eq!(
                out.contains(&a.name),
                !args.contains(&"--name"),
                "{args:?}: {out}"
            );
        }
    }
    // gc removes the unusable record: once through the agent, once without.
    let t = daemon.cli(&agent, &["gc"]);
    fs::write(&bad, "{ not json").unwrap();
    fs::set_permissions(&bad, fs::Permissions::from_mode(0o644)).unwrap();
    let w = direct(&agent, &["gc"]);
    let (_, out, _) = same("gc", t, w);
    assert!(out.contains("removed unusable record"), "{out}");

    // Errors: refused requests print the same one line.
    let mut taken_ip = Agent::enroll_args(&a, "other-name");
    taken_ip.iter_mut().for_each(|s| {
        if *s == a.cgroup.display().to_string() {
            *s = b.cgroup.display().to_string();
        }
    });
    let mut bad_ip = Agent::enroll_args(&a, "bad-ip");
    let pos = bad_ip.iter().position(|s| *s == a.ip4.to_string()).unwrap();
    bad_ip[pos] = "198.18.255.254".into();
    for args in [
        vec!["unenroll".to_string(), "--name".into(), "nobody".into()],
        taken_ip,
        bad_ip,
    ] {
        let t = daemon.cli(&agent, &args_of(&args));
        let w = direct(&agent, &args_of(&args));
        let (code, _, err) = same(&args.join(" "), t, w);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    // Through the agent really was through it: it logged the pod events.
    let log = daemon.log_text();
    assert!(
        log.contains(&format!("namespace=\"\" pod={:?}: enrolled", a.name)),
        "{log}"
    );
}

/// `/readyz` is 503, with the reason, while the agent waits to reconcile (here: for the state
/// lock, which the test holds), and 200 once it has; `/healthz` is 200 throughout; methods
/// other than GET get 405, unknown paths 404.
#[test]
fn readyz_turns_200_after_reconcile_and_only_get_is_served() {
    require!(Need::Root, datapath());
    let agent = Agent::new();
    let lock = StateStore::open(&agent.state_dir).expect("take the state lock");
    let daemon = Daemon::spawn(&agent, free_port());
    wait_for("the agent's HTTP port", || {
        TcpStream::connect(daemon.http).ok()
    });
    let (status, body) = daemon.get("/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = daemon.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("reconciling"), "{body}");
    assert!(
        !daemon.socket.exists(),
        "the socket accepts before reconcile"
    );
    drop(lock);
    daemon.wait_ready();
    assert!(daemon.socket.exists());

    for path in ["/metrics", "/healthz", "/readyz"] {
        for method in ["POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"] {
            let (status, head, _) = http(daemon.http, method, path);
            assert_eq!(status, 405, "{method} {path}: {head}");
            if method != "HEAD" {
                assert!(head.to_ascii_lowercase().contains("allow: get"), "{head}");
            }
        }
    }
    assert_eq!(daemon.get("/nothing").0, 404);
}

/// The socket is root's (mode 0600), and a non-root peer that reaches it anyway is refused
/// (`SO_PEERCRED`). A non-root CLI does what it does without an agent.
#[test]
fn non_root_peers_are_refused() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let a = node.add_pod("a").unwrap();
    let agent = Agent::new();
    let daemon = Daemon::start(&agent);
    daemon.cli(&agent, &args_of(&Agent::enroll_args(&a, &a.name)));
    let meta = fs::metadata(&daemon.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let nobody = |socket: &Path, args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(agent_bin())
            .env("REDIRECT_PIN_ROOT", &agent.pin_root)
            .env("REDIRECT_STATE_DIR", &agent.state_dir)
            .env("REDIRECT_SOCKET", socket)
            .env_remove("RUST_LOG")
            .args(args)
            .output()
            .expect("setpriv")
    };
    let nowhere = agent.state_dir.with_extension("no-agent.sock");
    for args in [vec!["list"], vec!["unenroll", "--name", &a.name]] {
        let t = printed(&nobody(&daemon.socket, &args));
        let w = printed(&nobody(&nowhere, &args));
        assert_eq!(t, w, "{args:?} as uid 65534");
    }
    assert_eq!(
        agent.listed_names(),
        vec![a.name.clone()],
        "nobody unenrolled"
    );

    // Open the socket to everyone: the agent itself still refuses the peer.
    fs::set_permissions(&daemon.socket, fs::Permissions::from_mode(0o666)).unwrap();
    let mut socat = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg("socat")
        .arg("-")
        .arg(format!("UNIX-CONNECT:{}", daemon.socket.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("socat");
    let req = format!(
        "{}\n",
        serde_json::to_string(&Request::Unenroll {
            name: a.name.clone()
        })
        .unwrap()
    );
    socat
        .stdin
        .take()
        .unwrap()
        .write_all(req.as_bytes())
        .unwrap();
    let out = socat.wait_with_output().unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    let resp: Response = serde_json::from_str(answer.trim())
        .unwrap_or_else(|e| panic!("{e}: {answer:?} {:?}", String::from_utf8_lossy(&out.stderr)));
    match resp {
        Response::Error { message } => assert!(message.contains("uid 65534"), "{message}"),
        other => panic!("a non-root peer was served: {other:?}"),
    }
    assert_eq!(
        agent.listed_names(),
        vec![a.name.clone()],
        "nobody unenrolled"
    );
}

/// 200 requests at once on the socket: the first enroll of 20 pods and 180 more enroll
/// requests of the same pods (each an update in place, or the first enroll if it wins the
/// race), each on its own connection, all sent together. Every one succeeds, and the 20 pods end
/// up enrolled once each, in distinct slots, all `ok`.
#[test]
fn two_hundred_concurrent_enroll_requests_all_succeed() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let pods: Vec<Pod> = (0..20)
        .map(|i| node.add_pod(&format!("p{i}")).unwrap())
        .collect();
    let agent = Agent::new();
    let daemon = Daemon::start(&agent);
    let specs: Vec<PodSpec> = pods
        .iter()
        .map(|p| PodSpec {
            name: p.name.clone(),
            namespace: None,
            cgroup: p.cgroup.clone(),
            netns: p.netns_path.clone(),
            pod_ips: vec![p.ip4.into(), p.ip6.into()],
            proxy_uid: PROXY_UID,
            inbound_policy: InboundPolicy::Passthrough,
            port_policies: Default::default(),
            exclude_inbound_ports: vec![],
            exclude_outbound_ports: vec![],
            exclude_outbound_cidrs: vec![],
            proxy_inbound_port: 15006,
            proxy_outbound_port: 15001,
            dns_capture: false,
            proxy_dns_port: 15053,
            ..Default::default()
        })
        .collect();
    let go = Arc::new(std::sync::Barrier::new(200));
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let spec = specs[i % specs.len()].clone();
            let socket = daemon.socket.clone();
            let go = go.clone();
            thread::spawn(move || {
                go.wait();
                proto::call(&socket, &Request::Enroll { spec })
            })
        })
        .collect();
    let mut failures = Vec::new();
    let mut first = 0;
    for (i, t) in threads.into_iter().enumerate() {
        match t.join().expect("request thread") {
            Ok(Some(Response::Enrolled(r))) => first += usize::from(!r.updated),
            other => failures.push(format!("request {i}: {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(first, 20, "each pod enrolled first exactly once");
    let list = agent.list();
    let listed = list["pods"].as_array().unwrap();
    assert_eq!(listed.len(), 20, "{list}");
    let slots: BTreeSet<u64> = listed.iter().map(|p| p["slot"].as_u64().unwrap()).collect();
    assert_eq!(slots.len(), 20, "slots shared: {list}");
    assert!(listed.iter().all(|p| p["status"] == "ok"), "{list}");
    let m = daemon.metrics();
    assert!(m.contains("redirect_pods_enrolled 20\n"), "{m}");
    assert!(
        m.contains("redirect_enroll_duration_seconds_count 200\n"),
        "{m}"
    );
}

/// A long-lived connection through the proxy: banner read, then each check is one byte echoed.
struct Held {
    stream: TcpStream,
}

impl Held {
    fn open(client: &Pod, to: SocketAddr) -> Held {
        let stream = client
            .in_netns(|| TcpStream::connect_timeout(&to, T))
            .unwrap()
            .expect("long-lived connection");
        stream.set_read_timeout(Some(T)).unwrap();
        let mut banner = String::new();
        BufReader::new(&stream)
            .read_line(&mut banner)
            .expect("banner");
        assert!(banner.contains("local"), "banner {banner:?}");
        Held { stream }
    }

    /// Whether the connection still carries data both ways.
    fn alive(&mut self) -> bool {
        let mut b = [0u8; 1];
        self.stream.write_all(b"x").is_ok() && self.stream.read_exact(&mut b).is_ok() && &b == b"x"
    }
}

/// Restart under traffic: 20 long-lived connections through an enrolled pod's proxy and a
/// client opening new connections in a loop, while the agent is SIGKILLed and started again
/// 10 times (after a pseudo-random pause of 0-300 ms each, seeded): no long-lived connection
/// drops, every new connection is echoed through the proxy (captured), the proxy saw exactly
/// those, and the pod's counter counted each one once (continuous across restarts). Each new
/// agent adopts the pod.
#[test]
fn restart_under_traffic_drops_nothing_and_captures_everything() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    let mut daemon = Daemon::start(&agent);
    let out = daemon.cli(&agent, &args_of(&Agent::enroll_args(&server, &server.name)));
    assert!(out.status.success(), "{out:?}");
    let to = sock(server.ip4, WILDCARD_PORT);
    let mut held: Vec<Held> = (0..20).map(|_| Held::open(&client, to)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let looper = {
        let stop = stop.clone();
        let client_ns = client.netns_path.clone();
        thread::spawn(move || {
            let ns = fs::File::open(&client_ns).expect("client netns");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let mut outcomes = Vec::new();
            while !stop.load(Ordering::Relaxed) || outcomes.len() < 20 {
                outcomes.push(redirect_testbed::probe(to, PAYLOAD, T));
            }
            outcomes
        })
    };
    let captured = |m: &str| -> u64 {
        let prefix = format!(
            "redirect_inbound_captured_total{{namespace=\"\",pod=\"{}\"}} ",
            server.name
        );
        m.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in:\n{m}"))
    };
    let mut last_captured = captured(&daemon.metrics());
    assert!(
        last_captured >= 20,
        "the 20 long-lived connections were captured"
    );
    let mut seed: u64 = 0x5eed_2026;
    for round in 0..10 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        thread::sleep(Duration::from_millis((seed >> 33) % 300));
        daemon.kill();
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        thread::sleep(Duration::from_millis((seed >> 33) % 300));
        daemon.restart();
        daemon.wait_ready();
        let m = daemon.metrics();
        assert!(
            m.contains("redirect_agent_restarts_adopted_pods 1\n"),
            "round {round}: {m}"
        );
        // Counters are the kernel's: a new agent goes on from where the last one was.
        let now = captured(&m);
        assert!(
            now >= last_captured,
            "round {round}: redirect_inbound_captured_total went from {last_captured} to {now}"
        );
        last_captured = now;
    }
    stop.store(true, Ordering::Relaxed);
    let outcomes = looper.join().expect("client loop");

    let mut failures = Failures::default();
    let expect = Expect::Echo {
        local: to,
        peer: V4_PASSTHROUGH_SRC,
        direct: false,
    };
    for (i, o) in outcomes.iter().enumerate() {
        failures.check(format!("new connection {i}"), expect, o);
    }
    for (i, h) in held.iter_mut().enumerate() {
        if !h.alive() {
            failures.push(format!("long-lived connection {i} dropped"));
        }
    }
    let inbound = proxy
        .entries()
        .into_iter()
        .filter(|e| e.listener == "inbound" && e.orig_dst == Some(to))
        .count();
    if inbound != outcomes.len() + 20 {
        failures.push(format!(
            "proxy logged {inbound} inbound connections, expected {} new + 20 long-lived",
            outcomes.len()
        ));
    }
    let stats = agent.stats(&server.name);
    let scraped = captured(&daemon.metrics());
    if scraped != stats["inbound_captured"] {
        failures.push(format!(
            "/metrics says {scraped} inbound_captured, stats {}",
            stats["inbound_captured"]
        ));
    }
    if stats["inbound_captured"] != (outcomes.len() + 20) as u64 {
        failures.push(format!(
            "inbound_captured {} after {} + 20 connections",
            stats["inbound_captured"],
            outcomes.len()
        ));
    }
    eprintln!(
        "restart under traffic: {} new connections over 10 restarts",
        outcomes.len()
    );
    failures.assert_none("restart under traffic");
}

/// A pod whose netns is deleted, one whose cgroup is removed, and one enrolled with a
/// process's `/proc/PID/ns/net` whose process exits, without unenroll: the running agent
/// unenrolls all three by itself (gone from `list` and from `/metrics`), counts them and logs
/// them with namespace and pod; the other pod stays. A pod enrolled with `--namespace` has it
/// in its metrics' `namespace` label and its log lines; one enrolled without has it empty.
#[test]
fn gone_pods_are_collected_while_running() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let keep = node.add_pod("keep").unwrap();
    let no_cgroup = node.add_pod("nocg").unwrap();
    let no_netns = node.add_pod("nons").unwrap();
    let by_pid = node.add_pod("bypid").unwrap();
    // Outside the pod's cgroup, so that only its exit tells of it (not cgroup.events).
    let holder = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &by_pid.name, "sleep", "1000"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let agent = Agent::new();
    let daemon = Daemon::start(&agent);
    for p in [&keep, &no_cgroup, &no_netns, &by_pid] {
        let mut args = Agent::enroll_args(p, &p.name);
        if p.name == no_netns.name {
            args.extend(["--namespace".into(), "prod".into()]);
        }
        if p.name == by_pid.name {
            let at = args.iter().position(|a| a == "--netns").unwrap() + 1;
            args[at] = format!("/proc/{}/ns/net", holder.0.id());
        }
        let out = daemon.cli(&agent, &args_of(&args));
        assert!(out.status.success(), "{out:?}");
    }
    let m = daemon.metrics();
    for (p, ns) in [
        (&keep, ""),
        (&no_cgroup, ""),
        (&no_netns, "prod"),
        (&by_pid, ""),
    ] {
        let series = format!(
            "redirect_inbound_captured_total{{namespace=\"{ns}\",pod=\"{}\"}} 0\n",
            p.name
        );
        assert!(m.contains(&series), "{series} not in:\n{m}");
    }
    let start = Instant::now();
    fs::remove_dir(&no_cgroup.cgroup).expect("remove the pod's cgroup");
    let out = Command::new("ip")
        .args(["netns", "delete", &no_netns.name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_for("the agent to collect two pods", || {
        (agent.listed_names() == vec![by_pid.name.clone(), keep.name.clone()]).then_some(())
    });
    eprintln!("gone pods collected after {:?}", start.elapsed());
    // The namespace stays (the pod's file holds it); the enrolled /proc/PID/ns/net goes.
    let start = Instant::now();
    drop(holder);
    wait_for("the agent to collect the pod whose process exited", || {
        (agent.listed_names() == vec![keep.name.clone()]).then_some(())
    });
    eprintln!(
        "the pod whose process exited collected after {:?}",
        start.elapsed()
    );
    let m = daemon.metrics();
    for p in [&no_cgroup, &no_netns, &by_pid] {
        assert!(!m.contains(&format!("pod=\"{}\"", p.name)), "{m}");
    }
    assert!(m.contains(&format!("pod=\"{}\"", keep.name)), "{m}");
    assert!(m.contains("redirect_pods_collected_total 3\n"), "{m}");
    assert!(m.contains("redirect_pods_enrolled 1\n"), "{m}");
    let log = daemon.log_text();
    for (p, ns) in [(&no_cgroup, ""), (&no_netns, "prod"), (&by_pid, "")] {
        assert!(
            log.contains(&format!("namespace={ns:?} pod={:?}: gone", p.name)),
            "{log}"
        );
    }
}

/// SIGTERM: a request in flight (waiting for the state lock the test holds) is answered, the
/// agent exits 0, removes its socket and leaves the pods enrolled and redirected.
#[test]
fn sigterm_finishes_requests_in_flight_and_leaves_pins() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let agent = Agent::new();
    let mut daemon = Daemon::start(&agent);
    assert!(daemon
        .cli(&agent, &args_of(&Agent::enroll_args(&a, &a.name)))
        .status
        .success());
    let lock = StateStore::open(&agent.state_dir).expect("take the state lock");
    let req = {
        let socket = daemon.socket.clone();
        let args = Agent::enroll_args(&b, &b.name);
        let agent_cmd = agent
            .cmd()
            .env("REDIRECT_SOCKET", socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("enroll b");
        agent_cmd
    };
    // Let the request reach the agent, which now waits for the lock.
    thread::sleep(Duration::from_millis(500));
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    drop(lock);
    let out = req.wait_with_output().unwrap();
    assert!(out.status.success(), "in-flight enroll: {out:?}");
    let mut child = daemon.child.take().unwrap();
    let status = wait_for("the agent to exit", || child.try_wait().unwrap());
    assert_eq!(status.code(), Some(0), "{}", daemon.log_text());
    assert!(!daemon.socket.exists(), "socket left behind");
    assert_eq!(agent.listed_names().len(), 2);
    for p in [&a, &b] {
        assert!(
            enroll_links(&agent, &p.name),
            "{}: links gone after SIGTERM",
            p.name
        );
    }
    // And a new agent adopts both.
    daemon.restart();
    daemon.wait_ready();
    assert!(daemon
        .metrics()
        .contains("redirect_agent_restarts_adopted_pods 2\n"));
}

fn enroll_links(agent: &Agent, name: &str) -> bool {
    let dir = agent.pin_root.join("pods").join(name.replace('.', "~2e"));
    fs::read_dir(dir).is_ok_and(|d| d.count() == redirect_agent::datapath::Hook::ALL.len())
}

/// A Prometheus server scraping the agent.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    web: SocketAddr,
}

impl Prometheus {
    fn start(target: SocketAddr, dir: PathBuf) -> Prometheus {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
                 scrape_configs:\n  - job_name: redirect\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (Debian package `prometheus`, cargo xtask setup)");
        Prometheus { child, dir, web }
    }

    /// The instant vector of `query`, as (labels, value) pairs.
    fn query(&self, query: &str) -> Option<Vec<(serde_json::Value, String)>> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        TcpStream::connect(self.web).ok()?;
        let (status, _, body) = http(self.web, "GET", &format!("/api/v1/query?query={encoded}"));
        if status != 200 {
            return None;
        }
        // Chunked transfer encoding: the JSON is between the first '{' and the last '}'.
        let json = &body[body.find('{')?..=body.rfind('}')?];
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        Some(
            v["data"]["result"]
                .as_array()?
                .iter()
                .map(|r| {
                    (
                        r["metric"].clone(),
                        r["value"][1].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect(),
        )
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "--- prometheus log ---\n{}",
                fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A real Prometheus scrapes the agent: after 3 IPv4 and 2 IPv6 connections to the pod through
/// its proxy, its query API returns exactly 5 for `redirect_inbound_captured_total{pod=...}`;
/// `promtool check metrics` finds nothing to say about the endpoint's output.
#[test]
fn prometheus_scrapes_the_agent() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let _proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    let daemon = Daemon::start(&agent);
    assert!(daemon
        .cli(&agent, &args_of(&Agent::enroll_args(&server, &server.name)))
        .status
        .success());
    for to in [
        sock(server.ip4, WILDCARD_PORT),
        sock(server.ip4, WILDCARD_PORT),
        sock(server.ip4, POD_IP_PORT),
        sock(server.ip6, WILDCARD_PORT),
        sock(server.ip6, POD_IP_PORT),
    ] {
        let o = probe(&client, to);
        assert!(o.is_echoed(), "{to}: {o:?}");
    }
    assert_eq!(agent.stats(&server.name)["inbound_captured"], 5);

    let text = daemon.metrics();
    assert!(
        text.contains(&format!(
            "redirect_inbound_captured_total{{namespace=\"\",pod=\"{}\"}} 5\n",
            server.name
        )),
        "{text}"
    );
    for needle in [
        "# TYPE redirect_inbound_captured_total counter",
        "redirect_map_entries{map=\"PODS\"} 1",
        "redirect_map_capacity{map=\"PODS\"} 4096",
        "redirect_pods_enrolled 1",
        "# TYPE redirect_enroll_duration_seconds histogram",
        "redirect_agent_restarts_adopted_pods 0",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    // Every counter of `stats` is a series, issue 13's included (this pod asked no DNS).
    for counter in agent.stats(&server.name).keys() {
        let series = format!(
            "redirect_{counter}_total{{namespace=\"\",pod=\"{}\"}} ",
            server.name
        );
        assert!(text.contains(&series), "{series}: {text}");
    }
    assert!(
        text.contains(&format!(
            "redirect_dns_captured_total{{namespace=\"\",pod=\"{}\"}} 0\n",
            server.name
        )),
        "{text}"
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {out:?}"
    );

    let prom = Prometheus::start(daemon.http, agent.state_dir.with_extension("prometheus"));
    let query = format!("redirect_inbound_captured_total{{pod=\"{}\"}}", server.name);
    let result = wait_for("Prometheus to scrape the agent", || {
        prom.query(&query).filter(|r| !r.is_empty())
    });
    assert_eq!(result.len(), 1, "{result:?}");
    assert_eq!(result[0].1, "5", "{result:?}");
    assert_eq!(result[0].0["job"], "redirect", "{result:?}");
    let up = prom.query("up{job=\"redirect\"}").unwrap();
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].1, "1", "{up:?}");
}

/// `--config FILE` sets the socket, HTTP address and node name; a command for another state
/// directory and pin root than the agent's is not the agent's: it runs directly, on its own
/// directories, even with the agent's socket.
#[test]
fn config_file_and_commands_for_other_directories() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let agent = Agent::new();
    let other = Agent::new();
    let port = free_port();
    let mut daemon = Daemon::new(&agent, port);
    // As Daemon::restart does, but with everything else from the file.
    let config = agent.state_dir.with_extension("config.yaml");
    fs::write(
        &config,
        format!(
            "nodeName: from-file\nsocket: {}\nhttpAddress: 127.0.0.1:{port}\n",
            daemon.socket.display()
        ),
    )
    .unwrap();
    let log = fs::File::create(&daemon.log).unwrap();
    daemon.child = Some(
        Command::new(agent_bin())
            .env("REDIRECT_PIN_ROOT", &agent.pin_root)
            .env("REDIRECT_STATE_DIR", &agent.state_dir)
            .env_remove("REDIRECT_SOCKET")
            .env_remove("REDIRECT_HTTP_ADDRESS")
            .env("RUST_LOG", "info")
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    daemon.wait_ready();
    let _ = fs::remove_file(&config);
    assert!(daemon.socket.exists());
    assert!(
        daemon.log_text().contains("node from-file"),
        "{}",
        daemon.log_text()
    );
    assert!(daemon
        .cli(&agent, &args_of(&Agent::enroll_args(&a, &a.name)))
        .status
        .success());
    // The other directories, the agent's socket: run directly, on the other directories.
    let out = other
        .cmd()
        .env("REDIRECT_SOCKET", &daemon.socket)
        .args(args_of(&Agent::enroll_args(&b, &b.name)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(other.listed_names(), vec![b.name.clone()]);
    assert_eq!(agent.listed_names(), vec![a.name.clone()]);
    let log = daemon.log_text();
    assert!(
        !log.contains(&b.name),
        "the agent served another state dir: {log}"
    );
}

/// (link id, program id) of each of a pod's pinned links.
fn link_ids(root: &Path, pod: &str) -> Vec<(u32, u32)> {
    use aya::programs::links::{FdLink, PinnedLink};
    redirect_agent::datapath::Hook::ALL
        .iter()
        .map(|h| {
            let path = root.join("pods").join(pod).join(h.program());
            let link = FdLink::from(
                PinnedLink::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            );
            let info = link.info().unwrap();
            (info.id(), info.program_id())
        })
        .collect()
}

/// Upgrade: a new agent finding the pins of an older compatible build (here: the pinned info
/// made to claim another build id) replaces every program in place at its start. The pod's
/// links keep their ids and run new programs, and connections opened in a loop across the
/// agent's kill, restart and upgrade are every one captured.
#[test]
fn a_new_agent_upgrades_an_older_builds_pins_in_place() {
    use aya::maps::{Array, Map, MapData};
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    let mut daemon = Daemon::start(&agent);
    assert!(daemon
        .cli(&agent, &args_of(&Agent::enroll_args(&server, &server.name)))
        .status
        .success());
    let to = sock(server.ip4, WILDCARD_PORT);
    let stop = Arc::new(AtomicBool::new(false));
    let looper = {
        let stop = stop.clone();
        let client_ns = client.netns_path.clone();
        thread::spawn(move || {
            let ns = fs::File::open(&client_ns).expect("client netns");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let mut outcomes = Vec::new();
            while !stop.load(Ordering::Relaxed) || outcomes.len() < 20 {
                outcomes.push(redirect_testbed::probe(to, PAYLOAD, T));
            }
            outcomes
        })
    };
    daemon.kill();
    let before = link_ids(&agent.pin_root, &server.name);
    {
        let data = MapData::from_pin(agent.pin_root.join("info")).expect("info pin");
        let mut info: Array<MapData, [u64; 2]> =
            Array::try_from(Map::from_map_data(data).unwrap()).unwrap();
        let [abi, _] = info.get(&0, 0).unwrap();
        info.set(0, [abi, 0x01d_b01d], 0).unwrap();
    }
    daemon.restart();
    daemon.wait_ready();
    stop.store(true, Ordering::Relaxed);
    let outcomes = looper.join().expect("client loop");
    let after = link_ids(&agent.pin_root, &server.name);

    let mut failures = Failures::default();
    for (i, ((l0, p0), (l1, p1))) in before.iter().zip(&after).enumerate() {
        if l0 != l1 {
            failures.push(format!("hook {i}: link {l0} replaced by {l1}"));
        }
        if p0 == p1 {
            failures.push(format!("hook {i}: still program {p0}: not upgraded"));
        }
    }
    let expect = Expect::Echo {
        local: to,
        peer: V4_PASSTHROUGH_SRC,
        direct: false,
    };
    for (i, o) in outcomes.iter().enumerate() {
        failures.check(format!("connection {i}"), expect, o);
    }
    let inbound = proxy
        .entries()
        .into_iter()
        .filter(|e| e.listener == "inbound" && e.orig_dst == Some(to))
        .count();
    if inbound != outcomes.len() {
        failures.push(format!(
            "proxy logged {inbound} inbound connections of {}",
            outcomes.len()
        ));
    }
    failures.assert_none("upgrade by a new agent");
    let log = daemon.log_text();
    assert!(log.contains("link(s) updated in place"), "{log}");
    assert!(daemon
        .metrics()
        .contains("redirect_agent_restarts_adopted_pods 1\n"));
}

/// Unmounts a test's bpffs mount (if still there) when dropped, so a failing test leaves none.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn mounted(path: &Path) -> bool {
    fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(&*path.to_string_lossy()))
}

/// Kills and reaps a child, also when the test fails.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes a test's scratch directory, also when the test fails.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `uninstall` is refused while an agent runs (nothing removed). Once the agent is stopped it
/// removes everything: the CNI plugin the agent installed (its entry cut out of the primary's
/// file, which is byte for byte what it was, and its binary), every pod's links (detached
/// from the kernel), the pins, the pin root and the bpffs mount redirect made on it, the
/// state directory; run again, it finds nothing to remove and succeeds.
#[test]
fn uninstall_removes_everything_and_refuses_while_an_agent_runs() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let mut agent = Agent::new();
    // Off bpffs: redirect mounts bpffs on the pin root itself, and uninstall must unmount it.
    agent.pin_root = PathBuf::from(format!("{}-pins", agent.state_dir.display()));
    let _unmount = Unmount(agent.pin_root.clone());
    let mut daemon = Daemon::start(&agent);
    for p in [&a, &b] {
        let out = daemon.cli(&agent, &args_of(&Agent::enroll_args(p, &p.name)));
        assert!(out.status.success(), "{out:?}");
    }
    assert!(mounted(&agent.pin_root), "bpffs is mounted on the pin root");
    // A node's CNI directories with the plugin installed beside a bridge chain and a
    // single-plugin file of another network (which install leaves alone).
    let cni = ScratchDir(PathBuf::from(format!("{}-cni", agent.state_dir.display())));
    let (bin, conf) = (cni.0.join("bin"), cni.0.join("net.d"));
    fs::create_dir_all(&bin).unwrap();
    fs::create_dir_all(&conf).unwrap();
    let primary =
        "{\"cniVersion\":\"1.0.0\",\"name\":\"k8s\",\"plugins\":[{\"type\":\"bridge\"}]}\n";
    let other = "{\"cniVersion\":\"0.4.0\",\"name\":\"other\",\"type\":\"macvlan\"}\n";
    fs::write(conf.join("10-k8s.conflist"), primary).unwrap();
    fs::write(conf.join("99-other.conf"), other).unwrap();
    fs::write(cni.0.join("plugin"), b"\x7fELF test plugin").unwrap();
    let (bin_s, conf_s) = (bin.display().to_string(), conf.display().to_string());
    let plugin_s = cni.0.join("plugin").display().to_string();
    let out = daemon.cli(
        &agent,
        &[
            "install-cni",
            "--cni-bin-dir",
            &bin_s,
            "--cni-conf-dir",
            &conf_s,
            "--cni-plugin",
            &plugin_s,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(bin.join("redirect-cni").exists());
    assert_ne!(
        fs::read_to_string(conf.join("10-k8s.conflist")).unwrap(),
        primary
    );
    let uninstall = [
        "uninstall",
        "--cni-bin-dir",
        &bin_s,
        "--cni-conf-dir",
        &conf_s,
    ];
    let links: Vec<u32> = [&a, &b]
        .iter()
        .flat_map(|p| link_ids(&agent.pin_root, &p.name))
        .map(|(link, _)| link)
        .collect();
    assert_eq!(links.len(), 2 * redirect_agent::datapath::Hook::ALL.len());

    let out = daemon.cli(&agent, &uninstall);
    assert!(
        !out.status.success(),
        "uninstall with an agent running: {out:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a node agent is running"), "{err}");
    assert_eq!(agent.listed_names().len(), 2, "nothing removed");
    assert!(bin.join("redirect-cni").exists(), "the plugin was removed");
    assert_ne!(
        fs::read_to_string(conf.join("10-k8s.conflist")).unwrap(),
        primary
    );

    // Half the CNI directories is refused before anything is removed.
    let out = daemon.cli(&agent, &["uninstall", "--cni-bin-dir", &bin_s]);
    assert!(!out.status.success(), "{out:?}");

    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let mut child = daemon.child.take().unwrap();
    let status = wait_for("the agent to exit", || child.try_wait().unwrap());
    assert_eq!(status.code(), Some(0));

    let out = daemon.cli(&agent, &uninstall);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("removed the CNI plugin"),
        "the plugin goes first: {said}"
    );
    assert_eq!(
        fs::read_to_string(conf.join("10-k8s.conflist")).unwrap(),
        primary
    );
    assert_eq!(
        fs::read_to_string(conf.join("99-other.conf")).unwrap(),
        other
    );
    assert_eq!(
        fs::read_dir(&conf).unwrap().count(),
        2,
        "a file left in net.d"
    );
    assert!(!bin.join("redirect-cni").exists(), "plugin binary left");
    for line in [
        format!("unenrolled {}", a.name),
        format!("unenrolled {}", b.name),
        format!("removed the pins under {}", agent.pin_root.display()),
        format!("removed the state directory {}", agent.state_dir.display()),
    ] {
        assert!(said.contains(&line), "{line:?} not in {said}");
    }
    assert!(!agent.pin_root.exists(), "pin root left");
    assert!(!mounted(&agent.pin_root), "bpffs mount left");
    assert!(!agent.state_dir.exists(), "state directory left");
    assert!(!daemon.socket.exists(), "socket left");
    let live: BTreeSet<u32> = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| l.id())
        .collect();
    let left: Vec<&u32> = links.iter().filter(|l| live.contains(l)).collect();
    assert!(left.is_empty(), "links still in the kernel: {left:?}");

    let out = daemon.cli(&agent, &uninstall);
    assert!(out.status.success(), "a second uninstall: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "nothing of redirect is installed\n"
    );
    assert!(!agent.pin_root.exists() && !agent.state_dir.exists());
}
