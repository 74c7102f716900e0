//! The pinned datapath as a long-lived node agent depends on it: pins of another layout are
//! refused without being touched, pins of another build are upgraded in place with no moment
//! where a connection escapes capture, readers change nothing, removal failures are reported,
//! the pin root is handled as a root daemon must, and the probe leaves no mount behind.
//!
//! Needs root (bpffs, eBPF programs, network namespaces, cgroups); without it each test says why
//! and returns, except under `CI=true`, where a skip is a failure.

mod common;

use std::{
    collections::BTreeSet,
    fs,
    net::SocketAddr,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Mutex,
    },
    time::Duration,
};

use aya::{
    maps::{Array, Map, MapData},
    programs::links::{FdLink, PinnedLink},
};
use common::*;
use redirect_agent::datapath::{self, Datapath, DatapathError, Hook};

/// The maps dir, programs dir and pods dir of a pin root.
fn maps_dir(root: &Path) -> PathBuf {
    root.join("maps")
}

fn mkdir_root_only(dir: &Path) {
    fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
}

/// Creates a map with aya and pins it at `path`: a pin set made by "another agent".
fn pin_map(path: &Path, map_type: u32, key: u32, value: u32, max: u32, flags: u32) -> MapData {
    let name = path.file_name().unwrap().to_str().unwrap();
    let def = aya_obj::Map::new_from_params(map_type, key, value, max, flags);
    let data = MapData::create(def, name, None).expect("create map");
    data.pin(path).expect("pin map");
    data
}

const ARRAY: u32 = 2;
const PERCPU_ARRAY: u32 = 6;
/// The foreign PODS map's value size; this agent's is another.
const FOREIGN_VALUE_SIZE: u32 = 64;
const HASH: u32 = 1;
const BPF_F_NO_PREALLOC: u32 = 1;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The layout of the object's PODS map, from the library (what a compatible pin has).
fn pods_layout() -> datapath::layout::MapLayout {
    datapath::layout::expected_maps()["PODS"]
}

