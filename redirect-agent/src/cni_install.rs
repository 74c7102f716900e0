//! Installing the CNI plugin on a node: `redirect-agent install-cni` (and `run --cni-conf-dir`).
//!
//! The plugin binary is copied into the runtime's CNI bin directory, and an entry
//! `{"type": "redirect-cni", ...}` is appended to the plugin chain of the configuration file
//! the runtime uses: the first of the directory's `.conf`, `.conflist` and `.json` files in
//! lexical order, as libcni's `ConfFiles` sorts them and containerd / CRI-O pick them. A
//! `.conf` (or `.json`) holds a single plugin; it becomes a `.conflist` of the same stem
//! holding that plugin unchanged and ours, and the single file is removed.
//!
//! Everything else in the file is kept byte for byte: the entry is spliced into the text
//! after the last plugin, and uninstalling cuts exactly that text out again (a converted
//! `.conf` is written back from the plugin it held, which our entry names in
//! `redirect.dev/convertedFrom`). Installing twice changes nothing.
//!
//! Files are written under a temporary name libcni ignores, fsync'ed and renamed: the runtime
//! never reads half a file. A file being rewritten by the primary CNI at the same moment is
//! detected (its inode, size or mtime changed since it was read) and read again; what the
//! primary CNI writes after us drops our entry, and the running agent's watch
//! ([`watch`]) re-inserts it. A symlinked configuration file is read only if it leads to a
//! regular file; the link itself is then replaced by the new file (never written through).

use std::{
    fs,
    io::{self, Read as _, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The plugin's type, and its binary's name in the bin directory.
pub const PLUGIN_TYPE: &str = "redirect-cni";
/// The runtime capability that hands the plugin the pod's annotations.
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";
/// Key of our entry naming the single-plugin file it was converted from.
pub const CONVERTED_FROM: &str = "redirect.dev/convertedFrom";
/// The largest configuration file read.
const MAX_CONF: u64 = 1 << 20;

/// The plugin's settings, as its entry in the chain holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginSettings {
    pub agent_socket: PathBuf,
    /// `fail` or `ignore`.
    pub failure_policy: String,
    pub exclude_namespaces: Vec<String>,
    pub log_level: String,
}

impl Default for PluginSettings {
    fn default() -> Self {
        PluginSettings {
            agent_socket: crate::agent::DEFAULT_SOCKET.into(),
            failure_policy: "fail".into(),
            exclude_namespaces: crate::annotations::DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            log_level: "warn".into(),
        }
    }
}

/// Our entry's text (one line), with `converted_from` when it came from a single-plugin file.
pub fn entry_text(s: &PluginSettings, converted_from: Option<&str>) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Entry<'a> {
        #[serde(rename = "type")]
        ty: &'a str,
        #[serde(flatten)]
        settings: &'a PluginSettings,
        capabilities: std::collections::BTreeMap<&'a str, bool>,
        #[serde(
            rename = "redirect.dev/convertedFrom",
            skip_serializing_if = "Option::is_none"
        )]
        converted_from: Option<&'a str>,
    }
    serde_json::to_string(&Entry {
        ty: PLUGIN_TYPE,
        settings: s,
        capabilities: [(ANNOTATIONS_CAPABILITY, true)].into_iter().collect(),
        converted_from,
    })
    .expect("serializes")
}

/// Why installing or uninstalling failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {why}")]
    Conf { path: PathBuf, why: String },
    #[error(
        "no CNI configuration (.conf, .conflist, .json) in {0}: install the primary CNI first"
    )]
    NoConf(PathBuf),
    #[error("{0} kept changing while it was being updated; giving up for now")]
    Busy(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

fn conf_err(path: &Path, why: impl Into<String>) -> InstallError {
    InstallError::Conf {
        path: path.to_owned(),
        why: why.into(),
    }
}

/// The configuration files of `dir` in libcni's order (lexical; `.conf`, `.conflist`,
/// `.json`; directories skipped, symlinks included as libcni includes them).
pub fn conf_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let p = e.path();
        let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
        if !matches!(ext, "conf" | "conflist" | "json") {
            continue;
        }
        if e.file_type().map_err(io_err(&p))?.is_dir() {
            continue;
        }
        out.push(p);
    }
    out.sort();
    Ok(out)
}

/// What a configuration file was when read: its text and identity, to notice a rewrite.
struct Read {
    text: String,
    stamp: (u64, u64, i64, i64),
}

fn stamp(m: &fs::Metadata) -> (u64, u64, i64, i64) {
    (m.ino(), m.size(), m.mtime(), m.mtime_nsec())
}

