//! `redirect-testbed demo`: DESIGN.md's conformance matrix on this machine, end to end.
//!
//! A node with a client pod and a server pod; the server runs three applications (bound to its
//! pod IP, to loopback and to the wildcard address, each over IPv4 and IPv6) and the proxy as
//! uid 1337, and is enrolled with the real `redirect-agent` CLI. The client connects to the
//! server's pod IP on each application's port under both inbound policies and with the proxy
//! dialling either the old way (127.0.0.1:P) or the new way (POD_IP:P from 127.0.0.6). Every
//! agent command is printed as it runs, so the output doubles as a CLI tutorial. The node agent
//! (`redirect-agent run`) runs throughout: the commands go through its socket, and the demo
//! ends with a few lines of its `/metrics`, as `curl` shows them.
//!
//! The agent gets its own pin root and state directory (`REDIRECT_PIN_ROOT`,
//! `REDIRECT_STATE_DIR`), so the demo never touches a real node's enrollments, and everything
//! is removed on the way out: on success, on failure and on Ctrl-C.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use redirect_testbed::{
    bin_path, matrix, AppBind, InboundPolicy, Node, Outcome, Pod, PodProcess, ProxyDial,
};

mod node;

const PROXY_UID: u32 = 1337;
const APP_UID: u32 = 1000;
const POD_NAME: &str = "demo-server";
/// Time for a process to start listening.
const START: Duration = Duration::from_secs(5);
/// A refused connection is answered at once; this only bounds a broken cell.
const PROBE: Duration = Duration::from_secs(2);
const DETECT_TIMEOUT: Duration = Duration::from_secs(10);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn policy_title(policy: InboundPolicy) -> &'static str {
    match policy {
        InboundPolicy::Passthrough => "policy passthrough (default)",
        InboundPolicy::Localhost => "policy localhost (legacy)",
    }
}

fn dial_title(dial: ProxyDial) -> &'static str {
    match dial {
        ProxyDial::Loopback => "proxy dials 127.0.0.1:P",
        ProxyDial::PodIp => "proxy dials POD_IP:P",
    }
}

/// The demo's application port for each row of DESIGN.md's matrix.
fn bind_port(bind: AppBind) -> u16 {
    match bind {
        AppBind::PodIp => 18082,
        AppBind::Loopback => 18084,
        AppBind::Wildcard => 18080,
    }
}

fn bind_kind(bind: AppBind) -> &'static str {
    match bind {
        AppBind::PodIp => "pod IP",
        AppBind::Loopback => "loopback",
        AppBind::Wildcard => "wildcard",
    }
}

