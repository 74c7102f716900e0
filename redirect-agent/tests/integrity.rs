//! State integrity (issue 9): a command that fails or is killed leaves the truth, updates
//! update everything, pods that disappear are collected, unsafe paths and dangerous input are
//! refused. Every test here runs for real (root, netns, cgroups, eBPF) and cleans up.

mod common;

use std::{
    os::unix::fs::{symlink, PermissionsExt as _},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// `list --output json` entries as (name, status).
fn statuses(agent: &Agent) -> Vec<(String, String)> {
    agent.list()["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn has_six(pod: &Pod) -> bool {
    lo_addresses(pod).contains("::6/128")
}

/// The pod is as if redirect had never been there: nothing attached, no pins, no record.
fn assert_clean(agent: &Agent, pods: &[&Pod], lo_before: &[bool]) {
    assert!(
        !agent.pin_root.exists(),
        "pins left: {:?}",
        tree(&agent.pin_root)
    );
    assert_eq!(agent.records(), Vec::<String>::new(), "records left");
    for (pod, had) in pods.iter().zip(lo_before) {
        assert_eq!(
            cgroup_programs(&pod.cgroup),
            "",
            "programs left on {}",
            pod.name
        );
        assert_eq!(has_six(pod), *had, "::6 on {}'s lo", pod.name);
    }
}

/// A failure late in enroll (after rows and links were written: `::6` cannot be added because
/// IPv6 is disabled on the pod's `lo`) leaves no record, no pins, no attachment; with another
/// pod enrolled, that pod is untouched. Variants: first pod of the node, second pod.
#[test]
fn failed_enroll_leaves_nothing() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let bad = node.add_pod("bad").unwrap();
    let good = node.add_pod("good").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&good);
    let proxy = Proxy::start(&node, &good, ProxyDial::PodIp, "proxy.log");
    bad.exec("sysctl", &["-qw", "net.ipv6.conf.lo.disable_ipv6=1"])
        .unwrap();
    let agent = Agent::new();

    for variant in ["first pod of the node", "second pod of the node"] {
        let list_before = agent.list();
        let pins_before = tree(&agent.pin_root);
        let mut args = Agent::enroll_args(&bad, &bad.name);
        let args: Vec<&str> = args.iter_mut().map(|s| s.as_str()).collect();
        let out = agent.run(&args);
        assert!(!out.status.success(), "{variant}: enroll must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("::6"), "{variant}: the error names ::6: {err}");
        assert_eq!(agent.list(), list_before, "{variant}: list changed");
        assert_eq!(
            tree(&agent.pin_root),
            pins_before,
            "{variant}: pins changed"
        );
        assert_eq!(cgroup_programs(&bad.cgroup), "", "{variant}: programs left");
        assert!(
            !agent.records().contains(&bad.name),
            "{variant}: record left"
        );
        if variant.starts_with("first") {
            agent.enroll(&good, &[]);
        } else {
            if let Some(e) = captured_inbound(&client, &good, &proxy) {
                panic!("{variant}: good pod: {e}");
            }
        }
    }
    agent.unenroll(&good.name);
    assert_clean(&agent, &[&good, &bad], &[false, false]);
}

/// A tiny seeded generator (xorshift), so a failing schedule can be replayed.
struct Seeded(u64);

impl Seeded {
    fn from_env() -> Seeded {
        let seed = std::env::var("REDIRECT_KILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("kill schedule seed: REDIRECT_KILL_SEED={seed}");
        Seeded(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Spawns `args`, kills it with SIGKILL after `after`, and reaps it.
fn kill_after(agent: &Agent, args: &[String], after: Duration) {
    let mut child = agent
        .cmd()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGKILL at points spread over the whole of enroll and unenroll (a seeded schedule covering
/// 0..120 % of each command's measured duration): after every kill `list` tells the truth
/// (absent, or `interrupted`, or `ok` with every link pinned: never `incomplete`), re-running
/// the command converges, capture works after each successful enroll, and the last unenroll
/// leaves no pins, links, addresses or records.
#[test]
fn kill_anywhere_converges() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    let enroll = Agent::enroll_args(&server, &server.name);
    let unenroll: Vec<String> = ["unenroll", "--name", &server.name]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let enroll_ref: Vec<&str> = enroll.iter().map(String::as_str).collect();

    // The commands' durations on this machine, first enroll of the node included.
    let t = Instant::now();
    agent.ok(&enroll_ref);
    let enroll_time = t.elapsed();
    let t = Instant::now();
    agent.unenroll(&server.name);
    let unenroll_time = t.elapsed();
    assert_clean(&agent, &[&server], &[false]);

    let mut rng = Seeded::from_env();
    const ROUNDS: u64 = 10;
    for round in 0..ROUNDS {
        // Spread the kill points over the whole command: one per tenth, jittered.
        let frac = |r: u64, rng: &mut Seeded| {
            (r * 100 + rng.next() % 120) as f64 / (ROUNDS * 100) as f64 * 1.2
        };
        let at = enroll_time.mul_f64(frac(round, &mut rng));
        kill_after(&agent, &enroll, at);
        for (name, status) in statuses(&agent) {
            assert_eq!(name, server.name);
            assert!(
                status == "ok" || status == "interrupted",
                "round {round}: enroll killed after {at:?}: listed as {status}"
            );
        }
        agent.ok(&enroll_ref);
        assert_eq!(
            statuses(&agent),
            vec![(server.name.clone(), "ok".to_owned())],
            "round {round}: after re-running enroll"
        );
        if let Some(e) = captured_inbound(&client, &server, &proxy) {
            panic!("round {round}: after enroll killed at {at:?}: {e}");
        }

        let at = unenroll_time.mul_f64(frac(round, &mut rng));
        kill_after(&agent, &unenroll, at);
        for (_, status) in statuses(&agent) {
            assert!(
                status == "ok" || status == "interrupted",
                "round {round}: unenroll killed after {at:?}: listed as {status}"
            );
        }
        let out = agent.run(&["unenroll", "--name", &server.name]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("no such enrolled pod"),
            "round {round}: re-running unenroll: {err}"
        );
        assert_clean(&agent, &[&server], &[false]);
        if let Some(e) = direct_inbound(&client, &server) {
            panic!("round {round}: after unenroll: {e}");
        }
    }
}

/// A record file that is empty, corrupt, a symlink, or written by another user never blocks a
/// command on another name and is never trusted: `list` shows it apart, `gc` removes it.
#[test]
fn unusable_records_never_block_or_lie() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let agent = Agent::new();
    agent.enroll(&a, &[]);
    let pods = agent.state_dir.join("pods");
    let real = std::fs::read_to_string(pods.join(format!("{}.json", a.name))).unwrap();
    // A forged copy of a's record under another name, owned by an unprivileged user.
    let forged: Value = {
        let mut v: Value = serde_json::from_str(&real).unwrap();
        v["name"] = "forged".into();
        v["slot"] = 9.into();
        v
    };
    std::fs::write(pods.join("forged.json"), forged.to_string()).unwrap();
    std::os::unix::fs::chown(pods.join("forged.json"), Some(65534), Some(65534)).unwrap();
    std::fs::write(pods.join("empty.json"), "").unwrap();
    std::fs::write(pods.join("corrupt.json"), "{\"name\": ").unwrap();
    let outside = node.scratch_file("outside.json").unwrap();
    std::fs::write(&outside, real.replace(&a.name, "linked")).unwrap();
    symlink(&outside, pods.join("linked.json")).unwrap();
    let mut writable = forged.clone();
    writable["name"] = "writable".into();
    std::fs::write(pods.join("writable.json"), writable.to_string()).unwrap();
    std::fs::set_permissions(
        pods.join("writable.json"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();

    let list = agent.list();
    assert_eq!(agent.listed_names(), vec![a.name.clone()], "{list}");
    let bad: Vec<String> = list["unusable_records"]
        .as_array()
        .expect("unusable_records")
        .iter()
        .map(|b| b["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(bad.len(), 5, "{bad:?}");
    for want in ["not root", "corrupt", "empty", "symlink", "writable"] {
        assert!(
            bad.iter().any(|r| r.contains(want)),
            "no {want:?} in {bad:?}"
        );
    }
    // Other names work: enroll, stats, unenroll.
    agent.enroll(&b, &[]);
    assert_eq!(agent.stats(&b.name)["inbound_captured"], 0);
    // The name of a bad record is refused with the reason, not silently replaced.
    let c = node.add_pod("c").unwrap();
    let args = Agent::enroll_args(&c, "empty");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = agent.run(&args);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unusable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gc = agent.ok(&["gc"]);
    assert_eq!(gc.matches("removed unusable record").count(), 5, "{gc}");
    assert_eq!(agent.list().get("unusable_records"), None);
    assert!(outside.exists(), "gc must not follow the symlink");
    agent.unenroll(&a.name);
    agent.unenroll(&b.name);
    assert_clean(&agent, &[&a, &b], &[false, false]);
}

/// A state directory another user could change is refused before anything is written:
/// owned by another user, writable by others, a symlink of another user's, below a parent
/// writable by others without the sticky bit.
#[test]
fn unsafe_state_directories_are_refused() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let pod = node.add_pod("pod").unwrap();
    let base = node.scratch_file("states").unwrap();
    let _ = std::fs::remove_file(&base);
    std::fs::create_dir_all(&base).unwrap();
    let mk = |name: &str| {
        let d = base.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let owned = mk("owned");
    std::os::unix::fs::chown(&owned, Some(65534), Some(65534)).unwrap();
    let open = mk("open");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let target = mk("target");
    let link = base.join("link");
    symlink(&target, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
    let loose = mk("loose");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).unwrap();
    let below = loose.join("state");

    let pin_root = Path::new("/sys/fs/bpf").join(format!("rdt-unsafe-{}", std::process::id()));
    for (what, dir, says) in [
        ("owned by another user", &owned, "uid 65534"),
        ("writable by others", &open, "writable"),
        ("another user's symlink", &link, "uid 65534"),
        (
            "below a non-sticky world-writable parent",
            &below,
            "writable",
        ),
    ] {
        let mut cmd = Command::new(agent_bin());
        cmd.args(Agent::enroll_args(&pod, &pod.name))
            .env("REDIRECT_STATE_DIR", dir)
            .env("REDIRECT_PIN_ROOT", &pin_root);
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: enroll must be refused");
        assert!(
            err.contains("refusing") && err.contains(says),
            "{what}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
        assert!(!pin_root.exists(), "{what}: pins were made");
        assert_eq!(cgroup_programs(&pod.cgroup), "", "{what}: attached");
        assert!(!dir.join("pods").join(format!("{}.json", pod.name)).exists());
    }
}

/// A pod whose cgroup or network namespace is gone is listed as `gone` and collected by `gc`;
/// its slot and addresses are free again.
#[test]
fn gone_pods_are_collected() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let agent = Agent::new();
    let keep = node.add_pod("keep").unwrap();
    agent.enroll(&keep, &[]);
    for variant in ["cgroup removed", "netns removed"] {
        let pod = node.add_pod("gone").unwrap();
        agent.enroll(&pod, &[]);
        match variant {
            "cgroup removed" => std::fs::remove_dir(&pod.cgroup).unwrap(),
            _ => {
                let out = Command::new("ip")
                    .args(["netns", "delete", &pod.name])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
            }
        }
        let st = statuses(&agent);
        assert!(
            st.contains(&(pod.name.clone(), "gone".into())),
            "{variant}: {st:?}"
        );
        let out = agent.ok(&["gc"]);
        assert!(out.contains(&pod.name), "{variant}: {out}");
        assert_eq!(agent.listed_names(), vec![keep.name.clone()], "{variant}");
        assert!(
            !tree(&agent.pin_root).iter().any(|p| p.contains(&pod.name)),
            "{variant}: links left"
        );
    }
    agent.unenroll(&keep.name);
    assert!(!agent.pin_root.exists());
}

/// A lost state directory: the pins say which slot an orphaned pod holds, a new pod never
/// takes it, `list` names the orphaned links, and `gc` removes them; the last unenroll then
/// leaves nothing.
#[test]
fn lost_state_directory_orphans_are_found_and_collected() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let orphan = node.add_pod("orphan").unwrap();
    let next = node.add_pod("next").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&orphan);
    let agent = Agent::new();
    agent.enroll(&orphan, &[]);
    let slot_of = |agent: &Agent, name: &str| -> u64 {
        agent.list()["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["slot"].as_u64().unwrap())
            .unwrap()
    };
    let orphan_slot = slot_of(&agent, &orphan.name);
    std::fs::remove_dir_all(&agent.state_dir).unwrap();

    agent.enroll(&next, &[]);
    assert_ne!(
        slot_of(&agent, &next.name),
        orphan_slot,
        "the orphan's slot was reused"
    );
    let list = agent.list();
    let links: Vec<&str> = list["orphaned_links"]
        .as_array()
        .expect("orphaned_links")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(links, vec![orphan.name.as_str()]);
    let out = agent.ok(&["gc"]);
    assert!(
        out.contains(&format!("removed links of {}", orphan.name)),
        "{out}"
    );
    assert!(
        out.contains(&format!("cleared slot {orphan_slot}")),
        "{out}"
    );
    assert_eq!(cgroup_programs(&orphan.cgroup), "", "orphan still attached");
    if let Some(e) = direct_inbound(&client, &orphan) {
        panic!("orphan after gc: {e}");
    }
    agent.unenroll(&next.name);
    assert!(!agent.pin_root.exists(), "{:?}", tree(&agent.pin_root));
}

/// `netns_ino` of the sk_lookup link pinned for `name`.
fn sk_lookup_netns(agent: &Agent, name: &str) -> u64 {
    let pin = agent.pin_root.join("pods").join(name).join("rd_sk_lookup");
    let out = Command::new("bpftool")
        .args(["link", "show", "pinned"])
        .arg(&pin)
        .arg("-j")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool link show {}: {e}: {out:?}", pin.display()));
    v["netns_ino"].as_u64().expect("netns_ino")
}

fn netns_inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).unwrap().ino()
}

/// Re-enrolling a name with another network namespace (a sandbox recreated) moves sk_lookup
/// to the new namespace and adds `::6` to the new `lo`; the old namespace keeps nothing.
#[test]
fn update_to_another_netns_moves_everything() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let old = node.add_pod("old").unwrap();
    let new = node.add_pod("new").unwrap();
    let agent = Agent::new();
    agent.enroll(&old, &[]);
    assert_eq!(
        sk_lookup_netns(&agent, &old.name),
        netns_inode(&old.netns_path)
    );
    assert!(has_six(&old));

    // Same name and cgroup, the new sandbox's namespace and addresses.
    let mut args = Agent::enroll_args(&new, &old.name);
    args[4] = old.cgroup.display().to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = agent.ok(&args);
    assert!(out.starts_with("updated "), "{out}");
    assert_eq!(
        sk_lookup_netns(&agent, &old.name),
        netns_inode(&new.netns_path)
    );
    assert!(has_six(&new), "::6 on the new lo");
    assert!(!has_six(&old), "::6 left on the old lo");
    let list = agent.list();
    assert_eq!(
        list["pods"][0]["netns"],
        new.netns_path.display().to_string()
    );
    agent.unenroll(&old.name);
    assert_clean(&agent, &[&old, &new], &[false, false]);
}

/// Dangerous input is refused with one clear line, before anything changes: the host's own
/// network namespace, a FIFO or a regular file as `--netns` (without blocking), two names
/// sharing one namespace, an address given twice, proxy uid 0, a proxy port that is never
/// captured.
#[test]
fn dangerous_input_is_refused_with_one_line() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let pod = node.add_pod("pod").unwrap();
    let other = node.add_pod("other").unwrap();
    let agent = Agent::new();
    agent.enroll(&other, &[]);
    let fifo = node.scratch_file("fifo").unwrap();
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let file = node.scratch_file("file").unwrap();
    std::fs::write(&file, "").unwrap();
    let ip4 = pod.ip4.to_string();
    let cgroup = pod.cgroup.display().to_string();
    type Case<'a> = (
        &'a str,
        &'a Pod,
        Vec<(&'a str, String)>,
        Vec<&'a str>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "host netns",
            &pod,
            vec![("--netns", "/proc/self/ns/net".into())],
            vec![],
            "host",
        ),
        (
            "FIFO as netns",
            &pod,
            vec![("--netns", fifo.display().to_string())],
            vec![],
            "not a network namespace",
        ),
        (
            "file as netns",
            &pod,
            vec![("--netns", file.display().to_string())],
            vec![],
            "not a network namespace",
        ),
        // Another name in the other pod's namespace (its addresses, so only the sharing is wrong).
        (
            "netns of another pod",
            &other,
            vec![("--cgroup", cgroup.clone())],
            vec![],
            "already belongs",
        ),
        (
            "address twice",
            &pod,
            vec![],
            vec!["--pod-ip", &ip4],
            "twice",
        ),
        (
            "proxy uid 0",
            &pod,
            vec![],
            vec!["--proxy-uid", "0"],
            "uid 0",
        ),
        (
            "inbound port 15020",
            &pod,
            vec![],
            vec!["--proxy-inbound-port", "15020"],
            "never-captured",
        ),
    ];
    for (what, base, replace, extra, says) in cases {
        let mut args = Agent::enroll_args(base, &pod.name);
        for (flag, value) in &replace {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1] = value.clone();
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let before = (agent.list(), tree(&agent.pin_root));
        let t = Instant::now();
        let out = agent.cmd().args(&args).output().unwrap();
        assert!(t.elapsed() < Duration::from_secs(10), "{what}: blocked");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: must be refused");
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
        assert!(err.contains(says), "{what}: {err:?} does not say {says:?}");
        assert_eq!(
            (agent.list(), tree(&agent.pin_root)),
            before,
            "{what}: state changed"
        );
        assert_eq!(cgroup_programs(&pod.cgroup), "", "{what}: attached");
    }
    agent.unenroll(&other.name);
}

/// The cgroup2 root is refused. Attaching there would capture every process on the machine,
/// so the refusal is first checked in the library (which never attaches), and only then
/// through the CLI with a pin root that is a regular file: were the refusal broken, loading the
/// datapath would fail before anything could attach.
#[test]
fn cgroup2_root_is_refused_without_risk() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let pod = node.add_pod("pod").unwrap();
    let root = pod
        .cgroup
        .ancestors()
        .find(|p| {
            p.parent().is_some_and(|up| {
                nix::sys::statfs::statfs(up)
                    .map(|s| s.filesystem_type().0 != 0x6367_7270)
                    .unwrap_or(true)
            })
        })
        .unwrap()
        .to_path_buf();
    let spec = redirect_agent::spec::PodSpec {
        name: "root".into(),
        namespace: None,
        cgroup: root.clone(),
        netns: pod.netns_path.clone(),
        pod_ips: vec![pod.ip4.into()],
        proxy_uid: 1337,
        inbound_policy: Default::default(),
        port_policies: Default::default(),
        exclude_inbound_ports: vec![],
        exclude_outbound_ports: vec![],
        exclude_outbound_cidrs: vec![],
        proxy_inbound_port: 15006,
        proxy_outbound_port: 15001,
        dns_capture: false,
        proxy_dns_port: 15053,
        ..Default::default()
    };
    let err = redirect_agent::enroll::inspect(spec).expect_err("the cgroup2 root is refused");
    assert!(
        matches!(err, redirect_agent::enroll::EnrollError::CgroupRoot(_)),
        "{err}"
    );
    let trap = node.scratch_file("pin-root-is-a-file").unwrap();
    std::fs::write(&trap, "").unwrap();
    let mut args = Agent::enroll_args(&pod, "root");
    args[4] = root.display().to_string();
    let out = Command::new(agent_bin())
        .args(&args)
        .env("REDIRECT_PIN_ROOT", &trap)
        .env("REDIRECT_STATE_DIR", node.scratch_file("state").unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cgroup2 root"), "{err}");
}

/// The node-wide rule map full: no single pod can fill `PORT_RULES` (its share is 16 384 of
/// 262 144 rows), so it takes sixteen pods at their limit; the seventeenth is refused with the
/// pod, the map, the errno and the capacity named, and rolled back; the others keep working.
#[test]
fn node_wide_rule_capacity_is_refused_with_pod_map_and_errno() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let agent = Agent::new();
    let per_pod = redirect_common::MAX_PORT_RULES_PER_POD as usize;
    let node_cap = redirect_common::MAX_PORT_RULES as usize;
    let pods_to_fill = node_cap / per_pod;
    // Istio's four never-captured inbound ports are rows too.
    let ports: Vec<String> = (20000..)
        .take(per_pod - redirect_common::DEFAULT_EXCLUDED_INBOUND_PORTS.len())
        .map(|p: u32| p.to_string())
        .collect();
    let ports = ports.join(",");
    let mut pods = Vec::new();
    for i in 0..pods_to_fill {
        let pod = node.add_pod(&format!("full{i}")).unwrap();
        agent.enroll(&pod, &["--exclude-outbound-ports", &ports]);
        pods.push(pod);
    }
    let last = node.add_pod("over").unwrap();
    let before = agent.list();
    let mut args = Agent::enroll_args(&last, &last.name);
    args.extend(["--exclude-outbound-ports".into(), "8080".into()]);
    let out = agent.cmd().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the node's PORT_RULES is full");
    for want in [
        last.name.as_str(),
        "PORT_RULES",
        "E2BIG",
        &node_cap.to_string(),
    ] {
        assert!(err.contains(want), "{err:?} does not name {want:?}");
    }
    assert_eq!(agent.list(), before, "the refused pod left state");
    assert_eq!(cgroup_programs(&last.cgroup), "");
    // One pod at its own limit cannot take more: refused before anything changes.
    let mut args = Agent::enroll_args(&last, &last.name);
    args.extend(["--exclude-outbound-ports".into(), format!("{ports},9999")]);
    let out = agent.cmd().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("per-pod limit of {per_pod}")),
        "{err}"
    );
    for pod in &pods {
        agent.unenroll(&pod.name);
    }
    assert!(!agent.pin_root.exists(), "{:?}", tree(&agent.pin_root));
}

/// Names with dots (Kubernetes names have them) enroll, list, capture and unenroll: bpffs refuses
/// dots in names, so the pod's link directory spells them `~2e`.
#[test]
fn dotted_names_work_end_to_end() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    let name = format!("{}.prod.svc", server.name);
    let args = Agent::enroll_args(&server, &name);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = agent.ok(&args);
    assert!(out.starts_with(&format!("enrolled {name} ")), "{out}");
    assert_eq!(agent.listed_names(), vec![name.clone()]);
    let dir = agent.pin_root.join("pods").join(name.replace('.', "~2e"));
    assert_eq!(
        tree(&dir).len(),
        redirect_agent::datapath::Hook::ALL.len(),
        "links of {name}: {:?}",
        tree(&agent.pin_root)
    );
    if let Some(e) = captured_inbound(&client, &server, &proxy) {
        panic!("{name}: {e}");
    }
    assert_eq!(agent.stats(&name)["inbound_captured"], 2);
    agent.unenroll(&name);
    assert!(!agent.pin_root.exists(), "{:?}", tree(&agent.pin_root));
}
