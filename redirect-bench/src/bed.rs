//! The test bed of the data-path benchmark: a node with a client and a server pod, the echo
//! application, and what one configuration starts in them (iptables rules, enrollment,
//! proxies) and stops again.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use redirect_devtools::output;
use redirect_testbed::{Node, Pod, PodProcess};

use crate::istio::{self, Exclusions};
use crate::modes::{Config, Mode, ProxyKind, Scale};

pub const APP_UID: u32 = 1000;
pub const PROXY_UID: u32 = 1337;
pub const APP_PORT: u16 = 8080;
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;
/// First port of the excluded inbound ports of the scale sweep.
const EXCLUDED_PORTS_BASE: u16 = 20000;
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// redirect's programs, as pinned under `<pin root>/progs/`.
pub const PROGRAMS: &[&str] = &[
    "rd_connect4",
    "rd_connect6",
    "rd_bind4",
    "rd_bind6",
    "rd_sock_ops",
    "rd_getsockopt",
    "rd_sk_lookup",
    "rd_getpeername4",
    "rd_getpeername6",
    "rd_sendmsg4",
    "rd_sendmsg6",
    "rd_recvmsg4",
    "rd_recvmsg6",
];

pub struct Bed {
    pub node: Node,
    pub client: Pod,
    pub server: Pod,
    pub testbed: PathBuf,
    pub agent: PathBuf,
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
    pub cpu: usize,
    pub _echo: PodProcess,
}

/// What one configuration started; undone by [`Bed::stop`] (or, best effort, on drop).
pub struct Running {
    pub cfg: Config,
    pub proxies: Vec<PodProcess>,
    pub enrolled: Vec<String>,
    pub iptables: Option<&'static str>,
    pub pods: Vec<String>,
    pub agent: PathBuf,
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        for p in &mut self.proxies {
            let _ = p.kill();
        }
        for name in std::mem::take(&mut self.enrolled) {
            let _ = agent_cmd(&self.agent, &self.pin_root, &self.state_dir)
                .args(["unenroll", "--name", &name])
                .output();
        }
        if let Some(backend) = self.iptables.take() {
            for pod in &self.pods {
                let _ = remove_rules(pod, backend);
            }
        }
    }
}

fn agent_cmd(agent: &Path, pin_root: &Path, state_dir: &Path) -> Command {
    let mut c = Command::new(agent);
    c.env("REDIRECT_PIN_ROOT", pin_root)
        .env("REDIRECT_STATE_DIR", state_dir)
        .stdin(Stdio::null());
    c
}

pub fn in_netns(pod: &str, prog: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", pod, prog]);
    c
}

fn remove_rules(pod: &str, backend: &str) -> Result<()> {
    match backend {
        // Deleting the table (not only flushing it) unregisters its hooks, and with them
        // conntrack, so the next mode in this namespace starts clean.
        "nft" => {
            let _ = output(in_netns(pod, "nft").args(["delete", "table", "ip", "nat"]));
        }
        _ => {
            output(in_netns(pod, "iptables-legacy").args(["-t", "nat", "-F"]))?;
            output(in_netns(pod, "iptables-legacy").args(["-t", "nat", "-X"]))?;
        }
    }
    Ok(())
}

impl Bed {
    pub fn new(bin_dir: &Path, cpu: usize) -> Result<Bed> {
        let testbed = bin_dir.join("redirect-testbed");
        let agent = bin_dir.join("redirect-agent");
        for b in [&testbed, &agent] {
            ensure!(b.exists(), "{} is missing", b.display());
        }
        crate::crowd::sweep_stale();
        let pid = std::process::id();
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/redirect-bench-{pid}"));
        let state_dir = PathBuf::from(format!("/tmp/redirect-bench-{pid}"));
        let node = Node::new()?;
        let client = node.add_pod("bench-client")?;
        let server = node.add_pod("bench-server")?;
        for pod in [&client, &server] {
            // Inside the pods' own namespaces only: a wide ephemeral range, and no TIME_WAIT
            // pile-up, so that connect-request-close runs do not run out of ports (the
            // 127.0.0.6 delivery binds its source port before connecting).
            output(in_netns(&pod.name, "sysctl").args([
                "-qw",
                "net.ipv4.ip_local_port_range=1024 65000",
                "net.ipv4.tcp_max_tw_buckets=0",
            ]))?;
        }
        let mut echo = Command::new("taskset");
        echo.arg("-c")
            .arg(cpu.to_string())
            .arg(&testbed)
            .args(["echo", "--plain", "--listen"])
            .arg(format!("0.0.0.0:{APP_PORT}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut echo = server.spawn(APP_UID, echo)?;
        echo.wait_for_listen(
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), APP_PORT),
            Duration::from_secs(5),
        )?;
        Ok(Bed {
            node,
            client,
            server,
            testbed,
            agent,
            pin_root,
            state_dir,
            cpu,
            _echo: echo,
        })
    }

