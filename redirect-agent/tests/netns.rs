//! Network namespace preparation through rtnetlink (`redirect_agent::netns`) against the real
//! kernel: test-bed pods (their own network namespaces, veths on a CNI bridge), `::6` on `lo`
//! added by us or already there (as istio-init leaves it), and the files that `--netns` must
//! refuse, each with one clear line.
//!
//! Needs root; without it each test says why and returns, except under `CI=true`.

mod common;

use std::{
    net::{IpAddr, Ipv6Addr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use common::*;
use redirect_agent::{
    error_chain,
    netns::{self, Added, NetnsError, NetnsHandle, Removed},
};

fn six() -> Ipv6Addr {
    netns::passthrough_src6()
}

fn open(pod: &Pod) -> NetnsHandle {
    NetnsHandle::open(&pod.netns_path).expect("open the pod's netns")
}

/// `::6` on the pod's `lo`, as `ip` shows it (an independent reader of the kernel's state).
fn lo_has_six(pod: &Pod) -> bool {
    lo_addresses(pod).contains("inet6 ::6/128")
}

#[test]
fn lo_addr6_added_then_removed_and_both_converge() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let pod = node.add_pod("pod").unwrap();
    let ns = open(&pod);
    assert!(
        !lo_has_six(&pod),
        "fresh pod already has ::6: {}",
        lo_addresses(&pod)
    );

    assert_eq!(netns::add_lo_addr6(&ns, six()).unwrap(), Added::Now);
    assert!(lo_has_six(&pod), "{}", lo_addresses(&pod));
    assert!(netns::assigned_addrs(&ns)
        .unwrap()
        .contains(&IpAddr::V6(six())));
    let link = pod
        .exec("ip", &["-o", "link", "show", "dev", "lo"])
        .unwrap();
    assert!(link.contains(",UP"), "lo is not up: {link}");
    // nodad: usable at once, never tentative.
    assert!(
        !lo_addresses(&pod).contains("tentative"),
        "{}",
        lo_addresses(&pod)
    );

    // Re-running converges: the second add finds ours, the second remove finds it gone.
    assert_eq!(
        netns::add_lo_addr6(&ns, six()).unwrap(),
        Added::AlreadyThere
    );
    assert_eq!(netns::remove_lo_addr6(&ns, six()).unwrap(), Removed::Now);
    assert!(!lo_has_six(&pod), "{}", lo_addresses(&pod));
    assert_eq!(
        netns::remove_lo_addr6(&ns, six()).unwrap(),
        Removed::WasAbsent
    );
    assert!(!netns::assigned_addrs(&ns)
        .unwrap()
        .contains(&IpAddr::V6(six())));
}

/// Issue 8: `::6` already on `lo`, as istio-init and other tools leave it, made every IPv6
/// enroll fail while only `ip`'s text "File exists" was tolerated. Now the kernel's `EEXIST`
/// says "already there", and the address stays: it is not ours to remove.
#[test]
fn lo_addr6_already_there_is_reported_and_left_alone() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let pod = node.add_pod("pod").unwrap();
    pod.add_lo_address(IpAddr::V6(six())).unwrap();
    let before = lo_addresses(&pod);
    assert!(lo_has_six(&pod), "{before}");
    let ns = open(&pod);

    let added = netns::add_lo_addr6(&ns, six()).unwrap();
    assert_eq!(added, Added::AlreadyThere);
    // What an owner does with that answer: remove only what it added itself.
    if added == Added::Now {
        netns::remove_lo_addr6(&ns, six()).unwrap();
    }
    assert!(lo_has_six(&pod), "someone else's ::6 was removed");
    assert_eq!(lo_addresses(&pod), before);
}

