//! The pin root as a root daemon must treat it: a directory only root can change, on bpffs,
//! with bpffs mounted at the pin root itself and nowhere else.
//!
//! Trust rule (OpenSSH's `StrictModes` over the whole chain): the pin root is not a symlink,
//! it and every directory above it are owned by root, and none is writable by group or others,
//! except a parent that is sticky (`/tmp`, and `/sys/fs/bpf`, which bpffs creates 1777): there
//! nobody else can rename or remove root's entries. A directory that fails is refused, never
//! repaired (no chmod, no chown).
//!
//! Mounting: when the pin root is not on bpffs, bpffs is mounted on the pin root itself (mode
//! 0700), never on its parent. The one exception is `/sys/fs/bpf`, the kernel's own mount point
//! for bpffs (an empty sysfs directory, where nothing can be created until bpffs is mounted):
//! when the pin root is directly below it and it has no bpffs, bpffs is mounted there, as
//! systemd, Cilium and bpfman do.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Component, Path, PathBuf},
};

use super::{DatapathError, RemoveFailure};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// The kernel's mount point for bpffs.
pub const SYS_FS_BPF: &str = "/sys/fs/bpf";
const STICKY: u32 = 0o1000;

/// Why a pin root is refused.
#[derive(Debug, thiserror::Error)]
pub enum UnsafeRoot {
    #[error("refusing pin root {path}: the path must be absolute")]
    Relative { path: PathBuf },
    #[error("refusing pin root {path}: {path} is a symlink")]
    Symlink { path: PathBuf },
    #[error("refusing pin root {root}: {path} is owned by uid {uid}, not root")]
    NotRootOwned {
        root: PathBuf,
        path: PathBuf,
        uid: u32,
    },
    #[error("refusing pin root {root}: {path} is writable by group or others (mode {mode:o})")]
    Writable {
        root: PathBuf,
        path: PathBuf,
        mode: u32,
    },
    #[error("refusing pin root {path}: not a directory")]
    NotDirectory { path: PathBuf },
    #[error(
        "refusing pin root {path}: it is not on bpffs and not empty; bpffs is only mounted on \
         an empty directory"
    )]
    NotEmpty { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `lstat`, `None` when nothing is there.
fn lstat(path: &Path) -> Result<Option<fs::Metadata>, DatapathError> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Whether `path` (followed) is on bpffs.
pub fn is_bpffs(path: &Path) -> Result<bool, DatapathError> {
    let st = nix::sys::statfs::statfs(path).map_err(|e| io_err(path)(e.into()))?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Checks the pin root and every directory above it (those that exist) against the trust rule.
/// No component may be a symlink: a pin root is spelled out, and a symlink in its chain is a
/// path someone could have meant to redirect.
pub fn check_chain(root: &Path) -> Result<(), DatapathError> {
    if !root.is_absolute() {
        return Err(UnsafeRoot::Relative {
            path: root.to_owned(),
        }
        .into());
    }
    if root.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(UnsafeRoot::Relative {
            path: root.to_owned(),
        }
        .into());
    }
    let mut cur = Some(root);
    while let Some(p) = cur {
        // The pin root itself may not be writable by others even when sticky: anyone could
        // create `maps/` in it before root does.
        let first = p == root;
        if let Some(m) = lstat(p)? {
            if m.file_type().is_symlink() {
                return Err(UnsafeRoot::Symlink { path: p.to_owned() }.into());
            }
            if !m.is_dir() {
                return Err(UnsafeRoot::NotDirectory { path: p.to_owned() }.into());
            }
            if m.uid() != 0 {
                return Err(UnsafeRoot::NotRootOwned {
                    root: root.to_owned(),
                    path: p.to_owned(),
                    uid: m.uid(),
                }
                .into());
            }
            let mode = m.permissions().mode();
            if mode & 0o022 != 0 && (first || mode & STICKY == 0) {
                return Err(UnsafeRoot::Writable {
                    root: root.to_owned(),
                    path: p.to_owned(),
                    mode: mode & 0o7777,
                }
                .into());
            }
        }
        cur = p.parent();
    }
    Ok(())
}

fn mount_bpffs(at: &Path, options: Option<&str>) -> Result<(), DatapathError> {
    nix::mount::mount(
        Some("bpf"),
        at,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        options,
    )
    .map_err(|e| DatapathError::Mount {
        path: at.to_owned(),
        source: e.into(),
    })
}

fn mkdir_private(dir: &Path) -> Result<(), DatapathError> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// Makes the pin root ready for writing: trusted, existing, on bpffs. The writer path only
/// (`Datapath::open`); readers use [`check_chain`] and never create or mount anything.
pub fn prepare(root: &Path) -> Result<(), DatapathError> {
    check_chain(root)?;
    if lstat(root)?.is_none() {
        let parent = root.parent().ok_or_else(|| UnsafeRoot::Relative {
            path: root.to_owned(),
        })?;
        if lstat(parent)?.is_none() {
            // Missing ancestors are created as root's, 0755; the chain is checked again below.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(io_err(parent))?;
            check_chain(root)?;
        }
        if !is_bpffs(parent)? && parent == Path::new(SYS_FS_BPF) {
            // The kernel's bpffs mount point without bpffs: mount it there (see above).
            mount_bpffs(parent, None)?;
        }
        mkdir_private(root)?;
    }
    if !is_bpffs(root)? {
        let empty = fs::read_dir(root).map_err(io_err(root))?.next().is_none();
        if !empty {
            return Err(UnsafeRoot::NotEmpty {
                path: root.to_owned(),
            }
            .into());
        }
        mount_bpffs(root, Some("mode=0700"))?;
    }
    // What was mounted or created is checked like what was found.
    check_chain(root)
}

/// Creates `dir` (mode 0700) below a prepared root unless it is there; refuses a symlink.
pub fn ensure_subdir(dir: &Path) -> Result<(), DatapathError> {
    mkdir_private(dir)?;
    match lstat(dir)? {
        Some(m) if m.is_dir() && !m.file_type().is_symlink() => Ok(()),
        _ => Err(UnsafeRoot::NotDirectory {
            path: dir.to_owned(),
        }
        .into()),
    }
}

/// Removes `path` (a pin), recording a failure other than "not there".
pub fn remove_pin(path: &Path, failures: &mut Vec<RemoveFailure>) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => failures.push(RemoveFailure {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes the directory `dir`; a failure is recorded unless an entry below it failed already
/// (then the directory is not empty because of that entry, which is reported).
pub fn remove_dir(dir: &Path, failures: &mut Vec<RemoveFailure>) {
    match fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            if !failures.iter().any(|f| f.path.starts_with(dir)) {
                failures.push(RemoveFailure {
                    path: dir.to_owned(),
                    source,
                })
            }
        }
    }
}

/// Removes every entry of `dir` (pins; one level of subdirectories of pins when `nested`),
/// then `dir`.
pub fn remove_tree(dir: &Path, nested: bool, failures: &mut Vec<RemoveFailure>) {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(source) => {
            failures.push(RemoveFailure {
                path: dir.to_owned(),
                source,
            });
            return;
        }
    };
    for e in entries {
        let e = match e {
            Ok(e) => e,
            Err(source) => {
                failures.push(RemoveFailure {
                    path: dir.to_owned(),
                    source,
                });
                continue;
            }
        };
        let path = e.path();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && nested {
            remove_tree(&path, false, failures);
        } else {
            // A directory where a pin belongs fails with EISDIR: reported, not recursed into.
            remove_pin(&path, failures);
        }
    }
    remove_dir(dir, failures);
}

/// Removes the (empty) pin root; when bpffs is mounted on the pin root itself (see
/// [`prepare`]), unmounts it first, so an idle node keeps no mount either.
pub fn remove_root(root: &Path, failures: &mut Vec<RemoveFailure>) {
    if !failures.is_empty() {
        return; // Something is still pinned below: the root stays, with its mount.
    }
    let Ok(Some(_)) = lstat(root) else { return };
    let own_mount = root != Path::new(SYS_FS_BPF)
        && is_bpffs(root).unwrap_or(false)
        && root.parent().is_some_and(|p| !is_bpffs(p).unwrap_or(true));
    if own_mount {
        if let Err(e) = nix::mount::umount2(root, nix::mount::MntFlags::empty()) {
            failures.push(RemoveFailure {
                path: root.to_owned(),
                source: e.into(),
            });
            return;
        }
    }
    if root != Path::new(SYS_FS_BPF) {
        remove_dir(root, failures);
    }
}