    pub fn agent(&self) -> Command {
        agent_cmd(&self.agent, &self.pin_root, &self.state_dir)
    }

    pub fn server_app(&self) -> SocketAddr {
        SocketAddr::new(self.server.ip4.into(), APP_PORT)
    }

    /// The exclusions of the scale sweep: N /32s of 198.18.0.0/15 outside the node's /24,
    /// and N ports from 20000.
    fn exclusions(&self, n: usize) -> Exclusions {
        let (net, _) = self.node.subnet4();
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
        let node_net = u32::from(net);
        let cidrs = (1u32..)
            .map(|i| base + i)
            .filter(|a| a & 0xffff_ff00 != node_net && a & 0xff != 0)
            .take(n)
            .map(|a| format!("{}/32", Ipv4Addr::from(a)))
            .collect();
        Exclusions {
            inbound_ports: (0..n).map(|i| EXCLUDED_PORTS_BASE + i as u16).collect(),
            outbound_cidrs: cidrs,
        }
    }

    pub fn start(&self, cfg: Config, scale: Scale) -> Result<Running> {
        let mut running = Running {
            cfg,
            proxies: Vec::new(),
            enrolled: Vec::new(),
            iptables: None,
            pods: vec![self.client.name.clone(), self.server.name.clone()],
            agent: self.agent.clone(),
            pin_root: self.pin_root.clone(),
            state_dir: self.state_dir.clone(),
        };
        let excl = self.exclusions(scale.rules);
        if let Some((backend, generation)) = cfg.mode.iptables() {
            running.iptables = Some(backend);
            let input = istio::restore_input(generation, &excl);
            for pod in [&self.client, &self.server] {
                crate::sys::run_with_input(
                    in_netns(&pod.name, &format!("iptables-{backend}-restore")).arg("--noflush"),
                    &input,
                )
                .with_context(|| format!("installing the iptables rules in {}", pod.name))?;
            }
        }
        if cfg.mode.enrolled() {
            for (name, pod) in [
                ("bench-client", &self.client),
                ("bench-server", &self.server),
            ] {
                let mut cmd = self.agent();
                cmd.args(["enroll", "--name", name, "--cgroup"])
                    .arg(&pod.cgroup)
                    .arg("--netns")
                    .arg(&pod.netns_path)
                    .arg("--pod-ip")
                    .arg(pod.ip4.to_string());
                for chunk in excl.outbound_cidrs.chunks(500) {
                    cmd.arg("--exclude-outbound-cidrs").arg(chunk.join(","));
                }
                for chunk in excl.inbound_ports.chunks(1000) {
                    let ports: Vec<String> = chunk.iter().map(u16::to_string).collect();
                    cmd.arg("--exclude-inbound-ports").arg(ports.join(","));
                }
                output(&mut cmd).context("enrolling a bench pod")?;
                running.enrolled.push(name.to_owned());
            }
        }
        if let Some(kind) = cfg.proxy {
            for (side, pod) in [("client", &self.client), ("server", &self.server)] {
                let p = match kind {
                    ProxyKind::TestProxy => self.spawn_test_proxy(cfg.mode, side, pod)?,
                    ProxyKind::Nginx => self.spawn_nginx(cfg.mode, side, pod)?,
                    ProxyKind::Haproxy => self.spawn_haproxy(cfg.mode, side, pod)?,
                };
                running.proxies.push(p);
            }
            for p in &mut running.proxies {
                for port in [INBOUND_PORT, OUTBOUND_PORT] {
                    p.wait_for_listen(
                        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
                        Duration::from_secs(5),
                    )?;
                }
            }
        }
        Ok(running)
    }