/// Reads a configuration file: through a symlink only to a regular file (O_NONBLOCK, so a
/// FIFO cannot hang us), at most [`MAX_CONF`] bytes.
fn read_conf(path: &Path) -> Result<Read, InstallError> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err(path))?;
    let m = f.metadata().map_err(io_err(path))?;
    if !m.is_file() {
        return Err(conf_err(path, "not a regular file"));
    }
    if m.len() > MAX_CONF {
        return Err(conf_err(path, format!("larger than {MAX_CONF} bytes")));
    }
    let mut text = String::new();
    std::io::Read::take(&mut f, MAX_CONF)
        .read_to_string(&mut text)
        .map_err(io_err(path))?;
    let lm = fs::symlink_metadata(path).map_err(io_err(path))?;
    Ok(Read {
        text,
        stamp: stamp(&lm),
    })
}

/// Writes `text` to `path` atomically: a temporary file libcni ignores, fsync, rename, fsync
/// of the directory.
fn write_atomic(path: &Path, text: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.redirect-tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let r = f
        .write_all(text)
        .and_then(|()| f.set_permissions(fs::Permissions::from_mode(mode)))
        .and_then(|()| f.sync_all());
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The entries of a JSON object in their order, each as its raw text (borrowed from the input,
/// so its offset in the file is known).
struct Object<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Object<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Object<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Object<'a>, M::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Object(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl<'a> Object<'a> {
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

/// Byte offset of a borrowed slice in `text`.
fn offset(text: &str, part: &str) -> usize {
    part.as_ptr() as usize - text.as_ptr() as usize
}

fn is_ours(plugin: &RawValue) -> bool {
    serde_json::from_str::<Object>(plugin.get())
        .ok()
        .and_then(|o| o.get("type"))
        .and_then(|t| serde_json::from_str::<String>(t.get()).ok())
        .as_deref()
        == Some(PLUGIN_TYPE)
}

/// The plugins of a configuration list's text, borrowed.
fn plugins<'a>(
    path: &Path,
    text: &'a str,
) -> Result<(Object<'a>, &'a RawValue, Vec<&'a RawValue>), InstallError> {
    let obj: Object = serde_json::from_str(text)
        .map_err(|e| conf_err(path, format!("not a JSON object: {e}")))?;
    let list = obj
        .get("plugins")
        .ok_or_else(|| conf_err(path, "a .conflist without \"plugins\""))?;
    let items: Vec<&RawValue> = serde_json::from_str(list.get())
        .map_err(|e| conf_err(path, format!("\"plugins\" is not a list: {e}")))?;
    Ok((obj, list, items))
}

/// A configuration list's text with our entry last (any earlier entry of ours replaced), or
/// `None` when it already ends with exactly that entry. Pure: the golden tests drive it.
pub fn insert_into_list(
    path: &Path,
    text: &str,
    entry: &str,
) -> Result<Option<String>, InstallError> {
    let (_, _, items) = plugins(path, text)?;
    if items.iter().filter(|p| is_ours(p)).count() == 1
        && items.last().map(|p| p.get()) == Some(entry)
    {
        return Ok(None);
    }
    let base = remove_from_list(path, text)?;
    let text = base.as_deref().unwrap_or(text);
    let (_, list, items) = plugins(path, text)?;
    let at = match items.last() {
        Some(last) => offset(text, last.get()) + last.get().len(),
        // An empty list: right after its '['.
        None => offset(text, list.get()) + 1,
    };
    let sep = if items.is_empty() { "" } else { ", " };
    let mut out = String::with_capacity(text.len() + entry.len() + 2);
    out.push_str(&text[..at]);
    out.push_str(sep);
    out.push_str(entry);
    out.push_str(&text[at..]);
    Ok(Some(out))
}

/// A configuration list's text without our entries, or `None` when it has none. Each entry
/// is cut out with the separator before it (after it, for the first), so that inserting and
/// then removing gives back the same bytes.
pub fn remove_from_list(path: &Path, text: &str) -> Result<Option<String>, InstallError> {
    let (_, _, items) = plugins(path, text)?;
    if !items.iter().any(|p| is_ours(p)) {
        return Ok(None);
    }
    let mut cuts = Vec::new();
    for (i, p) in items.iter().enumerate() {
        if !is_ours(p) {
            continue;
        }
        let start = offset(text, p.get());
        let end = start + p.get().len();
        let cut = if i > 0 {
            let prev = items[i - 1];
            (offset(text, prev.get()) + prev.get().len(), end)
        } else if let Some(next) = items.get(1) {
            (start, offset(text, next.get()))
        } else {
            (start, end)
        };
        cuts.push(cut);
    }
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    for (a, b) in cuts {
        let a = a.max(pos);
        out.push_str(&text[pos..a]);
        pos = b.max(pos);
    }
    out.push_str(&text[pos..]);
    Ok(Some(out))
}

/// The list made from a single-plugin file (`.conf`, `.json`): its `cniVersion` and `name`,
/// its plugin unchanged, and our entry.
pub fn list_from_conf(path: &Path, text: &str, entry: &str) -> Result<String, InstallError> {
    let obj: Object = serde_json::from_str(text)
        .map_err(|e| conf_err(path, format!("not a JSON object: {e}")))?;
    let field = |k: &str| -> Result<&RawValue, InstallError> {
        obj.get(k)
            .ok_or_else(|| conf_err(path, format!("no {k:?} in a single-plugin configuration")))
    };
    Ok(format!(
        "{{\n  \"cniVersion\": {},\n  \"name\": {},\n  \"plugins\": [\n    {}, {entry}\n  ]\n}}\n",
        field("cniVersion")?.get(),
        field("name")?.get(),
        text.trim()
    ))
}

/// The single-plugin file our entry in a list says the list was made from.
fn converted_marker(path: &Path, text: &str) -> Option<String> {
    let (_, _, items) = plugins(path, text).ok()?;
    let ours = items.iter().find(|p| is_ours(p))?;
    serde_json::from_str::<Object>(ours.get())
        .ok()?
        .get(CONVERTED_FROM)
        .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
        .filter(|f| !f.contains('/') && !f.starts_with('.'))
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub binary: PathBuf,
    pub binary_updated: bool,
    pub conf: PathBuf,
    /// `false`: the entry was there already, nothing written.
    pub conf_updated: bool,
    /// The single-plugin file replaced by `conf`.
    pub converted_from: Option<PathBuf>,
}

/// Copies `plugin` into `bin_dir` as `redirect-cni` (only when its content differs).
pub fn install_binary(plugin: &Path, bin_dir: &Path) -> Result<(PathBuf, bool), InstallError> {
    let dest = bin_dir.join(PLUGIN_TYPE);
    let new = fs::read(plugin).map_err(io_err(plugin))?;
    if fs::symlink_metadata(&dest).is_ok_and(|m| m.is_file())
        && fs::read(&dest).is_ok_and(|old| old == new)
    {
        return Ok((dest, false));
    }
    fs::create_dir_all(bin_dir).map_err(io_err(bin_dir))?;
    write_atomic(&dest, &new, 0o755)?;
    Ok((dest, true))
}

/// Inserts the plugin into the primary configuration of `conf_dir` (see the module docs),
/// retrying while the file is being rewritten.
pub fn install_conf(
    conf_dir: &Path,
    settings: &PluginSettings,
) -> Result<(PathBuf, bool, Option<PathBuf>), InstallError> {
    let mut last_busy = None;
    for attempt in 0..20 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        let files = conf_files(conf_dir)?;
        let primary = files
            .first()
            .cloned()
            .ok_or_else(|| InstallError::NoConf(conf_dir.to_owned()))?;
        let read = match read_conf(&primary) {
            Ok(r) => r,
            // Gone between listing and reading: list again.
            Err(InstallError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue
            }
            Err(e) => return Err(e),
        };
        let is_list = primary.extension().and_then(|x| x.to_str()) == Some("conflist");
        let (target, text, converted) = if is_list {
            // A list we made from a single-plugin file keeps saying so (for uninstall).
            let from = converted_marker(&primary, &read.text);
            match insert_into_list(&primary, &read.text, &entry_text(settings, from.as_deref())) {
                Ok(Some(t)) => (primary.clone(), t, None),
                Ok(None) => return Ok((primary, false, None)),
                // Half written by the primary CNI: read again shortly.
                Err(InstallError::Conf { .. }) if attempt < 19 => {
                    last_busy = Some(primary);
                    continue;
                }
                Err(e) => return Err(e),
            }
        } else {
            let from = primary
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_owned();
            match list_from_conf(&primary, &read.text, &entry_text(settings, Some(&from))) {
                Ok(t) => (primary.with_extension("conflist"), t, Some(primary.clone())),
                Err(InstallError::Conf { .. }) if attempt < 19 => {
                    last_busy = Some(primary);
                    continue;
                }
                Err(e) => return Err(e),
            }
        };
        // Rewritten meanwhile: start over from what is there now.
        if fs::symlink_metadata(&primary).map(|m| stamp(&m)).ok() != Some(read.stamp) {
            last_busy = Some(primary);
            continue;
        }
        write_atomic(&target, text.as_bytes(), 0o644)?;
        if let Some(single) = &converted {
            fs::remove_file(single).map_err(io_err(single))?;
        }
        return Ok((target, true, converted));
    }
    Err(InstallError::Busy(
        last_busy.unwrap_or_else(|| conf_dir.to_owned()),
    ))
}

