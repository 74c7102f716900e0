//! Loading every datapath program through the verifier without leaving anything behind: the
//! probe's most faithful check of a kernel.
//!
//! The object's maps are pinned by name, so loading it needs a bpffs to pin them on. That bpffs
//! is a fresh instance mounted inside a private mount namespace of a short-lived thread
//! (`unshare(CLONE_NEWNS)`, which unshares the thread's `fs_struct` too, with `/` made
//! recursively private first so nothing propagates out). No other process, and no other
//! thread of this one, ever sees the mount; it and the maps pinned on it go when the thread
//! exits, and a `SIGKILL` at any point leaves nothing either: there is no host path to follow,
//! overmount or clean up.

use std::path::Path;

use aya::EbpfLoader;
use nix::{
    mount::{mount, MsFlags},
    sched::{unshare, CloneFlags},
};

use super::{load_program, Hook, OBJECT};

/// Where the private bpffs goes inside the thread's mount namespace: any existing directory
/// works (the mount is invisible outside); the kernel's own bpffs mount point comes first.
const MOUNT_CANDIDATES: [&str; 3] = ["/sys/fs/bpf", "/tmp", "/mnt"];

type Verdicts = Vec<(&'static str, Result<(), String>)>;

fn all(msg: String) -> Verdicts {
    Hook::ALL
        .iter()
        .map(|h| (h.program(), Err(msg.clone())))
        .collect()
}

/// Loads every program of the datapath into the kernel, as `Datapath::open` would, without
/// pinning or attaching anything visible. Returns one entry per hook program, `Err` holding
/// the reason (for a verifier rejection: the errno and the verifier log's tail).
pub fn verify_programs() -> Verdicts {
    std::thread::Builder::new()
        .name("redirect-verify".into())
        .spawn(verify_in_private_namespace)
        .map_err(|e| format!("cannot start the verifier thread: {e}"))
        .and_then(|t| {
            t.join()
                .map_err(|_| "the verifier thread panicked".to_string())
        })
        .unwrap_or_else(all)
}

/// Runs on its own thread: the namespace changes below are that thread's alone.
fn verify_in_private_namespace() -> Verdicts {
    if let Err(e) = unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_FS) {
        return all(format!("unshare(CLONE_NEWNS) for a private bpffs: {e}"));
    }
    if let Err(e) = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    ) {
        return all(format!("making the private mount namespace private: {e}"));
    }
    let Some(dir) = MOUNT_CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()))
    else {
        return all(format!(
            "no directory to mount a private bpffs on (tried {})",
            MOUNT_CANDIDATES.join(", ")
        ));
    };
    if let Err(e) = mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    ) {
        return all(format!(
            "cannot mount a private bpffs (in a private mount namespace) on {}: {e}",
            dir.display()
        ));
    }
    match EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(OBJECT)
    {
        Ok(mut ebpf) => Hook::ALL
            .iter()
            .map(|&hook| {
                (
                    hook.program(),
                    load_program(&mut ebpf, hook).map_err(|e| crate::error_chain(&e)),
                )
            })
            .collect(),
        Err(e) => all(crate::error_chain(&super::DatapathError::Load(e))),
    }
    // No unmount: the namespace, its bpffs and the maps pinned there end with this thread.
}
