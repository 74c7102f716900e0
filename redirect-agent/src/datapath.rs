//! The loaded datapath: programs and maps, pinned under the pin root so that every agent
//! process (and every pod) shares one set.
//!
//! Layout under the root (default `/sys/fs/bpf/redirect`):
//! `maps/<MAP>` the shared maps, `progs/<program>` the loaded programs,
//! `pods/<name>/<program>` one link per hook of an enrolled pod.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::bpf_sys::{self, AttachType};
use aya::{
    maps::{lpm_trie::LpmTrie, Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SockOps},
    Ebpf, EbpfLoader,
};
use redirect_common::{AddrKey, CidrKey4, CidrKey6, ListenerKey, PodConfig, PortKey, MAX_PODS};

/// The compiled kernel programs, built by build.rs from `redirect-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect"));

/// Default pin root; `REDIRECT_PIN_ROOT` overrides it (tests use their own).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/redirect";

/// One hook of the datapath: a program and what it attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
    Bind4,
    Bind6,
    SockOps,
    GetSockopt,
    SkLookup,
}

impl Hook {
    pub const ALL: [Hook; 7] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::Bind4,
        Hook::Bind6,
        Hook::SockOps,
        Hook::GetSockopt,
        Hook::SkLookup,
    ];

    pub const fn attach_type(self) -> AttachType {
        match self {
            Hook::Connect4 => AttachType::Inet4Connect,
            Hook::Connect6 => AttachType::Inet6Connect,
            Hook::Bind4 => AttachType::Inet4Bind,
            Hook::Bind6 => AttachType::Inet6Bind,
            Hook::SockOps => AttachType::SockOps,
            Hook::GetSockopt => AttachType::GetSockopt,
            Hook::SkLookup => AttachType::SkLookup,
        }
    }

    /// The program's name in the object file, also its pin name.
    pub const fn program(self) -> &'static str {
        match self {
            Hook::Connect4 => "rd_connect4",
            Hook::Connect6 => "rd_connect6",
            Hook::Bind4 => "rd_bind4",
            Hook::Bind6 => "rd_bind6",
            Hook::SockOps => "rd_sock_ops",
            Hook::GetSockopt => "rd_getsockopt",
            Hook::SkLookup => "rd_sk_lookup",
        }
    }
}

/// Failures of loading, attaching or pinning the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// bpffs is not mounted and could not be mounted.
    #[error("cannot mount bpffs at {path}")]
    Mount { path: PathBuf, source: io::Error },
    /// A pin directory could not be created or read.
    #[error("{path}")]
    Io { path: PathBuf, source: io::Error },
    /// The object could not be loaded (maps created or reused).
    #[error("cannot load the datapath object: {0}")]
    Load(#[from] aya::EbpfError),
    /// The kernel refused a program; the verifier log says why.
    #[error("cannot load program {program}: {detail}")]
    Program {
        program: &'static str,
        detail: String,
    },
    /// Attaching a program to the pod's cgroup or netns failed.
    #[error("cannot attach {program} to {target}")]
    Attach {
        program: &'static str,
        target: PathBuf,
        source: io::Error,
    },
    /// Pinning a link or program failed.
    #[error("cannot pin {path}: {detail}")]
    Pin { path: PathBuf, detail: String },
    /// A map is missing from the object or has the wrong type.
    #[error("map {name}: {detail}")]
    Map { name: &'static str, detail: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The pin root in use.
pub fn pin_root() -> PathBuf {
    std::env::var_os("REDIRECT_PIN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT))
}

/// Mounts bpffs on the pin root's mount point if nothing of type bpf is mounted there,
/// as Cilium and bpfman do on nodes that lack it.
pub fn ensure_bpffs(root: &Path) -> Result<(), DatapathError> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let parent = root.parent().unwrap_or(Path::new("/sys/fs/bpf"));
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let st = nix::sys::statfs::statfs(parent).map_err(|e| DatapathError::Io {
        path: parent.to_owned(),
        source: e.into(),
    })?;
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        nix::mount::mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| DatapathError::Mount {
            path: parent.to_owned(),
            source: e.into(),
        })?;
    }
    fs::create_dir_all(root).map_err(io_err(root))?;
    Ok(())
}