/// Installs binary and configuration.
pub fn install(
    plugin: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    settings: &PluginSettings,
) -> Result<Installed, InstallError> {
    let (binary, binary_updated) = install_binary(plugin, bin_dir)?;
    let (conf, conf_updated, converted_from) = install_conf(conf_dir, settings)?;
    Ok(Installed {
        binary,
        binary_updated,
        conf,
        conf_updated,
        converted_from,
    })
}

/// What [`uninstall`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uninstalled {
    pub binary: Option<PathBuf>,
    /// Files our entry was removed from.
    pub confs: Vec<PathBuf>,
    /// Single-plugin files written back (converted lists removed).
    pub restored: Vec<PathBuf>,
}

/// Removes our entry from every configuration file of `conf_dir` (a converted list becomes its
/// single-plugin file again) and the binary from `bin_dir`. Nothing there is success.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Uninstalled, InstallError> {
    let mut done = Uninstalled::default();
    if conf_dir.is_dir() {
        for path in conf_files(conf_dir)? {
            if path.extension().and_then(|x| x.to_str()) != Some("conflist") {
                continue;
            }
            let read = match read_conf(&path) {
                Ok(r) => r,
                Err(e) => {
                    log::warn!(
                        "uninstall: skipping {}: {}",
                        path.display(),
                        crate::error_chain(&e)
                    );
                    continue;
                }
            };
            let Ok((_, _, items)) = plugins(&path, &read.text) else {
                continue;
            };
            let Some(ours) = items.iter().find(|p| is_ours(p)) else {
                continue;
            };
            let _ = ours;
            match (converted_marker(&path, &read.text), items.len()) {
                (Some(from), 2) => {
                    let single = conf_dir.join(&from);
                    let mut text = items[0].get().to_owned();
                    text.push('\n');
                    write_atomic(&single, text.as_bytes(), 0o644)?;
                    fs::remove_file(&path).map_err(io_err(&path))?;
                    done.restored.push(single);
                }
                _ => {
                    if let Some(t) = remove_from_list(&path, &read.text)? {
                        write_atomic(&path, t.as_bytes(), 0o644)?;
                        done.confs.push(path);
                    }
                }
            }
        }
    }
    let bin = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&bin) {
        Ok(()) => done.binary = Some(bin),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&bin)(e)),
    }
    Ok(done)
}