/// A pin set with a deliberately different layout, in several variants, is refused by enroll
/// (the writer) and by `open_existing` (the reader), with a message naming every difference;
/// nothing is created, loaded or written, and the foreign pins are left exactly as they were.
#[test]
fn incompatible_pins_are_refused_and_left_untouched() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let pod = node.add_pod("pod").unwrap();
    let pods = pods_layout();
    assert_ne!(pods.value_size, FOREIGN_VALUE_SIZE);

    struct Variant {
        what: &'static str,
        /// Makes the foreign pin set under the root.
        make: Box<dyn Fn(&Path)>,
        /// Substrings of the refusal.
        says: Vec<String>,
    }
    let variants = vec![
        Variant {
            what: "PODS with other value size and max entries",
            make: Box::new(move |root| {
                let m = pin_map(
                    &maps_dir(root).join("PODS"),
                    ARRAY,
                    4,
                    FOREIGN_VALUE_SIZE,
                    16,
                    0,
                );
                drop(m);
            }),
            says: vec![
                format!(
                    "PODS value size: pinned {FOREIGN_VALUE_SIZE}, expected {}",
                    pods.value_size
                ),
                format!("PODS max entries: pinned 16, expected {}", pods.max_entries),
            ],
        },
        Variant {
            what: "POD_CGROUPS of another map type and key size",
            make: Box::new(|root| {
                drop(pin_map(
                    &maps_dir(root).join("POD_CGROUPS"),
                    ARRAY,
                    4,
                    4,
                    4096,
                    0,
                ));
            }),
            says: vec![
                "POD_CGROUPS map type: pinned Array (2), expected Hash (1)".into(),
                "POD_CGROUPS key size: pinned 4, expected 8".into(),
            ],
        },
        Variant {
            what: "PORT_RULES with other flags",
            make: Box::new(|root| {
                let l = datapath::layout::expected_maps()["PORT_RULES"];
                drop(pin_map(
                    &maps_dir(root).join("PORT_RULES"),
                    HASH,
                    l.key_size,
                    l.value_size,
                    l.max_entries,
                    BPF_F_NO_PREALLOC,
                ));
            }),
            says: vec!["PORT_RULES flags: pinned 0x1, expected 0x0".into()],
        },
        Variant {
            what: "a datapath of another ABI version",
            make: Box::new(|root| {
                let data = pin_map(&root.join("info"), ARRAY, 4, 16, 1, 0);
                let mut a: Array<MapData, [u64; 2]> =
                    Array::try_from(Map::from_map_data(data).unwrap()).unwrap();
                a.set(0, [99, 7], 0).unwrap();
            }),
            says: vec![format!(
                "info abi version: pinned 99, expected {}",
                datapath::DATAPATH_ABI
            )],
        },
        Variant {
            // The datapath before the DNS counters: 14 counters per pod, ABI 1. Its pins are
            // refused (the pods must be unenrolled by that agent), never reinterpreted: a row
            // of 14 read as one of 24 would give every pod another pod's counts.
            what: "the previous datapath's COUNTERS (14 per pod) and ABI 1",
            make: Box::new(|root| {
                let data = pin_map(&root.join("info"), ARRAY, 4, 16, 1, 0);
                let mut a: Array<MapData, [u64; 2]> =
                    Array::try_from(Map::from_map_data(data).unwrap()).unwrap();
                a.set(0, [1, 7], 0).unwrap();
                drop(pin_map(
                    &maps_dir(root).join("COUNTERS"),
                    PERCPU_ARRAY,
                    4,
                    8,
                    redirect_common::MAX_PODS * 14,
                    0,
                ));
            }),
            says: vec![
                format!(
                    "COUNTERS max entries: pinned {}, expected {}",
                    redirect_common::MAX_PODS * 14,
                    redirect_common::MAX_PODS * redirect_common::COUNTERS_PER_POD
                ),
                format!(
                    "info abi version: pinned 1, expected {}",
                    datapath::DATAPATH_ABI
                ),
            ],
        },
    ];

    let mut failures = Failures::default();
    for v in &variants {
        let agent = Agent::new();
        mkdir_root_only(&agent.pin_root);
        mkdir_root_only(&maps_dir(&agent.pin_root));
        (v.make)(&agent.pin_root);
        let before = tree(&agent.pin_root);

        let args = Agent::enroll_args(&pod, &pod.name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = agent.run(&args);
        let err = stderr(&out);
        if out.status.success() {
            failures.push(format!("{}: enroll succeeded", v.what));
        }
        for s in &v.says {
            if !err.contains(s.as_str()) {
                failures.push(format!("{}: enroll's refusal lacks {s:?}: {err}", v.what));
            }
        }
        if !err.contains("incompatible datapath") || !err.contains("nothing was changed") {
            failures.push(format!(
                "{}: refusal does not say what it is: {err}",
                v.what
            ));
        }
        let after = tree(&agent.pin_root);
        if after != before {
            failures.push(format!(
                "{}: enroll changed the pins: before {before:?}, after {after:?}",
                v.what
            ));
        }
        if agent.listed_names() != Vec::<String>::new() {
            failures.push(format!("{}: a pod is listed after the refusal", v.what));
        }
        if !cgroup_programs(&pod.cgroup).is_empty() {
            failures.push(format!("{}: programs attached to the pod's cgroup", v.what));
        }

        // The readers refuse the same way and create nothing either.
        match Datapath::open_read_only(&agent.pin_root) {
            Err(e @ DatapathError::Incompatible { .. }) => {
                let msg = redirect_agent::error_chain(&e);
                for s in &v.says {
                    if !msg.contains(s.as_str()) {
                        failures.push(format!("{}: open_existing lacks {s:?}: {msg}", v.what));
                    }
                }
            }
            Err(e) => failures.push(format!(
                "{}: open_existing: {}",
                v.what,
                redirect_agent::error_chain(&e)
            )),
            Ok(_) => failures.push(format!("{}: open_existing accepted the pins", v.what)),
        }
        if tree(&agent.pin_root) != before {
            failures.push(format!("{}: open_existing changed the pins", v.what));
        }
    }

    // Nothing was written into the foreign PODS map: every entry is still zero.
    let agent = Agent::new();
    mkdir_root_only(&agent.pin_root);
    mkdir_root_only(&maps_dir(&agent.pin_root));
    (variants[0].make)(&agent.pin_root);
    let args = Agent::enroll_args(&pod, &pod.name);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(!agent.run(&args).status.success());
    let data = MapData::from_pin(maps_dir(&agent.pin_root).join("PODS")).unwrap();
    let arr: Array<MapData, [u8; FOREIGN_VALUE_SIZE as usize]> =
        Array::try_from(Map::from_map_data(data).unwrap()).unwrap();
    for i in 0..16 {
        let v = arr.get(&i, 0).unwrap();
        if v.iter().any(|b| *b != 0) {
            failures.push(format!("foreign PODS entry {i} was written: {v:?}"));
        }
    }
    failures.assert_none("incompatible pins");
}

