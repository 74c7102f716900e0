//! DNS capture with real programs (issue 13, item 4): Debian's `dnsmasq` as the proxy's DNS
//! listener on 15053 running as uid 1337 in the pod, another `dnsmasq` as the upstream server
//! the application asks, in another pod, and `dig` (UDP and `+tcp`) as the application. Each
//! server answers `who.test` with an address of its own, so the answer proves which server
//! replied; `up.test` is forwarded by the proxy's server to the upstream, which proves that the
//! proxy's own queries are not captured (they would loop back to itself). With capture off
//! nothing changes. glibc's resolver (`getent ahosts`) the same way. The counters
//! (`dns_captured`, `dns_tcp_captured`, `dns_replies_rewritten`) say what the datapath did.
//! Needs root, `dnsmasq`, `dig` and util-linux; without them each test says why.

mod common;

use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
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

/// `dnsmasq` in `pod` as `uid` on `port` with the given extra arguments (no other names known),
/// listening on the wildcard.
fn dnsmasq_with(pod: &Pod, uid: u32, port: u16, extra: &[String]) -> PodProcess {
    let any = [Family::V4.unspecified(), Family::V6.unspecified()];
    dnsmasq_at(pod, uid, port, extra, &any)
}

/// The same, ready once it listens on each of `listen` at `port`.
fn dnsmasq_at(pod: &Pod, uid: u32, port: u16, extra: &[String], listen: &[IpAddr]) -> PodProcess {
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
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if uid == 0 {
        cmd.arg("--user=root");
    }
    let mut p = pod.spawn(uid, cmd).expect("spawn dnsmasq");
    for a in listen {
        p.wait_for_listen(sock(*a, port), LISTEN_WAIT)
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
    let before = agent.stats(&app.name);
    let on = answers(&app, &upstream);
    if on != expected("proxy") {
        failures.push(format!("capture on: {on:#?}"));
    }
    // dig: 4 TCP queries (2 families, 2 names, one connection each, no retries) and 4 UDP
    // ones, each read back from the server dig asked.
    let d = delta(&before, &agent.stats(&app.name));
    if d.get("dns_tcp_captured") != Some(&4)
        || d.get("dns_captured").copied().unwrap_or(0) < 4
        || d.get("dns_replies_rewritten").copied().unwrap_or(0) < 4
    {
        failures.push(format!("capture on, counters: {d:?}"));
    }
    agent.enroll(&app, &[]);
    let off_again = answers(&app, &upstream);
    if off_again != expected("upstream") {
        failures.push(format!("capture off again: {off_again:#?}"));
    }
    failures.assert_none("DNS capture");
}

/// What servers `one` and `two` answer for `one.test` and `two.test`: each name is known to its
/// own server only, so an answer proves which server it came from.
const ONE_ANSWER: Ipv4Addr = Ipv4Addr::new(198, 19, 202, 1);
const TWO_ANSWER: Ipv4Addr = Ipv4Addr::new(198, 19, 202, 2);

/// `redirect-testbed dns-query` in `pod` as the application: one unconnected UDP socket sends
/// `names[i]` to `servers[i]`, in order, then reads every reply (or, with `connect` `udp` or
/// `tcp`, one socket per server connected to it); each reply as `ID from ADDR: ANSWER` (the
/// address `recvfrom` said it came from, the first A record), plus `, peer ADDR` for a
/// connected socket (its `getpeername()`), sorted by id.
fn dns_query(
    pod: &Pod,
    servers: &[SocketAddr],
    names: &[&str],
    connect: Option<&str>,
) -> Result<Vec<String>, String> {
    let mut cmd = Command::new(testbed_bin());
    cmd.arg("dns-query")
        .args(names.iter().flat_map(|n| ["--name", n]))
        .args(
            servers
                .iter()
                .flat_map(|s| ["--server".to_string(), s.to_string()]),
        )
        .args(connect.iter().flat_map(|c| ["--connect", c]))
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut p = pod.spawn(APP_UID, cmd).expect("spawn dns-query");
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
    if !status.success() {
        return Err(format!("dns-query: {status}: {out:?} {}", err.trim()));
    }
    let mut replies: Vec<(u64, String)> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("reply line");
            let id = v["id"].as_u64().unwrap();
            let mut line = format!(
                "{id} from {}: {}",
                v["from"].as_str().unwrap(),
                v["answer"].as_str().unwrap_or("-")
            );
            if let Some(peer) = v["peer"].as_str() {
                line.push_str(&format!(", peer {peer}"));
            }
            (id, line)
        })
        .collect();
    replies.sort();
    Ok(replies.into_iter().map(|(_, l)| l).collect())
}

