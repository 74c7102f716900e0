//! Nodes and pods built the way a Kubernetes node builds them: a bridge made by the real CNI
//! `bridge` plugin with `host-local` IPAM, one network namespace and one cgroup per pod.

use std::{
    collections::HashSet,
    ffi::CString,
    fs::{self, File},
    io::{self, BufRead as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::AsRawFd as _,
        unix::{ffi::OsStrExt as _, fs::PermissionsExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex, Once},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{cgroup, netns, state, sweep};

/// Where Debian's `containernetworking-plugins` (and most distributions) put the plugins.
const CNI_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

/// The directory holding the CNI plugins: `$REDIRECT_TESTBED_CNI_PATH` or a standard location.
pub fn cni_plugin_dir() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("REDIRECT_TESTBED_CNI_PATH") {
        return Ok(PathBuf::from(p));
    }
    CNI_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("bridge").exists() && d.join("host-local").exists())
        .context(
            "CNI plugins not found in /usr/lib/cni or /opt/cni/bin \
             (apt-get install containernetworking-plugins)",
        )
}

/// A simulated Kubernetes node: its own network namespace holding the pods' bridge.
///
/// Each node owns a `/24` of 198.18.0.0/15 and a `/64` of 2001:db8::/32 that no other live
/// node on the machine has, because the datapath keys pods by address machine-wide.
/// Everything is removed when the node and all its pods are dropped.
pub struct Node {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    id: String,
    name: String,
    netns_path: PathBuf,
    dir: PathBuf,
    netns_created: bool,
    cni_dir: PathBuf,
    cni_conf: Vec<u8>,
    pod_names: Mutex<HashSet<String>>,
    subnet: state::SubnetLease,
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        if self.netns_created {
            if let Err(e) = netns::delete(&self.name) {
                eprintln!("redirect-testbed: removing node netns {}: {e:#}", self.name);
            }
        }
        // Before the run directory goes: while it exists a sweep in another process knows
        // the run is alive and leaves the lock alone.
        self.subnet.release();
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("redirect-testbed: removing {}: {e}", self.dir.display());
            }
        }
    }
}

/// IPv4 subnet number `index` of 198.18.0.0/15 as `/24`s.
fn subnet4(index: u16) -> Ipv4Addr {
    let hi = 18 + (index / 256) as u8;
    Ipv4Addr::new(198, hi, (index % 256) as u8, 0)
}

fn subnet6(index: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, index, 0, 0, 0, 0)
}

impl Node {
    /// Creates the node's namespace and picks a free subnet pair. Leftovers of dead runs are
    /// swept first (once per process).
    pub fn new() -> Result<Node> {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep::sweep_stale);

