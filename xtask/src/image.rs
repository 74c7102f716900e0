//! `cargo xtask image`: the node agent's container image (issue 12), from static musl builds of
//! `redirect-agent` and `redirect-cni`, with no base image and no container daemon, written as
//! one archive that is both an OCI image layout and a docker archive (`redirect-image`), so
//! `ctr -n k8s.io images import FILE` and `docker load -i FILE` take it. Reproducible: the same
//! sources give the same digest. Prints the image's name, its manifest digest and the archive.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

use crate::util::{self, header};

#[derive(clap::Args)]
pub struct Args {
    /// Where to write the archive (default `<target>/image/redirect-agent.tar`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip `setup` (the musl target, bpf-linker, protoc).
    #[arg(long)]
    pub no_setup: bool,
}

/// The packages whose static binaries go into the image; `redirect-cni` once it is a workspace
/// member.
fn packages() -> Vec<&'static str> {
    let mut p = vec!["redirect-agent"];
    if util::workspace_root()
        .join("redirect-cni/Cargo.toml")
        .exists()
    {
        p.push("redirect-cni");
    }
    p
}

pub fn run(args: Args) -> Result<()> {
    if !args.no_setup {
        header("[1/3] setup");
        crate::setup::run().context("step 'setup' failed")?;
    }
    header("[2/3] static binaries");
    let dir = redirect_devtools::build_static(&packages()).context("building static binaries")?;
    header("[3/3] image");
    let out = match args.out {
        Some(p) => p,
        None => {
            let d = util::target_dir()?.join("image");
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            d.join("redirect-agent.tar")
        }
    };
    let image = redirect_image::images::agent(&dir)?;
    let written = redirect_image::write_archive(&[image], &out)?;
    let img = &written.images[0];
    println!("image   {}", img.name);
    println!("digest  {}", img.digest);
    println!("archive {}", out.display());
    Ok(())
}