/// What `dns_query` must return when servers one and two each answered their own name.
fn from_each_server(servers: &[SocketAddr; 2], connected: bool) -> Vec<String> {
    [(servers[0], ONE_ANSWER), (servers[1], TWO_ANSWER)]
        .iter()
        .enumerate()
        .map(|(i, (s, a))| {
            let peer = if connected {
                format!(", peer {s}")
            } else {
                String::new()
            };
            format!("{} from {s}: {a}{peer}", i + 1)
        })
        .collect()
}

/// One unconnected UDP socket asks two servers (`sendmsg` to server one, then to server two,
/// then reads both replies), IPv4 and IPv6: it asks server one for `one.test` and server two
/// for `two.test`, names only that server knows. The same with one connected UDP socket and
/// one TCP connection per server, whose `getpeername()` must be the server too. Under capture both queries go to the proxy's
/// `dnsmasq` (uid 1337), which forwards each name to the server that knows it (its own queries
/// are not captured), and each reply must be reported as coming from the server its query was
/// sent to: the answer inside proves which server produced it, `recvfrom` says which one the
/// application thinks replied. The reverse mapping is keyed by socket and address: keyed by
/// socket alone, both replies would name the last server. Without capture the servers answer
/// directly, and the application sees exactly the same; the counters say which path was taken.
/// IPv6 needs the reply addresses on the pod's `lo` (`100::53:0-7`): there while the pod
/// captures DNS, gone without.
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
    let server = |pod: &Pod, name: &str, answer: Ipv4Addr| {
        dnsmasq_with(pod, 0, 53, &[format!("--address=/{name}/{answer}")])
    };
    let _one = server(&one, "one.test", ONE_ANSWER);
    let _two = server(&two, "two.test", TWO_ANSWER);
    let _proxy_dns = dnsmasq_with(
        &app,
        PROXY_UID,
        15053,
        &[
            format!("--server=/one.test/{}", one.ip4),
            format!("--server=/two.test/{}", two.ip4),
            format!("--address=/who.test/{PROXY_WHO}"),
        ],
    );
    // The proxy's TCP side: without DNS capture, TCP to port 53 is ordinary outbound traffic.
    let _proxy = Proxy::start(&node, &app, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    let pool = |pod: &Pod| {
        let lo = lo_addresses(pod);
        (0..8)
            .filter(|i| lo.contains(&format!("inet6 100::53:{i}/128")))
            .count()
    };
    let mut failures = Failures::default();
    for (case, flags, captured) in [
        ("capture off", &[][..], false),
        ("capture on", &["--dns-capture"][..], true),
        ("capture off again", &[][..], false),
    ] {
        agent.enroll(&app, flags);
        let addresses = pool(&app);
        if addresses != if captured { 8 } else { 0 } {
            failures.push(format!(
                "{case}: {addresses} of the 8 DNS reply addresses on lo: {}",
                lo_addresses(&app)
            ));
        }
        for f in Family::BOTH {
            let servers = [sock(f.pod_ip(&one), 53), sock(f.pod_ip(&two), 53)];
            // (mode, connected, what is counted with capture on and off: dns_captured,
            // dns_replies_rewritten, dns_tcp_captured, peername_rewritten; off, TCP to port 53
            // is outbound traffic through the proxy, whose peer is rewritten too).
            for (mode, connect, on, off) in [
                ("one unconnected socket", None, [2, 2, 0, 0], [0; 4]),
                ("connected UDP sockets", Some("udp"), [2, 2, 0, 2], [0; 4]),
                ("TCP connections", Some("tcp"), [0, 0, 2, 2], [0, 0, 0, 2]),
            ] {
                let before = agent.stats(&app.name);
                let got = dns_query(&app, &servers, &["one.test", "two.test"], connect);
                let d = delta(&before, &agent.stats(&app.name));
                let want = from_each_server(&servers, connect.is_some());
                if got.as_ref() != Ok(&want) {
                    failures.push(format!(
                        "{case}, {}, {mode}: replies {got:?}, want {want:?}",
                        f.name()
                    ));
                }
                let names = [
                    "dns_captured",
                    "dns_replies_rewritten",
                    "dns_tcp_captured",
                    "peername_rewritten",
                ];
                let counted = names.map(|n| d.get(n).copied().unwrap_or(0));
                let want_counted = if captured { on } else { off };
                if counted != want_counted {
                    failures.push(format!(
                        "{case}, {}, {mode}: {names:?} {counted:?}, want {want_counted:?}: {d:?}",
                        f.name()
                    ));
                }
            }
        }
    }
    agent.unenroll(&app.name);
    if pool(&app) != 0 {
        failures.push(format!("unenrolled: {}", lo_addresses(&app)));
    }
    failures.assert_none("one socket, two servers");
}

