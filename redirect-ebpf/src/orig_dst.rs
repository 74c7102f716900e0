//! `ORIG_DST`, the one node-wide map a pod's connections write to, and each pod's share of it.
//!
//! An entry lives from the client's SYN (sock_ops `TCP_CONNECT_CB`, when the four-tuple is
//! known) until the proxy's side of the connection is established and copies it into its own
//! socket storage (`PASSIVE_ESTABLISHED_CB`), or until the client closes first. Each pod may hold
//! `MAX_ORIG_DST_PER_POD` entries: the count is kept per slot in `ORIG_DST_USED`, raised on a
//! successful insert and lowered on a successful removal, so each entry is counted once. A pod at
//! its share gets `map_full` and unredirected connections; the others do not notice.
//!
//! An entry can still be left behind when its pod's sock_ops link is gone before the connection
//! ends (the pod was unenrolled mid-handshake); the agent sweeps a slot's entries and zeroes its
//! count at enroll and unenroll (`redirect_agent::conntrack::sweep_slot`).
//!
//! # Minimum kernel version
//! 4.20 for the atomic add on an array value (`BPF_XADD`, older) and hash maps; nothing here
//! needs the 5.12 fetching atomics.

use aya_ebpf::bindings::{BPF_EXIST, BPF_NOEXIST};
use redirect_common::{OrigDst, SockTuple, MAX_ORIG_DST_PER_POD};

use crate::maps::{ORIG_DST, ORIG_DST_USED};

/// Why an entry was not filed.
pub enum NotFiled {
    /// The pod is at its share, or the node's map is full.
    Full,
    /// Another pod holds an entry under the same four-tuple (only possible for loopback or
    /// spoofed sources): neither is overwritten.
    Taken,
}

/// Whether the pod in `slot` is below its share of `ORIG_DST`. A plain read: two CPUs may both
/// see room for the last entry, so a pod can pass its share by the number of inserts running at
/// once (a few per CPU), never more.
#[inline(always)]
pub fn has_room(slot: u32) -> bool {
    match ORIG_DST_USED.get_ptr_mut(slot) {
        Some(used) => {
            // SAFETY: an array value pointer, valid for this run; an aligned u32 is never
            // torn, and a stale read only moves the bound by a few entries (see above).
            let now = unsafe { core::ptr::read_volatile(used) };
            now < MAX_ORIG_DST_PER_POD
        }
        None => false,
    }
}

/// Adds `delta` (wrapping: `u32::MAX` is -1) to the slot's count, atomically.
#[inline(always)]
fn add(slot: u32, delta: u32) {
    if let Some(used) = ORIG_DST_USED.get_ptr_mut(slot) {
        // SAFETY: an aligned u32 array value, valid for this run and written only atomically.
        // Written as `BPF_XADD` (an atomic add that returns nothing) because that is what 5.10
        // accepts; the fetching atomics core::sync::atomic would need are 5.12.
        unsafe {
            core::arch::asm!(
                "lock *(u32 *)({p} + 0) += {v}",
                p = in(reg) used,
                v = in(reg) delta as u64,
                options(nostack, preserves_flags),
            );
        }
    }
}

/// Files `orig` under the connection's four-tuple, within the pod's share.
#[inline(always)]
pub fn file(tuple: &SockTuple, orig: &OrigDst) -> Result<(), NotFiled> {
    // SAFETY: a hash map value, copied before any other map operation.
    if let Some(old) = unsafe { ORIG_DST.get(tuple) }.copied() {
        if old.slot != orig.slot {
            return Err(NotFiled::Taken);
        }
        // The pod's own stale entry (a four-tuple reused before its old entry was taken):
        // replace it, already counted.
        return ORIG_DST
            .insert(tuple, orig, BPF_EXIST.into())
            .map_err(|_| NotFiled::Full);
    }
    if !has_room(orig.slot) {
        return Err(NotFiled::Full);
    }
    // NOEXIST: a racing insert of the same four-tuple by another pod is not overwritten.
    if ORIG_DST.insert(tuple, orig, BPF_NOEXIST.into()).is_err() {
        return Err(NotFiled::Full);
    }
    add(orig.slot, 1);
    Ok(())
}

/// Takes the entry under `tuple` out of the map, if there is one, and returns it.
#[inline(always)]
pub fn take(tuple: &SockTuple) -> Option<OrigDst> {
    // SAFETY: a hash map value, copied before the removal.
    let orig = unsafe { ORIG_DST.get(tuple) }.copied()?;
    remove(tuple, orig.slot);
    Some(orig)
}

/// The entry under `tuple`, if there is one (without taking it).
#[inline(always)]
pub fn peek(tuple: &SockTuple) -> Option<OrigDst> {
    // SAFETY: a hash map value, copied at once.
    unsafe { ORIG_DST.get(tuple) }.copied()
}

/// Removes the entry under `tuple` if it is the pod's in `slot`; the count goes down only for a
/// removal that happened, so an entry taken twice (by both sides of a connection racing) is
/// uncounted once.
#[inline(always)]
pub fn release(tuple: &SockTuple, slot: u32) {
    // SAFETY: a hash map value, copied at once.
    match unsafe { ORIG_DST.get(tuple) }.copied() {
        Some(orig) if orig.slot == slot => remove(tuple, slot),
        _ => {}
    }
}

#[inline(always)]
fn remove(tuple: &SockTuple, slot: u32) {
    if ORIG_DST.remove(tuple).is_ok() {
        add(slot, u32::MAX);
    }
}
