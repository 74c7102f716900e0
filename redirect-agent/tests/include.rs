//! Istio's include lists in the real datapath (DESIGN.md, "Include lists"): real pods, the
//! real kernel, the test proxy as uid 1337. Needs root; without it each test says why and
//! returns, except under `CI=true`, where a skip is a failure.

mod common;

use common::*;

fn wildcard_echo(pod: &Pod, ports: &[u16]) -> PodProcess {
    let mut listen = Vec::new();
    for p in ports {
        listen.push(sock(Family::V4.unspecified(), *p));
        listen.push(sock(Family::V6.unspecified(), *p));
    }
    echo(pod, APP_UID, &listen)
}

/// `--include-inbound-ports`: only the listed ports reach the proxy; others go straight to the
/// application, and an exclusion of a listed port means nothing (Istio ignores
/// excludeInboundPorts beside an include list).
#[test]
fn include_inbound_ports_limit_capture() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = wildcard_echo(&server, &[WILDCARD_PORT, 18086]);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    let included = WILDCARD_PORT.to_string();
    agent.enroll(
        &server,
        &[
            "--include-inbound-ports",
            &included,
            "--exclude-inbound-ports",
            &included,
        ],
    );
    let before = agent.stats(&server.name);
    let mut failures = Failures::default();
    if let Some(why) = captured_inbound(&client, &server, &proxy) {
        failures.push(format!("included port not captured: {why}"));
    }
    let seen = proxy.entries().len();
    for f in Family::BOTH {
        let to = sock(f.pod_ip(&server), 18086);
        let got = probe(&client, to);
        let expect = Expect::Echo {
            local: to,
            peer: f.pod_ip(&client),
            direct: true,
        };
        failures.check(format!("client -> not included {to}"), expect, &got);
    }
    if proxy.entries().len() != seen {
        failures.push(format!(
            "the proxy saw a port that is not included: {:?}",
            &proxy.entries()[seen..]
        ));
    }
    let d = delta(&before, &agent.stats(&server.name));
    let want = delta(
        &counters(&[]),
        &counters(&[
            ("inbound_captured", 2),
            ("inbound_excluded", 2),
            ("orig_dst_local", 2),
            ("delivered_pod_ip", 2),
        ]),
    );
    if d != want {
        failures.push(format!("counters moved {d:?}, expected {want:?}"));
    }
    failures.assert_none("include inbound ports");
}

/// `--include-outbound-cidrs` and `--include-outbound-ports` in Istio's order: an excluded
/// port wins over an included range, an included port is captured whatever its address, a
/// destination outside every included range goes straight out.
#[test]
fn include_outbound_ranges_and_ports() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let kept = node.add_pod("kept").unwrap();
    let other = node.add_pod("other").unwrap();
    let _e1 = wildcard_echo(&kept, &[WILDCARD_PORT, 18090]);
    let _e2 = wildcard_echo(&other, &[WILDCARD_PORT, 18091]);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    let cidrs = format!("{}/32,{}/128", kept.ip4, kept.ip6);
    agent.enroll(
        &server,
        &[
            "--include-outbound-cidrs",
            &cidrs,
            "--include-outbound-ports",
            "18091",
            "--exclude-outbound-ports",
            "18090",
        ],
    );
    let before = agent.stats(&server.name);
    let mut failures = Failures::default();
    let mut want_seen = Vec::new();
    for f in Family::BOTH {
        for (to, direct) in [
            (sock(f.pod_ip(&kept), WILDCARD_PORT), false),
            (sock(f.pod_ip(&kept), 18090), true),
            (sock(f.pod_ip(&other), WILDCARD_PORT), true),
            (sock(f.pod_ip(&other), 18091), false),
        ] {
            let got = connect_as(&server, APP_UID, to, None);
            let expect = Expect::Echo {
                local: to,
                peer: f.pod_ip(&server),
                direct,
            };
            failures.check(format!("app -> {to}"), expect, &got);
            if !direct {
                want_seen.push(to);
            }
        }
    }
    let seen: Vec<_> = proxy.entries().iter().filter_map(|e| e.orig_dst).collect();
    if seen != want_seen {
        failures.push(format!("the proxy saw {seen:?}, expected {want_seen:?}"));
    }
    let d = delta(&before, &agent.stats(&server.name));
    let want = delta(
        &counters(&[]),
        &counters(&[
            ("outbound_excluded", 4),
            ("outbound_captured", 4),
            ("orig_dst_hit", 4),
        ]),
    );
    if d != want {
        failures.push(format!("counters moved {d:?}, expected {want:?}"));
    }
    failures.assert_none("include outbound");
}

/// Empty include lists: nothing captured inbound or outbound (Istio's `""`), the pod still
/// enrolled; `"*"` is the default.
#[test]
fn empty_include_lists_capture_nothing() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = wildcard_echo(&server, &[WILDCARD_PORT]);
    let _e = wildcard_echo(&client, &[WILDCARD_PORT]);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(
        &server,
        &["--include-inbound-ports=", "--include-outbound-cidrs="],
    );
    let mut failures = Failures::default();
    if let Some(why) = direct_inbound(&client, &server) {
        failures.push(format!("inbound with an empty include list: {why}"));
    }
    for f in Family::BOTH {
        let to = sock(f.pod_ip(&client), WILDCARD_PORT);
        let got = connect_as(&server, APP_UID, to, None);
        let expect = Expect::Echo {
            local: to,
            peer: f.pod_ip(&server),
            direct: true,
        };
        failures.check(format!("app -> {to}"), expect, &got);
    }
    if !proxy.entries().is_empty() {
        failures.push(format!("the proxy saw {:?}", proxy.entries()));
    }
    // Back to "*": captured again, by an update in place.
    agent.enroll(
        &server,
        &[
            "--include-inbound-ports",
            "*",
            "--include-outbound-cidrs",
            "*",
        ],
    );
    if let Some(why) = captured_inbound(&client, &server, &proxy) {
        failures.push(format!("after \"*\": {why}"));
    }
    failures.assert_none("empty include lists");
}