/// The installed plugin as `uninstall` sees it: its entries in `conf_dir` and its binary in
/// `bin_dir`, removed before any pod is unenrolled so that no new sandbox is handed to an
/// agent that is going away.
#[derive(Debug, Clone)]
pub struct InstalledPlugin {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
}

impl crate::commands::Installed for InstalledPlugin {
    fn what(&self) -> String {
        format!(
            "the CNI plugin ({} in {}, its entry in {})",
            PLUGIN_TYPE,
            self.bin_dir.display(),
            self.conf_dir.display()
        )
    }

    fn remove(&self) -> Result<bool, String> {
        let u = uninstall(&self.bin_dir, &self.conf_dir).map_err(|e| crate::error_chain(&e))?;
        for c in &u.confs {
            log::info!("removed redirect-cni from {}", c.display());
        }
        for r in &u.restored {
            log::info!("restored {}", r.display());
        }
        Ok(u.binary.is_some() || !u.confs.is_empty() || !u.restored.is_empty())
    }
}

/// Keeps the plugin in `conf_dir`'s primary configuration for as long as it runs: re-inserts
/// it whenever a file there is written, moved or removed (the primary CNI rewriting its
/// configuration drops our entry). Blocks; run it on a thread of its own.
pub fn watch(conf_dir: &Path, settings: &PluginSettings) -> Result<(), InstallError> {
    use inotify::{Inotify, WatchMask};
    let mut ino = Inotify::init().map_err(io_err(conf_dir))?;
    ino.watches()
        .add(
            conf_dir,
            WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::CREATE
                | WatchMask::DELETE,
        )
        .map_err(io_err(conf_dir))?;
    let mut buf = [0u8; 4096];
    loop {
        match install_conf(conf_dir, settings) {
            Ok((path, true, _)) => log::info!("CNI: inserted redirect-cni into {}", path.display()),
            Ok(_) => {}
            Err(e) => log::warn!("CNI: {}", crate::error_chain(&e)),
        }
        // Events of our own write come back too; the next pass finds the entry and writes
        // nothing, so this settles.
        ino.read_events_blocking(&mut buf)
            .map_err(io_err(conf_dir))?;
        // Let a burst of writes (write, then rename) finish before reading.
        std::thread::sleep(Duration::from_millis(50));
        while ino
            .read_events(&mut buf)
            .is_ok_and(|mut e| e.next().is_some())
        {}
    }
}