fn bind_addr(bind: AppBind, pod_ip: IpAddr) -> SocketAddr {
    let ip = match (bind, pod_ip) {
        (AppBind::PodIp, ip) => ip,
        (AppBind::Loopback, ip) => matrix::loopback(ip),
        (AppBind::Wildcard, IpAddr::V4(_)) => Ipv4Addr::UNSPECIFIED.into(),
        (AppBind::Wildcard, IpAddr::V6(_)) => Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(ip, bind_port(bind))
}

/// DESIGN.md's answer, from the one prediction of the matrix
/// (`redirect_common::matrix::expect`): `Some((where the app sees the connection, from
/// whom))` when reachable.
fn expected(
    policy: InboundPolicy,
    dial: ProxyDial,
    bind: AppBind,
    pod_ip: IpAddr,
) -> Option<(SocketAddr, IpAddr)> {
    let cell = matrix::expect(policy, bind, dial)?;
    let (ip, port) = cell.local(pod_ip, bind_port(bind));
    Some((SocketAddr::new(ip, port), cell.peer_ip(pod_ip)))
}

/// One cell: its text and whether it is what DESIGN.md expects.
fn judge(outcome: &Outcome, want: Option<(SocketAddr, IpAddr)>) -> (String, bool) {
    match (outcome, want) {
        (Outcome::Echoed { server, .. }, want) => {
            let ok = want == Some((server.local, server.peer.ip()));
            let at = match want {
                Some((local, _)) if local != server.local => format!(" at {}", server.local),
                _ => String::new(),
            };
            (format!("reachable{at} (peer {})", server.peer.ip()), ok)
        }
        // Nothing reached an application: the proxy's upstream connect was refused, so it
        // closed (or reset) the client's connection.
        (Outcome::Refused | Outcome::Closed { .. } | Outcome::Reset { server: None, .. }, w) => {
            ("refused".to_owned(), w.is_none())
        }
        (other, _) => (other.result().to_owned(), false),
    }
}

/// Runs the demo (`node`: the node demo, [`node::demo`]); exits 1 (after cleaning up) when a
/// cell is not as expected.
pub fn run(which: Which) -> Result<()> {
    if !redirect_testbed::needs::is_root() {
        bail!(
            "the demo needs root (network namespaces, cgroups, eBPF{}); try: sudo {} {}",
            if which == Which::Node {
                ", containerd"
            } else {
                ""
            },
            exe(),
            which.command()
        );
    }
    let handler = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &handler) }.with_context(|| format!("installing {sig} handler"))?;
    }
    let r = match which {
        Which::Quick => demo(),
        Which::Node => node::demo(),
    };
    match r {
        Ok(true) => Ok(()),
        Ok(false) => std::process::exit(1),
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => {
            eprintln!("demo: interrupted; everything it created is removed");
            std::process::exit(130);
        }
        Err(e) => Err(e.context("demo failed; everything it created is removed")),
    }
}

/// Which demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Pods made by the test bed, the agent as a process: seconds.
    Quick,
    /// A private containerd, the agent's DaemonSet pod from its image, pods through CRI.
    Node,
}

impl Which {
    fn command(self) -> &'static str {
        match self {
            Which::Quick => "demo",
            Which::Node => "demo-node",
        }
    }
}

fn exe() -> String {
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "redirect-testbed".into())
}