        let cni_dir = cni_plugin_dir()?;
        let (id, dir) = state::create_node_dir()?;
        let subnet = match state::allocate_subnet(&id) {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let name = format!("{}{id}-node", state::PREFIX);
        let index = subnet.index;
        let ipam_dir = dir.join("ipam");
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("{}{id}", state::PREFIX),
            "type": "bridge",
            "bridge": "cni0",
            // The bridge gets the .1 addresses; that gateway lives inside the node netns,
            // which has no route anywhere, so nothing leaves the machine.
            "isGateway": true,
            "isDefaultGateway": false,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "dataDir": ipam_dir,
                "ranges": [
                    [{ "subnet": format!("{}/24", subnet4(index)) }],
                    [{ "subnet": format!("{}/64", subnet6(index)) }],
                ],
            },
        });
        let mut inner = NodeInner {
            netns_path: netns::path_of(&name),
            id,
            name,
            dir,
            netns_created: false,
            cni_dir,
            cni_conf: serde_json::to_vec(&conf)?,
            pod_names: Mutex::new(HashSet::new()),
            subnet,
        };
        netns::add(&inner.name)?;
        inner.netns_created = true;
        netns::run_in(&inner.netns_path, || -> Result<()> {
            disable_dad()?;
            Ok(())
        })??;
        netns::run_cmd(Command::new("ip").args(["-n", &inner.name, "link", "set", "lo", "up"]))?;
        Ok(Node {
            inner: Arc::new(inner),
        })
    }

    /// Creates a pod named `rdt-<run>-<name_hint>`: netns, cgroup, `lo` and `eth0` on the
    /// node's bridge with one IPv4 and one IPv6 address.
    pub fn add_pod(&self, name_hint: &str) -> Result<Pod> {
        let node = &self.inner;
        let name = {
            let mut hint: String = name_hint
                .chars()
                .map(|c| c.to_ascii_lowercase())
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(16)
                .collect();
            if hint.is_empty() || hint == "node" {
                hint.insert_str(0, "pod");
            }
            let mut names = node.pod_names.lock().unwrap_or_else(|e| e.into_inner());
            let mut candidate = format!("{}{}-{hint}", state::PREFIX, node.id);
            let mut n = 1;
            while !names.insert(candidate.clone()) {
                n += 1;
                candidate = format!("{}{}-{hint}{n}", state::PREFIX, node.id);
            }
            candidate
        };
        let mut teardown = PodTeardown {
            name: name.clone(),
            node: Arc::clone(node),
            netns_created: false,
            cgroup: None,
            cni_added: false,
        };
        let netns_path = netns::add(&name)?;
        teardown.netns_created = true;
        netns::run_in(&netns_path, disable_dad)??;

        let cgroup = cgroup::testbed_root()?.join(&name);
        fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        teardown.cgroup = Some(cgroup.clone());

        let lo_conf = serde_json::json!({"cniVersion": "1.0.0", "name": "lo", "type": "loopback"});
        node.cni(
            "loopback",
            "ADD",
            &name,
            "lo",
            &serde_json::to_vec(&lo_conf)?,
        )?;
        teardown.cni_added = true;
        let result = node.cni("bridge", "ADD", &name, "eth0", &node.cni_conf)?;
        let (ip4, ip6) = pod_addresses(&result)
            .with_context(|| format!("unexpected CNI result for {name}: {result}"))?;
        Ok(Pod {
            name,
            netns_path,
            cgroup,
            ip4,
            ip6,
            teardown,
        })
    }

    /// `/var/run/netns/<node name>`.
    pub fn netns_path(&self) -> &Path {
        &self.inner.netns_path
    }

    /// The run id shared by the names of this node and its pods (`rdt-<run>-...`).
    pub fn run_id(&self) -> &str {
        &self.inner.id
    }

    /// Index of the node's subnet pair (lock file `/run/redirect-testbed/subnets/<index>`).
    pub fn subnet_index(&self) -> u16 {
        self.inner.subnet.index
    }

    /// The node namespace's name (`rdt-<run>-node`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The node's IPv4 subnet, a `/24` of 198.18.0.0/15.
    pub fn subnet4(&self) -> (Ipv4Addr, u8) {
        (subnet4(self.inner.subnet.index), 24)
    }

    /// The node's IPv6 subnet, a `/64` of 2001:db8::/32.
    pub fn subnet6(&self) -> (Ipv6Addr, u8) {
        (subnet6(self.inner.subnet.index), 64)
    }

    /// A directory private to this node, removed with it (`/run/redirect-testbed/nodes/<run>`).
    pub fn scratch_dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Creates an empty file in [`Node::scratch_dir`] that any uid may write: a log for a
    /// proxy that runs as uid 1337, for instance.
    pub fn scratch_file(&self, name: &str) -> Result<PathBuf> {
        let path = self.inner.dir.join(name);
        File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666))?;
        Ok(path)
    }

    /// Runs a command inside the node's netns (`ip netns exec`), returning its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        netns::exec(&self.inner.name, program, args)
    }

    /// Runs `f` on a thread inside the node's netns.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        netns::run_in(&self.inner.netns_path, f)
    }
}

impl NodeInner {
    /// Runs a CNI plugin inside the node netns, as a container runtime on the node would.
    fn cni(
        &self,
        plugin: &str,
        command: &str,
        pod: &str,
        ifname: &str,
        conf: &[u8],
    ) -> Result<serde_json::Value> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(self.cni_dir.join(plugin))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", pod)
            .env("CNI_NETNS", netns::path_of(pod))
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", &self.cni_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running CNI plugin {plugin}"))?;
        child.stdin.take().expect("piped").write_all(conf)?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            anyhow::bail!(
                "CNI {plugin} {command} for {pod} failed ({}): {} {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("CNI {plugin} {command} printed invalid JSON"))
    }
}

/// Without this, a new IPv6 address is "tentative" for a second or two and cannot be bound.
fn disable_dad() -> Result<()> {
    for scope in ["all", "default"] {
        let p = format!("/proc/sys/net/ipv6/conf/{scope}/accept_dad");
        fs::write(&p, "0").with_context(|| format!("writing {p}"))?;
    }
    Ok(())
}

fn pod_addresses(result: &serde_json::Value) -> Option<(Ipv4Addr, Ipv6Addr)> {
    let mut v4 = None;
    let mut v6 = None;
    for ip in result.get("ips")?.as_array()? {
        let addr = ip.get("address")?.as_str()?;
        match addr.split('/').next()?.parse::<IpAddr>().ok()? {
            IpAddr::V4(a) => v4 = v4.or(Some(a)),
            IpAddr::V6(a) => v6 = v6.or(Some(a)),
        }
    }
    Some((v4?, v6?))
}