/// The datapath's maps, opened from their pins.
pub struct Datapath {
    root: PathBuf,
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the object, reusing pinned maps, and makes sure every program is loaded and pinned.
    pub fn open(root: &Path) -> Result<Self, DatapathError> {
        ensure_bpffs(root)?;
        let maps_dir = root.join("maps");
        let progs_dir = root.join("progs");
        fs::create_dir_all(&maps_dir).map_err(io_err(&maps_dir))?;
        fs::create_dir_all(&progs_dir).map_err(io_err(&progs_dir))?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)?;
        let mut dp = Datapath {
            root: root.to_owned(),
            ebpf,
        };
        for hook in Hook::ALL {
            dp.ensure_program(hook)?;
        }
        Ok(dp)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn prog_pin(&self, hook: Hook) -> PathBuf {
        self.root.join("progs").join(hook.program())
    }

    /// Loads and pins `hook`'s program unless a pinned one is there already.
    fn ensure_program(&mut self, hook: Hook) -> Result<(), DatapathError> {
        let pin = self.prog_pin(hook);
        if pin.exists() {
            return Ok(());
        }
        let program = hook.program();
        load_unpinned(&mut self.ebpf, hook)
            .map_err(|detail| DatapathError::Program { program, detail })?;
        let prog = self.ebpf.program_mut(program).expect("loaded just above");
        prog.pin(&pin).map_err(|e| DatapathError::Pin {
            path: pin.clone(),
            detail: e.to_string(),
        })
    }

    /// Attaches `hook` to a pod (its cgroup, or its netns for sk_lookup) and pins the link at
    /// `link_pin`. The pinned link keeps the attachment alive after this process exits, and
    /// removing the pin detaches it.
    pub fn attach(&self, hook: Hook, target: &Path, link_pin: &Path) -> Result<(), DatapathError> {
        let program = hook.program();
        let attach_err = |source| DatapathError::Attach {
            program,
            target: target.to_owned(),
            source,
        };
        let prog = bpf_sys::obj_get(&self.prog_pin(hook)).map_err(attach_err)?;
        let target_file = fs::File::open(target).map_err(io_err(target))?;
        let link =
            bpf_sys::link_create(&prog, &target_file, hook.attach_type()).map_err(attach_err)?;
        bpf_sys::obj_pin(&link, link_pin).map_err(|e| DatapathError::Pin {
            path: link_pin.to_owned(),
            detail: e.to_string(),
        })
    }

    fn map_data(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf.map_mut(name).ok_or_else(|| DatapathError::Map {
            name,
            detail: "not in object".into(),
        })
    }

    pub fn pods(&mut self) -> Result<Array<&mut MapData, PodConfig>, DatapathError> {
        Array::try_from(self.map_data("PODS")?).map_err(map_err("PODS"))
    }

    pub fn pod_cgroups(&mut self) -> Result<HashMap<&mut MapData, u64, u32>, DatapathError> {
        HashMap::try_from(self.map_data("POD_CGROUPS")?).map_err(map_err("POD_CGROUPS"))
    }

    pub fn pod_addrs(&mut self) -> Result<HashMap<&mut MapData, AddrKey, u32>, DatapathError> {
        HashMap::try_from(self.map_data("POD_ADDRS")?).map_err(map_err("POD_ADDRS"))
    }

    pub fn port_rules(&mut self) -> Result<HashMap<&mut MapData, PortKey, u32>, DatapathError> {
        HashMap::try_from(self.map_data("PORT_RULES")?).map_err(map_err("PORT_RULES"))
    }

    pub fn cidr4(&mut self) -> Result<LpmTrie<&mut MapData, CidrKey4, u32>, DatapathError> {
        LpmTrie::try_from(self.map_data("CIDR4")?).map_err(map_err("CIDR4"))
    }

