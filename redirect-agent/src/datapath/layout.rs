//! What the pins must look like for this agent to use them: the layout of every pinned map
//! (type, key size, value size, max entries, flags, as the embedded object declares them), and
//! the datapath's ABI version and build, kept in the pinned `info` map.
//!
//! aya 0.14 reuses a pinned map by name without looking at it (`MapData::create_pinned_by_name`
//! takes whatever `BPF_OBJ_GET` returns), so a pin set left by an agent with another layout
//! would be written with rows it cannot hold, or read as garbage. This module compares every
//! pin with the object first, as cilium/ebpf's `MapSpec.Compatible` does, before anything is
//! loaded, created or written.
//!
//! `info` (an ARRAY of one `[u64; 2]`: ABI version, build id) is created by the agent, not
//! declared in the eBPF object: its own layout never changes, and the kernel programs never
//! read it. The build id is a hash of the embedded object: two agents with the same build id
//! run byte-identical kernel programs. A pin set whose build id is not ours (or that has no
//! `info`: pins of the first, unversioned agent, or of an agent killed before it wrote `info`)
//! but whose ABI version and map layouts match is upgraded in place: see `Datapath::open`.

use std::{
    collections::BTreeMap,
    fmt, fs, io,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use aya::maps::{Array, Map, MapData, MapError, MapInfo};
use aya_obj::{maps::PinningType, Object};

use super::{DatapathError, OBJECT};

/// The datapath's ABI version: the meaning of the pinned maps' rows. Bump it when a change
/// keeps a map's sizes but changes what its bytes mean (a field reordered, a flag bit given
/// another meaning, a counter index moved): pins of another ABI version are refused, never
/// reinterpreted. Size changes are caught by the layout check whatever this says.
///
/// 2: a pod's `COUNTERS` row is `COUNTERS_PER_POD` (24) wide, with room for later counters;
/// ABI 1's rows were 14 wide (the map is also larger, which the layout check names).
pub const DATAPATH_ABI: u64 = 2;

/// Name of the info pin under the pin root.
pub const INFO_PIN: &str = "info";
/// The info map's kernel name (at most 15 characters).
const INFO_MAP_NAME: &str = "rd_info";
const INFO_KEY_SIZE: u32 = 4;
const INFO_VALUE_SIZE: u32 = 16;
const INFO_MAX_ENTRIES: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// How a pinned map must be, as this agent's object declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLayout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapLayout {
    fn of_pin(info: &MapInfo) -> Result<Self, MapError> {
        Ok(MapLayout {
            map_type: info.map_type()? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    /// Every field that differs, named.
    fn diff(&self, object: &str, pinned: &MapLayout) -> Vec<Mismatch> {
        let mut out = Vec::new();
        let mut field = |name: &'static str, p: u32, e: u32, show: fn(u32) -> String| {
            if p != e {
                out.push(Mismatch {
                    object: object.to_owned(),
                    field: name,
                    pinned: show(p),
                    expected: show(e),
                });
            }
        };
        field(
            "map type",
            pinned.map_type,
            self.map_type,
            map_type_name as fn(u32) -> String,
        );
        field("key size", pinned.key_size, self.key_size, |v| {
            v.to_string()
        });
        field("value size", pinned.value_size, self.value_size, |v| {
            v.to_string()
        });
        field("max entries", pinned.max_entries, self.max_entries, |v| {
            v.to_string()
        });
        field("flags", pinned.flags, self.flags, |v| format!("{v:#x}"));
        out
    }
}

fn map_type_name(t: u32) -> String {
    let name = aya_obj::generated::bpf_map_type::try_from(t)
        .ok()
        .and_then(|t| aya::maps::MapType::try_from(t).ok());
    match name {
        Some(n) => format!("{n:?} ({t})"),
        None => t.to_string(),
    }
}

/// One difference between a pin and what this agent expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The map's name (`PODS`), or `info` for the datapath's version record.
    pub object: String,
    /// `map type`, `key size`, `value size`, `max entries`, `flags`, `abi version`.
    pub field: &'static str,
    pub pinned: String,
    pub expected: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: pinned {}, expected {}",
            self.object, self.field, self.pinned, self.expected
        )
    }
}