/// `getent ahosts name` in `pod` as the application, with glibc's resolver configured to ask
/// `server` only (`/etc/resolv.conf` and `/etc/nsswitch.conf` replaced by bind mounts in a
/// private mount namespace of the command alone, so the machine's files are never touched):
/// the addresses it prints, or why not.
fn getent(node: &Node, pod: &Pod, server: IpAddr, name: &str) -> Result<Vec<IpAddr>, String> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let resolv = node.scratch_file(&format!("resolv-{n}.conf")).unwrap();
    std::fs::write(
        &resolv,
        format!("nameserver {server}\noptions timeout:2 attempts:1\n"),
    )
    .unwrap();
    let nsswitch = node.scratch_file(&format!("nsswitch-{n}.conf")).unwrap();
    std::fs::write(&nsswitch, "hosts: dns\n").unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount --bind \"$1\" /etc/resolv.conf && mount --bind \"$2\" /etc/nsswitch.conf && \
             exec \"$5\" --reuid=\"$3\" --regid=\"$3\" --clear-groups getent ahosts \"$4\"",
        )
        .arg("getent")
        .arg(&resolv)
        .arg(&nsswitch)
        .arg(APP_UID.to_string())
        .arg(name)
        // util-linux's, by its path: a busybox `sh` (the kernel matrix's guests) would run its
        // own `setpriv` applet, which has no --reuid.
        .arg(on_path("setpriv"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Root only to make the mounts; the resolver runs as the application's uid.
    let mut p = pod.spawn(0, cmd).expect("spawn getent");
    let mut text = String::new();
    p.child_mut()
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut text)
        .expect("read getent output");
    let mut err = String::new();
    let _ = p
        .child_mut()
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut err);
    let status = p.child_mut().wait().expect("wait getent");
    let mut addrs: Vec<IpAddr> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!(
            "getent ahosts {name} via {server}: {status}: {text:?} {err:?}"
        ));
    }
    Ok(addrs)
}

/// The first `name` on `PATH` (the name itself if none: the spawn then says why).
fn on_path(name: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| name.into())
}