/// The non-building ways in change nothing: on a missing root they say "no datapath" and
/// create no directory; on an empty bpffs root likewise; a partial pin set is opened as far as
/// it goes, naming what is missing; and the maps of `open_read_only` cannot be written through.
#[test]
fn open_existing_and_read_only_change_nothing() {
    require!(Need::Root, datapath());
    let agent = Agent::new();
    for open in [Datapath::open_existing, Datapath::open_read_only] {
        assert!(matches!(open(&agent.pin_root), Ok(None)));
        assert!(!agent.pin_root.exists(), "created the root");
    }
    mkdir_root_only(&agent.pin_root);
    for open in [Datapath::open_existing, Datapath::open_read_only] {
        assert!(matches!(open(&agent.pin_root), Ok(None)));
        assert_eq!(tree(&agent.pin_root), Vec::<String>::new());
    }

    // A complete datapath (the writer made it); the writer again finds it current and
    // replaces nothing; then the readers.
    let first = Datapath::open(&agent.pin_root).unwrap();
    assert_eq!(first.program_changes().len(), Hook::ALL.len());
    drop(first);
    let pins = tree(&agent.pin_root);
    let again = Datapath::open(&agent.pin_root).unwrap();
    assert_eq!(
        again.program_changes(),
        &[],
        "the same build replaced programs"
    );
    drop(again);
    assert_eq!(
        tree(&agent.pin_root),
        pins,
        "the second open changed the pins"
    );
    let mut reader = Datapath::open_read_only(&agent.pin_root)
        .unwrap()
        .expect("a complete datapath");
    assert!(reader.missing().is_empty(), "{:?}", reader.missing());
    let err = reader
        .pod_cgroups()
        .unwrap()
        .insert(1u64, 1u32, 0)
        .expect_err("a write through a read-only map fd");
    let msg = redirect_agent::error_chain(&err);
    assert!(msg.contains("Operation not permitted"), "{msg}");
    let zero: u64 = reader.counters().unwrap().get(&0, 0).unwrap().iter().sum();
    assert_eq!(zero, 0);
    drop(reader);
    let mut writer = Datapath::open_existing(&agent.pin_root).unwrap().unwrap();
    writer.pod_cgroups().unwrap().insert(1u64, 1u32, 0).unwrap();
    writer.pod_cgroups().unwrap().remove(&1u64).unwrap();
    drop(writer);
    assert_eq!(tree(&agent.pin_root), pins, "the readers changed the pins");

    // Half torn down: programs and one map gone.
    for hook in Hook::ALL {
        fs::remove_file(agent.pin_root.join("progs").join(hook.program())).unwrap();
    }
    fs::remove_file(agent.pin_root.join("maps").join("PODS")).unwrap();
    let pins = tree(&agent.pin_root);
    for open in [Datapath::open_existing, Datapath::open_read_only] {
        let mut dp = open(&agent.pin_root).unwrap().expect("a partial datapath");
        let missing: Vec<String> = dp
            .missing()
            .iter()
            .map(|p| {
                p.strip_prefix(&agent.pin_root)
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        assert!(
            missing.contains(&"progs/rd_connect4".to_string()),
            "{missing:?}"
        );
        assert!(missing.contains(&"maps/PODS".to_string()), "{missing:?}");
        assert_eq!(missing.len(), Hook::ALL.len() + 1, "{missing:?}");
        let e = dp.pods().err().expect("PODS is not pinned");
        assert!(e.to_string().contains("map PODS is not pinned"), "{e}");
        dp.counters().expect("COUNTERS is still there");
        assert_eq!(tree(&agent.pin_root), pins, "opening changed the pins");
    }
    Datapath::remove_shared_pins(&agent.pin_root).unwrap();
    assert!(!agent.pin_root.exists());
}

/// Rounds of enroll + raced unenroll, and stats loops racing each.
const ROUNDS: usize = 5;
const LOOPERS: usize = 4;

/// Issue 8's race: `stats` while the last pod is unenrolled, first as the three interleavings
/// that broke it (made deterministic), then in loops. Whatever the interleaving, stats creates
/// nothing and the unenroll leaves no datapath at all (no programs bound to orphaned maps, no
/// maps without programs); the next enroll works with inbound captured.
#[test]
fn stats_during_the_last_unenroll_leaves_nothing_behind() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();

    // The interleavings that broke it, made deterministic: stats has read the pod's record and
    // opens the datapath after the unenroll removed all of it, or only its programs, or only
    // its maps. A reader must not re-create any of it.
    // (What was cut, what stats must say: `None` when it may read the counters that are left.)
    type Cut = fn(&Path);
    let cuts: [(&str, Cut, Option<&str>); 3] = [
        (
            "every pin removed",
            |root| Datapath::remove_shared_pins(root).unwrap(),
            Some("no datapath is pinned"),
        ),
        (
            "programs removed",
            |root| {
                for h in Hook::ALL {
                    fs::remove_file(root.join("progs").join(h.program())).unwrap();
                }
            },
            None,
        ),
        (
            "maps removed",
            |root| {
                for m in datapath::layout::expected_maps().keys() {
                    fs::remove_file(root.join("maps").join(m)).unwrap();
                }
            },
            Some("map COUNTERS is not pinned"),
        ),
    ];
    for (what, cut, says) in cuts {
        agent.enroll(&server, &[]);
        cut(&agent.pin_root);
        let before = tree(&agent.pin_root);
        let out = agent.run(&["stats", "--output", "json"]);
        let err = stderr(&out);
        if let Some(says) = says {
            assert!(!out.status.success(), "{what}: stats succeeded");
            assert!(err.contains(says), "{what}: {err}");
        }
        assert_eq!(
            tree(&agent.pin_root),
            before,
            "{what}: stats changed the pins"
        );
        if what == "every pin removed" {
            assert!(
                !agent.pin_root.exists(),
                "{what}: stats created the pin root"
            );
        }
    }
    // The writer completes whatever a cut left; then the last unenroll removes it all.
    agent.enroll(&server, &[]);
    agent.unenroll(&server.name);
    assert!(!agent.pin_root.exists(), "left {:?}", tree(&agent.pin_root));

    // The race itself, as it happens.
    let mut stats_runs = 0;
    for round in 0..ROUNDS {
        agent.enroll(&server, &[]);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let loopers: Vec<_> = (0..LOOPERS)
                .map(|_| {
                    s.spawn(|| {
                        let mut n = 0;
                        while !stop.load(Ordering::Relaxed) {
                            let _ = agent.run(&["stats", "--output", "json"]);
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            // Let the loops get going, so the unenroll overlaps them.
            std::thread::sleep(Duration::from_millis(50));
            agent.unenroll(&server.name);
            // And some stats after it, which find no datapath.
            std::thread::sleep(Duration::from_millis(20));
            stop.store(true, Ordering::Relaxed);
            for l in loopers {
                stats_runs += l.join().unwrap();
            }
        });
        assert!(
            !agent.pin_root.exists(),
            "round {round}: the last unenroll, raced by stats, left {:?}",
            tree(&agent.pin_root)
        );
    }
    assert!(stats_runs >= ROUNDS, "stats ran {stats_runs} times");
    eprintln!("{stats_runs} stats runs raced {ROUNDS} last unenrolls");
    agent.enroll(&server, &[]);
    for f in Family::BOTH {
        let to = sock(f.pod_ip(&server), WILDCARD_PORT);
        let seen = proxy.entries().len();
        let got = probe(&client, to);
        let expect = Expect::Echo {
            local: to,
            peer: f.passthrough_src(),
            direct: false,
        };
        if let Some(why) = expect.check(&got) {
            panic!("after the raced unenrolls, client -> {to}: {why}");
        }
        assert_eq!(proxy.entries().len(), seen + 1, "proxy saw {to}");
    }
}

/// (link id, program id) of each of a pod's pinned links.
fn link_ids(root: &Path, pod: &str) -> Vec<(u32, u32)> {
    Hook::ALL
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

/// Makes the pinned info claim another build: what an agent of an older build left.
fn pretend_older_build(root: &Path, build: u64) {
    let data = MapData::from_pin(root.join("info")).expect("info pin");
    let mut a: Array<MapData, [u64; 2]> =
        Array::try_from(Map::from_map_data(data).unwrap()).unwrap();
    let [abi, _] = a.get(&0, 0).unwrap();
    a.set(0, [abi, build], 0).unwrap();
}

/// An upgrade from a compatible older build swaps every program in place: the pods' links keep
/// their ids and now run the new programs, and connections opened in a loop the whole time,
/// inbound to the pod and outbound from it, are every one captured.
#[test]
fn compatible_upgrade_swaps_programs_without_a_gap() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let other = node.add_pod("other").unwrap();
    let client = node.add_pod("client").unwrap();
    let _remote = echo(&client, APP_UID, &[sock(client.ip4, 18089)]);
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(&server, &[]);
    let before_stats = agent.stats(&server.name);
    let syn_retrans_before = syn_retransmits(&client);
    let before_log = proxy.entries().len();

    let stop = AtomicBool::new(false);
    let upgrading = AtomicBool::new(false);
    let during_upgrade = AtomicU32::new(0);
    let inbound: Mutex<Vec<(SocketAddr, Outcome)>> = Mutex::default();
    let outbound: Mutex<Vec<Outcome>> = Mutex::default();
    let mut rounds = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let f = Family::BOTH[i % 2];
                i += 1;
                let to = sock(f.pod_ip(&server), WILDCARD_PORT);
                let overlapped = upgrading.load(Ordering::SeqCst);
                let got = probe(&client, to);
                if overlapped || upgrading.load(Ordering::SeqCst) {
                    during_upgrade.fetch_add(1, Ordering::Relaxed);
                }
                inbound.lock().unwrap().push((to, got));
            }
        });
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let got = connect_as(&server, APP_UID, sock(client.ip4, 18089), None);
                outbound.lock().unwrap().push(got);
            }
        });
        // Four upgrades, each from a pretended older build: by enrolling another pod, by an
        // explicit upgrade, by re-enrolling the pod itself, and from pins without info.
        for round in 0..4u64 {
            if round == 3 {
                // Pins of the first, unversioned agent: no info at all.
                fs::remove_file(agent.pin_root.join("info")).unwrap();
            } else {
                pretend_older_build(&agent.pin_root, 0x01d_b01d + round);
            }
            let before = link_ids(&agent.pin_root, &server.name);
            std::thread::sleep(Duration::from_millis(100));
            upgrading.store(true, Ordering::SeqCst);
            match round {
                0 => {
                    agent.enroll(&other, &[]);
                }
                1 => {
                    let changes = Datapath::upgrade(&agent.pin_root).expect("upgrade");
                    assert_eq!(changes.len(), Hook::ALL.len(), "{changes:?}");
                    for c in &changes {
                        assert_eq!(c.links_updated, 2, "{c:?}: two pods enrolled");
                        assert!(c.old_id.is_some_and(|o| o != c.new_id), "{c:?}");
                    }
                }
                2 => {
                    agent.enroll(&server, &[]);
                }
                _ => {
                    let changes = Datapath::upgrade(&agent.pin_root).expect("upgrade");
                    assert_eq!(changes.len(), Hook::ALL.len(), "{changes:?}");
                    let info = datapath::layout::read_info(&agent.pin_root)
                        .unwrap()
                        .unwrap();
                    assert_eq!(info, Some(datapath::layout::Info::current()));
                }
            }
            upgrading.store(false, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            let after = link_ids(&agent.pin_root, &server.name);
            rounds.push((before, after));
        }
        stop.store(true, Ordering::Relaxed);
    });

    let mut failures = Failures::default();
    for (round, (before, after)) in rounds.iter().enumerate() {
        for (i, hook) in Hook::ALL.iter().enumerate() {
            let ((l0, p0), (l1, p1)) = (before[i], after[i]);
            if l0 != l1 {
                failures.push(format!(
                    "round {round}: {} link id changed {l0} -> {l1}: it was re-created",
                    hook.program()
                ));
            }
            if p0 == p1 {
                failures.push(format!(
                    "round {round}: {} link still runs program {p0}",
                    hook.program()
                ));
            }
            let pinned = aya::programs::ProgramInfo::from_pin(
                agent.pin_root.join("progs").join(hook.program()),
            )
            .unwrap()
            .id();
            if round == rounds.len() - 1 && pinned != p1 {
                failures.push(format!(
                    "{}: link runs {p1}, the pinned program is {pinned}",
                    hook.program()
                ));
            }
        }
    }
    let inbound = inbound.into_inner().unwrap();
    let outbound = outbound.into_inner().unwrap();
    for (to, got) in &inbound {
        let expect = Expect::Echo {
            local: *to,
            peer: if to.is_ipv4() {
                Family::V4.passthrough_src()
            } else {
                Family::V6.passthrough_src()
            },
            direct: false,
        };
        failures.check(format!("client -> {to} during upgrades"), expect, got);
    }
    let to = sock(client.ip4, 18089);
    for got in &outbound {
        let expect = Expect::Echo {
            local: to,
            peer: server.ip4.into(),
            direct: false,
        };
        failures.check(format!("server app -> {to} during upgrades"), expect, got);
    }
    let new_entries = proxy.entries().len() - before_log;
    if new_entries != inbound.len() + outbound.len() {
        failures.push(format!(
            "proxy logged {new_entries} connections, {} inbound + {} outbound were made",
            inbound.len(),
            outbound.len()
        ));
    }
    let d = delta(&before_stats, &agent.stats(&server.name));
    // sk_lookup counts each SYN it hands to the proxy: a SYN the client sent again (its first
    // or the SYN-ACK lost on a loaded machine) is counted again, for one connection. The
    // client's namespace counts those retransmissions, so the figure stays exact.
    let syn_retrans = syn_retransmits(&client) - syn_retrans_before;
    for (counter, want, slack) in [
        ("inbound_captured", inbound.len() as u64, syn_retrans),
        ("outbound_captured", outbound.len() as u64, 0),
    ] {
        let got = d.get(counter).copied().unwrap_or(0);
        if got < want || got > want + slack {
            failures.push(format!(
                "{counter} moved by {got}, want {want} (+ at most {slack} SYN retransmissions)"
            ));
        }
    }
    let overlapped = during_upgrade.load(Ordering::Relaxed);
    if overlapped == 0 {
        failures.push("no connection overlapped an upgrade: the test proved nothing".into());
    }
    eprintln!(
        "{} inbound and {} outbound connections, {overlapped} inbound during an upgrade",
        inbound.len(),
        outbound.len()
    );
    failures.assert_none("compatible upgrade");
}