/// The pinned maps of the embedded object, by name, with their layout.
pub fn expected_maps() -> &'static BTreeMap<String, MapLayout> {
    static MAPS: OnceLock<BTreeMap<String, MapLayout>> = OnceLock::new();
    MAPS.get_or_init(|| {
        // The object is built with this crate and parsed by aya at every load: a parse error
        // here is a build defect, not a run-time condition.
        let obj = Object::parse(OBJECT).expect("the embedded datapath object parses");
        obj.maps
            .iter()
            .filter(|(_, m)| m.pinning() == PinningType::ByName)
            .map(|(name, m)| {
                (
                    name.clone(),
                    MapLayout {
                        map_type: m.map_type(),
                        key_size: m.key_size(),
                        value_size: m.value_size(),
                        max_entries: m.max_entries(),
                        flags: m.map_flags(),
                    },
                )
            })
            .collect()
    })
}

/// This build's id: FNV-1a of the embedded object (stable across Rust versions, unlike
/// `DefaultHasher`).
pub fn build_id() -> u64 {
    static ID: OnceLock<u64> = OnceLock::new();
    *ID.get_or_init(|| {
        OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    })
}

/// The pinned version record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    pub abi: u64,
    pub build: u64,
}

impl Info {
    pub fn current() -> Info {
        Info {
            abi: DATAPATH_ABI,
            build: build_id(),
        }
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn exists(path: &Path) -> Result<bool, DatapathError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(DatapathError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads `root/info`; `Ok(Err(mismatches))` when the info map itself has another layout.
pub fn read_info(root: &Path) -> Result<Result<Option<Info>, Vec<Mismatch>>, DatapathError> {
    let path = root.join(INFO_PIN);
    if !exists(&path)? {
        return Ok(Ok(None));
    }
    let data = MapData::from_fd(open_pin_ro(&path)?).map_err(map_err(INFO_PIN))?;
    let info = data.info().map_err(map_err(INFO_PIN))?;
    let want = info_layout();
    let diff = want.diff(
        INFO_PIN,
        &MapLayout::of_pin(&info).map_err(map_err(INFO_PIN))?,
    );
    if !diff.is_empty() {
        return Ok(Err(diff));
    }
    let arr: Array<MapData, [u64; 2]> = info_array(data)?;
    let [abi, build] = arr.get(&0, 0).map_err(map_err(INFO_PIN))?;
    Ok(Ok(Some(Info { abi, build })))
}

fn info_array(data: MapData) -> Result<Array<MapData, [u64; 2]>, DatapathError> {
    let map = Map::from_map_data(data).map_err(map_err(INFO_PIN))?;
    Array::try_from(map).map_err(map_err(INFO_PIN))
}

fn info_layout() -> MapLayout {
    MapLayout {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: INFO_KEY_SIZE,
        value_size: INFO_VALUE_SIZE,
        max_entries: INFO_MAX_ENTRIES,
        flags: 0,
    }
}

/// Writes this build's info to `root/info`, creating the map if needed. The value is written
/// before the map is pinned, so a reader never sees an info pin without its record.
pub fn write_info(root: &Path, info: Info) -> Result<(), DatapathError> {
    let path = root.join(INFO_PIN);
    if exists(&path)? {
        let data = MapData::from_pin(&path).map_err(map_err(INFO_PIN))?;
        let mut arr: Array<MapData, [u64; 2]> = info_array(data)?;
        return arr
            .set(0, [info.abi, info.build], 0)
            .map_err(map_err(INFO_PIN));
    }
    let l = info_layout();
    let def =
        aya_obj::Map::new_from_params(l.map_type, l.key_size, l.value_size, l.max_entries, l.flags);
    let data = MapData::create(def, INFO_MAP_NAME, None).map_err(map_err(INFO_PIN))?;
    data.pin(&path).map_err(|source| DatapathError::Pin {
        path: path.clone(),
        source,
    })?;
    let mut arr: Array<MapData, [u64; 2]> = info_array(data)?;
    arr.set(0, [info.abi, info.build], 0)
        .map_err(map_err(INFO_PIN))
}

/// Opens a pin read-only (`BPF_F_RDONLY`): whatever the caller does with the fd, the kernel
/// refuses writes through it.
pub fn open_pin_ro(path: &Path) -> Result<std::os::fd::OwnedFd, DatapathError> {
    crate::bpf_sys::obj_get_with(path, crate::bpf_sys::BPF_F_RDONLY).map_err(|source| {
        DatapathError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

/// What the pin set under `root` is, compared with this agent.
#[derive(Debug)]
pub struct Survey {
    /// The info record, if there is one.
    pub info: Option<Info>,
    /// Every difference found (empty: compatible).
    pub mismatches: Vec<Mismatch>,
    /// Pinned maps of the object that are there.
    pub present: Vec<String>,
    /// Pinned maps of the object that are not there.
    pub absent: Vec<PathBuf>,
}

/// Compares every pin under `root` with this agent's object, without changing anything.
pub fn survey(root: &Path) -> Result<Survey, DatapathError> {
    let mut mismatches = Vec::new();
    let info = match read_info(root)? {
        Ok(info) => info,
        Err(diff) => {
            mismatches.extend(diff);
            None
        }
    };
    if let Some(i) = info {
        if i.abi != DATAPATH_ABI {
            mismatches.push(Mismatch {
                object: INFO_PIN.into(),
                field: "abi version",
                pinned: i.abi.to_string(),
                expected: DATAPATH_ABI.to_string(),
            });
        }
    }
    let mut present = Vec::new();
    let mut absent = Vec::new();
    let maps_dir = root.join(super::MAPS_DIR);
    for (name, want) in expected_maps() {
        let path = maps_dir.join(name);
        if !exists(&path)? {
            absent.push(path);
            continue;
        }
        let info = MapData::from_fd(open_pin_ro(&path)?)
            .and_then(|m| m.info())
            .map_err(|source| DatapathError::PinnedMap {
                path: path.clone(),
                source,
            })?;
        let pinned = MapLayout::of_pin(&info).map_err(|source| DatapathError::PinnedMap {
            path: path.clone(),
            source,
        })?;
        mismatches.extend(want.diff(name, &pinned));
        present.push(name.clone());
    }
    Ok(Survey {
        info,
        mismatches,
        present,
        absent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_declares_the_maps_the_agent_uses() {
        let maps = expected_maps();
        for name in [
            "PODS",
            "POD_CGROUPS",
            "POD_ADDRS",
            "PORT_RULES",
            "CIDR4",
            "CIDR6",
            "LISTENERS",
            "COUNTERS",
        ] {
            assert!(maps.contains_key(name), "{name} not pinned by the object");
        }
        assert!(
            !maps.contains_key(INFO_PIN),
            "info is the agent's, not the object's"
        );
    }

    #[test]
    fn build_id_is_stable_within_a_build() {
        assert_eq!(build_id(), build_id());
        assert_ne!(build_id(), 0);
    }

    #[test]
    fn differences_are_named() {
        let want = MapLayout {
            map_type: 2,
            key_size: 4,
            value_size: 32,
            max_entries: 4096,
            flags: 0,
        };
        let pinned = MapLayout {
            value_size: 40,
            max_entries: 16,
            ..want
        };
        let d = want.diff("PODS", &pinned);
        let text: Vec<String> = d.iter().map(|m| m.to_string()).collect();
        assert_eq!(
            text,
            [
                "PODS value size: pinned 40, expected 32",
                "PODS max entries: pinned 16, expected 4096"
            ]
        );
        let other_type = MapLayout {
            map_type: 1,
            ..want
        };
        assert_eq!(
            want.diff("PODS", &other_type)[0].to_string(),
            "PODS map type: pinned Hash (1), expected Array (2)"
        );
    }
}
