//! DNS capture with real programs (issue 13, item 4): Debian's `dnsmasq` as the proxy's DNS
//! listener on 15053 running as uid 1337 in the pod, another `dnsmasq` as the upstream server
//! the application asks, in another pod, and `dig` (UDP and `+tcp`) as the application. Each
//! server answers `who.test` with an address of its own, so the answer proves which server
//! replied; `up.test` is forwarded by the proxy's server to the upstream, which proves that the
//! proxy's own queries are not captured (they would loop back to itself). With capture off
//! nothing changes. Needs root, `dnsmasq` and `dig`; without them each test says why.

mod common;

use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr},
    process::{Command, Stdio},
};

use common::*;

/// What the upstream server answers for `who.test`, and for `up.test`.
const UPSTREAM_WHO: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 1);
const UPSTREAM_UP: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 2);
/// What the proxy's DNS server answers for `who.test`.
const PROXY_WHO: Ipv4Addr = Ipv4Addr::new(198, 19, 201, 1);

fn tool(name: &str, arg: &str) -> Need {
    let found = Command::new(name)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(drop)
        .map_err(|e| format!("{name}: {e} (Debian: apt-get install dnsmasq-base bind9-dnsutils)"));
    Need::machine(name.to_string(), found)
}

/// `dnsmasq` in `pod` as `uid`, on `port`, answering `who.test` with `who`, and forwarding
/// `up.test` to `forward` if given (else answering it with [`UPSTREAM_UP`]).
fn dnsmasq(pod: &Pod, uid: u32, port: u16, who: Ipv4Addr, forward: Option<IpAddr>) -> PodProcess {
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--pid-file=",
        "--log-facility=-",
        "--log-queries",
    ])
    .arg(format!("--port={port}"))
    .arg(format!("--address=/who.test/{who}"))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if uid == 0 {
        cmd.arg("--user=root");
    }
    match forward {
        Some(up) => cmd.arg(format!("--server=/up.test/{up}")),
        None => cmd.arg(format!("--address=/up.test/{UPSTREAM_UP}")),
    };
    let mut p = pod.spawn(uid, cmd).expect("spawn dnsmasq");
    for f in Family::BOTH {
        p.wait_for_listen(sock(f.unspecified(), port), LISTEN_WAIT)
            .expect("dnsmasq listens");
    }
    p
}

/// `dig @server name` in `pod` as the application: the first A record, or why not.
fn dig(pod: &Pod, server: IpAddr, name: &str, tcp: bool) -> Result<Ipv4Addr, String> {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{server}"))
        .args([name, "A", "+short", "+time=2", "+tries=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if tcp {
        cmd.arg("+tcp");
    }
    let mut p = pod.spawn(APP_UID, cmd).expect("spawn dig");
    let mut text = String::new();
    p.child_mut()
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut text)
        .expect("read dig output");
    let mut err = String::new();
    let _ = p
        .child_mut()
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut err);
    let status = p.child_mut().wait().expect("wait dig");
    text.lines()
        .find_map(|l| l.trim().parse::<Ipv4Addr>().ok())
        .ok_or_else(|| format!("dig @{server} {name} (tcp {tcp}): {status}: {text:?} {err:?}"))
}

/// Who answers the application's queries to the upstream server, over UDP and TCP, IPv4 and
/// IPv6, and whether the proxy's own forwarded query reaches the upstream.
fn answers(app: &Pod, upstream: &Pod) -> Vec<String> {
    let mut out = Vec::new();
    for f in Family::BOTH {
        for tcp in [false, true] {
            for name in ["who.test", "up.test"] {
                let got = dig(app, f.pod_ip(upstream), name, tcp);
                out.push(format!(
                    "{} {} {name}: {}",
                    f.name(),
                    if tcp { "tcp" } else { "udp" },
                    match got {
                        Ok(a) if a == UPSTREAM_WHO => "upstream".to_string(),
                        Ok(a) if a == PROXY_WHO => "proxy".to_string(),
                        Ok(a) if a == UPSTREAM_UP => "upstream (up)".to_string(),
                        Ok(a) => format!("{a}?"),
                        Err(e) => e,
                    }
                ));
            }
        }
    }
    out
}

