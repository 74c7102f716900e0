//! The three bpf(2) commands the agent issues itself: BPF_OBJ_GET, BPF_OBJ_PIN and
//! BPF_LINK_CREATE. aya 0.14 cannot turn every link type it creates into a pinnable link (not
//! the cgroup sockopt one), and enrolling a pod needs every link pinned, so links are made here
//! from the pinned programs, the same way for every hook.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;

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
    let path = c_path(path)?;
    let mut attr = Attr([0; 128]);
    put_u64(&mut attr, 0, path.as_ptr() as u64);
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