/// glibc's resolver (`getent ahosts`, which asks A and AAAA over one connected UDP socket and
/// reads the replies with `recvfrom`, checking that they come from the server it asked) with
/// the pod's configured upstream as its name server, IPv4 and IPv6: with capture off the
/// upstream answers, with `--dns-capture` the proxy's server (uid 1337) answers, and off again
/// the upstream. The answers prove which server replied; the counters say what the datapath did.
#[test]
fn glibc_resolver_is_answered_by_the_proxy_dns_server_under_capture() {
    require!(
        Need::Root,
        datapath(),
        tool("dnsmasq", "--version"),
        tool("getent", "--version"),
        tool("unshare", "--version"),
        tool("setpriv", "--version")
    );
    let node = Node::new().unwrap();
    let app = node.add_pod("app").unwrap();
    let upstream = node.add_pod("upstream").unwrap();
    let _up = dnsmasq(&upstream, 0, 53, UPSTREAM_WHO, None);
    let _proxy_dns = dnsmasq(&app, PROXY_UID, 15053, PROXY_WHO, None);
    let agent = Agent::new();
    let who = |expect: Ipv4Addr| -> Vec<String> {
        Family::BOTH
            .iter()
            .map(|f| {
                let got = getent(&node, &app, f.pod_ip(&upstream), "who.test");
                let said = match got {
                    Ok(a) if a == [IpAddr::V4(UPSTREAM_WHO)] => "upstream".to_string(),
                    Ok(a) if a == [IpAddr::V4(PROXY_WHO)] => "proxy".to_string(),
                    Ok(a) => format!("{a:?}?"),
                    Err(e) => e,
                };
                let want = if expect == PROXY_WHO {
                    "proxy"
                } else {
                    "upstream"
                };
                format!("{}: {said} (want {want})", f.name())
            })
            .collect()
    };
    let ok = |lines: &[String]| {
        lines.iter().all(|l| {
            let (said, want) = l.split_once(" (want ").unwrap();
            said.ends_with(want.trim_end_matches(')'))
        })
    };
    let dns_counters = ["dns_captured", "dns_tcp_captured", "dns_replies_rewritten"];
    let mut failures = Failures::default();

    agent.enroll(&app, &[]);
    let before = agent.stats(&app.name);
    let off = who(UPSTREAM_WHO);
    if !ok(&off) {
        failures.push(format!("capture off: {off:?}"));
    }
    let d = delta(&before, &agent.stats(&app.name));
    if dns_counters.iter().any(|c| d.contains_key(*c)) {
        failures.push(format!("capture off counted DNS: {d:?}"));
    }

    agent.enroll(&app, &["--dns-capture"]);
    let before = agent.stats(&app.name);
    let on = who(PROXY_WHO);
    if !ok(&on) {
        failures.push(format!("capture on: {on:?}"));
    }
    let d = delta(&before, &agent.stats(&app.name));
    // One connected UDP socket per lookup (glibc), one reply at least per lookup read back.
    if d.get("dns_captured").copied().unwrap_or(0) < 2
        || d.get("dns_replies_rewritten").copied().unwrap_or(0) < 2
        || d.contains_key("dns_tcp_captured")
    {
        failures.push(format!("capture on, counters: {d:?}"));
    }

    agent.enroll(&app, &[]);
    let off_again = who(UPSTREAM_WHO);
    if !ok(&off_again) {
        failures.push(format!("capture off again: {off_again:?}"));
    }
    failures.assert_none("glibc resolver");
}

/// DNS capture turned on by the pod's annotations, through the path the CNI plugin and the API
/// watch take (`annotations::pod_spec`, then the library's enroll), not by the command line:
/// `redirect.dev/dns-capture: "true"` and Istio's `ISTIO_META_DNS_CAPTURE: "true"` in
/// `proxy.istio.io/config` each send the application's queries to the proxy's server; without
/// either, or with redirect's own annotation saying `false`, the upstream answers.
#[test]
fn dns_capture_follows_the_pod_annotations() {
    use redirect_agent::annotations::{self, Annotations, NodeDefaults, PodPlace};
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
    let _proxy_dns = dnsmasq(&app, PROXY_UID, 15053, PROXY_WHO, None);
    let agent = Agent::new();
    let mut writer = redirect_agent::commands::Writer::new(&agent.state_dir, &agent.pin_root);
    let istio = "holdApplicationUntilProxyStarts: true\nproxyMetadata:\n  \
                 ISTIO_META_DNS_CAPTURE: \"true\"\n";
    let mut failures = Failures::default();
    for (case, pairs, want) in [
        ("no annotation", vec![], UPSTREAM_WHO),
        (
            "redirect.dev/dns-capture",
            vec![(annotations::DNS_CAPTURE, "true")],
            PROXY_WHO,
        ),
        (
            "ISTIO_META_DNS_CAPTURE in proxy.istio.io/config",
            vec![(annotations::PROXY_CONFIG, istio)],
            PROXY_WHO,
        ),
        (
            "Istio's on, redirect.dev/dns-capture false",
            vec![
                (annotations::PROXY_CONFIG, istio),
                (annotations::DNS_CAPTURE, "false"),
            ],
            UPSTREAM_WHO,
        ),
    ] {
        let a: Annotations = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let place = PodPlace {
            name: app.name.clone(),
            cgroup: app.cgroup.clone(),
            netns: app.netns_path.clone(),
            pod_ips: vec![app.ip4.into(), app.ip6.into()],
            kube: None,
        };
        let spec = annotations::pod_spec(&NodeDefaults::default(), place, &a)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        if let Err(e) = writer.enroll(spec) {
            failures.push(format!(
                "{case}: enroll: {}",
                redirect_agent::error_chain(&e)
            ));
            continue;
        }
        for f in Family::BOTH {
            let got = dig(&app, f.pod_ip(&upstream), "who.test", false);
            if got.as_ref() != Ok(&want) {
                failures.push(format!("{case}, {}: {got:?}, want {want}", f.name()));
            }
        }
    }
    failures.assert_none("DNS capture by annotation");
}