/// `TCPSynRetrans` of the pod's network namespace: SYNs sent again.
fn syn_retransmits(pod: &Pod) -> u64 {
    let text = pod
        .in_netns(|| fs::read_to_string("/proc/thread-self/net/netstat").unwrap())
        .unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "TCPSynRetrans")
        .map(|(_, v)| v.parse().unwrap())
        .expect("TCPSynRetrans in /proc/net/netstat")
}

/// The id of each hook's pinned program.
fn pinned_ids(root: &Path) -> Vec<u32> {
    Hook::ALL
        .iter()
        .map(|h| {
            aya::programs::ProgramInfo::from_pin(root.join("progs").join(h.program()))
                .map(|i| i.id())
                .unwrap_or(0)
        })
        .collect()
}

/// A `SIGKILL` at points over an upgrading enroll (a sweep, then bisection into the upgrade
/// itself) never leaves a hook without a program: right after each kill inbound is captured,
/// and the next `Datapath::upgrade` completes the upgrade: every link runs the pinned program,
/// no staged program is left, and `info` is this build's.
#[test]
fn a_killed_upgrade_is_completed_by_the_next_open() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(&server, &[]);
    let args = Agent::enroll_args(&server, &server.name);
    let mut failures = Failures::default();
    let mut build = 100;

    // Kills an upgrading enroll `at` after its start, checks, repairs, checks; returns how many
    // programs the killed enroll had replaced.
    let mut kill_at = |at: Duration, failures: &mut Failures| -> usize {
        build += 1;
        pretend_older_build(&agent.pin_root, build);
        let pinned_before = pinned_ids(&agent.pin_root);
        let mut child = agent
            .cmd()
            .args(&args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        let _ = child.kill();
        let _ = child.wait();
        if let Some(why) = captured_inbound(&client, &server, &proxy) {
            failures.push(format!("killed at {at:?}, before any repair: {why}"));
        }
        let replaced = pinned_ids(&agent.pin_root)
            .iter()
            .zip(&pinned_before)
            .filter(|(a, b)| a != b)
            .count();
        let staged: Vec<String> = tree(&agent.pin_root.join("progs"))
            .into_iter()
            .filter(|p| p.ends_with("-new"))
            .collect();
        eprintln!(
            "killed at {at:?}: {replaced} of {} programs replaced, staged {staged:?}",
            Hook::ALL.len()
        );
        if let Err(e) = Datapath::upgrade(&agent.pin_root) {
            failures.push(format!(
                "killed at {at:?}: the next upgrade: {}",
                redirect_agent::error_chain(&e)
            ));
            return replaced;
        }
        let links = link_ids(&agent.pin_root, &server.name);
        for ((hook, (_, prog)), pinned) in
            Hook::ALL.iter().zip(links).zip(pinned_ids(&agent.pin_root))
        {
            if prog != pinned {
                failures.push(format!(
                    "killed at {at:?}: {} link runs {prog}, the pinned program is {pinned}",
                    hook.program()
                ));
            }
        }
        let staged: Vec<String> = tree(&agent.pin_root.join("progs"))
            .into_iter()
            .filter(|p| p.ends_with("-new"))
            .collect();
        if !staged.is_empty() {
            failures.push(format!("killed at {at:?}: staged programs left {staged:?}"));
        }
        let info = datapath::layout::read_info(&agent.pin_root)
            .unwrap()
            .unwrap();
        if info != Some(datapath::layout::Info::current()) {
            failures.push(format!("killed at {at:?}: info {info:?}"));
        }
        if let Some(why) = captured_inbound(&client, &server, &proxy) {
            failures.push(format!("killed at {at:?}, after the upgrade: {why}"));
        }
        replaced
    };

    // A coarse sweep from the start to past the end of an upgrading enroll, then bisection
    // between the last kill that replaced nothing and the first that replaced everything, to
    // land inside the upgrade. Every kill is checked the same way; where they land is logged.
    let mut done = Duration::from_millis(50);
    while kill_at(done, &mut failures) < Hook::ALL.len() {
        done *= 2;
        assert!(done < Duration::from_secs(20), "the enroll never finished");
    }
    let (mut lo, mut hi) = (Duration::ZERO, done);
    let mut partial = 0;
    for _ in 0..10 {
        let mid = (lo + hi) / 2;
        match kill_at(mid, &mut failures) {
            0 => lo = mid,
            n if n == Hook::ALL.len() => hi = mid,
            _ => {
                partial += 1;
                hi = mid;
            }
        }
    }
    eprintln!("{partial} kills landed inside the upgrade (between {lo:?} and {hi:?})");
    failures.assert_none("killed upgrades");
}

