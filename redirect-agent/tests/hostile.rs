//! Issue 9, item 1: no process inside a pod can affect capture of another pod or of later
//! connections. An application of an enrolled pod (unprivileged where it matters) makes
//! connect() fail in every way it can, holds thousands of connections, binds, listens on the
//! proxy's port and claims another pod's address; afterwards no per-connection state is left in
//! the node-wide maps, and meanwhile another pod's capture works with exact counters.
//!
//! The datapath's per-connection state: each redirected socket's own storage (freed with the
//! socket by the kernel, so not observable once the socket is gone) and `ORIG_DST` with its
//! per-pod count `ORIG_DST_USED`, which these tests read from the pins through
//! `redirect_agent::conntrack`. See `docs/PER-CONNECTION.md`.

mod common;

use std::{
    io::Read as _,
    net::{IpAddr, SocketAddr, TcpListener},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use redirect_agent::conntrack::{PinnedMaps, SlotUsage};
use redirect_common::MAX_ORIG_DST_PER_POD;
use serde_json::Value;

/// The unprivileged application's uid: neither root, nor the proxy, nor the usual app uid.
const HOSTILE_UID: u32 = 4242;
/// How far concurrent connects may take a pod past its `ORIG_DST` share (two CPUs here, a
/// few inserts in flight per CPU; generous).
const QUOTA_SLACK: u32 = 64;

/// The tests of this file one at a time: the 60 s attack keeps both CPUs of a small machine
/// busy, and the other tests' two-second probes would time out beside it for no fault of the
/// datapath.
fn alone() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The slot enroll gave `name` (from its record).
fn slot_of(agent: &Agent, name: &str) -> u32 {
    let path = agent.state_dir.join("pods").join(format!("{name}.json"));
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("record {}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).expect("record is JSON");
    v["slot"].as_u64().expect("record has a slot") as u32
}

fn maps(agent: &Agent) -> PinnedMaps {
    PinnedMaps::open(&agent.pin_root.join("maps")).expect("open ORIG_DST pins")
}

/// Waits (bounded) until `slot` holds nothing: its sockets' closes are processed by the kernel
/// as they happen, but a closing connection may take a few round trips.
fn wait_empty(agent: &Agent, slot: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let maps = maps(agent);
    loop {
        let usage = maps.slot_usage(slot).expect("slot usage");
        if usage == SlotUsage::default() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: slot {slot} still holds {usage:?} in ORIG_DST"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `redirect-testbed hostile` in `pod` as `uid`, stdout piped.
fn start_hostile(pod: &Pod, uid: u32, args: &[String]) -> PodProcess {
    let mut cmd = Command::new(testbed_bin());
    cmd.arg("hostile")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    pod.spawn(uid, cmd).expect("spawn hostile")
}

/// Waits for the hostile application to finish; its one-line JSON report.
fn finish_hostile(mut p: PodProcess) -> Value {
    let mut out = String::new();
    p.child_mut()
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .expect("read hostile report");
    let status = p.child_mut().wait().expect("wait hostile");
    assert!(status.success(), "hostile exited with {status}: {out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("hostile report ({e}): {out:?}"))
}

/// A listener opened by the test itself in `pod`'s network namespace (not its cgroup), which
/// never accepts: connections to it complete in the kernel until its queue is full, then wait
/// in SYN_SENT. Outside the pod's cgroup, so the datapath never takes their `ORIG_DST` entries
/// on that side: the most a pod's connections can hold there.
/// Where a stand-in for the proxy's outbound listener listens: `0.0.0.0:15001` (captured IPv4
/// connections arrive at addresses of 127.128.0.0/12, as at Envoy's wildcard listener) and
/// `[::1]:15001`.
fn outbound_listen(f: Family) -> SocketAddr {
    match f {
        Family::V4 => sock(f.unspecified(), 15001),
        // Captured IPv6 connections go to addresses of 100::/64 (port spreading), which only
        // a wildcard listener accepts; IPV6_V6ONLY keeps it beside the IPv4 one.
        Family::V6 => sock(f.unspecified(), 15001),
    }
}

fn silent_listener(pod: &Pod, addr: SocketAddr) -> TcpListener {
    pod.in_netns(|| redirect_testbed::echo::listen(addr, true))
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("listen on {addr} in {}: {e}", pod.name))
}

/// The application's outbound connection to `to` is captured, reaches the proxy with the exact
/// original destination from SO_ORIGINAL_DST, and is echoed by `to`.
fn outbound_captured(pod: &Pod, proxy: &Proxy, to: SocketAddr) -> Option<String> {
    let seen = proxy.entries().len();
    let got = connect_as(pod, APP_UID, to, None);
    let mut why = Vec::new();
    let expect = Expect::Echo {
        local: to,
        peer: if to.is_ipv4() {
            pod.ip4.into()
        } else {
            pod.ip6.into()
        },
        direct: false,
    };
    if let Some(w) = expect.check(&got) {
        why.push(w);
    }
    let new = proxy.entries().split_off(seen);
    let ok = new.len() == 1
        && new[0].listener == "outbound"
        && new[0].orig_dst == Some(to)
        && new[0].orig_dst_source.as_deref() == Some("so_original_dst")
        && got.local() == Some(new[0].peer);
    if !ok {
        why.push(format!("proxy log: {new:?}"));
    }
    (!why.is_empty()).then(|| format!("app -> {to}: {}", why.join("; ")))
}

/// The counters one round of [`victim_round`] moves: an outbound capture per family (answered
/// from the proxy's socket storage), an inbound capture per family (answered from the socket's
/// own address) delivered to the pod IP.
fn victim_round_counters() -> std::collections::BTreeMap<String, u64> {
    delta(
        &counters(&[]),
        &counters(&[
            ("outbound_captured", 2),
            ("orig_dst_hit", 2),
            ("inbound_captured", 2),
            ("orig_dst_local", 2),
            ("delivered_pod_ip", 2),
        ]),
    )
}

/// The victim pod's capture, outbound to `remote` and inbound from `client`, both families,
/// with exact counters.
fn victim_round(
    agent: &Agent,
    victim: &Pod,
    proxy: &Proxy,
    remote: &Pod,
    client: &Pod,
    when: &str,
) {
    let before = agent.stats(&victim.name);
    let mut failures = Failures::default();
    for f in Family::BOTH {
        if let Some(why) = outbound_captured(victim, proxy, sock(f.pod_ip(remote), WILDCARD_PORT)) {
            failures.push(why);
        }
    }
    if let Some(why) = captured_inbound(client, victim, proxy) {
        failures.push(why);
    }
    let d = delta(&before, &agent.stats(&victim.name));
    let want = victim_round_counters();
    if d != want {
        failures.push(format!("counters moved {d:?}, expected {want:?}"));
    }
    failures.assert_none(&format!("the other pod's capture {when}"));
}

/// (a) Failing connect() patterns, many times over, in an enrolled pod whose proxy accepts:
/// REUSEADDR pairs on one pod address and port to two destinations (for IPv6 the second gets
/// EADDRNOTAVAIL before its SYN; for IPv4 both connect and are dropped at once), non-blocking connects closed in progress, connections reset,
/// connections refused (the proxy's upstream refuses), binds never listened on, another pod's
/// address claimed with IP_FREEBIND, connections held and dropped. Afterwards the pod holds
/// nothing in ORIG_DST, and a new connection is captured exactly.
#[test]
fn failing_connects_leave_no_per_connection_state() {
    require!(Need::Root, datapath());
    let _alone = alone();
    let node = Node::new().unwrap();
    let pod = node.add_pod("pod").unwrap();
    let remote = node.add_pod("remote").unwrap();
    let other = node.add_pod("other").unwrap();
    let _remote_apps = echo(
        &remote,
        APP_UID,
        &Family::BOTH.map(|f| sock(f.unspecified(), WILDCARD_PORT)),
    );
    let proxy = Proxy::start(&node, &pod, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(&pod, &[]);
    let slot = slot_of(&agent, &pod.name);

    let args: Vec<String> = [
        "--duration-ms".into(),
        "4000".into(),
        "--target".into(),
        sock(remote.ip4, WILDCARD_PORT).to_string(),
        "--target".into(),
        sock(remote.ip4, 18090).to_string(),
        "--target".into(),
        sock(remote.ip6, WILDCARD_PORT).to_string(),
        "--target".into(),
        sock(remote.ip6, 18090).to_string(),
        "--refused".into(),
        sock(remote.ip4, 18091).to_string(),
        "--pod-ip".into(),
        pod.ip4.to_string(),
        "--pod-ip".into(),
        pod.ip6.to_string(),
        "--foreign-ip".into(),
        other.ip4.to_string(),
        "--hold".into(),
        "150".into(),
        "--binds".into(),
        "200".into(),
        "--burst".into(),
        "10".into(),
    ]
    .to_vec();
    for round in 0..3 {
        let report = finish_hostile(start_hostile(&pod, APP_UID, &args));
        eprintln!("round {round}: {report}");
        for pattern in [
            "reuseaddr_addrnotavail",
            "closed_in_progress",
            "reset",
            "refused_attempts",
            "binds",
            "freebind_binds",
            "held_connects",
        ] {
            assert!(
                report[pattern].as_u64().unwrap_or(0) > 0,
                "round {round}: pattern {pattern} never happened: {report}"
            );
        }
        wait_empty(&agent, slot, &format!("after round {round}"));
    }
    // Later connections are captured as before. The proxy may still be asking SO_ORIGINAL_DST
    // for the last hostile connections it accepts (an IPv4 REUSEADDR pair's second socket now
    // connects, and is closed at once, but sits in the accept queue): let its counters settle
    // first, so that the two new connections are counted alone.
    let mut before = agent.stats(&pod.name);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        let now = agent.stats(&pod.name);
        if now == before {
            break;
        }
        before = now;
    }
    for f in Family::BOTH {
        if let Some(why) = outbound_captured(&pod, &proxy, sock(f.pod_ip(&remote), WILDCARD_PORT)) {
            panic!("after the failing connects: {why}");
        }
    }
    let d = delta(&before, &agent.stats(&pod.name));
    let want = delta(
        &counters(&[]),
        &counters(&[("outbound_captured", 2), ("orig_dst_hit", 2)]),
    );
    assert_eq!(d, want, "counters of the two new connections");
    wait_empty(&agent, slot, "after the new connections");
    let stats = agent.stats(&pod.name);
    assert_eq!(stats["map_full"], 0, "no map was full: {stats:?}");
}

/// (b) For 60 s an unprivileged application (uid 4242) of one pod holds thousands of
/// connections (more than its ORIG_DST share), fails connects, binds, listens on the proxy's
/// inbound port and claims the other pod's address. The other pod's capture, outbound with
/// SO_ORIGINAL_DST through its proxy and inbound, works during and after, with exactly the
/// expected counters and no `map_full`; the first pod is refused beyond its share (its own
/// `map_full`) and holds nothing once its application exits and it is unenrolled.
#[test]
fn unprivileged_app_cannot_exhaust_maps_for_other_pods() {
    require!(Need::Root, datapath());
    let _alone = alone();
    let node = Node::new().unwrap();
    let hostile = node.add_pod("hostile").unwrap();
    let victim = node.add_pod("victim").unwrap();
    let remote = node.add_pod("remote").unwrap();
    let client = node.add_pod("client").unwrap();
    let sink = node.add_pod("sink").unwrap();
    let _remote_apps = echo(
        &remote,
        APP_UID,
        &Family::BOTH.map(|f| sock(f.unspecified(), WILDCARD_PORT)),
    );
    let _victim_apps = matrix_apps(&victim);
    let victim_proxy = Proxy::start(&node, &victim, ProxyDial::PodIp, "victim-proxy.log");
    // The hostile pod's "proxy": listeners that never accept, so its connections keep their
    // ORIG_DST entries; the sink takes the connections the datapath no longer redirects.
    let _hostile_proxy: Vec<TcpListener> = Family::BOTH
        .iter()
        .map(|f| silent_listener(&hostile, outbound_listen(*f)))
        .collect();
    let sink_targets: Vec<SocketAddr> = Family::BOTH
        .iter()
        .flat_map(|f| [WILDCARD_PORT, 18090].map(|p| sock(f.pod_ip(&sink), p)))
        .collect();
    let _sink: Vec<TcpListener> = sink_targets
        .iter()
        .map(|a| silent_listener(&sink, *a))
        .collect();
    let agent = Agent::new();
    agent.enroll(&hostile, &[]);
    agent.enroll(&victim, &[]);
    let hostile_slot = slot_of(&agent, &hostile.name);
    let victim_slot = slot_of(&agent, &victim.name);
    victim_round(&agent, &victim, &victim_proxy, &remote, &client, "before");

    let hold = (MAX_ORIG_DST_PER_POD + 2000) as usize;
    let mut args: Vec<String> = vec!["--duration-ms".into(), "60000".into()];
    for t in &sink_targets {
        args.push("--target".into());
        args.push(t.to_string());
    }
    args.extend([
        "--refused".into(),
        sock(sink.ip4, 18091).to_string(),
        "--pod-ip".into(),
        hostile.ip4.to_string(),
        "--pod-ip".into(),
        hostile.ip6.to_string(),
        "--foreign-ip".into(),
        victim.ip4.to_string(),
        "--hold".into(),
        hold.to_string(),
    ]);
    let started = Instant::now();
    let app = start_hostile(&hostile, HOSTILE_UID, &args);

    // Wait until the hostile pod is at its share and refused beyond it.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let full = agent.stats(&hostile.name)["map_full"];
        let used = maps(&agent).slot_usage(hostile_slot).unwrap();
        if full > 0 && used.counted >= MAX_ORIG_DST_PER_POD {
            eprintln!(
                "hostile pod at its share after {:?}: {used:?}, map_full {full}",
                started.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hostile pod never reached its ORIG_DST share: {used:?}, map_full {full}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Under attack: the share holds, every entry's source is its own pod's address, the other
    // pod's capture works with exact counters.
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(50) {
        let m = maps(&agent);
        let used = m.slot_usage(hostile_slot).unwrap();
        // The kernel's own count is exact at any moment. A walk of the hash under this churn
        // is not a snapshot (entries removed and added while it runs are both seen), so the
        // entries it finds are compared with the count only once the attack is over (below).
        assert!(
            used.counted <= MAX_ORIG_DST_PER_POD + QUOTA_SLACK,
            "the hostile pod holds more than its share: {used:?}"
        );
        for entry in m.orig_dst.iter() {
            let (key, orig) = entry.unwrap();
            let src = addr_of(&key.src, key.family);
            let own = if orig.slot == hostile_slot {
                [hostile.ip4.into(), hostile.ip6.into()]
            } else {
                [victim.ip4.into(), victim.ip6.into()]
            };
            assert!(
                own.contains(&src) || src.is_loopback(),
                "an ORIG_DST entry of slot {} has the source {src}",
                orig.slot
            );
        }
        victim_round(
            &agent,
            &victim,
            &victim_proxy,
            &remote,
            &client,
            "under attack",
        );
        rounds += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(rounds > 0, "no victim round ran during the attack");
    let report = finish_hostile(app);
    eprintln!("hostile report: {report}; victim rounds during the attack: {rounds}");
    assert!(
        started.elapsed() >= Duration::from_secs(60),
        "the attack ran for 60 s"
    );
    assert!(
        report["held_connects"].as_u64().unwrap() > u64::from(MAX_ORIG_DST_PER_POD),
        "the hostile app held fewer connections than the share: {report}"
    );
    assert!(
        report["reuseaddr_addrnotavail"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        report["proxy_port_listens"].as_u64().unwrap() > 0,
        "{report}"
    );
    victim_round(&agent, &victim, &victim_proxy, &remote, &client, "after");

    let hostile_stats = agent.stats(&hostile.name);
    assert!(hostile_stats["map_full"] > 0, "{hostile_stats:?}");
    assert_eq!(
        hostile_stats["listener_registered"], 0,
        "a non-proxy listener on the proxy's port was registered: {hostile_stats:?}"
    );
    let victim_stats = agent.stats(&victim.name);
    assert_eq!(victim_stats["map_full"], 0, "{victim_stats:?}");
    assert_eq!(victim_stats["orig_dst_miss"], 0, "{victim_stats:?}");

    // The application exited: its sockets and everything they held are gone.
    wait_empty(&agent, hostile_slot, "after the hostile app exited");
    agent.unenroll(&hostile.name);
    let m = maps(&agent);
    assert_eq!(m.slot_usage(hostile_slot).unwrap(), SlotUsage::default());
    wait_empty(&agent, victim_slot, "the victim, idle");
    assert_eq!(m.total_entries().unwrap(), 0, "ORIG_DST entries left");
    victim_round(
        &agent,
        &victim,
        &victim_proxy,
        &remote,
        &client,
        "after unenroll",
    );
}

fn addr_of(words: &[u32; 4], family: u32) -> IpAddr {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if family == u32::from(redirect_common::AF_INET) {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        let b: [u8; 16] = bytes.try_into().unwrap();
        IpAddr::from(b)
    }
}

/// (c) An entry whose connection ends while its pod is unenrolled (no sock_ops link to see the
/// close) is swept with its slot, so it is not there when the pod comes back, and the slot's
/// count starts at zero.
#[test]
fn orig_dst_entry_of_an_unenrolled_pod_is_swept() {
    require!(Need::Root, datapath());
    let _alone = alone();
    let node = Node::new().unwrap();
    let pod = node.add_pod("pod").unwrap();
    let keeper = node.add_pod("keeper").unwrap();
    let remote = node.add_pod("remote").unwrap();
    // Not the pod's proxy (outside its cgroup): the connection keeps its ORIG_DST entry while
    // it lives.
    let _listener = silent_listener(&pod, outbound_listen(Family::V4));
    let agent = Agent::new();
    // Keeps the shared maps alive across the pod's unenroll.
    agent.enroll(&keeper, &[]);
    agent.enroll(&pod, &[]);
    let slot = slot_of(&agent, &pod.name);

    // Connects (captured), sends, and waits for an answer that never comes.
    let mut cmd = Command::new(testbed_bin());
    cmd.args([
        "connect",
        "--to",
        &sock(remote.ip4, WILDCARD_PORT).to_string(),
    ])
    .args(["--timeout-ms", "30000"])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut conn = pod.spawn(APP_UID, cmd).expect("spawn connect");
    let deadline = Instant::now() + Duration::from_secs(10);
    while maps(&agent).slot_usage(slot).unwrap()
        != (SlotUsage {
            entries: 1,
            counted: 1,
        })
    {
        assert!(
            Instant::now() < deadline,
            "the connection's entry never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    agent.unenroll(&pod.name);
    conn.kill().expect("kill the client");
    drop(conn);
    // The kernel saw the close without the pod's sock_ops link; until enroll and unenroll
    // sweep the slot themselves, the test does what they must.
    let swept = maps(&agent).sweep_slot(slot).expect("sweep");
    assert!(swept <= 1, "swept {swept}");
    assert_eq!(
        maps(&agent).slot_usage(slot).unwrap(),
        SlotUsage::default(),
        "slot {slot} after the sweep"
    );

    agent.enroll(&pod, &[]);
    let slot = slot_of(&agent, &pod.name);
    assert_eq!(
        maps(&agent).slot_usage(slot).unwrap(),
        SlotUsage::default(),
        "slot {slot} of the re-enrolled pod"
    );
    assert_eq!(maps(&agent).total_entries().unwrap(), 0, "ORIG_DST entries");
}