    pub fn cidr6(&mut self) -> Result<LpmTrie<&mut MapData, CidrKey6, u32>, DatapathError> {
        LpmTrie::try_from(self.map_data("CIDR6")?).map_err(map_err("CIDR6"))
    }

    pub fn listeners(&mut self) -> Result<SockHash<&mut MapData, ListenerKey>, DatapathError> {
        SockHash::try_from(self.map_data("LISTENERS")?).map_err(map_err("LISTENERS"))
    }

    pub fn counters(&mut self) -> Result<PerCpuArray<&mut MapData, u64>, DatapathError> {
        PerCpuArray::try_from(self.map_data("COUNTERS")?).map_err(map_err("COUNTERS"))
    }

    /// Removes every shared pin (programs and maps) once no pod uses them, so an idle node
    /// carries no residue.
    pub fn remove_shared_pins(root: &Path) -> Result<(), DatapathError> {
        for dir in ["progs", "maps", "pods"] {
            let d = root.join(dir);
            match fs::read_dir(&d) {
                Ok(entries) => {
                    for e in entries.flatten() {
                        let _ = fs::remove_file(e.path());
                    }
                    let _ = fs::remove_dir(&d);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(DatapathError::Io { path: d, source: e }),
            }
        }
        let _ = fs::remove_dir(root);
        Ok(())
    }
}

const _: () = assert!(MAX_PODS > 0);

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |e| DatapathError::Map {
        name,
        detail: e.to_string(),
    }
}

/// The verifier log's last lines, where the reason for a rejection is.
fn verifier_detail(e: ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("{io_error}; verifier: {}", tail.join(" | "))
        }
        other => other.to_string(),
    }
}

/// Loads every program of the datapath into the kernel, as `Datapath::open` would, without
/// pinning or attaching anything: the shared maps are created under a private bpffs instance
/// mounted on a temporary directory and detached before returning, so nothing outlives the call.
/// The most faithful probe of a kernel: the verifier judges the real programs.
///
/// Returns one entry per hook program, `Err` holding the reason (the verifier log's tail).
pub fn verify_programs() -> Vec<(&'static str, Result<(), String>)> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let all = |msg: String| {
        Hook::ALL
            .iter()
            .map(|h| (h.program(), Err(msg.clone())))
            .collect()
    };
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("redirect-verify-{}-{seq}", std::process::id()));
    if let Err(e) = fs::create_dir_all(&dir) {
        return all(format!("{}: {e}", dir.display()));
    }
    if let Err(e) = nix::mount::mount(
        Some("bpf"),
        &dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    ) {
        let _ = fs::remove_dir(&dir);
        return all(format!(
            "cannot mount a private bpffs at {}: {e}",
            dir.display()
        ));
    }
    let result = match EbpfLoader::new()
        .default_map_pin_directory(&dir)
        .load(OBJECT)
    {
        Ok(mut ebpf) => Hook::ALL
            .iter()
            .map(|&hook| (hook.program(), load_unpinned(&mut ebpf, hook)))
            .collect(),
        Err(e) => all(format!("cannot load the datapath object: {e}")),
    };
    let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&dir);
    result
}

fn load_unpinned(ebpf: &mut Ebpf, hook: Hook) -> Result<(), String> {
    let prog = ebpf
        .program_mut(hook.program())
        .ok_or_else(|| "not in object".to_string())?;
    let r = match hook {
        Hook::Connect4 | Hook::Connect6 | Hook::Bind4 | Hook::Bind6 => {
            <&mut CgroupSockAddr>::try_from(prog).and_then(|p| p.load())
        }
        Hook::SockOps => <&mut SockOps>::try_from(prog).and_then(|p| p.load()),
        Hook::GetSockopt => <&mut CgroupSockopt>::try_from(prog).and_then(|p| p.load()),
        Hook::SkLookup => <&mut SkLookup>::try_from(prog).and_then(|p| p.load()),
    };
    r.map_err(verifier_detail)
}