/// Everything below returns before `run` exits, so every guard (agent enrollment, processes,
/// pods, node) has been dropped by then.
fn demo() -> Result<bool> {
    let started = Instant::now();
    let agent_bin = bin_path("redirect-agent");
    if !agent_bin.is_file() {
        bail!(
            "{} is missing; build it with: cargo build --workspace --exclude redirect-ebpf --bins",
            agent_bin.display()
        );
    }
    let testbed_bin = std::env::current_exe().context("locating redirect-testbed")?;

    println!("redirect demo: DESIGN.md's conformance matrix, on this machine\n");
    let node = Node::new().context("creating the node")?;
    let client = node.add_pod("client").context("creating the client pod")?;
    let server = node.add_pod("server").context("creating the server pod")?;
    println!(
        "node {}: client pod {} / {}, server pod {} / {}",
        node.name(),
        client.ip4,
        client.ip6,
        server.ip4,
        server.ip6
    );
    let pod_ips = [IpAddr::V4(server.ip4), IpAddr::V6(server.ip6)];

    // Three applications, each over IPv4 and IPv6, as an unprivileged uid.
    let mut apps = Vec::new();
    for bind in AppBind::ALL {
        let listen: Vec<SocketAddr> = pod_ips.iter().map(|ip| bind_addr(bind, *ip)).collect();
        let mut cmd = Command::new(&testbed_bin);
        cmd.arg("echo");
        for a in &listen {
            cmd.arg("--listen").arg(a.to_string());
        }
        apps.push(start(&server, APP_UID, cmd, &listen)?);
    }
    println!(
        "server apps (uid {APP_UID}): {}",
        AppBind::ALL
            .iter()
            .flat_map(|b| pod_ips.iter().map(|ip| bind_addr(*b, *ip).to_string()))
            .collect::<Vec<_>>()
            .join("  ")
    );
    let mut proxy = Some(start_proxy(&server, &testbed_bin, ProxyDial::Loopback)?);
    check_interrupted()?;

    let agent = Agent::new(agent_bin);
    println!(
        "agent state: REDIRECT_PIN_ROOT={} REDIRECT_STATE_DIR={} (never a real node's)\n",
        agent.pin_root.display(),
        agent.state_dir.display()
    );
    let mut daemon = Some(Daemon::start(&agent)?);
    check_interrupted()?;

    let mut results: Vec<Vec<(String, bool)>> = vec![Vec::new(); AppBind::ALL.len() * 2];
    let mut counters: Vec<serde_json::Map<String, serde_json::Value>> = Vec::new();
    let mut previous = serde_json::Map::new();
    let mut enrollment: Option<Enrollment<'_>> = None;
    for (pi, policy) in InboundPolicy::ALL.into_iter().enumerate() {
        let mut args: Vec<String> = vec![
            "enroll".into(),
            "--name".into(),
            POD_NAME.into(),
            "--cgroup".into(),
            server.cgroup.display().to_string(),
            "--netns".into(),
            server.netns_path.display().to_string(),
        ];
        for ip in pod_ips {
            args.extend(["--pod-ip".into(), ip.to_string()]);
        }
        args.extend(["--inbound-policy".into(), policy.name().into()]);
        args.extend(["--namespace".into(), "demo".into()]);
        if pi == 0 {
            println!("# enroll the server pod; its proxy runs as uid {PROXY_UID} (the default)");
        } else {
            println!("# switch the policy: enrolling again updates the pod in place");
        }
        // Armed before the first enroll, so a half-done enroll is also undone.
        if enrollment.is_none() {
            enrollment = Some(Enrollment { agent: &agent });
        }
        agent.run_checked(&args)?;

        if pi == 0 {
            detect(&agent, &server.netns_path);
        }

        for (di, delivery) in ProxyDial::ALL.into_iter().enumerate() {
            check_interrupted()?;
            // The first proxy is already up with loopback delivery.
            if pi + di > 0 {
                drop(proxy.take());
                proxy = Some(start_proxy(&server, &testbed_bin, delivery)?);
            }
            for (vi, pod_ip) in pod_ips.into_iter().enumerate() {
                for (bi, bind) in AppBind::ALL.into_iter().enumerate() {
                    check_interrupted()?;
                    let to = SocketAddr::new(pod_ip, bind_port(bind));
                    let outcome =
                        client.in_netns(|| redirect_testbed::probe(to, b"demo", PROBE))?;
                    results[vi * AppBind::ALL.len() + bi]
                        .push(judge(&outcome, expected(policy, delivery, bind, pod_ip)));
                }
            }
        }

        let now = agent.stats()?;
        // Counters are cumulative; show what this policy's 12 connections did.
        let delta = now
            .iter()
            .map(|(k, v)| {
                let before = previous.get(k).and_then(|p| p.as_u64()).unwrap_or(0);
                let v = v.as_u64().unwrap_or(0);
                (k.clone(), serde_json::Value::from(v.saturating_sub(before)))
            })
            .collect();
        previous = now;
        counters.push(delta);
        println!();
    }
    drop(proxy);

    print_matrix(&results, &pod_ips);
    print_counters(&counters);
    if let Some(d) = daemon.take() {
        d.show_metrics();
        d.stop();
    }

    let wrong = results.iter().flatten().filter(|(_, ok)| !ok).count();
    let total = results.iter().map(Vec::len).sum::<usize>();
    println!();
    // Unenroll and tear down before the verdict, so the verdict is the last word.
    drop(enrollment);
    drop(apps);
    drop(server);
    drop(client);
    drop(node);
    let secs = started.elapsed().as_secs_f32();
    if wrong == 0 {
        println!("verdict: PASS, all {total} cells as DESIGN.md expects ({secs:.1}s)");
    } else {
        println!("verdict: FAIL, {wrong} of {total} cells differ from DESIGN.md ({secs:.1}s)");
    }
    Ok(wrong == 0)
}