#[test]
fn assigned_addrs_sees_the_veth_addresses() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let pod = node.add_pod("pod").unwrap();
    let other = node.add_pod("other").unwrap();
    let addrs = netns::assigned_addrs(&open(&pod)).unwrap();
    for ip in [IpAddr::V4(pod.ip4), IpAddr::V6(pod.ip6)] {
        assert!(addrs.contains(&ip), "{ip} not in {addrs:?}");
    }
    for ip in [IpAddr::V4(other.ip4), IpAddr::V6(other.ip6)] {
        assert!(!addrs.contains(&ip), "{ip} of another pod in {addrs:?}");
    }
    // The same set as `ip` shows for the veth (IPv6 link-local included).
    let shown = pod
        .exec("ip", &["-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    let from_ip: Vec<IpAddr> = shown
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = w.iter().position(|x| *x == "inet" || *x == "inet6")?;
            w.get(at + 1)?.split('/').next()?.parse().ok()
        })
        .collect();
    assert!(!from_ip.is_empty(), "{shown}");
    for ip in &from_ip {
        assert!(addrs.contains(ip), "{ip} (from ip addr) not in {addrs:?}");
    }
}

#[test]
fn handle_names_the_namespace_by_inode_and_device() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let pod = node.add_pod("pod").unwrap();
    let other = node.add_pod("other").unwrap();
    let ns = open(&pod);
    let meta = std::fs::metadata(&pod.netns_path).unwrap();
    assert_eq!((ns.inode(), ns.dev()), (meta.ino(), meta.dev()));
    assert_eq!(ns.path(), pod.netns_path.as_path());
    // A process in the pod sees the same namespace through /proc/PID/ns/net.
    let p = pod
        .spawn(APP_UID, {
            let mut c = std::process::Command::new("sleep");
            c.arg("30");
            c
        })
        .unwrap();
    let via_proc = NetnsHandle::open(Path::new(&format!("/proc/{}/ns/net", p.pid()))).unwrap();
    assert_eq!(via_proc.id(), ns.id());
    assert_ne!(open(&other).id(), ns.id());
    // Work run inside it sees the pod's interfaces, not the host's.
    let hex = |ip: Ipv6Addr| {
        ip.octets()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let inside = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/if_inet6"))
        .unwrap()
        .unwrap();
    assert!(inside.contains(&hex(pod.ip6)), "{inside}");
    assert!(!inside.contains(&hex(other.ip6)), "{inside}");
}

/// A unique scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("redirect-netns-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Opens `path` on another thread, so that a blocking open fails the test instead of hanging
/// it (no writer ever opens the FIFO).
fn open_guarded(path: &Path) -> Result<NetnsHandle, NetnsError> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send(NetnsHandle::open(&p));
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("opening {} blocked", path.display()))
}

