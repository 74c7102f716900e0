//! The bpf(2) commands the agent issues itself, each because aya 0.14 does not offer it:
//!
//! - `BPF_LINK_CREATE` for the cgroup sockopt hook: aya 0.14 creates that link but cannot turn
//!   it into an `FdLink` (no `TryFrom<CgroupSockoptLink> for FdLink`), so it cannot be pinned,
//!   and an enrolled pod needs every link pinned. The probe uses it too, for its link checks
//!   with a throw-away program.
//! - `BPF_LINK_UPDATE`: aya 0.14 only updates XDP links, and only internally. An upgrade swaps
//!   the program of every pinned link in place with it.
//! - `BPF_OBJ_GET` (with `BPF_F_RDONLY`) and `BPF_OBJ_PIN` on raw file descriptors, for the
//!   two above and for opening pinned maps read-only (aya's `from_pin` opens them read-write).
//! - `BPF_MAP_LOOKUP_BATCH`: aya 0.14 reads one element per syscall; the metrics endpoint
//!   reads every pod's counters and counts the shared maps' rows at each scrape, thousands of
//!   elements, with a few batches instead.
//!
//! Everything else (loading, the six other links, pinning programs and links, map and
//! program info) goes through aya.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `file_flags` of `BPF_OBJ_GET`: the returned fd may only read the object.
pub const BPF_F_RDONLY: u32 = 1 << 3;

/// `enum bpf_attach_type` values from the kernel's uapi (stable ABI).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum AttachType {
    SockOps = 3,
    Inet4Bind = 8,
    Inet6Bind = 9,
    Inet4Connect = 10,
    Inet6Connect = 11,
    GetSockopt = 21,
    Inet4GetPeername = 29,
    Inet6GetPeername = 30,
    Udp4Sendmsg = 14,
    Udp6Sendmsg = 15,
    Udp4Recvmsg = 19,
    Udp6Recvmsg = 20,
    SkLookup = 36,
}

/// Large enough for every `union bpf_attr` member used here; the kernel accepts a larger
/// attribute as long as the bytes it does not know are zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, zero-padded bpf_attr of the size passed.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, size_of::<Attr>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn put_u32(attr: &mut Attr, offset: usize, v: u32) {
    attr.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut Attr, offset: usize, v: u64) {
    attr.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Opens a pinned object (program, map or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    obj_get_with(path, 0)
}

/// Opens a pinned object with `file_flags` (`BPF_F_RDONLY`: a map fd that cannot write).
pub fn obj_get_with(path: &Path, file_flags: u32) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = Attr([0; 128]);
    // union bpf_attr, BPF_OBJ_* member: pathname (u64), bpf_fd (u32), file_flags (u32).
    put_u64(&mut attr, 0, path.as_ptr() as u64);
    put_u32(&mut attr, 12, file_flags);
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins an object at `path` on bpffs.
pub fn obj_pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = Attr([0; 128]);
    put_u64(&mut attr, 0, path.as_ptr() as u64);
    put_u32(&mut attr, 8, fd.as_raw_fd() as u32);
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Creates a bpf_link attaching `prog` to `target` (a cgroup directory or a netns file).
///
/// # Minimum kernel version
/// 5.7 for cgroup links, 5.9 for sk_lookup (netns) links.
pub fn link_create(
    prog: &OwnedFd,
    target: &impl AsRawFd,
    attach: AttachType,
) -> io::Result<OwnedFd> {
    let mut attr = Attr([0; 128]);
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, target.as_raw_fd() as u32);
    put_u32(&mut attr, 8, attach as u32);
    let fd = sys_bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program of link `link` by `new_prog`, atomically: the hook runs the old program
/// or the new one, never none.
///
/// # Minimum kernel version
/// 5.7 for cgroup links, 5.9 for netns (sk_lookup) links.
pub fn link_update(link: &impl AsRawFd, new_prog: &impl AsRawFd) -> io::Result<()> {
    let mut attr = Attr([0; 128]);
    // union bpf_attr, BPF_LINK_UPDATE member: link_fd, new_prog_fd, flags, old_prog_fd (u32s).
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    put_u32(&mut attr, 4, new_prog.as_raw_fd() as u32);
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Every entry of a map, read with `BPF_MAP_LOOKUP_BATCH` (`per_call` entries per syscall),
/// stopping once `limit` entries were read: (keys, values, how many). `value_size` is the size
/// of one key's value as the kernel copies it (for a per-CPU map: the value rounded up to 8
/// bytes, times the possible CPUs).
///
/// # Minimum kernel version
/// 5.6 for arrays and hash maps; LPM tries, sockhash and older kernels refuse it (`EINVAL`,
/// `ENOTSUPP`): see [`batch_unsupported`].
pub fn lookup_all(
    map: std::os::fd::BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    per_call: u32,
    limit: usize,
) -> io::Result<(Vec<u8>, Vec<u8>, usize)> {
    let per = per_call as usize;
    // A batch position is a key for arrays and a bucket index (u32) for hash maps.
    let pos_size = key_size.max(8);
    let mut in_batch = vec![0u8; pos_size];
    let mut out_batch = vec![0u8; pos_size];
    let mut keys = Vec::new();
    let mut values = Vec::new();
    let mut total = 0usize;
    let mut first = true;
    while total < limit {
        keys.resize((total + per) * key_size, 0);
        values.resize((total + per) * value_size, 0);
        let mut attr = Attr([0; 128]);
        // union bpf_attr, BPF_MAP_*_BATCH member: in_batch, out_batch, keys, values (u64
        // pointers), count, map_fd (u32), elem_flags, flags (u64).
        put_u64(
            &mut attr,
            0,
            if first { 0 } else { in_batch.as_ptr() as u64 },
        );
        put_u64(&mut attr, 8, out_batch.as_mut_ptr() as u64);
        put_u64(&mut attr, 16, keys[total * key_size..].as_mut_ptr() as u64);
        put_u64(
            &mut attr,
            24,
            values[total * value_size..].as_mut_ptr() as u64,
        );
        put_u32(&mut attr, 32, per_call);
        put_u32(&mut attr, 36, map.as_raw_fd() as u32);
        let r = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let copied = u32::from_ne_bytes(attr.0[32..36].try_into().expect("4 bytes")) as usize;
        match r {
            Ok(_) => {}
            // The end of the map: `copied` entries were still copied.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                total += copied.min(per);
                break;
            }
            Err(e) => return Err(e),
        }
        total += copied.min(per);
        in_batch.copy_from_slice(&out_batch);
        first = false;
    }
    let total = total.min(limit);
    keys.truncate(total * key_size);
    values.truncate(total * value_size);
    Ok((keys, values, total))
}

/// Whether `BPF_MAP_LOOKUP_BATCH` failed because the kernel or the map type does not offer it
/// (the caller then reads element by element).
pub fn batch_unsupported(e: &io::Error) -> bool {
    /// The kernel's internal `ENOTSUPP`, which reaches user space as is.
    const ENOTSUPP: i32 = 524;
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | ENOTSUPP | libc::ENOSPC)
    )
}
