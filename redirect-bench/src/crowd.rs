//! Many pods, for the node-scale measurement.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use redirect_devtools::{flush, output};
use redirect_testbed::Node;

use crate::bed::Bed;
use crate::sys::ip_batch;

// Many pods, for the node-scale measurement

/// Cheap pods: a bare network namespace with an address on `lo`, and an empty cgroup, named
/// `rdb-<pid>-<i>`. Their addresses come from /24s leased by extra test-bed nodes, so no
/// other live test on the machine has them.
pub struct Crowd {
    pid: u32,
    names: Vec<(String, Ipv4Addr)>,
    cgroup_root: PathBuf,
    _nodes: Vec<Node>,
}

const CROWD_PREFIX: &str = "rdb-";

impl Crowd {
    pub fn new(_bed: &Bed, n: usize) -> Result<Crowd> {
        Crowd::create(n)
    }

    /// `n` pods, without a test bed (the agent benchmark needs none).
    pub fn create(n: usize) -> Result<Crowd> {
        let pid = std::process::id();
        let cgroup_root = redirect_testbed::cgroup2_mount()?.join(format!("redirect-bench-{pid}"));
        fs::create_dir_all(&cgroup_root)?;
        let mut nodes = Vec::new();
        let mut addrs = Vec::new();
        while addrs.len() < n {
            let node = Node::new()?;
            let (net, _) = node.subnet4();
            let base = u32::from(net);
            addrs.extend((2..255).map(|h| Ipv4Addr::from(base + h)));
            nodes.push(node);
        }
        addrs.truncate(n);
        let names: Vec<(String, Ipv4Addr)> = addrs
            .into_iter()
            .enumerate()
            .map(|(i, a)| (format!("{CROWD_PREFIX}{pid}-{i}"), a))
            .collect();
        let crowd = Crowd {
            pid,
            names,
            cgroup_root,
            _nodes: nodes,
        };
        let mut batch = String::new();
        for (name, _) in &crowd.names {
            batch.push_str(&format!("netns add {name}\n"));
            fs::create_dir_all(crowd.cgroup_root.join(name))?;
        }
        ip_batch(&batch)?;
        let chunks: Vec<_> = crowd
            .names
            .chunks(crowd.names.len().div_ceil(4).max(1))
            .collect();
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = chunks
                .iter()
                .map(|chunk| {
                    s.spawn(move || -> Result<()> {
                        for (name, ip) in chunk.iter() {
                            output(Command::new("ip").args([
                                "-n",
                                name,
                                "addr",
                                "add",
                                &format!("{ip}/32"),
                                "dev",
                                "lo",
                            ]))?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
            }
            Ok(())
        })?;
        Ok(crowd)
    }

    /// Each pod: (name, cgroup, netns file, address).
    pub fn pods(&self) -> impl Iterator<Item = (&str, PathBuf, PathBuf, Ipv4Addr)> + '_ {
        self.names.iter().map(|(name, ip)| {
            (
                name.as_str(),
                self.cgroup_root.join(name),
                PathBuf::from(format!("/var/run/netns/{name}")),
                *ip,
            )
        })
    }

    pub fn enroll(&self, bed: &Bed) -> Result<()> {
        for (i, (name, ip)) in self.names.iter().enumerate() {
            output(
                bed.agent()
                    .args(["enroll", "--name", name, "--cgroup"])
                    .arg(self.cgroup_root.join(name))
                    .args(["--netns", &format!("/var/run/netns/{name}")])
                    .args(["--pod-ip", &ip.to_string()]),
            )
            .with_context(|| format!("enrolling crowd pod {name}"))?;
            if (i + 1) % 100 == 0 {
                println!("  enrolled {}/{}", i + 1, self.names.len());
                flush();
            }
        }
        Ok(())
    }

    pub fn unenroll(&self, bed: &Bed) -> Result<()> {
        for (name, _) in &self.names {
            output(bed.agent().args(["unenroll", "--name", name]))?;
        }
        Ok(())
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        remove_crowd(self.pid);
    }
}

/// Removes the crowd pods, cgroups, pins and state of benchmark process `pid`.
fn remove_crowd(pid: u32) {
    let prefix = format!("{CROWD_PREFIX}{pid}-");
    let batch: String = fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .map(|n| format!("netns del {n}\n"))
        .collect();
    if !batch.is_empty() {
        let _ = ip_batch(&batch);
    }
    if let Ok(cg) = redirect_testbed::cgroup2_mount() {
        let root = cg.join(format!("redirect-bench-{pid}"));
        for e in fs::read_dir(&root).into_iter().flatten().flatten() {
            let _ = fs::remove_dir(e.path());
        }
        let _ = fs::remove_dir(&root);
    }
}

/// Leftovers of benchmark runs whose process is gone.
pub fn sweep_stale() {
    let dead = |pid: &str| !Path::new(&format!("/proc/{pid}")).exists();
    let mut pids: Vec<u32> = Vec::new();
    for e in fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(rest) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix(CROWD_PREFIX))
        {
            if let Some(pid) = rest.split('-').next().and_then(|p| p.parse().ok()) {
                pids.push(pid);
            }
        }
    }
    for dir in ["/sys/fs/bpf", "/tmp"] {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Some(pid) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("redirect-bench-"))
                .and_then(|p| p.parse::<u32>().ok())
            {
                if dead(&pid.to_string()) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
    if let Ok(cg) = redirect_testbed::cgroup2_mount() {
        for e in fs::read_dir(&cg).into_iter().flatten().flatten() {
            if let Some(pid) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("redirect-bench-"))
                .and_then(|p| p.parse::<u32>().ok())
            {
                pids.push(pid);
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        if dead(&pid.to_string()) {
            remove_crowd(pid);
        }
    }
}