/// Runs `agent`'s CLI with `args` inside a private mount namespace where `mount_cmd` ran first
/// (a bind mount over a pin: what a container runtime does to pass a pin into a container).
/// The mount dies with the namespace, also if the test is killed.
fn run_with_mount(agent: &Agent, mount_cmd: &str, args: &[&str]) -> std::process::Output {
    let script = format!("{mount_cmd} && exec \"$0\" \"$@\"");
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(agent_bin())
        .args(args)
        .env("REDIRECT_PIN_ROOT", &agent.pin_root)
        .env("REDIRECT_STATE_DIR", &agent.state_dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("run unshare")
}

/// The last unenroll cannot remove some pins: a map pin with a bind mount over it (EBUSY), and
/// a directory someone made among the programs (EISDIR). The unenroll fails and names each,
/// removes everything else, and what is left does not break the next enroll, which works and
/// captures; its unenroll then leaves nothing.
#[test]
fn unenroll_reports_every_pin_it_cannot_remove() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let client = node.add_pod("client").unwrap();
    let _apps = matrix_apps(&server);
    let proxy = Proxy::start(&node, &server, ProxyDial::PodIp, "proxy.log");
    let agent = Agent::new();
    agent.enroll(&server, &[]);
    let counters = agent.pin_root.join("maps").join("COUNTERS");
    let junk = agent.pin_root.join("progs").join("someone-else");
    fs::create_dir(&junk).unwrap();
    fs::create_dir(junk.join("inside")).unwrap();

    let mount = format!("mount --bind {0} {0}", counters.display());
    let out = run_with_mount(&agent, &mount, &["unenroll", "--name", &server.name]);
    let err = stderr(&out);
    assert!(!out.status.success(), "unenroll succeeded: {err}");
    assert!(err.contains("could not remove 2 pin(s)"), "{err}");
    assert!(
        err.contains(&format!("{}: Device or resource busy", counters.display())),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}: Is a directory", junk.display())),
        "{err}"
    );
    // Everything else is gone; the pod itself is unenrolled.
    let left: BTreeSet<String> = tree(&agent.pin_root).into_iter().collect();
    let want: BTreeSet<String> = [
        "maps",
        "maps/COUNTERS",
        "progs",
        "progs/someone-else",
        "progs/someone-else/inside",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(left, want);
    assert_eq!(agent.listed_names(), Vec::<String>::new());
    assert_eq!(
        cgroup_programs(&server.cgroup),
        "",
        "links left on the cgroup"
    );

    // What is left is a partial datapath: the next enroll completes it and works.
    fs::remove_dir(junk.join("inside")).unwrap();
    fs::remove_dir(&junk).unwrap();
    agent.enroll(&server, &[]);
    let to = sock(server.ip4, WILDCARD_PORT);
    let seen = proxy.entries().len();
    let got = probe(&client, to);
    let expect = Expect::Echo {
        local: to,
        peer: Family::V4.passthrough_src(),
        direct: false,
    };
    if let Some(why) = expect.check(&got) {
        panic!("enroll after a failed teardown, client -> {to}: {why}");
    }
    assert_eq!(proxy.entries().len(), seen + 1);
    agent.unenroll(&server.name);
    assert!(!agent.pin_root.exists(), "left {:?}", tree(&agent.pin_root));
}

