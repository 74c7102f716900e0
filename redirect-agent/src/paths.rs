//! Paths a root daemon can trust: directories that only root can change.
//!
//! A state or pin directory that another user can write (or replace, through a writable parent
//! or a symlink of theirs) lets that user forge records or make root overwrite a file of their
//! choosing. The check is OpenSSH's `StrictModes` applied to the whole chain: every directory
//! from `/` down is owned by root and not writable by group or others (a sticky world-writable
//! parent such as `/tmp` is accepted: no one else can rename or remove root's entries in it),
//! every symlink on the way is root's, and the directory itself is root's and not writable by
//! group or others.

use std::{
    io,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Component, Path, PathBuf},
};

/// Why a directory cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum UnsafePath {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// Owned by a user other than root.
    #[error("refusing {path}: owned by uid {uid}, not root")]
    NotRootOwned { path: PathBuf, uid: u32 },
    /// Group or others may write it.
    #[error("refusing {path}: writable by group or others (mode {mode:o})")]
    Writable { path: PathBuf, mode: u32 },
    /// Not a directory (a file, a FIFO, ...).
    #[error("refusing {path}: not a directory")]
    NotDirectory { path: PathBuf },
    #[error("refusing {path}: the path must be absolute")]
    Relative { path: PathBuf },
}

fn lstat(path: &Path) -> Result<std::fs::Metadata, UnsafePath> {
    std::fs::symlink_metadata(path).map_err(|source| UnsafePath::Io {
        path: path.to_owned(),
        source,
    })
}

const STICKY: u32 = 0o1000;

/// Checks that `dir` exists and that only root can change it or any directory above it.
pub fn check_trusted_dir(dir: &Path) -> Result<(), UnsafePath> {
    if !dir.is_absolute() {
        return Err(UnsafePath::Relative {
            path: dir.to_owned(),
        });
    }
    // Symlinks on the given path: only root's (one in /tmp made by a user is refused).
    let mut prefix = PathBuf::new();
    for c in dir.components() {
        prefix.push(c);
        if matches!(c, Component::RootDir) {
            continue;
        }
        let m = lstat(&prefix)?;
        if m.file_type().is_symlink() && m.uid() != 0 {
            return Err(UnsafePath::NotRootOwned {
                path: prefix,
                uid: m.uid(),
            });
        }
    }
    let real = dir.canonicalize().map_err(|source| UnsafePath::Io {
        path: dir.to_owned(),
        source,
    })?;
    let m = lstat(&real)?;
    if !m.is_dir() {
        return Err(UnsafePath::NotDirectory { path: real });
    }
    let mut cur = Some(real.as_path());
    let mut first = true;
    while let Some(p) = cur {
        let m = lstat(p)?;
        if m.uid() != 0 {
            return Err(UnsafePath::NotRootOwned {
                path: p.to_owned(),
                uid: m.uid(),
            });
        }
        let mode = m.permissions().mode();
        let writable = mode & 0o022 != 0;
        if writable && (first || mode & STICKY == 0) {
            return Err(UnsafePath::Writable {
                path: p.to_owned(),
                mode: mode & 0o7777,
            });
        }
        first = false;
        cur = p.parent();
    }
    Ok(())
}

/// Creates `dir` (mode 0755, parents as needed) unless it exists, then checks it as
/// [`check_trusted_dir`] does. A directory that exists already is never chmod'ed or chown'ed:
/// one that is not safe is refused, not repaired.
pub fn ensure_trusted_dir(dir: &Path) -> Result<(), UnsafePath> {
    if std::fs::symlink_metadata(dir).is_err() {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| UnsafePath::Io {
                path: dir.to_owned(),
                source,
            })?;
    }
    check_trusted_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_is_refused() {
        assert!(matches!(
            check_trusted_dir(Path::new("run/redirect")),
            Err(UnsafePath::Relative { .. })
        ));
    }

    #[test]
    fn root_is_trusted() {
        // `/` is root's and 0755 on every machine this runs on.
        check_trusted_dir(Path::new("/")).unwrap();
    }
}
