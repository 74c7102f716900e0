//! What the agent remembers about enrolled pods, outside the kernel.
//!
//! The kernel side keeps the pod's configuration in maps; this store keeps what the maps cannot
//! (the name, the paths the operator gave) as one JSON file per pod under the state directory
//! (default `/run/redirect`, overridden by `REDIRECT_STATE_DIR`).

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use redirect_common::InboundPolicy;
use serde::{Deserialize, Serialize};

/// One enrolled pod, as `enroll` recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub name: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub netns: PathBuf,
    /// Inode of the network namespace, to recognise it however it is named.
    pub netns_inode: u64,
    pub pod_ips: Vec<IpAddr>,
    pub proxy_uid: u32,
    pub inbound_policy: InboundPolicy,
    pub port_policies: BTreeMap<u16, InboundPolicy>,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<String>,
    pub proxy_inbound_port: u16,
    pub proxy_outbound_port: u16,
    /// Index of the pod's row in the shared counter and configuration maps.
    pub slot: u32,
    /// Whether enroll added `::6` to the pod's `lo` (and unenroll must remove it).
    #[serde(default)]
    pub added_lo6: bool,
}

impl PodRecord {
    /// The policy that applies to inbound port `port`: the per-port override or the pod's.
    pub fn policy_for(&self, port: u16) -> InboundPolicy {
        self.port_policies
            .get(&port)
            .copied()
            .unwrap_or(self.inbound_policy)
    }
}

/// Failures of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt pod record")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The directory of pod records, with a lock that serialises every command that changes
/// the datapath (two `enroll`s racing for a slot, say).
pub struct StateStore {
    dir: PathBuf,
    _lock: std::fs::File,
}

/// Default state directory; `REDIRECT_STATE_DIR` overrides it.
pub const DEFAULT_STATE_DIR: &str = "/run/redirect";

pub fn state_dir() -> PathBuf {
    std::env::var_os("REDIRECT_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

impl StateStore {
    /// Opens the store, creating it if needed, and takes its exclusive lock (blocking).
    pub fn open(dir: &std::path::Path) -> Result<Self, StateError> {
        let io = |path: &std::path::Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        let pods = dir.join("pods");
        std::fs::create_dir_all(&pods).map_err(io(&pods))?;
        let lock_path = dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            return Err(StateError::Io {
                path: lock_path,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(StateStore {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join("pods").join(format!("{name}.json"))
    }

    pub fn get(&self, name: &str) -> Result<Option<PodRecord>, StateError> {
        read_record(&self.path(name))
    }

    /// Every enrolled pod, sorted by name.
    pub fn list(&self) -> Result<Vec<PodRecord>, StateError> {
        list_records(&self.dir)
    }

    /// Writes the record atomically (temp file + rename): a crash leaves the old or the new one.
    pub fn put(&self, rec: &PodRecord) -> Result<(), StateError> {
        let path = self.path(&rec.name);
        let tmp = path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(rec).expect("PodRecord serializes");
        std::fs::write(&tmp, data).map_err(|source| StateError::Io {
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| StateError::Io { path, source })
    }

    pub fn remove(&self, name: &str) -> Result<(), StateError> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }
}

fn read_record(path: &std::path::Path) -> Result<Option<PodRecord>, StateError> {
    match std::fs::read(path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|source| StateError::Corrupt {
                path: path.to_owned(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads every pod record under `dir` without taking the lock (for read-only commands).
pub fn list_records(dir: &std::path::Path) -> Result<Vec<PodRecord>, StateError> {
    let pods = dir.join("pods");
    let entries = match std::fs::read_dir(&pods) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(StateError::Io { path: pods, source }),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            if let Some(rec) = read_record(&path)? {
                out.push(rec);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