/// Spawns `cmd` in `pod` as `uid`, quiet, and waits until it listens on every address.
fn start(pod: &Pod, uid: u32, mut cmd: Command, listen: &[SocketAddr]) -> Result<PodProcess> {
    // Its own process group: a Ctrl-C reaches only the demo, which then tears down in order.
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let mut p = pod.spawn(uid, cmd)?;
    for a in listen {
        p.wait_for_listen(*a, START)?;
    }
    Ok(p)
}

fn start_proxy(pod: &Pod, bin: &Path, delivery: ProxyDial) -> Result<PodProcess> {
    let mut cmd = Command::new(bin);
    cmd.args([
        "proxy",
        "--inbound-port",
        "15006",
        "--outbound-port",
        "15001",
        "--delivery",
        delivery.name(),
    ]);
    let listen: Vec<SocketAddr> = [15006u16, 15001]
        .iter()
        .flat_map(|p| {
            [
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), *p),
                SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), *p),
            ]
        })
        .collect();
    let p = start(pod, PROXY_UID, cmd, &listen)?;
    println!(
        "# proxy (uid {PROXY_UID}) listening on 15006/15001, --delivery {:<8} ({})",
        delivery.name(),
        dial_title(delivery)
    );
    Ok(p)
}

/// The `redirect-agent` CLI with the demo's private pin root and state directory.
struct Agent {
    bin: PathBuf,
    pin_root: PathBuf,
    state_dir: PathBuf,
    /// The demo agent's socket: every command goes through the agent while it runs.
    socket: PathBuf,
}

impl Agent {
    fn new(bin: PathBuf) -> Agent {
        let pid = std::process::id();
        Agent {
            bin,
            pin_root: PathBuf::from(format!("/sys/fs/bpf/redirect-demo-{pid}")),
            state_dir: PathBuf::from(format!("/tmp/redirect-demo-{pid}")),
            socket: PathBuf::from(format!("/tmp/redirect-demo-{pid}.sock")),
        }
    }

    fn command(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("REDIRECT_PIN_ROOT", &self.pin_root)
            .env("REDIRECT_STATE_DIR", &self.state_dir)
            .env("REDIRECT_SOCKET", &self.socket)
            .stdin(Stdio::null())
            // A Ctrl-C must not kill an enroll halfway; the demo unenrolls once it returns.
            .process_group(0);
        cmd
    }

    /// Runs a command, printing it and its output.
    fn run(&self, args: &[String]) -> Result<Output> {
        println!("$ redirect-agent {}", args.join(" "));
        let out = self
            .command(args)
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        print_indented(&String::from_utf8_lossy(&out.stdout));
        print_indented(&String::from_utf8_lossy(&out.stderr));
        Ok(out)
    }

    fn run_checked(&self, args: &[String]) -> Result<Output> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!("redirect-agent {} failed ({})", args[0], out.status);
        }
        Ok(out)
    }

    /// The pod's counters, from `stats --output json`.
    fn stats(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let args: Vec<String> = ["stats", "--name", POD_NAME, "--output", "json"]
            .map(String::from)
            .to_vec();
        println!(
            "$ redirect-agent {}   (shown below the matrix)",
            args.join(" ")
        );
        let out = self.command(&args).output()?;
        if !out.status.success() {
            print_indented(&String::from_utf8_lossy(&out.stderr));
            bail!("redirect-agent stats failed ({})", out.status);
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing stats --output json")?;
        v["pods"]
            .as_array()
            .and_then(|pods| pods.iter().find(|p| p["name"] == POD_NAME))
            .and_then(|p| p["counters"].as_object())
            .cloned()
            .context("stats --output json has no counters for the pod")
    }
}