/// A pod: network namespace with `lo` and `eth0`, plus its own cgroup v2 directory.
///
/// Dropping it kills its processes, runs CNI DEL, and removes the netns and the cgroup. The
/// node stays alive until its last pod is gone.
pub struct Pod {
    /// Unique name, `rdt-<run>-<hint>`; also the netns and cgroup directory name.
    pub name: String,
    /// `/var/run/netns/<name>`.
    pub netns_path: PathBuf,
    /// `<cgroup2 mount>/redirect-testbed/<name>`.
    pub cgroup: PathBuf,
    /// Address on `eth0`, from the node's 198.18/15 subnet.
    pub ip4: Ipv4Addr,
    /// Address on `eth0`, from the node's 2001:db8 `/64`.
    pub ip6: Ipv6Addr,
    teardown: PodTeardown,
}

/// Undoes as much of a pod as was built, also when [`Node::add_pod`] fails halfway.
struct PodTeardown {
    name: String,
    node: Arc<NodeInner>,
    netns_created: bool,
    cgroup: Option<PathBuf>,
    cni_added: bool,
}

impl Drop for PodTeardown {
    fn drop(&mut self) {
        // Processes first: they hold sockets in the netns and pin the cgroup.
        if let Some(cg) = &self.cgroup {
            if let Err(e) = cgroup::kill_and_remove(cg) {
                eprintln!("redirect-testbed: removing cgroup {}: {e}", cg.display());
            }
        }
        if self.cni_added {
            if let Err(e) = self
                .node
                .cni("bridge", "DEL", &self.name, "eth0", &self.node.cni_conf)
            {
                eprintln!("redirect-testbed: {e:#}");
            }
        }
        if self.netns_created {
            if let Err(e) = netns::delete(&self.name) {
                eprintln!("redirect-testbed: removing pod netns {}: {e:#}", self.name);
            }
        }
        self.node
            .pod_names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
    }
}

impl Pod {
    /// Starts `cmd` inside the pod: its netns and its cgroup, as uid and gid `uid` with no
    /// supplementary groups. stdio is whatever `cmd` says. Killed (SIGKILL, then reaped) when
    /// the returned [`PodProcess`] is dropped, and with the pod in any case.
    ///
    /// Do not set a uid on `cmd` itself: std switches uid before the hook that joins the netns
    /// and the cgroup runs, and an unprivileged process can join neither.
    pub fn spawn(&self, uid: u32, mut cmd: Command) -> Result<PodProcess> {
        let ns = File::open(&self.netns_path)
            .with_context(|| format!("opening {}", self.netns_path.display()))?;
        let procs = CString::new(self.cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
        let ns_fd = ns.as_raw_fd();
        let program = format!("{:?}", cmd.get_program());
        // SAFETY: the hook runs between fork and exec and only makes raw syscalls.
        unsafe {
            cmd.pre_exec(move || {
                let check = |r: libc::c_int| {
                    if r < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(r)
                    }
                };
                check(libc::setns(ns_fd, libc::CLONE_NEWNET))?;
                let fd = check(libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC))?;
                // "0" moves the writing process itself.
                let w = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if w != 1 {
                    return Err(err);
                }
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(uid))?;
                check(libc::setuid(uid))?;
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {program} in pod {}", self.name))?;
        drop(ns);
        Ok(PodProcess {
            child,
            program,
            stdout_lines: None,
        })
    }

    /// Runs `f` on a thread that joined the pod's netns (not its cgroup). A panic in `f`
    /// propagates to the caller.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        netns::run_in(&self.netns_path, f)
    }