/// Issue 9 item 6: a FIFO, a regular file, another namespace type or the host's network
/// namespace as `--netns` is refused at once, with one line naming the path and what it is.
#[test]
fn non_namespaces_and_the_host_namespace_are_refused_with_one_line() {
    require!(Need::Root);
    let dir = Scratch::new();
    let fifo = dir.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let file = dir.0.join("file");
    std::fs::write(&file, b"not a namespace").unwrap();
    let missing = dir.0.join("missing");
    let cases: [(&Path, &str); 6] = [
        (&fifo, "is a FIFO, not a network namespace"),
        (&file, "is a regular file, not a network namespace"),
        (&dir.0, "is a directory, not a network namespace"),
        (
            Path::new("/proc/self/ns/mnt"),
            "is a mount namespace, not a network namespace",
        ),
        (
            Path::new("/proc/self/ns/net"),
            "is the host's network namespace, not a pod's",
        ),
        (&missing, "cannot open network namespace"),
    ];
    let mut wrong = Vec::new();
    for (path, want) in cases {
        let e = match open_guarded(path) {
            Ok(h) => {
                wrong.push(format!(
                    "{}: accepted (inode {})",
                    path.display(),
                    h.inode()
                ));
                continue;
            }
            Err(e) => e,
        };
        let line = error_chain(&e);
        eprintln!("{}: {line}", path.display());
        let ok = line.contains(want)
            && line.contains(&path.display().to_string())
            && !line.contains('\n');
        let kind_ok = match &e {
            NetnsError::NotNamespace { .. } => path == fifo || path == file || path == dir.0,
            NetnsError::OtherNamespace { .. } => path.ends_with("mnt"),
            NetnsError::HostNetns { .. } => path.ends_with("net"),
            NetnsError::Open { source, .. } => {
                path == missing && source.kind() == std::io::ErrorKind::NotFound
            }
            _ => false,
        };
        if !ok || !kind_ok {
            wrong.push(format!(
                "{}: {e:?} / {line:?}, want {want:?}",
                path.display()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Runs the CLI with a hang guard: a command blocked on a FIFO would otherwise hang the test.
fn run_guarded(agent: &Agent, args: &[String]) -> std::process::Output {
    let child = agent
        .cmd()
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn redirect-agent");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send(());
        out
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        // SAFETY: kill(2) on the child this test spawned and has not reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        panic!("redirect-agent {args:?} blocked");
    }
    waiter.join().unwrap().expect("wait for redirect-agent")
}

/// The same refusals through `redirect-agent enroll --netns`: one `error:` line naming the
/// path and what it is, at once (a FIFO does not block it), and nothing left behind.
#[test]
fn enroll_refuses_non_namespaces_and_the_host_with_one_line() {
    require!(Need::Root);
    let node = Node::new().unwrap();
    let pod = node.add_pod("pod").unwrap();
    let agent = Agent::new();
    let dir = Scratch::new();
    let fifo = dir.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let file = dir.0.join("file");
    std::fs::write(&file, b"not a namespace").unwrap();
    let lo_before = lo_addresses(&pod);
    let cases: [(&Path, &str); 4] = [
        (&fifo, "is a FIFO, not a network namespace"),
        (&file, "is a regular file, not a network namespace"),
        (
            Path::new("/proc/self/ns/mnt"),
            "is a mount namespace, not a network namespace",
        ),
        (
            Path::new("/proc/self/ns/net"),
            "is the host's network namespace, not a pod's",
        ),
    ];
    for (path, want) in cases {
        let mut args = Agent::enroll_args(&pod, &pod.name);
        let at = args.iter().position(|a| a == "--netns").unwrap() + 1;
        args[at] = path.display().to_string();
        let out = run_guarded(&agent, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        eprintln!("{}: {}", path.display(), stderr.trim());
        assert!(
            !out.status.success(),
            "{}: enroll succeeded",
            path.display()
        );
        assert_eq!(lines.len(), 1, "{}: {stderr}", path.display());
        assert!(
            lines[0].starts_with("error: ")
                && lines[0].contains(want)
                && lines[0].contains(&path.display().to_string()),
            "{}: {}",
            path.display(),
            lines[0]
        );
        assert!(agent.listed_names().is_empty(), "{}", path.display());
        assert!(
            !agent.pin_root.exists(),
            "{}: pin root created",
            path.display()
        );
    }
    assert_eq!(lo_addresses(&pod), lo_before);
}

/// Issue 8's case end to end: with `::6` already on the pod's `lo` (as istio-init leaves it),
/// an IPv6 enroll succeeds and the unenroll leaves that `::6` where it was; without it, enroll
/// adds `::6` and unenroll removes it again.
#[test]
fn enroll_with_six_already_on_lo_succeeds_and_unenroll_leaves_it() {
    require!(Need::Root, datapath());
    let node = Node::new().unwrap();
    let theirs = node.add_pod("theirs").unwrap();
    let ours = node.add_pod("ours").unwrap();
    theirs.add_lo_address(IpAddr::V6(six())).unwrap();
    let agent = Agent::new();

    agent.enroll(&theirs, &[]);
    agent.enroll(&ours, &[]);
    assert!(lo_has_six(&theirs), "{}", lo_addresses(&theirs));
    assert!(
        lo_has_six(&ours),
        "enroll did not add ::6: {}",
        lo_addresses(&ours)
    );
    let mut names = agent.listed_names();
    names.sort();
    let mut want = vec![theirs.name.clone(), ours.name.clone()];
    want.sort();
    assert_eq!(names, want);

    agent.unenroll(&theirs.name);
    agent.unenroll(&ours.name);
    assert!(
        lo_has_six(&theirs),
        "unenroll removed the ::6 it did not add: {}",
        lo_addresses(&theirs)
    );
    assert!(
        !lo_has_six(&ours),
        "unenroll left the ::6 it added: {}",
        lo_addresses(&ours)
    );
}