/// `redirect-agent run` on the demo's directories, its own socket and a free loopback port;
/// stopped with SIGTERM (the pod stays enrolled, as it would for the next agent).
struct Daemon {
    child: std::process::Child,
    socket: PathBuf,
    http: SocketAddr,
}

impl Daemon {
    fn start(agent: &Agent) -> Result<Daemon> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let http = SocketAddr::from(([127, 0, 0, 1], port));
        let args: Vec<String> = vec![
            "run".into(),
            "--node-name".into(),
            "demo".into(),
            "--socket".into(),
            agent.socket.display().to_string(),
            "--http-address".into(),
            http.to_string(),
        ];
        println!("# the node agent: serves the commands below over its socket, metrics over HTTP");
        println!("$ redirect-agent {} &", args.join(" "));
        let child = agent
            .command(&args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting redirect-agent run")?;
        let mut d = Daemon {
            child,
            socket: agent.socket.clone(),
            http,
        };
        let started = Instant::now();
        loop {
            check_interrupted()?;
            if let Some(status) = d.child.try_wait()? {
                bail!("redirect-agent run exited ({status})");
            }
            if matches!(http_get(http, "/readyz"), Ok((200, _))) {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the agent is not ready after 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        println!("$ curl -s http://{http}/readyz");
        print_indented("ready\n");
        println!();
        Ok(d)
    }

    /// What Prometheus would scrape: the pod's non-zero counters and a few of the agent's own.
    fn show_metrics(&self) {
        println!();
        println!(
            "$ curl -s http://{}/metrics | grep -E 'pod=\"{POD_NAME}\"|pods_enrolled|enroll_duration_seconds_count' | grep -v ' 0$'",
            self.http
        );
        match http_get(self.http, "/metrics") {
            Ok((200, body)) => {
                let lines: String = body
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
                    .filter(|l| {
                        l.contains(&format!("pod=\"{POD_NAME}\""))
                            || l.starts_with("redirect_pods_enrolled")
                            || l.starts_with("redirect_enroll_duration_seconds_count")
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
                print_indented(&lines);
            }
            Ok((status, body)) => eprintln!("demo: /metrics answered {status}: {body}"),
            Err(e) => eprintln!("demo: /metrics: {e}"),
        }
    }

    /// SIGTERM, then waits for the agent to exit.
    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            Signal::SIGTERM,
        );
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_file(&self.socket);
    }
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    Ok(redirect_testbed::http::get(addr, path)?)
}

/// Unenrolls the server pod and removes the agent's private state, however the demo ends.
struct Enrollment<'a> {
    agent: &'a Agent,
}

impl Drop for Enrollment<'_> {
    fn drop(&mut self) {
        let args = ["unenroll", "--name", POD_NAME].map(String::from).to_vec();
        match self.agent.run(&args) {
            Ok(out) if out.status.success() => {}
            Ok(_) | Err(_) => eprintln!("demo: unenroll failed; removing the demo's pins anyway"),
        }
        // The shared programs and maps go with the last pod; whatever a failure left goes here.
        if self.agent.pin_root.exists() {
            remove_pins(&self.agent.pin_root);
        }
        let _ = fs::remove_dir_all(&self.agent.state_dir);
    }
}

/// `remove_dir_all` for bpffs, depth first; unlinking a pin drops the object when unused.
fn remove_pins(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_pins(&p);
            } else if let Err(err) = fs::remove_file(&p) {
                eprintln!("demo: removing {}: {err}", p.display());
            }
        }
    }
    if let Err(err) = fs::remove_dir(dir) {
        eprintln!("demo: removing {}: {err}", dir.display());
    }
}