    /// Runs `program args` in the pod's netns (`ip netns exec`), returning stdout; a non-zero
    /// exit is an error carrying stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        netns::exec(&self.name, program, args)
    }

    /// The cgroup id (inode number of the cgroup directory), which is what
    /// `bpf_get_current_cgroup_id` returns for the pod's processes.
    pub fn cgroup_id(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(fs::metadata(&self.cgroup)?.ino())
    }

    /// Adds an address to the pod's `lo`, e.g. `::6`, which Istio's init container adds so
    /// that the proxy can bind its IPv6 inbound-passthrough source.
    pub fn add_lo_address(&self, addr: IpAddr) -> Result<()> {
        let cidr = match addr {
            IpAddr::V4(a) => format!("{a}/32"),
            IpAddr::V6(a) => format!("{a}/128"),
        };
        netns::run_cmd(
            Command::new("ip").args(["-n", &self.name, "addr", "add", &cidr, "dev", "lo"]),
        )?;
        Ok(())
    }

    /// Runs the `redirect-testbed connect` client as `uid` in the pod's netns *and cgroup*,
    /// so cgroup-attached programs see it as the pod's application (a thread from
    /// [`Pod::in_netns`] stays in the caller's cgroup).
    pub fn connect_as(
        &self,
        uid: u32,
        to: SocketAddr,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<crate::Outcome> {
        let mut cmd = Command::new(crate::testbed_bin()?);
        cmd.arg("connect")
            .arg("--to")
            .arg(to.to_string())
            .arg("--payload")
            .arg(std::ffi::OsStr::from_bytes(payload))
            .arg("--timeout-ms")
            .arg(timeout.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut p = self.spawn(uid, cmd)?;
        let child = &mut p.child;
        let mut out = String::new();
        io::Read::read_to_string(child.stdout.as_mut().expect("piped"), &mut out)?;
        let status = child.wait()?;
        let mut err = String::new();
        let _ = io::Read::read_to_string(child.stderr.as_mut().expect("piped"), &mut err);
        if !status.success() {
            anyhow::bail!("connect in {} failed ({status}): {}", self.name, err.trim());
        }
        serde_json::from_str(out.trim()).with_context(|| format!("connect printed {out:?}"))
    }

    /// Name of the node netns the pod is attached to.
    pub fn node_name(&self) -> &str {
        &self.teardown.node.name
    }
}

/// A process started by [`Pod::spawn`]; SIGKILLed and reaped on drop.
pub struct PodProcess {
    child: Child,
    program: String,
    stdout_lines: Option<mpsc::Receiver<String>>,
}

impl PodProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The underlying child, e.g. to take its piped stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits until the process has a TCP socket listening on `addr` (a wildcard listener on
    /// the port counts for a specific address). Asks sock_diag in the process's own netns
    /// instead of connecting: a probe connection would reach a proxy and appear in its log.
    pub fn wait_for_listen(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "{} exited ({status}) before listening on {addr}",
                    self.program
                );
            }
            if listening(self.pid(), addr) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{} is not listening on {addr} after {timeout:?}",
                    self.program
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a line of the process's stdout that contains `needle` (the `listening` and
    /// `ready` lines of `echo` and `proxy`) and returns it. stdout must be piped; lines before
    /// the match are consumed.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        if self.stdout_lines.is_none() {
            let out = self
                .child
                .stdout
                .take()
                .context("stdout is not piped (Command::stdout(Stdio::piped()))")?;
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            self.stdout_lines = Some(rx);
        }
        let rx = self.stdout_lines.as_ref().expect("set above");
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    anyhow::bail!(
                        "{} printed no line with {needle:?} in {timeout:?}",
                        self.program
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    anyhow::bail!(
                        "{} exited ({status}) without printing {needle:?}",
                        self.program
                    )
                }
            }
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let _ = self.child.kill();
        Ok(self.child.wait()?)
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Whether a TCP socket listens on `want` (or on the wildcard address of its port) in the
/// network namespace of process `pid`, as sock_diag reports it.
pub(crate) fn listening(pid: u32, want: SocketAddr) -> bool {
    let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let Ok(Ok(listeners)) = netns::run_in(&ns, crate::sockdiag::tcp_listeners) else {
        return false;
    };
    listeners.iter().any(|local| {
        local.port() == want.port()
            && (local.ip() == want.ip()
                || (local.ip().is_unspecified()
                    && (local.is_ipv6() || want.is_ipv4())
                    && !want.ip().is_unspecified()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_cover_the_benchmark_range() {
        assert_eq!(subnet4(0), Ipv4Addr::new(198, 18, 0, 0));
        assert_eq!(subnet4(255), Ipv4Addr::new(198, 18, 255, 0));
        assert_eq!(subnet4(256), Ipv4Addr::new(198, 19, 0, 0));
        assert_eq!(subnet4(511), Ipv4Addr::new(198, 19, 255, 0));
        assert_eq!(subnet6(300).to_string(), "2001:db8:0:12c::");
    }

    #[test]
    fn finds_own_listener() {
        crate::require!(crate::Need::Root);
        let me = std::process::id();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(listening(me, addr));
        assert!(!listening(me, SocketAddr::new(addr.ip(), 1)));
        let l6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        assert!(listening(me, l6.local_addr().unwrap()));
        // A wildcard listener covers the specific addresses of its port.
        let any = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = any.local_addr().unwrap().port();
        assert!(listening(
            me,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
        ));
        assert!(!listening(
            me,
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)
        ));
    }
}