/// Istio's DNS capture rules as `istio-iptables --redirect-dns --capture-all-dns` writes them
/// (nat table; proxy uid and gid 1337): TCP port 53 from `ISTIO_OUTPUT`, UDP port 53 from
/// `OUTPUT`, the proxy's own queries returned first. Left out: the raw table's conntrack zones,
/// which only keep the application's and the proxy's flows apart when their tuples would meet
/// (never here), and the TCP capture table, which no flow of the test uses.
const ISTIO_DNS_RULES: &str = "*nat
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p tcp --dport 53 -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -p tcp --dport 53 -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -p tcp --dport 53 -j REDIRECT --to-ports 15053
-A OUTPUT -p udp --dport 53 -m owner --uid-owner 1337 -j RETURN
-A OUTPUT -p udp --dport 53 -m owner --gid-owner 1337 -j RETURN
-A OUTPUT -p udp --dport 53 -j REDIRECT --to-ports 15053
COMMIT
";

/// `iptables-restore` (or `ip6tables-restore`) of `input` in `pod`'s own namespace.
fn restore(pod: &Pod, tool: &str, input: &str) -> Result<(), String> {
    use std::io::Write as _;
    pod.in_netns(|| -> Result<(), String> {
        let mut child = Command::new(tool)
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{tool}: {e}"))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    })
    .map_err(|e| e.to_string())?
}

/// The same application in two pods, one under Istio's DNS capture rules (iptables and
/// ip6tables, conntrack un-NATs the replies) and one enrolled with `--dns-capture`, each with
/// the proxy's `dnsmasq` on 15053 as uid 1337: what the application sees is the same. `dig`
/// over UDP and TCP, IPv4 and IPv6 (the answer, from the address dig asked, which dig checks),
/// and one unconnected socket asking two servers (each reply's answer and the server
/// `recvfrom` names).
#[test]
fn dns_capture_looks_as_under_istio_iptables_dns_rules() {
    require!(
        Need::Root,
        datapath(),
        tool("dnsmasq", "--version"),
        tool("dig", "-v"),
        tool("iptables-restore", "--version"),
        tool("ip6tables-restore", "--version")
    );
    let node = Node::new().unwrap();
    let under_iptables = node.add_pod("ipt").unwrap();
    let under_redirect = node.add_pod("rd").unwrap();
    let one = node.add_pod("one").unwrap();
    let two = node.add_pod("two").unwrap();
    let _one = dnsmasq_with(&one, 0, 53, &[format!("--address=/one.test/{ONE_ANSWER}")]);
    let _two = dnsmasq_with(&two, 0, 53, &[format!("--address=/two.test/{TWO_ANSWER}")]);
    let proxy_dns = |pod: &Pod| {
        dnsmasq_with(
            pod,
            PROXY_UID,
            15053,
            &[
                format!("--server=/one.test/{}", one.ip4),
                format!("--server=/two.test/{}", two.ip4),
                format!("--address=/who.test/{PROXY_WHO}"),
            ],
        )
    };
    let _dns_ipt = proxy_dns(&under_iptables);
    let _dns_rd = proxy_dns(&under_redirect);
    restore(&under_iptables, "iptables-restore", ISTIO_DNS_RULES).expect("Istio's DNS rules");
    restore(&under_iptables, "ip6tables-restore", ISTIO_DNS_RULES).expect("Istio's DNS rules");
    let agent = Agent::new();
    agent.enroll(&under_redirect, &["--dns-capture"]);
    let view = |app: &Pod| -> Vec<String> {
        let mut out = Vec::new();
        for f in Family::BOTH {
            for tcp in [false, true] {
                let got = dig(app, f.pod_ip(&one), "who.test", tcp);
                out.push(format!(
                    "{} {} dig @one who.test: {}",
                    f.name(),
                    if tcp { "tcp" } else { "udp" },
                    match got {
                        Ok(a) if a == PROXY_WHO => "the proxy's server".to_string(),
                        Ok(a) => format!("{a}?"),
                        Err(e) => e,
                    }
                ));
            }
            let servers = [sock(f.pod_ip(&one), 53), sock(f.pod_ip(&two), 53)];
            out.push(format!(
                "{} one socket, two servers: {:?}",
                f.name(),
                dns_query(app, &servers, &["one.test", "two.test"], None)
            ));
        }
        out
    };
    let ipt = view(&under_iptables);
    let rd = view(&under_redirect);
    let mut want = Vec::new();
    for f in Family::BOTH {
        for proto in ["udp", "tcp"] {
            want.push(format!(
                "{} {proto} dig @one who.test: the proxy's server",
                f.name()
            ));
        }
        let servers = [sock(f.pod_ip(&one), 53), sock(f.pod_ip(&two), 53)];
        let replies: Result<Vec<String>, String> = Ok(from_each_server(&servers, false));
        want.push(format!("{} one socket, two servers: {replies:?}", f.name()));
    }
    let mut failures = Failures::default();
    if ipt != want {
        failures.push(format!("under Istio's iptables DNS rules: {ipt:#?}"));
    }
    if rd != ipt {
        failures.push(format!(
            "under redirect, differs from iptables: {rd:#?} vs {ipt:#?}"
        ));
    }
    failures.assert_none("DNS capture against Istio's iptables rules");
}

/// The proxy's DNS server bound to loopback only (`127.0.0.1:15053` and `[::1]:15053`, as
/// istio-agent's `localhost:15053` is), not to the wildcard. No socket takes datagrams at the
/// per-server addresses then, so the datapath sends UDP queries to `127.0.0.1`/`::1` (it asks
/// the kernel, `bpf_sk_lookup_udp`), where the server answers: `dig` over UDP and TCP, IPv4 and
/// IPv6, gets the proxy's answer from the server it asked, connected UDP sockets and TCP
/// connections to two servers each name their own. What a loopback-bound server cannot give:
/// one unconnected socket asking two servers gets both answers, but both named after the last
/// server asked (every reply comes from the one loopback address).
#[test]
fn dns_capture_reaches_a_loopback_bound_dns_server() {
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
    let _one = dnsmasq_with(&one, 0, 53, &[format!("--address=/one.test/{ONE_ANSWER}")]);
    let _two = dnsmasq_with(&two, 0, 53, &[format!("--address=/two.test/{TWO_ANSWER}")]);
    let loopback = [Family::V4.loopback(), Family::V6.loopback()];
    let _proxy_dns = dnsmasq_at(
        &app,
        PROXY_UID,
        15053,
        &[
            "--bind-interfaces".to_string(),
            "--listen-address=127.0.0.1,::1".to_string(),
            format!("--server=/one.test/{}", one.ip4),
            format!("--server=/two.test/{}", two.ip4),
            format!("--address=/who.test/{PROXY_WHO}"),
        ],
        &loopback,
    );
    let agent = Agent::new();
    agent.enroll(&app, &["--dns-capture"]);
    let mut failures = Failures::default();
    for f in Family::BOTH {
        for tcp in [false, true] {
            let got = dig(&app, f.pod_ip(&one), "who.test", tcp);
            if got != Ok(PROXY_WHO) {
                failures.push(format!("{} dig (tcp {tcp}): {got:?}", f.name()));
            }
        }
        let servers = [sock(f.pod_ip(&one), 53), sock(f.pod_ip(&two), 53)];
        for connect in [Some("udp"), Some("tcp")] {
            let got = dns_query(&app, &servers, &["one.test", "two.test"], connect);
            let want = from_each_server(&servers, true);
            if got.as_ref() != Ok(&want) {
                failures.push(format!("{} {connect:?}: {got:?}, want {want:?}", f.name()));
            }
        }
        let got = dns_query(&app, &servers, &["one.test", "two.test"], None);
        let want = vec![
            format!("1 from {}: {ONE_ANSWER}", servers[1]),
            format!("2 from {}: {TWO_ANSWER}", servers[1]),
        ];
        if got.as_ref() != Ok(&want) {
            failures.push(format!("{} one socket: {got:?}, want {want:?}", f.name()));
        }
    }
    failures.assert_none("a loopback-bound DNS server");
}
