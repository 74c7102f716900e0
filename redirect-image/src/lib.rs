//! Container images made from static binaries alone: no base image, no container daemon, no
//! registry (none is reachable where redirect is built and tested).
//!
//! [`write_archive`] writes one tar file that is at once
//! - an **OCI image layout** (`oci-layout`, `index.json`, `blobs/sha256/...`), which
//!   `ctr images import` (containerd), `skopeo copy oci-archive:...` and `docker load` (25+) read,
//! - and a **docker archive** (`manifest.json` with `RepoTags`, naming the same blobs), which
//!   every `docker load` reads,
//!
//! as `docker save` itself writes since Docker 25. Each image has one uncompressed layer holding
//! the given files (and their parent directories), owned by root.
//!
//! **Reproducible:** the same inputs give the same bytes, so the same digests: entries are
//! sorted by path, every mtime is 0 (the epoch), owners are 0:0 with no user or group names,
//! JSON is written with sorted keys and no whitespace, the configuration's `created` is the
//! epoch, and nothing of the machine (time, host name, user) goes in.
//!
//! ```no_run
//! use redirect_image::{write_archive, Entry, Image};
//!
//! let image = Image::new("redirect.dev/redirect-agent:0.1.0")
//!     .file(Entry::file_from("usr/local/bin/redirect-agent", "target/redirect-agent", 0o755)?)
//!     .entrypoint(["/usr/local/bin/redirect-agent"]);
//! let written = write_archive(&[image], "image.tar".as_ref())?;
//! println!("{}", written.images[0].digest);
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```

pub mod images;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder, Sha256Digest,
};
use sha2::{Digest as _, Sha256};

/// Why an archive could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {image}: {what}")]
    Invalid { image: String, what: String },
    #[error("building the OCI {what}")]
    Spec {
        what: &'static str,
        #[source]
        source: oci_spec::OciSpecError,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// One entry of an image's layer. Paths are relative to the root (`usr/local/bin/x`); parent
/// directories are added as needed (mode 0755).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Dir {
        path: String,
        mode: u32,
    },
}

impl Entry {
    /// A file with the contents of `source` on this machine (only the contents are taken: not its
    /// owner, mode or time).
    pub fn file_from(path: &str, source: impl AsRef<Path>, mode: u32) -> Result<Entry> {
        let source = source.as_ref();
        let data = fs::read(source).map_err(|e| Error::Read {
            path: source.to_owned(),
            source: e,
        })?;
        Ok(Entry::File {
            path: path.to_owned(),
            mode,
            data,
        })
    }

    fn path(&self) -> &str {
        match self {
            Entry::File { path, .. } | Entry::Dir { path, .. } => path,
        }
    }
}

/// An image: a name, one layer of entries, and how to run it.
#[derive(Debug, Clone, Default)]
pub struct Image {
    /// A full reference, `host/path:tag` (`redirect.dev/redirect-agent:0.1.0`).
    pub name: String,
    pub entries: Vec<Entry>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// `uid[:gid]` the process runs as unless the runtime is told otherwise.
    pub user: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl Image {
    pub fn new(name: impl Into<String>) -> Image {
        Image {
            name: name.into(),
            ..Image::default()
        }
    }

    pub fn file(mut self, entry: Entry) -> Image {
        self.entries.push(entry);
        self
    }

    pub fn entrypoint<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Image {
        self.entrypoint = args.into_iter().map(Into::into).collect();
        self
    }

    pub fn cmd<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Image {
        self.cmd = args.into_iter().map(Into::into).collect();
        self
    }

    pub fn env(mut self, var: impl Into<String>) -> Image {
        self.env.push(var.into());
        self
    }

    pub fn user(mut self, user: impl Into<String>) -> Image {
        self.user = Some(user.into());
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Image {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// The tag part of the name (`0.1.0`), `latest` when there is none.
    fn tag(&self) -> &str {
        let last = self.name.rsplit('/').next().unwrap_or(&self.name);
        last.split_once(':').map_or("latest", |(_, t)| t)
    }

    fn invalid(&self, what: impl Into<String>) -> Error {
        Error::Invalid {
            image: self.name.clone(),
            what: what.into(),
        }
    }
}

/// What [`write_archive`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub images: Vec<WrittenImage>,
    /// `sha256:...` of the archive file itself.
    pub archive_digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenImage {
    pub name: String,
    /// The manifest's digest, `sha256:...`: the image's identity (`ctr images ls`, a kubelet's
    /// `imageID`, `image@sha256:...` references).
    pub digest: String,
    /// The configuration's digest (docker's image id).
    pub config_digest: String,
    pub layer_digest: String,
}

/// A content-addressed blob.
struct Blob {
    digest_hex: String,
    data: Vec<u8>,
}

impl Blob {
    fn new(data: Vec<u8>) -> Blob {
        let digest_hex = hex(&Sha256::digest(&data));
        Blob { digest_hex, data }
    }

    fn digest(&self) -> String {
        format!("sha256:{}", self.digest_hex)
    }

    fn path(&self) -> String {
        format!("blobs/sha256/{}", self.digest_hex)
    }

    fn descriptor(&self, media_type: MediaType) -> Result<Descriptor> {
        let digest: Sha256Digest = self.digest_hex.parse().map_err(|source| Error::Spec {
            what: "digest",
            source,
        })?;
        Ok(Descriptor::new(media_type, self.data.len() as u64, digest))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `images` into one archive at `out` (atomically: a temporary file renamed over it).
/// Blobs that two images share (the same layer) are stored once.
pub fn write_archive(images: &[Image], out: &Path) -> Result<Written> {
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut index_manifests = Vec::new();
    let mut docker_manifest = Vec::new();
    let mut written = Vec::new();
    let mut names = BTreeSet::new();
    for image in images {
        if !names.insert(image.name.as_str()) {
            return Err(image.invalid("named twice in one archive"));
        }
        let layer = Blob::new(layer_tar(image)?);
        let config = Blob::new(canonical_json(&config_json(image, &layer)?)?);
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(config.descriptor(MediaType::ImageConfig)?)
            .layers(vec![layer.descriptor(MediaType::ImageLayer)?])
            .build()
            .map_err(|source| Error::Spec {
                what: "manifest",
                source,
            })?;
        let manifest = Blob::new(canonical_json(&manifest)?);

        let mut desc = manifest.descriptor(MediaType::ImageManifest)?;
        desc.set_platform(Some(
            PlatformBuilder::default()
                .architecture(Arch::Amd64)
                .os(Os::Linux)
                .build()
                .map_err(|source| Error::Spec {
                    what: "platform",
                    source,
                })?,
        ));
        // The names as `docker save` (25+) writes them: containerd's full name, and the OCI
        // layout's own ref name (the tag).
        desc.set_annotations(Some(HashMap::from([
            ("io.containerd.image.name".to_owned(), image.name.clone()),
            (
                "org.opencontainers.image.ref.name".to_owned(),
                image.tag().to_owned(),
            ),
        ])));
        index_manifests.push(desc);
        docker_manifest.push(serde_json::json!({
            "Config": config.path(),
            "RepoTags": [image.name],
            "Layers": [layer.path()],
        }));
        written.push(WrittenImage {
            name: image.name.clone(),
            digest: manifest.digest(),
            config_digest: config.digest(),
            layer_digest: layer.digest(),
        });
        for b in [layer, config, manifest] {
            blobs.insert(b.path(), b.data);
        }
    }
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(index_manifests)
        .build()
        .map_err(|source| Error::Spec {
            what: "index",
            source,
        })?;

    let mut files: BTreeMap<String, Vec<u8>> = blobs;
    files.insert("index.json".into(), canonical_json(&index)?);
    files.insert(
        "manifest.json".into(),
        canonical_json(&serde_json::Value::Array(docker_manifest))?,
    );
    files.insert(
        "oci-layout".into(),
        canonical_json(&serde_json::json!({"imageLayoutVersion": "1.0.0"}))?,
    );
    let mut entries: Vec<Entry> = files
        .into_iter()
        .map(|(path, data)| Entry::File {
            path,
            mode: 0o644,
            data,
        })
        .collect();
    entries.push(Entry::Dir {
        path: "blobs/sha256".into(),
        mode: 0o755,
    });
    let archive = tar_of(&mut entries).map_err(|e| Error::Write {
        path: out.to_owned(),
        source: e,
    })?;
    let archive_digest = format!("sha256:{}", hex(&Sha256::digest(&archive)));
    write_atomically(out, &archive)?;
    Ok(Written {
        images: written,
        archive_digest,
    })
}

/// The image names an archive written by [`write_archive`] (or any OCI layout archive whose
/// index names its images as containerd does) holds, from its `index.json`.
pub fn names_in(archive: &Path) -> Result<Vec<String>> {
    let read_err = |source| Error::Read {
        path: archive.to_owned(),
        source,
    };
    let f = fs::File::open(archive).map_err(read_err)?;
    let mut a = tar::Archive::new(f);
    for e in a.entries().map_err(read_err)? {
        let mut e = e.map_err(read_err)?;
        if e.path().map_err(read_err)?.as_os_str() != "index.json" {
            continue;
        }
        let index: serde_json::Value =
            serde_json::from_reader(&mut e).map_err(|e| read_err(e.into()))?;
        return Ok(index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["annotations"]["io.containerd.image.name"].as_str())
            .map(str::to_owned)
            .collect());
    }
    Err(read_err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no index.json in the archive",
    )))
}

fn write_atomically(out: &Path, data: &[u8]) -> Result<()> {
    let err = |source| Error::Write {
        path: out.to_owned(),
        source,
    };
    // Unique per process *and* per call: two threads of one test process writing the same
    // archive shared a pid-only name, and the second rename found the first had taken it.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp_name = out.file_name().unwrap_or_default().to_owned();
    tmp_name.push(format!(".tmp-{}-{seq}", std::process::id()));
    let tmp = out.with_file_name(tmp_name);
    let mut f = fs::File::create(&tmp).map_err(err)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(err)?;
    fs::rename(&tmp, out).map_err(err)
}

fn config_json(image: &Image, layer: &Blob) -> Result<oci_spec::image::ImageConfiguration> {
    let spec_err = |what| move |source| Error::Spec { what, source };
    let mut config = ConfigBuilder::default();
    if !image.entrypoint.is_empty() {
        config = config.entrypoint(image.entrypoint.clone());
    }
    if !image.cmd.is_empty() {
        config = config.cmd(image.cmd.clone());
    }
    if !image.env.is_empty() {
        config = config.env(image.env.clone());
    }
    if let Some(u) = &image.user {
        config = config.user(u.clone());
    }
    if !image.labels.is_empty() {
        config = config.labels(image.labels.clone().into_iter().collect::<HashMap<_, _>>());
    }
    let config = config.build().map_err(spec_err("image config"))?;
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(vec![layer.digest()])
        .build()
        .map_err(spec_err("rootfs"))?;
    ImageConfigurationBuilder::default()
        .created("1970-01-01T00:00:00Z")
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(config)
        .rootfs(rootfs)
        .build()
        .map_err(spec_err("image configuration"))
}

/// JSON with keys sorted at every level and no whitespace, whatever order the types (or
/// serde_json's `preserve_order`, if some crate enables it) would give.
fn canonical_json(value: &impl serde::Serialize) -> Result<Vec<u8>> {
    fn sort(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let sorted: BTreeMap<String, serde_json::Value> =
                    m.into_iter().map(|(k, v)| (k, sort(v))).collect();
                serde_json::Value::Object(sorted.into_iter().collect())
            }
            serde_json::Value::Array(a) => {
                serde_json::Value::Array(a.into_iter().map(sort).collect())
            }
            other => other,
        }
    }
    let v = serde_json::to_value(value).map_err(|e| Error::Write {
        path: PathBuf::from("<json>"),
        source: e.into(),
    })?;
    serde_json::to_vec(&sort(v)).map_err(|e| Error::Write {
        path: PathBuf::from("<json>"),
        source: e.into(),
    })
}

/// The image's single layer.
fn layer_tar(image: &Image) -> Result<Vec<u8>> {
    let mut entries = image.entries.clone();
    for e in &entries {
        let p = e.path();
        if p.is_empty()
            || p.starts_with('/')
            || p.ends_with('/')
            || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(image.invalid(format!(
                "entry path {p:?} must be relative, without `.`, `..` or empty components"
            )));
        }
    }
    let mut seen = BTreeSet::new();
    for e in &entries {
        if !seen.insert(e.path().to_owned()) {
            return Err(image.invalid(format!("{} given twice", e.path())));
        }
    }
    tar_of(&mut entries).map_err(|e| image.invalid(format!("building its layer: {e}")))
}

/// A tar of `entries` plus every missing parent directory, sorted by path, owned by 0:0, mtime
/// 0, no user or group names: the same entries give the same bytes.
fn tar_of(entries: &mut Vec<Entry>) -> io::Result<Vec<u8>> {
    let have: BTreeSet<String> = entries.iter().map(|e| e.path().to_owned()).collect();
    let mut parents = BTreeSet::new();
    for e in entries.iter() {
        let mut p = e.path();
        while let Some((parent, _)) = p.rsplit_once('/') {
            if !have.contains(parent) {
                parents.insert(parent.to_owned());
            }
            p = parent;
        }
    }
    entries.extend(
        parents
            .into_iter()
            .map(|path| Entry::Dir { path, mode: 0o755 }),
    );
    entries.sort_by(|a, b| a.path().cmp(b.path()));

    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    for e in entries.iter() {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match e {
            Entry::File { path, mode, data } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Dir { path, mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, format!("{path}/"), io::empty())?;
            }
        }
    }
    b.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> Image {
        Image::new(name)
            .file(Entry::File {
                path: "usr/local/bin/hello".into(),
                mode: 0o755,
                data: b"#!not really\n".to_vec(),
            })
            .file(Entry::Dir {
                path: "tmp".into(),
                mode: 0o1777,
            })
            .entrypoint(["/usr/local/bin/hello"])
            .user("65534")
            .label("b", "2")
            .label("a", "1")
    }

    fn entries_of(tar_bytes: &[u8]) -> Vec<(String, u32, u64, u64)> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    h.mtime().unwrap(),
                    h.uid().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn same_inputs_same_bytes_and_digests() {
        let dir = std::env::temp_dir().join(format!("redirect-image-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.tar"), dir.join("b.tar"));
        let wa = write_archive(&[sample("x.test/hello:1")], &a).unwrap();
        let wb = write_archive(&[sample("x.test/hello:1")], &b).unwrap();
        assert_eq!(wa, wb);
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        // Another input, another digest.
        let wc = write_archive(&[sample("x.test/hello:1").env("A=1")], &b).unwrap();
        assert_ne!(wa.images[0].digest, wc.images[0].digest);
        assert_eq!(wa.images[0].layer_digest, wc.images[0].layer_digest);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn archive_is_an_oci_layout_and_a_docker_archive() {
        let dir =
            std::env::temp_dir().join(format!("redirect-image-layout-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("x.tar");
        let w = write_archive(
            &[sample("x.test/hello:1"), sample("x.test/other").env("X=1")],
            &out,
        )
        .unwrap();
        let bytes = fs::read(&out).unwrap();
        let mut files = BTreeMap::new();
        let mut a = tar::Archive::new(bytes.as_slice());
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            io::Read::read_to_end(&mut e, &mut data).unwrap();
            files.insert(p, data);
        }
        // Every blob is named by its digest; the shared layer is stored once.
        let blobs: Vec<_> = files
            .keys()
            .filter(|k| k.starts_with("blobs/sha256/") && k.len() > 13)
            .collect();
        for b in &blobs {
            assert_eq!(b[13..], hex(&Sha256::digest(&files[*b])));
        }
        assert_eq!(
            blobs.len(),
            5,
            "one layer, two configs, two manifests: {blobs:?}"
        );
        let layout: serde_json::Value = serde_json::from_slice(&files["oci-layout"]).unwrap();
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(m["digest"], w.images[0].digest.as_str());
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "x.test/hello:1"
        );
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "1");
        assert_eq!(
            index["manifests"][1]["annotations"]["org.opencontainers.image.ref.name"],
            "latest"
        );
        assert_eq!(m["platform"]["architecture"], "amd64");
        assert_eq!(names_in(&out).unwrap(), ["x.test/hello:1", "x.test/other"]);
        let docker: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        assert_eq!(docker[0]["RepoTags"][0], "x.test/hello:1");
        let config_path = docker[0]["Config"].as_str().unwrap();
        let config: serde_json::Value = serde_json::from_slice(&files[config_path]).unwrap();
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/hello");
        assert_eq!(config["config"]["User"], "65534");
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            w.images[0].layer_digest.as_str()
        );
        // The layer: parents first, sorted, root-owned, epoch times, modes kept.
        let layer = &files[docker[0]["Layers"][0].as_str().unwrap()];
        let got = entries_of(layer);
        let names: Vec<_> = got.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "tmp/",
                "usr/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/hello"
            ]
        );
        assert!(got.iter().all(|e| e.2 == 0 && e.3 == 0));
        assert_eq!(got[0].1, 0o1777);
        assert_eq!(got[4].1, 0o755);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_paths_and_duplicates_are_refused() {
        let out = std::env::temp_dir().join("redirect-image-never-written.tar");
        for bad in ["/abs", "a/../b", "a//b", "a/", ""] {
            let img = Image::new("x.test/bad").file(Entry::Dir {
                path: bad.into(),
                mode: 0o755,
            });
            assert!(
                matches!(write_archive(&[img], &out), Err(Error::Invalid { .. })),
                "{bad:?}"
            );
        }
        let dup = sample("x.test/d").file(Entry::Dir {
            path: "tmp".into(),
            mode: 0o755,
        });
        assert!(write_archive(&[dup], &out).is_err());
        assert!(write_archive(&[sample("x.test/s"), sample("x.test/s")], &out).is_err());
        assert!(!out.exists());
    }
}