    pub fn stop(&self, mut running: Running) -> Result<()> {
        for p in &mut running.proxies {
            // nginx's master stops its workers on SIGTERM; SIGKILL would orphan them.
            // SAFETY: kill has no memory preconditions; the pid is our own child.
            unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while p.child_mut().try_wait()?.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            p.kill()?;
        }
        running.proxies.clear();
        // Whatever a proxy left behind (it is all uid 1337: the application is never stopped).
        for pod in [&self.client, &self.server] {
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let strays = pids_of_uid(&pod.cgroup, PROXY_UID);
                if strays.is_empty() {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "proxy processes {strays:?} in {} do not go away",
                    pod.name
                );
                for pid in strays {
                    // SAFETY: as above; the pid is in a cgroup that only this run uses.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for name in std::mem::take(&mut running.enrolled) {
            output(self.agent().args(["unenroll", "--name", &name]))?;
        }
        if let Some(backend) = running.iptables.take() {
            for pod in [&self.client, &self.server] {
                remove_rules(&pod.name, backend)?;
            }
        }
        Ok(())
    }

    fn pinned(&self, cmd: &mut Command) -> Command {
        let mut t = Command::new("taskset");
        t.arg("-c").arg(self.cpu.to_string()).arg(cmd.get_program());
        t.args(cmd.get_args());
        t
    }

    fn spawn_test_proxy(&self, mode: Mode, side: &str, pod: &Pod) -> Result<PodProcess> {
        let mut cmd = Command::new(&self.testbed);
        cmd.arg("proxy").args([
            "--delivery",
            if mode.loopback_delivery() {
                "loopback"
            } else {
                "pod-ip"
            },
        ]);
        if mode.explicit() {
            let upstream = match side {
                "client" => SocketAddr::new(self.server.ip4.into(), INBOUND_PORT),
                _ => self.server_app(),
            };
            cmd.arg("--upstream").arg(upstream.to_string());
        }
        let mut cmd = self.pinned(&mut cmd);
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        pod.spawn(PROXY_UID, cmd)
    }

    /// nginx's stream module as the sidecar. It cannot read SO_ORIGINAL_DST, so outbound it
    /// always goes to the server's application; inbound it goes to `$server_addr:$server_port`
    /// (the original destination when capture keeps it, as sk_lookup does) and to the
    /// application's fixed address when the local port is the capture port (REDIRECT).
    fn spawn_nginx(&self, mode: Mode, side: &str, pod: &Pod) -> Result<PodProcess> {
        let dir = self
            .node
            .scratch_dir()
            .join(format!("nginx-{side}-{}", mode.name()));
        fs::create_dir_all(dir.join("logs"))?;
        let app = self.server_app();
        let server_block = match (side, mode) {
            ("client", Mode::Explicit | Mode::ExplicitEnrolled) => format!(
                "server {{ listen {OUTBOUND_PORT}; proxy_pass {}:{INBOUND_PORT}; }}\n\
                 server {{ listen {INBOUND_PORT}; proxy_pass {app}; }}",
                self.server.ip4
            ),
            ("client", _) => format!(
                "server {{ listen {OUTBOUND_PORT}; proxy_pass {app}; }}\n\
                 server {{ listen {INBOUND_PORT}; proxy_pass {app}; }}"
            ),
            (_, Mode::IptablesLocalhost) => format!(
                "server {{ listen {INBOUND_PORT}; proxy_pass 127.0.0.1:{APP_PORT}; }}\n\
                 server {{ listen {OUTBOUND_PORT}; proxy_pass {app}; }}"
            ),
            _ => format!(
                "map $server_port $inbound_upstream {{ {INBOUND_PORT} {app}; \
                 default $server_addr:$server_port; }}\n\
                 server {{ listen {INBOUND_PORT}; proxy_bind 127.0.0.6; \
                 proxy_pass $inbound_upstream; }}\n\
                 server {{ listen {OUTBOUND_PORT}; proxy_pass {app}; }}"
            ),
        };
        let conf = format!(
            "load_module {NGINX_STREAM_MODULE};\n\
             daemon off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
             error_log {dir}/logs/error.log error;\n\
             events {{ worker_connections 8192; }}\n\
             stream {{\n{server_block}\n}}\n",
            dir = dir.display()
        );
        fs::write(dir.join("nginx.conf"), conf)?;
        chown_r(&dir, PROXY_UID)?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"));
        let mut cmd = self.pinned(&mut cmd);
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        pod.spawn(PROXY_UID, cmd)
    }
}

impl Bed {
    /// HAProxy as a transparent sidecar: outbound to the original destination it reads with
    /// `SO_ORIGINAL_DST` (redirect's getsockopt program, or conntrack under iptables), inbound
    /// to the same destination from 127.0.0.6, or to 127.0.0.1 at its port for the pre-1.10
    /// rules; fixed upstreams in `explicit`, as the other proxies have.
    fn spawn_haproxy(&self, mode: Mode, side: &str, pod: &Pod) -> Result<PodProcess> {
        use redirect_testbed::proxy::haproxy::HaproxyConfig;
        use redirect_testbed::ProxyDial;
        let dir = self
            .node
            .scratch_dir()
            .join(format!("haproxy-{side}-{}", mode.name()));
        let upstream = mode.explicit().then(|| {
            (
                SocketAddr::new(self.server.ip4.into(), INBOUND_PORT),
                self.server_app(),
            )
        });
        let cfg = HaproxyConfig {
            inbound_port: INBOUND_PORT,
            outbound_port: OUTBOUND_PORT,
            dial: if mode.loopback_delivery() {
                ProxyDial::Loopback
            } else {
                ProxyDial::PodIp
            },
            upstream,
            ipv6: false,
            log: false,
        };
        let mut cmd = self.pinned(&mut cfg.command(&dir)?);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        pod.spawn(PROXY_UID, cmd)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.pin_root);
        let _ = fs::remove_dir_all(&self.state_dir);
    }
}

/// Processes of `uid` in a cgroup.
fn pids_of_uid(cgroup: &Path, uid: u32) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt as _;
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|pid| fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == uid))
        .collect()
}

fn chown_r(dir: &Path, uid: u32) -> Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            chown_r(&p, uid)?;
        } else {
            std::os::unix::fs::chown(&p, Some(uid), Some(uid))?;
        }
    }
    Ok(())
}
