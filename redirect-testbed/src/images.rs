//! The runtime test bed's images, built from the project's static binaries and written once per
//! test process: `redirect.test/pause:1` (the sandbox image), `redirect.test/echo:1` and
//! `redirect.test/proxy:1` (the application and the sidecar proxy, `redirect-testbed`), all in
//! one archive for [`crate::Containerd::import`]. Definitions: [`redirect_image::images`].

use std::{path::PathBuf, sync::Mutex};

use anyhow::{Context as _, Result};

/// The directory of the static (musl) binaries of `packages`, built now if needed (cargo is
/// fast when they are fresh).
pub fn static_bins(packages: &[&str]) -> Result<PathBuf> {
    redirect_devtools::build_static(packages).context("building static binaries")
}

/// The test images' archive, `<target>/image/redirect-testbed.tar`, built at the first call of
/// the process.
pub fn test_images() -> Result<PathBuf> {
    // A lock, not a OnceLock: the tests of one binary run in parallel, and each must wait for
    // the one that is building rather than build and write the same archive beside it.
    static ARCHIVE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut archive = ARCHIVE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = &*archive {
        return Ok(p.clone());
    }
    let dir = static_bins(&["redirect-testbed"])?;
    let images = [
        redirect_image::images::pause(&dir)?,
        redirect_image::images::echo(&dir)?,
        redirect_image::images::proxy(&dir)?,
    ];
    let out_dir = redirect_devtools::target_dir()?.join("image");
    std::fs::create_dir_all(&out_dir)?;
    // Two test processes may write it at once: the write is a rename of a complete file, and
    // the archive is reproducible, so either one's is the same.
    let out = out_dir.join("redirect-testbed.tar");
    redirect_image::write_archive(&images, &out)?;
    *archive = Some(out.clone());
    Ok(out)
}

/// The node agent's image as `cargo xtask image` builds it ([`redirect_image::images::agent`]),
/// and a newer build of it for a rolling update: the same binaries under the tag
/// `<version>-next`, with a label that gives it another digest. Both in one archive,
/// `<target>/image/redirect-agent-test.tar`, built at the first call of the process. Returns
/// the archive and the two image names.
pub fn agent_images() -> Result<(PathBuf, String, String)> {
    static ARCHIVE: Mutex<Option<(PathBuf, String, String)>> = Mutex::new(None);
    let mut archive = ARCHIVE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = &*archive {
        return Ok(a.clone());
    }
    let dir = static_bins(&["redirect-agent", "redirect-cni"])?;
    let current = redirect_image::images::agent(&dir)?;
    let mut newer = current
        .clone()
        .label("dev.redirect.test.build", "the next release");
    newer.name = format!("{}-next", current.name);
    let out = redirect_devtools::target_dir()?
        .join("image")
        .join("redirect-agent-test.tar");
    std::fs::create_dir_all(out.parent().expect("a parent"))?;
    redirect_image::write_archive(&[current.clone(), newer.clone()], &out)?;
    let a = (out, current.name, newer.name);
    *archive = Some(a.clone());
    Ok(a)
}
