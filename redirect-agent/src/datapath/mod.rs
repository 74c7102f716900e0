//! The datapath: its programs and maps, pinned under the pin root so that every agent process
//! (and every pod) shares one set.
//!
//! Layout under the root (default `/sys/fs/bpf/redirect`), see docs/DESIGN.md:
//! - `info`: the datapath's ABI version and build id ([`layout`]);
//! - `maps/<MAP>`: the shared maps;
//! - `progs/<program>`: the loaded programs, one per [`Hook`];
//! - `pods/<name>/<program>`: one pinned link per hook of an enrolled pod.
//!
//! Three ways in, all refusing pins of an incompatible layout before touching anything:
//! - [`Datapath::open`], the writer that builds (enroll; the caller holds the state lock):
//!   mounts bpffs if needed, creates what is missing, upgrades the programs of an older build
//!   in place;
//! - [`Datapath::open_existing`], for writers that must not build (unenroll, gc, recovery):
//!   opens what is pinned, read-write, and creates nothing;
//! - [`Datapath::open_read_only`], for readers (stats, list): the same with read-only map fds.

pub mod layout;
mod root;
mod verify;

use std::{
    collections::BTreeMap,
    fmt, fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::LpmTrie, Array, HashMap, Map, MapData, MapError, PerCpuArray, SockHash},
    pin::PinError,
    programs::{
        links::{FdLink, LinkError},
        CgroupAttachMode, CgroupSockAddr, CgroupSockAddrAttachType, CgroupSockopt, ProgramError,
        ProgramInfo, SkLookup, SockOps,
    },
    Ebpf, EbpfLoader,
};
use redirect_common::{
    AddrKey, CidrKey4, CidrKey6, ListenerKey, OrigDst, PodConfig, PortKey, SockTuple,
};

use crate::bpf_sys::{self, AttachType};
pub use layout::{Mismatch, DATAPATH_ABI};
pub use root::UnsafeRoot;
pub use verify::verify_programs;

/// The compiled kernel programs, built by build.rs from `redirect-ebpf`.
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect"));

/// Default pin root; `REDIRECT_PIN_ROOT` overrides it (tests use their own).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/redirect";

const MAPS_DIR: &str = "maps";
const PROGS_DIR: &str = "progs";
const PODS_DIR: &str = "pods";
/// Suffix of a program pinned during an upgrade, before it replaces the old one (bpffs refuses
/// names with a dot).
const STAGED: &str = "-new";

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
    /// Since 5.8: a redirected socket's peer is its original destination.
    GetPeername4,
    GetPeername6,
    /// DNS capture (only for pods that ask for it): unconnected UDP to port 53, and the
    /// replies' source.
    SendMsg4,
    SendMsg6,
    RecvMsg4,
    RecvMsg6,
}

impl Hook {
    pub const ALL: [Hook; 13] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::Bind4,
        Hook::Bind6,
        Hook::SockOps,
        Hook::GetSockopt,
        Hook::SkLookup,
        Hook::GetPeername4,
        Hook::GetPeername6,
        Hook::SendMsg4,
        Hook::SendMsg6,
        Hook::RecvMsg4,
        Hook::RecvMsg6,
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
            Hook::GetPeername4 => AttachType::Inet4GetPeername,
            Hook::GetPeername6 => AttachType::Inet6GetPeername,
            Hook::SendMsg4 => AttachType::Udp4Sendmsg,
            Hook::SendMsg6 => AttachType::Udp6Sendmsg,
            Hook::RecvMsg4 => AttachType::Udp4Recvmsg,
            Hook::RecvMsg6 => AttachType::Udp6Recvmsg,
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
            Hook::GetPeername4 => "rd_getpeername4",
            Hook::GetPeername6 => "rd_getpeername6",
            Hook::SendMsg4 => "rd_sendmsg4",
            Hook::SendMsg6 => "rd_sendmsg6",
            Hook::RecvMsg4 => "rd_recvmsg4",
            Hook::RecvMsg6 => "rd_recvmsg6",
        }
    }

    /// Whether the hook attaches to the pod's network namespace (else to its cgroup).
    pub const fn on_netns(self) -> bool {
        matches!(self, Hook::SkLookup)
    }

    const fn sock_addr(self) -> Option<CgroupSockAddrAttachType> {
        match self {
            Hook::Connect4 => Some(CgroupSockAddrAttachType::Connect4),
            Hook::Connect6 => Some(CgroupSockAddrAttachType::Connect6),
            Hook::Bind4 => Some(CgroupSockAddrAttachType::Bind4),
            Hook::Bind6 => Some(CgroupSockAddrAttachType::Bind6),
            Hook::GetPeername4 => Some(CgroupSockAddrAttachType::GetPeerName4),
            Hook::GetPeername6 => Some(CgroupSockAddrAttachType::GetPeerName6),
            Hook::SendMsg4 => Some(CgroupSockAddrAttachType::UDPSendMsg4),
            Hook::SendMsg6 => Some(CgroupSockAddrAttachType::UDPSendMsg6),
            Hook::RecvMsg4 => Some(CgroupSockAddrAttachType::UDPRecvMsg4),
            Hook::RecvMsg6 => Some(CgroupSockAddrAttachType::UDPRecvMsg6),
            _ => None,
        }
    }
}