/// `Datapath::detach_pod` reports every link pin it cannot remove (here one with a bind mount
/// over it, in a private mount namespace of the test's own thread) and removes the others.
#[test]
fn detach_pod_reports_every_link_it_cannot_remove() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let server = node.add_pod("server").unwrap();
    let agent = Agent::new();
    agent.enroll(&server, &[]);
    let root = agent.pin_root.clone();
    let name = server.name.clone();
    let busy = root.join("pods").join(&name).join(Hook::SockOps.program());
    let result = std::thread::spawn({
        let busy = busy.clone();
        move || {
            use nix::mount::{mount, MsFlags};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .unwrap();
            mount(
                Some(&busy),
                &busy,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap();
            let dp = Datapath::open_read_only(&root).unwrap().expect("datapath");
            dp.detach_pod(&name).map_err(|e| e.to_string())
        }
    })
    .join()
    .unwrap();
    let err = result.expect_err("detach_pod with a busy link pin");
    assert!(err.contains("could not remove 1 pin(s)"), "{err}");
    assert!(
        err.contains(&format!("{}: Device or resource busy", busy.display())),
        "{err}"
    );
    let left = tree(&agent.pin_root.join("pods").join(&server.name));
    assert_eq!(left, vec![Hook::SockOps.program().to_string()]);
}

