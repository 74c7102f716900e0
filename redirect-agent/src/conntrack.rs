//! The datapath's per-connection maps, seen from the agent: `ORIG_DST` (original destination by
//! four-tuple, during each redirected connection's handshake) and `ORIG_DST_USED` (how many of
//! those entries each pod slot holds, the kernel's per-pod quota count).
//!
//! The kernel removes an entry when the proxy's side of its connection is established or when
//! the client closes first. It cannot when the pod's sock_ops link is already gone (the pod was
//! unenrolled while a connection was in its handshake): [`sweep_slot`] removes what a slot left
//! behind and zeroes its count, and enroll and unenroll call it so that a slot starts and ends
//! empty. Every other piece of per-connection state lives in socket-local storage and is freed
//! by the kernel with its socket. See `docs/PER-CONNECTION.md`.

use std::{borrow::BorrowMut, path::Path};

use aya::maps::{Array, HashMap, MapData, MapError};
use redirect_common::{OrigDst, SockTuple};

/// Pin names of the maps, under the datapath's `maps/` directory.
pub const ORIG_DST: &str = "ORIG_DST";
pub const ORIG_DST_USED: &str = "ORIG_DST_USED";

/// A map operation of a sweep or a usage query failed.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> ConntrackError {
    move |source| ConntrackError::Map { name, source }
}

/// What a slot holds in `ORIG_DST`: entries found, and the kernel's count of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotUsage {
    pub entries: usize,
    pub counted: u32,
}

/// Removes every `ORIG_DST` entry of `slot` and zeroes its count; returns how many entries
/// were removed. Call it with the slot's links detached (before attaching at enroll, after
/// detaching at unenroll): a connection of the slot still in its handshake then loses its
/// original destination, as it would have anyway.
///
/// Entries are listed first and removed after (removing while walking a BPF hash map can
/// restart the walk); an entry that vanished in between (the kernel took it) is not an error.
pub fn sweep_slot<T, U>(
    orig_dst: &mut HashMap<T, SockTuple, OrigDst>,
    used: &mut Array<U, u32>,
    slot: u32,
) -> Result<usize, ConntrackError>
where
    T: BorrowMut<MapData>,
    U: BorrowMut<MapData>,
{
    let mut mine = Vec::new();
    for entry in orig_dst.iter() {
        let (key, orig) = entry.map_err(map_err(ORIG_DST))?;
        if orig.slot == slot {
            mine.push(key);
        }
    }
    let mut removed = 0;
    for key in &mine {
        match orig_dst.remove(key) {
            Ok(()) => removed += 1,
            Err(MapError::ElementNotFound) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(map_err(ORIG_DST)(e)),
        }
    }
    used.set(slot, 0, 0).map_err(map_err(ORIG_DST_USED))?;
    Ok(removed)
}

/// [`sweep_slot`] when the slot's count says it holds entries; else nothing (returns 0).
///
/// Walking `ORIG_DST` visits every one of its buckets (262 144) however few entries it holds,
/// about a millisecond: enroll and unenroll walk it only for a slot that has something to
/// sweep. The kernel counts an entry as soon as it has filed it, and the slot's links are
/// detached (unenroll) or not attached yet (enroll) when this is called, so a count of zero
/// means no entry of the slot is left, but for one filed by a hook that was running at the
/// very moment its link went and had not counted it yet.
pub fn sweep_slot_if_used<T, U>(
    orig_dst: &mut HashMap<T, SockTuple, OrigDst>,
    used: &mut Array<U, u32>,
    slot: u32,
) -> Result<usize, ConntrackError>
where
    T: BorrowMut<MapData>,
    U: BorrowMut<MapData>,
{
    if used.get(&slot, 0).map_err(map_err(ORIG_DST_USED))? == 0 {
        return Ok(0);
    }
    sweep_slot(orig_dst, used, slot)
}

/// What `slot` holds now.
pub fn slot_usage<T, U>(
    orig_dst: &HashMap<T, SockTuple, OrigDst>,
    used: &Array<U, u32>,
    slot: u32,
) -> Result<SlotUsage, ConntrackError>
where
    T: std::borrow::Borrow<MapData>,
    U: std::borrow::Borrow<MapData>,
{
    // A walk restarts a bucket when its current key is removed under it: the same key can come
    // twice while connections churn, so keys are counted once.
    let mut seen = std::collections::BTreeSet::new();
    for entry in orig_dst.iter() {
        let (k, orig) = entry.map_err(map_err(ORIG_DST))?;
        if orig.slot == slot {
            seen.insert((k.src, k.dst, k.src_port, k.dst_port, k.family));
        }
    }
    let entries = seen.len();
    let counted = used.get(&slot, 0).map_err(map_err(ORIG_DST_USED))?;
    Ok(SlotUsage { entries, counted })
}

/// The two maps, opened from their pins in `maps_dir` (the datapath's `<pin root>/maps`).
pub struct PinnedMaps {
    pub orig_dst: HashMap<MapData, SockTuple, OrigDst>,
    pub used: Array<MapData, u32>,
}

impl PinnedMaps {
    pub fn open(maps_dir: &Path) -> Result<Self, ConntrackError> {
        let open =
            |name: &'static str| MapData::from_pin(maps_dir.join(name)).map_err(map_err(name));
        let orig_dst = aya::maps::Map::HashMap(open(ORIG_DST)?);
        let used = aya::maps::Map::Array(open(ORIG_DST_USED)?);
        Ok(PinnedMaps {
            orig_dst: HashMap::try_from(orig_dst).map_err(map_err(ORIG_DST))?,
            used: Array::try_from(used).map_err(map_err(ORIG_DST_USED))?,
        })
    }

    /// [`sweep_slot`] on the pinned maps.
    pub fn sweep_slot(&mut self, slot: u32) -> Result<usize, ConntrackError> {
        sweep_slot(&mut self.orig_dst, &mut self.used, slot)
    }

    /// [`slot_usage`] on the pinned maps.
    pub fn slot_usage(&self, slot: u32) -> Result<SlotUsage, ConntrackError> {
        slot_usage(&self.orig_dst, &self.used, slot)
    }

    /// Entries in `ORIG_DST` over all slots.
    pub fn total_entries(&self) -> Result<usize, ConntrackError> {
        let mut n = 0;
        for entry in self.orig_dst.keys() {
            entry.map_err(map_err(ORIG_DST))?;
            n += 1;
        }
        Ok(n)
    }
}