/// Why attaching a hook failed: aya's error, or the raw syscall's for the one link aya 0.14
/// cannot pin.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Program(#[from] ProgramError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("BPF_LINK_CREATE")]
    LinkCreate(#[source] io::Error),
}

/// A pin that could not be removed.
#[derive(Debug)]
pub struct RemoveFailure {
    pub path: PathBuf,
    pub source: io::Error,
}

impl fmt::Display for RemoveFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.source)
    }
}

fn joined<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Failures of loading, attaching, pinning or removing the datapath. Each keeps its cause in
/// `source()`.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// bpffs is not mounted and could not be mounted.
    #[error("cannot mount bpffs at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A pin directory or pin could not be created or read.
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The pin root is not one only root can change.
    #[error(transparent)]
    UnsafeRoot(#[from] UnsafeRoot),
    /// The object could not be loaded (maps created or reused).
    #[error("cannot load the datapath object")]
    Load(#[source] aya::EbpfError),
    /// The kernel's verifier refused a program. The message carries the log's last lines, where
    /// the reason is; `log` the whole log; the source is the errno of `BPF_PROG_LOAD`.
    #[error("the verifier rejects {program}: {tail}")]
    Verifier {
        program: &'static str,
        tail: String,
        log: String,
        #[source]
        source: io::Error,
    },
    /// A program could not be loaded, pinned or opened for another reason.
    #[error("program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    /// Attaching a program to the pod's cgroup or netns failed.
    #[error("cannot attach {program} to {target}")]
    Attach {
        program: &'static str,
        target: PathBuf,
        #[source]
        source: AttachError,
    },
    /// Pinning a link, program or map failed.
    #[error("cannot pin {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    /// Pinning a link made with raw bpf(2) failed.
    #[error("cannot pin {path}")]
    PinRaw {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An operation on a map of the datapath failed.
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// A pinned map could not be opened or inspected.
    #[error("pinned map {path}")]
    PinnedMap {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    /// A map the agent uses is not in the object (a build defect).
    #[error("map {name} is not in the datapath object")]
    MapMissing { name: &'static str },
    /// Swapping the program of a pod's pinned link failed.
    #[error("cannot update link {path} to the new {program}")]
    LinkUpdate {
        path: PathBuf,
        program: &'static str,
        #[source]
        source: io::Error,
    },
    /// The pins were made by a datapath with another layout or ABI: nothing was written.
    #[error(
        "the pins under {} belong to an incompatible datapath (this agent: ABI {DATAPATH_ABI}): \
         {}; nothing was changed. Unenroll every pod with the agent that made them, or remove {}",
        root.display(), joined(mismatches), root.display()
    )]
    Incompatible {
        root: PathBuf,
        mismatches: Vec<Mismatch>,
    },
    /// A map of the datapath is not pinned (a partial pin set, see `Datapath::missing`).
    #[error("map {name} is not pinned under {}", root.display())]
    MapNotPinned { name: &'static str, root: PathBuf },
    /// Pins that could not be removed, every one of them.
    #[error("could not remove {} pin(s): {}", failures.len(), joined(failures))]
    Remove { failures: Vec<RemoveFailure> },
}

impl DatapathError {
    /// Whether the error says a map is not pinned at all (a partial pin set): a teardown has no
    /// rows to remove from it.
    pub fn is_not_pinned(&self) -> bool {
        matches!(self, DatapathError::MapNotPinned { .. })
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// The pin root in use.
pub fn pin_root() -> PathBuf {
    std::env::var_os("REDIRECT_PIN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT))
}

/// Makes sure the pin root exists, only root can change it, and bpffs is mounted at it (see
/// the `root` module for where bpffs is mounted). Part of [`Datapath::open`].
pub fn ensure_bpffs(root: &Path) -> Result<(), DatapathError> {
    root::prepare(root)
}

/// A program that `Datapath::open` loaded and pinned, replacing the pinned one (an upgrade) or
/// filling its place (first load, or a pin lost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramChange {
    pub program: &'static str,
    /// The id of the program pinned before, if one was.
    pub old_id: Option<u32>,
    pub new_id: u32,
    /// Pods' links switched to the new program with `BPF_LINK_UPDATE`.
    pub links_updated: usize,
}

/// The datapath's maps, opened from their pins.
pub struct Datapath {
    root: PathBuf,
    maps: BTreeMap<String, Map>,
    changes: Vec<ProgramChange>,
    missing: Vec<PathBuf>,
    /// Device and inode of the `info` pin when this was opened: a new pin set (the old one
    /// removed, another made) has another.
    info_id: Option<(u64, u64)>,
}

impl Datapath {
    /// The writer's way in (enroll, unenroll, and anything else that changes the datapath; the
    /// caller holds the state lock, which serialises writers): prepares the pin root, refuses
    /// pins of an incompatible datapath before anything is created or written, loads the
    /// object reusing the pinned maps, and makes sure every program is loaded, pinned and bound
    /// to those maps.
    ///
    /// Programs pinned by another build of a compatible datapath (or bound to maps that are no
    /// longer the pinned ones, after a teardown that failed half-way) are replaced in place:
    /// the new program is pinned beside the old, every pod's link of that hook is switched to
    /// it with `BPF_LINK_UPDATE` (the hook runs the old program or the new one, never none),
    /// then the new pin takes the old one's name. `info` is written last, so a kill at any
    /// point leaves a state the next `open` completes.
    pub fn open(root: &Path) -> Result<Self, DatapathError> {
        root::prepare(root)?;
        let survey = layout::survey(root)?;
        if !survey.mismatches.is_empty() {
            return Err(DatapathError::Incompatible {
                root: root.to_owned(),
                mismatches: survey.mismatches,
            });
        }
        for d in [MAPS_DIR, PROGS_DIR, PODS_DIR] {
            root::ensure_subdir(&root.join(d))?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(root.join(MAPS_DIR))
            .load(OBJECT)
            .map_err(DatapathError::Load)?;
        let mut map_ids = BTreeMap::new();
        for name in layout::expected_maps().keys() {
            // Every map of the object is pinned now, reused or created by the load.
            let path = root.join(MAPS_DIR).join(name);
            let info = aya::maps::MapInfo::from_pin(&path)
                .map_err(|source| DatapathError::PinnedMap { path, source })?;
            map_ids.insert(kernel_name(name), info.id());
        }
        let current = layout::Info::current();
        let same_build = survey.info == Some(current);
        let mut changes = Vec::new();
        for hook in Hook::ALL {
            if let Some(c) = reconcile(&mut ebpf, root, hook, same_build, &map_ids)? {
                changes.push(c);
            }
        }
        if !same_build {
            layout::write_info(root, current)?;
        }
        let mut maps = BTreeMap::new();
        for name in layout::expected_maps().keys() {
            if let Some(m) = ebpf.take_map(name) {
                maps.insert(name.to_string(), m);
            }
        }
        Ok(Datapath {
            info_id: info_id(root),
            root: root.to_owned(),
            maps,
            changes,
            missing: Vec::new(),
        })
    }

    /// The way in for a command that must not create a datapath (unenroll, gc, recovery):
    /// opens the pinned maps read-write after checking them against this agent's layout, and
    /// never mounts, creates, loads or pins anything. A partial pin set (a teardown that failed
    /// or was killed half-way) is opened as far as it goes: [`Datapath::missing`] names what is
    /// not there, and the accessor of a missing map fails with `MapNotPinned`.
    ///
    /// `Ok(None)`: no datapath there (no pin root, or nothing of ours pinned in it).
    /// `Incompatible`: the pins have another layout or ABI; nothing was opened.
    pub fn open_existing(root: &Path) -> Result<Option<Self>, DatapathError> {
        Self::open_pinned(root, 0)
    }

    /// The reader's way in (stats, list, a slot survey): as [`Datapath::open_existing`], with
    /// every map opened read-only (`BPF_F_RDONLY`): the kernel refuses writes through them,
    /// whatever the caller does.
    pub fn open_read_only(root: &Path) -> Result<Option<Self>, DatapathError> {
        Self::open_pinned(root, bpf_sys::BPF_F_RDONLY)
    }

    fn open_pinned(root: &Path, file_flags: u32) -> Result<Option<Self>, DatapathError> {
        match fs::symlink_metadata(root) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(root)(e)),
            Ok(_) => {}
        }
        root::check_chain(root)?;
        if !root::is_bpffs(root)? {
            return Ok(None);
        }
        let survey = layout::survey(root)?;
        let mut missing: Vec<PathBuf> = Hook::ALL
            .iter()
            .map(|h| prog_pin(root, *h))
            .filter(|p| fs::symlink_metadata(p).is_err())
            .collect();
        if survey.present.is_empty() && missing.len() == Hook::ALL.len() && survey.info.is_none() {
            return Ok(None);
        }
        if !survey.mismatches.is_empty() {
            return Err(DatapathError::Incompatible {
                root: root.to_owned(),
                mismatches: survey.mismatches,
            });
        }
        missing.extend(survey.absent);
        let mut maps = BTreeMap::new();
        for name in &survey.present {
            let path = root.join(MAPS_DIR).join(name);
            let fd = bpf_sys::obj_get_with(&path, file_flags).map_err(io_err(&path))?;
            let data = MapData::from_fd(fd).map_err(|source| DatapathError::PinnedMap {
                path: path.clone(),
                source,
            })?;
            let map = Map::from_map_data(data)
                .map_err(|source| DatapathError::PinnedMap { path, source })?;
            maps.insert(name.clone(), map);
        }
        Ok(Some(Datapath {
            info_id: info_id(root),
            root: root.to_owned(),
            maps,
            changes: Vec::new(),
            missing,
        }))
    }

    /// Whether the pins are still the ones this was opened from: the same `info` pin (one
    /// `stat`). After the shared pins were removed (the last pod went), or removed and made
    /// again, the maps held here are no longer the datapath's.
    pub fn still_pinned(&self) -> bool {
        self.info_id.is_some() && info_id(&self.root) == self.info_id
    }

    /// Pins of a complete datapath that were not there when this was opened (always empty
    /// after [`Datapath::open`]).
    pub fn missing(&self) -> &[PathBuf] {
        &self.missing
    }

    /// Same as [`Datapath::open`]; returns what was replaced. For an explicit upgrade after
    /// installing a new agent, without enrolling anything; the caller holds the state lock.
    pub fn upgrade(root: &Path) -> Result<Vec<ProgramChange>, DatapathError> {
        Ok(Self::open(root)?.changes)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Programs this `open` loaded and pinned (empty when every pinned one was current).
    pub fn program_changes(&self) -> &[ProgramChange] {
        &self.changes
    }

    /// The directory of a pod's link pins. `pod` is the directory's name under `pods/`, as
    /// `enroll::pin_dir_name` spells a pod's name (bpffs refuses dots).
    pub fn pod_dir(&self, pod: &str) -> PathBuf {
        self.root.join(PODS_DIR).join(pod)
    }

    /// Where a pod's link of `hook` is pinned.
    pub fn link_pin(&self, pod: &str, hook: Hook) -> PathBuf {
        self.pod_dir(pod).join(hook.program())
    }

    /// Attaches `hook` to a pod (its cgroup, or its netns for sk_lookup) and pins the link at
    /// `link_pin`. The pinned link keeps the attachment alive after this process exits, and
    /// removing the pin detaches it.
    ///
    /// All hooks but one go through aya's program types and links (`from_pin`, `attach`, `take_link`,
    /// `FdLink::pin`). The getsockopt hook cannot: aya 0.14 has no `FdLink` conversion for
    /// `CgroupSockoptLink`, so its link is created and pinned with raw bpf(2).
    pub fn attach(&self, hook: Hook, target: &Path, link_pin: &Path) -> Result<(), DatapathError> {
        let program = hook.program();
        let attach_err = |source: AttachError| DatapathError::Attach {
            program,
            target: target.to_owned(),
            source,
        };
        let prog_err = |source| attach_err(AttachError::Program(source));
        let pin = prog_pin(&self.root, hook);
        let target_file = fs::File::open(target).map_err(io_err(target))?;
        let link: FdLink = if let Some(attach_type) = hook.sock_addr() {
            let mut p = CgroupSockAddr::from_pin(&pin, attach_type).map_err(prog_err)?;
            let id = p
                .attach(&target_file, CgroupAttachMode::Single)
                .map_err(prog_err)?;
            let link = p.take_link(id).map_err(prog_err)?;
            FdLink::try_from(link).map_err(|e| attach_err(e.into()))?
        } else {
            match hook {
                Hook::SockOps => {
                    let mut p = SockOps::from_pin(&pin).map_err(prog_err)?;
                    let id = p
                        .attach(&target_file, CgroupAttachMode::Single)
                        .map_err(prog_err)?;
                    let link = p.take_link(id).map_err(prog_err)?;
                    FdLink::try_from(link).map_err(|e| attach_err(e.into()))?
                }
                Hook::SkLookup => {
                    let mut p = SkLookup::from_pin(&pin).map_err(prog_err)?;
                    let id = p.attach(&target_file).map_err(prog_err)?;
                    p.take_link(id).map_err(prog_err)?.into()
                }
                Hook::GetSockopt => {
                    let prog = bpf_sys::obj_get(&pin).map_err(io_err(&pin))?;
                    let link = bpf_sys::link_create(&prog, &target_file, hook.attach_type())
                        .map_err(|e| attach_err(AttachError::LinkCreate(e)))?;
                    return bpf_sys::obj_pin(&link, link_pin).map_err(|source| {
                        DatapathError::PinRaw {
                            path: link_pin.to_owned(),
                            source,
                        }
                    });
                }
                _ => unreachable!("sock_addr hooks are handled above"),
            }
        };
        link.pin(link_pin)
            .map(drop)
            .map_err(|source| DatapathError::Pin {
                path: link_pin.to_owned(),
                source,
            })
    }

    /// Detaches a pod (`pod` as for [`Datapath::pod_dir`]): removes each of its link pins
    /// (which detaches the link) and its directory. Every failure is reported, not only the first; a pin that is not there is
    /// not a failure.
    pub fn detach_pod(&self, pod: &str) -> Result<(), DatapathError> {
        let mut failures = Vec::new();
        for hook in Hook::ALL {
            root::remove_pin(&self.link_pin(pod, hook), &mut failures);
        }
        root::remove_dir(&self.pod_dir(pod), &mut failures);
        if failures.is_empty() {
            Ok(())
        } else {
            Err(DatapathError::Remove { failures })
        }
    }

    fn map_data(&mut self, name: &'static str) -> Result<&mut Map, DatapathError> {
        self.maps
            .get_mut(name)
            .ok_or_else(|| DatapathError::MapNotPinned {
                name,
                root: self.root.clone(),
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

    /// `ORIG_DST` and `ORIG_DST_USED` together (a sweep changes both; see `conntrack`).
    #[allow(clippy::type_complexity)]
    pub fn orig_dst_maps(
        &mut self,
    ) -> Result<
        (
            HashMap<&mut MapData, SockTuple, OrigDst>,
            Array<&mut MapData, u32>,
        ),
        DatapathError,
    > {
        const ORIG_DST: &str = "ORIG_DST";
        const USED: &str = "ORIG_DST_USED";
        let root = self.root.clone();
        let not_pinned = |name| DatapathError::MapNotPinned {
            name,
            root: root.clone(),
        };
        let (mut orig, mut used) = (None, None);
        for (name, map) in self.maps.iter_mut() {
            match name.as_str() {
                ORIG_DST => orig = Some(map),
                USED => used = Some(map),
                _ => {}
            }
        }
        let orig = HashMap::try_from(orig.ok_or_else(|| not_pinned(ORIG_DST))?)
            .map_err(map_err(ORIG_DST))?;
        let used = Array::try_from(used.ok_or_else(|| not_pinned(USED))?).map_err(map_err(USED))?;
        Ok((orig, used))
    }

    /// Removes every shared pin (pods' links, programs, maps, info) and the pin root once no
    /// pod uses them, so an idle node carries no residue; when bpffs was mounted on the pin
    /// root itself, it is unmounted. Goes on past failures and reports every pin it could not
    /// remove.
    ///
    /// Pins of an incompatible datapath are not this agent's to remove: refused, untouched.
    pub fn remove_shared_pins(root: &Path) -> Result<(), DatapathError> {
        if fs::symlink_metadata(root).is_err() {
            return Ok(());
        }
        root::check_chain(root)?;
        let survey = layout::survey(root)?;
        if !survey.mismatches.is_empty() {
            return Err(DatapathError::Incompatible {
                root: root.to_owned(),
                mismatches: survey.mismatches,
            });
        }
        let mut failures = Vec::new();
        root::remove_tree(&root.join(PODS_DIR), true, &mut failures);
        root::remove_tree(&root.join(PROGS_DIR), false, &mut failures);
        root::remove_tree(&root.join(MAPS_DIR), false, &mut failures);
        root::remove_pin(&root.join(layout::INFO_PIN), &mut failures);
        root::remove_root(root, &mut failures);
        if failures.is_empty() {
            Ok(())
        } else {
            Err(DatapathError::Remove { failures })
        }
    }
}

/// Device and inode of the `info` pin, if there is one.
fn info_id(root: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    fs::symlink_metadata(root.join(layout::INFO_PIN))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// A writer's handles on the datapath, kept between changes: the node agent keeps them for
/// its whole life, a CLI command for the one change it makes. Opened on first use, and again
/// whenever the pins are no longer the ones they were opened from
/// ([`Datapath::still_pinned`]), so loading the object (which parses the kernel's BTF) is
/// paid once, not per change. The caller holds the state lock whenever it uses them.
pub struct Handles {
    root: PathBuf,
    dp: Option<Datapath>,
    /// Whether `dp` came from [`Datapath::open`] (complete, programs current).
    built: bool,
}

impl Handles {
    pub fn new(root: &Path) -> Handles {
        Handles {
            root: root.to_owned(),
            dp: None,
            built: false,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn drop_stale(&mut self) {
        if self.dp.as_ref().is_some_and(|dp| !dp.still_pinned()) {
            self.forget();
        }
    }

    /// The datapath for a change that may build it (enroll): [`Datapath::open`], unless the
    /// handles held came from it and are still those pinned.
    pub fn build(&mut self) -> Result<&mut Datapath, DatapathError> {
        self.drop_stale();
        if !self.built || self.dp.is_none() {
            self.dp = Some(Datapath::open(&self.root)?);
            self.built = true;
        }
        Ok(self.dp.as_mut().expect("opened above"))
    }

    /// The pinned datapath for a change that must not build (a teardown, gc, recovery): the
    /// handles held if they are still those pinned, else [`Datapath::open_existing`]
    /// (`None`: nothing is pinned).
    pub fn existing(&mut self) -> Result<Option<&mut Datapath>, DatapathError> {
        self.drop_stale();
        if self.dp.is_none() {
            self.dp = Datapath::open_existing(&self.root)?;
            self.built = false;
        }
        Ok(self.dp.as_mut())
    }

    /// The datapath held, if any (for readers within a change: no opening).
    pub fn held(&mut self) -> Option<&mut Datapath> {
        self.drop_stale();
        self.dp.as_mut()
    }

    /// Lets the handles go: the pins were removed, or another process may have changed them.
    pub fn forget(&mut self) {
        self.dp = None;
        self.built = false;
    }
}

fn prog_pin(root: &Path, hook: Hook) -> PathBuf {
    root.join(PROGS_DIR).join(hook.program())
}

/// The kernel keeps 15 characters of a map's name.
fn kernel_name(name: &str) -> String {
    name.chars().take(15).collect()
}

/// Whether a pinned program is bound to the currently pinned maps: every map it references
/// that has the name of one of ours is the pinned one.
fn binds_pinned_maps(
    info: &ProgramInfo,
    map_ids: &BTreeMap<String, u32>,
) -> Result<bool, ProgramError> {
    let Some(ids) = info.map_ids()? else {
        return Ok(false);
    };
    for id in ids {
        if map_ids.values().any(|v| *v == id) {
            continue;
        }
        if let Ok(m) = aya::maps::MapInfo::from_id(id) {
            if m.name_as_str().is_some_and(|n| map_ids.contains_key(n)) {
                return Ok(false); // One of ours, but not the pinned one: an orphaned map.
            }
        }
    }
    Ok(true)
}

/// Loads `hook`'s program into the kernel (unpinned, unattached).
pub(crate) fn load_program(ebpf: &mut Ebpf, hook: Hook) -> Result<(), DatapathError> {
    let program = hook.program();
    let prog = ebpf.program_mut(program).ok_or(DatapathError::Program {
        program,
        source: ProgramError::NotLoaded,
    })?;
    let r = match hook {
        Hook::Connect4
        | Hook::Connect6
        | Hook::Bind4
        | Hook::Bind6
        | Hook::GetPeername4
        | Hook::GetPeername6
        | Hook::SendMsg4
        | Hook::SendMsg6
        | Hook::RecvMsg4
        | Hook::RecvMsg6 => <&mut CgroupSockAddr>::try_from(prog).and_then(|p| p.load()),
        Hook::SockOps => <&mut SockOps>::try_from(prog).and_then(|p| p.load()),
        Hook::GetSockopt => <&mut CgroupSockopt>::try_from(prog).and_then(|p| p.load()),
        Hook::SkLookup => <&mut SkLookup>::try_from(prog).and_then(|p| p.load()),
    };
    r.map_err(|e| match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            DatapathError::Verifier {
                program,
                tail: tail.join(" | "),
                log,
                source: io_error,
            }
        }
        source => DatapathError::Program { program, source },
    })
}

/// Makes `hook`'s pinned program current (see [`Datapath::open`]); `Some` when it was
/// (re)loaded.
fn reconcile(
    ebpf: &mut Ebpf,
    root: &Path,
    hook: Hook,
    same_build: bool,
    map_ids: &BTreeMap<String, u32>,
) -> Result<Option<ProgramChange>, DatapathError> {
    let program = hook.program();
    let pin = prog_pin(root, hook);
    let prog_err = |source| DatapathError::Program { program, source };
    let old = match fs::symlink_metadata(&pin) {
        Ok(_) => Some(ProgramInfo::from_pin(&pin).map_err(prog_err)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(&pin)(e)),
    };
    if let Some(info) = &old {
        if same_build && binds_pinned_maps(info, map_ids).map_err(prog_err)? {
            return Ok(None);
        }
    }
    load_program(ebpf, hook)?;
    let prog = ebpf.program_mut(program).expect("loaded just above");
    let staged = root.join(PROGS_DIR).join(format!("{program}{STAGED}"));
    match fs::remove_file(&staged) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&staged)(e)),
    }
    prog.pin(&staged).map_err(|source| DatapathError::Pin {
        path: staged.clone(),
        source,
    })?;
    let new_id = prog.info().map_err(prog_err)?.id();
    let fd = prog.fd().map_err(prog_err)?.as_fd();
    let mut links_updated = 0;
    let pods = root.join(PODS_DIR);
    let entries = fs::read_dir(&pods).map_err(io_err(&pods))?;
    // Every link of this hook in every pod directory: `<program>`, and a link staged beside it
    // (`<program>_next`, pinned by an update before it replaces the link).
    let staged_link = format!("{program}_");
    for pod in entries {
        let pod = pod.map_err(io_err(&pods))?.path();
        let links = match fs::read_dir(&pod) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&pod)(e)),
        };
        for l in links {
            let l = l.map_err(io_err(&pod))?;
            let name = l.file_name();
            let name = name.to_string_lossy();
            if name != program && !name.starts_with(&staged_link) {
                continue;
            }
            let link_path = l.path();
            let link = match bpf_sys::obj_get(&link_path) {
                Ok(l) => l,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&link_path)(e)),
            };
            bpf_sys::link_update(&link, &fd).map_err(|source| DatapathError::LinkUpdate {
                path: link_path.clone(),
                program,
                source,
            })?;
            links_updated += 1;
        }
    }
    fs::rename(&staged, &pin).map_err(io_err(&pin))?;
    Ok(Some(ProgramChange {
        program,
        old_id: old.map(|i| i.id()),
        new_id,
        links_updated,
    }))
}