/// A mount guard: unmounts `path` (lazily) when dropped, also when the test fails.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Mount points under `prefix` in this process's mount namespace.
fn mounts_under(prefix: &Path) -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(prefix))
        .collect()
}

/// Unsafe pin roots are refused before anything is created or mounted: a symlink, one owned by
/// another user, one writable by others, one below a directory another user owns; and a pin
/// root that is not on bpffs gets bpffs mounted on itself, never on its parent, and loses the
/// mount again with the last pin.
#[test]
fn pin_roots_are_handled_as_a_root_daemon_must() {
    require!(Need::Root, datapath());
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let scratch = std::env::temp_dir().join(format!(
        "redirect-test-{}-pins-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&scratch);
    mkdir_root_only(&scratch);
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for m in mounts_under(&self.0).iter().rev() {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(scratch.clone());
    let bpf = Path::new("/sys/fs/bpf");
    let mut failures = Failures::default();
    let refused = |failures: &mut Failures, what: &str, root: &Path, says: &str| {
        let before = tree(root.parent().unwrap());
        match Datapath::open(root) {
            Ok(_) => failures.push(format!("{what}: {} accepted", root.display())),
            Err(e) => {
                let msg = redirect_agent::error_chain(&e);
                if !msg.contains(says) {
                    failures.push(format!("{what}: refusal lacks {says:?}: {msg}"));
                }
            }
        }
        if tree(root.parent().unwrap()) != before {
            failures.push(format!("{what}: something was created"));
        }
        if !mounts_under(root).is_empty() {
            failures.push(format!("{what}: something was mounted"));
        }
    };

    // A symlink to a bpffs directory.
    let target = bpf.join(format!("redirect-test-{}-target", std::process::id()));
    mkdir_root_only(&target);
    let link = scratch.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    refused(&mut failures, "symlink", &link, "is a symlink");
    refused(
        &mut failures,
        "symlink parent",
        &link.join("root"),
        "is a symlink",
    );
    if !tree(&target).is_empty() {
        failures.push(format!("symlink target written: {:?}", tree(&target)));
    }
    let _ = fs::remove_dir(&target);

    // Owned by another user; writable by others; below another user's directory.
    let theirs = scratch.join("theirs");
    mkdir_root_only(&theirs);
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    refused(&mut failures, "other owner", &theirs, "owned by uid 65534");
    refused(
        &mut failures,
        "other owner's parent",
        &theirs.join("root"),
        "owned by uid 65534",
    );
    let open = scratch.join("open");
    mkdir_root_only(&open);
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    refused(
        &mut failures,
        "world-writable",
        &open,
        "writable by group or others (mode 777)",
    );
    refused(
        &mut failures,
        "world-writable parent",
        &open.join("root"),
        "writable by group or others (mode 777)",
    );
    refused(
        &mut failures,
        "relative",
        Path::new("relative/root"),
        "must be absolute",
    );

    // Not on bpffs: bpffs goes on the pin root itself.
    let parent = scratch.join("state");
    mkdir_root_only(&parent);
    let pin_root = parent.join("bpf");
    let _unmount = Unmount(pin_root.clone());
    match Datapath::open(&pin_root) {
        Err(e) => failures.push(format!(
            "pin root on tmpfs: {}",
            redirect_agent::error_chain(&e)
        )),
        Ok(dp) => {
            drop(dp);
            let mounts = mounts_under(&scratch);
            if mounts != vec![pin_root.clone()] {
                failures.push(format!(
                    "mounted {mounts:?}, want only {}",
                    pin_root.display()
                ));
            }
            // bpffs always sets the sticky bit on its root; only root may enter.
            let mode = fs::metadata(&pin_root).unwrap().permissions().mode() & 0o777;
            if mode != 0o700 {
                failures.push(format!("pin root mode {mode:o}"));
            }
            if let Err(e) = Datapath::remove_shared_pins(&pin_root) {
                failures.push(redirect_agent::error_chain(&e));
            }
            if !mounts_under(&scratch).is_empty() || pin_root.exists() {
                failures.push(format!(
                    "after the last pin: mounts {:?}, root exists {}",
                    mounts_under(&scratch),
                    pin_root.exists()
                ));
            }
        }
    }
    failures.assert_none("pin roots");
}

/// Mount points of bpffs instances in this mount namespace, except those of the other tests of
/// this process (their pin roots are `redirect-test-<pid>-...`) and the verify mounts of other
/// processes (an older agent's probe mounts `/tmp/redirect-verify-<its pid>-N`).
fn bpf_mounts(ours: &[u32]) -> Vec<String> {
    let tests = format!("redirect-test-{}-", std::process::id());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(" - ").nth(1).is_some_and(|t| t.starts_with("bpf ")))
        .map(|l| l.split_whitespace().nth(4).unwrap_or("").to_owned())
        .filter(|m| !m.contains(&tests))
        .filter(|m| !is_others_verify(m, ours))
        .collect()
}

/// `…redirect-verify-<pid>-…` of a pid that is not one of `ours`.
fn is_others_verify(name: &str, ours: &[u32]) -> bool {
    let Some(rest) = name.split("redirect-verify-").nth(1) else {
        return false;
    };
    let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
    pid.is_some_and(|p| !ours.contains(&p))
}

fn verify_dirs(ours: &[u32]) -> Vec<String> {
    fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("redirect-verify") && !is_others_verify(n, ours))
        .collect()
}

/// The probe's private bpffs is invisible and leaves nothing: after a complete run, and after
/// a SIGKILL at several points of a run, there is no new bpffs mount and no verify directory.
#[test]
fn probe_leaves_no_mount_even_when_killed() {
    require!(Need::Root);
    let mut ours = Vec::new();
    let mounts = bpf_mounts(&ours);
    let dirs = verify_dirs(&ours);
    let child = Command::new(agent_bin())
        .arg("probe")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    ours.push(child.id());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "probe failed");
    assert_eq!(bpf_mounts(&ours), mounts, "after probe");
    for ms in [0, 5, 20, 50, 100, 200, 400] {
        let mut child = Command::new(agent_bin())
            .arg("probe")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        ours.push(child.id());
        std::thread::sleep(Duration::from_millis(ms));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(bpf_mounts(&ours), mounts, "after a kill at {ms} ms");
    }
    assert_eq!(verify_dirs(&ours), dirs, "verify directories left");
}