fn expected(who: &str) -> Vec<String> {
    let mut out = Vec::new();
    for f in Family::BOTH {
        for proto in ["udp", "tcp"] {
            out.push(format!("{} {proto} who.test: {who}", f.name()));
            out.push(format!("{} {proto} up.test: upstream (up)", f.name()));
        }
    }
    out
}

/// With `--dns-capture` the application's queries to the upstream are answered by the proxy's
/// server (UDP and TCP, both families), from the address it asked (dig accepts no other), and
/// the proxy's own query for `up.test` reaches the upstream; without it (the same pod, enrolled
/// again without the flag) the upstream answers.
#[test]
fn dns_capture_sends_queries_to_the_proxy_dns_port() {
    require!(
        Need::Root,
        datapath(),
        tool("dnsmasq", "--version"),
        tool("dig", "-v")
    );
    let node = Node::new().unwrap();
    let app = node.add_pod("app").unwrap();
    let upstream = node.add_pod("upstream").unwrap();
    let _up = dnsmasq(&upstream, 0, 53, UPSTREAM_WHO, None);
    let _proxy_dns = dnsmasq(
        &app,
        PROXY_UID,
        15053,
        PROXY_WHO,
        Some(IpAddr::V4(upstream.ip4)),
    );
    // The proxy's TCP side: without DNS capture, TCP to port 53 is ordinary outbound traffic.
    let _proxy = Proxy::start(&node, &app, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();

    let mut failures = Failures::default();
    agent.enroll(&app, &[]);
    let off = answers(&app, &upstream);
    if off != expected("upstream") {
        failures.push(format!("capture off: {off:#?}"));
    }
    agent.enroll(&app, &["--dns-capture"]);
    let on = answers(&app, &upstream);
    if on != expected("proxy") {
        failures.push(format!("capture on: {on:#?}"));
    }
    agent.enroll(&app, &[]);
    let off_again = answers(&app, &upstream);
    if off_again != expected("upstream") {
        failures.push(format!("capture off again: {off_again:#?}"));
    }
    failures.assert_none("DNS capture");
}

/// One unconnected UDP socket asks two upstream servers (IPv4): under capture both queries go
/// to the proxy's server (each to the loopback address of its own server), and each reply is
/// reported as coming from the server its query went to: the reverse mapping is keyed by
/// socket and address, not by socket alone.
#[test]
fn dns_replies_of_one_socket_name_their_servers() {
    require!(
        Need::Root,
        datapath(),
        tool("dnsmasq", "--version"),
        tool("dig", "-v")
    );
    let node = Node::new().unwrap();
    let app = node.add_pod("app").unwrap();
    let one = node.add_pod("one").unwrap();
    let two = node.add_pod("two").unwrap();
    let _one = dnsmasq(&one, 0, 53, UPSTREAM_WHO, None);
    let _two = dnsmasq(&two, 0, 53, UPSTREAM_WHO, None);
    let _proxy_dns = dnsmasq(&app, PROXY_UID, 15053, PROXY_WHO, None);
    let agent = Agent::new();
    agent.enroll(&app, &["--dns-capture"]);
    let servers = [sock(one.ip4, 53), sock(two.ip4, 53)];
    let mut cmd = Command::new(testbed_bin());
    cmd.args(["dns-query", "--name", "who.test"])
        .args(
            servers
                .iter()
                .flat_map(|s| ["--server".to_string(), s.to_string()]),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = app.spawn(APP_UID, cmd).expect("spawn dns-query");
    let mut out = String::new();
    p.child_mut()
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .expect("read dns-query output");
    let mut err = String::new();
    let _ = p
        .child_mut()
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut err);
    let status = p.child_mut().wait().expect("wait dns-query");
    assert!(status.success(), "dns-query: {status}: {out} {err}");
    let mut replies: Vec<(u64, String, String)> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("reply line");
            (
                v["id"].as_u64().unwrap(),
                v["from"].as_str().unwrap().to_string(),
                v["answer"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    replies.sort();
    let want: Vec<(u64, String, String)> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| (1 + i as u64, s.to_string(), PROXY_WHO.to_string()))
        .collect();
    assert_eq!(replies, want, "replies (id, from, answer)");
}