/// `redirect-agent detect` on the server pod, when that command works here; silent otherwise.
fn detect(agent: &Agent, netns: &Path) {
    let args: Vec<String> = vec![
        "detect".into(),
        "--netns".into(),
        netns.display().to_string(),
    ];
    let Ok(mut child) = agent
        .command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return;
    };
    let deadline = Instant::now() + DETECT_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    };
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        use std::io::Read as _;
        let _ = out.read_to_string(&mut stdout);
    }
    // 0 = nothing affected, 1 = affected listeners found; both are reports worth showing.
    if !matches!(status.code(), Some(0 | 1)) || stdout.trim().is_empty() {
        return;
    }
    println!(
        "# which listeners does the pod-IP delivery change affect? (no shell in the pod needed)"
    );
    println!("$ redirect-agent {}", args.join(" "));
    print_indented(&stdout);
}

fn print_indented(text: &str) {
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        println!("    {line}");
    }
}

const CELL: usize = 30;

fn print_matrix(results: &[Vec<(String, bool)>], pod_ips: &[IpAddr; 2]) {
    let labels: Vec<String> = pod_ips
        .iter()
        .flat_map(|ip| {
            AppBind::ALL
                .iter()
                .map(move |b| format!("{:<9}{}", bind_kind(*b), bind_addr(*b, *ip)))
        })
        .collect();
    let lw = labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0)
        .max(9);
    let group = 2 * CELL;
    println!("conformance matrix: client pod -> server POD_IP:P, through the server's proxy");
    let mut line = format!("{:lw$} |", "");
    for p in InboundPolicy::ALL {
        let _ = write!(line, " {:<group$}|", policy_title(p));
    }
    println!("{line}");
    let mut line = format!("{:<lw$} |", "app binds");
    for _ in InboundPolicy::ALL {
        line.push(' ');
        for d in ProxyDial::ALL {
            let _ = write!(line, "{:<CELL$}", dial_title(d));
        }
        line.push('|');
    }
    println!("{line}");
    println!("{}", "-".repeat(lw + 1 + 2 * (group + 2)));
    for (i, (label, row)) in labels.iter().zip(results).enumerate() {
        if i == AppBind::ALL.len() {
            println!("{:lw$} |{:w$}|{:w$}|", "", "", "", w = group + 1);
        }
        let mut line = format!("{label:<lw$} |");
        for (j, (text, ok)) in row.iter().enumerate() {
            if j % 2 == 0 {
                line.push(' ');
            }
            let mark = if *ok { '✓' } else { '✗' };
            let _ = write!(line, "{:<CELL$}", format!("{mark} {text}"));
            if j % 2 == 1 {
                line.push('|');
            }
        }
        println!("{line}");
    }
    println!("✓/✗ = as DESIGN.md expects or not; peer = the source address the application saw.");
    println!(
        "The policy picks where a connection ends, the proxy's config never does: a proxy that"
    );
    println!(
        "dials POD_IP:P under localhost lands at 127.0.0.1:P (from the 127.0.0.6 it bound itself)."
    );
}

fn print_counters(counters: &[serde_json::Map<String, serde_json::Value>]) {
    let get = |m: &serde_json::Map<String, serde_json::Value>, k: &str| {
        m.get(k).and_then(|v| v.as_u64()).unwrap_or(0)
    };
    let Some(first) = counters.first() else {
        return;
    };
    // Counters that stayed zero under both policies are left out.
    let names: Vec<&String> = first
        .keys()
        .filter(|k| counters.iter().any(|c| get(c, k) > 0))
        .collect();
    let lw = names.iter().map(|n| n.len()).max().unwrap_or(0).max(9);
    let policies: Vec<&str> = InboundPolicy::ALL
        .iter()
        .take(counters.len())
        .map(|p| p.name())
        .collect();
    println!();
    println!("server pod counters from `redirect-agent stats`, per policy (12 connections each):");
    let mut line = format!("{:<lw$} |", "counter");
    for p in &policies {
        let _ = write!(line, " {p:>12}");
    }
    println!("{line}");
    for n in names {
        let mut line = format!("{n:<lw$} |");
        for c in counters {
            let _ = write!(line, " {:>12}", get(c, n));
        }
        println!("{line}");
    }
}