/// Run by an unprivileged user, `probe` says it needs root instead of reporting every feature
/// missing, in both output formats.
#[test]
fn probe_as_an_unprivileged_user_says_it_needs_root() {
    require!(Need::Root);
    for args in [&["probe"][..], &["probe", "--output", "json"]] {
        let mut cmd = Command::new(agent_bin());
        cmd.args(args);
        // SAFETY: setgroups/setgid/setuid are async-signal-safe raw syscalls, run between fork
        // and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().expect("run probe as uid 65534");
        let err = stderr(&out);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{args:?} succeeded:\n{stdout}");
        assert!(err.contains("must run as root"), "{args:?}: {err}");
        assert!(err.contains("non-root"), "{args:?}: {err}");
        assert!(!stdout.contains("MISSING"), "{args:?}: {stdout}");
        assert!(
            stdout.trim().is_empty(),
            "{args:?} printed a report: {stdout}"
        );
    }
}

/// bpf mount points under `/sys` in the calling thread's mount namespace.
fn thread_bpf_mounts() -> Vec<String> {
    fs::read_to_string("/proc/thread-self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(" - ").nth(1).is_some_and(|t| t.starts_with("bpf ")))
        .map(|l| l.split_whitespace().nth(4).unwrap_or("").to_owned())
        .filter(|m| m.starts_with("/sys"))
        .collect()
}

/// On a node without bpffs (made so in a private mount namespace of the test's own thread, by
/// unmounting `/sys/fs/bpf` there only): `--pin-root /sys/fs/bpf` gets bpffs on `/sys/fs/bpf`
/// itself, not on `/sys/fs` as before; the default layout (a root directly below `/sys/fs/bpf`)
/// gets it on `/sys/fs/bpf`, the kernel's mount point, and nowhere else.
#[test]
fn without_bpffs_it_is_mounted_at_the_pin_root_never_above() {
    require!(Need::Root, datapath());
    let below = format!("/sys/fs/bpf/redirect-test-{}-nobpffs", std::process::id());
    let result = std::thread::spawn(move || -> Result<(), String> {
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|e| e.to_string())?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| e.to_string())?;
        let bpf = Path::new("/sys/fs/bpf");
        let clear = || {
            while thread_bpf_mounts().iter().any(|m| m == "/sys/fs/bpf") {
                umount2(bpf, MntFlags::MNT_DETACH).map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        };
        clear()?;
        let mut why = Vec::new();
        for root in [Path::new("/sys/fs/bpf"), Path::new(&below)] {
            match Datapath::open(root) {
                Err(e) => why.push(format!(
                    "{}: {}",
                    root.display(),
                    redirect_agent::error_chain(&e)
                )),
                Ok(dp) => {
                    drop(dp);
                    let mounts = thread_bpf_mounts();
                    if mounts != ["/sys/fs/bpf"] {
                        why.push(format!(
                            "pin root {}: bpf mounts {mounts:?}",
                            root.display()
                        ));
                    }
                    if let Err(e) = Datapath::remove_shared_pins(root) {
                        why.push(redirect_agent::error_chain(&e));
                    }
                }
            }
            clear()?;
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("\n"))
        }
    })
    .join()
    .unwrap();
    if let Err(why) = result {
        panic!("{why}");
    }
}
