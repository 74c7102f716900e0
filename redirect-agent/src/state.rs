//! What the agent remembers about enrolled pods, outside the kernel.
//!
//! The kernel side keeps the pod's configuration in pinned maps and links, and those are the
//! source of truth (docs/DESIGN.md, "State and pins"); this store keeps what the maps cannot:
//! the name, the paths the operator gave, and which step of a change was under way. One JSON
//! file per pod under `STATE_DIR/pods/` (default `/run/redirect`, or `REDIRECT_STATE_DIR`).
//!
//! Every mutating command holds the store's lock from its first read to its last write, and
//! marks a record [`Pending`] before it touches the kernel; a command that finds a pending
//! record (its writer was killed) finishes the rollback first ([`crate::enroll::recover`]).

use std::{
    collections::BTreeMap,
    fs, io,
    io::Write as _,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    paths::{self, UnsafePath},
    spec::PodSpec,
};

/// One enrolled pod: the checked spec and what enroll derived from the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    #[serde(flatten)]
    pub spec: PodSpec,
    /// The cgroup's id (its inode), what `bpf_get_current_cgroup_id` returns.
    pub cgroup_id: u64,
    /// Inode of the network namespace, to recognise it however it is named.
    pub netns_inode: u64,
    /// Index of the pod's row in the shared counter and configuration maps.
    pub slot: u32,
    /// Whether enroll added `::6` to the pod's `lo` (and unenroll must remove it).
    #[serde(default)]
    pub added_lo6: bool,
    /// Set while a command changes this pod; a record still pending when the next command
    /// starts belongs to a command that was killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
}

/// The change a command had started on a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "op")]
pub enum Pending {
    /// A first enroll: roll back means remove everything of this record.
    Enroll,
    /// An update of an enrolled pod: roll back means write `previous` again.
    Update { previous: Box<PodRecord> },
    /// An unenroll: finishing it means remove everything of this record.
    Unenroll,
}

/// A record is its spec plus what enroll derived: reading it reads the spec.
impl std::ops::Deref for PodRecord {
    type Target = PodSpec;
    fn deref(&self) -> &PodSpec {
        &self.spec
    }
}

impl PodRecord {
    /// The name given at enroll.
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// Failures of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}")]
    Io { path: PathBuf, source: io::Error },
    /// The pod's record file exists but cannot be used; `redirect-agent gc` removes it.
    #[error("record {path} is unusable ({reason}); `redirect-agent gc` removes it")]
    BadRecord { path: PathBuf, reason: String },
    /// The state directory could be changed by someone other than root.
    #[error("state directory")]
    Unsafe(#[source] UnsafePath),
}

/// A record file that could not be used, and why; listed, never trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadRecord {
    pub path: PathBuf,
    pub reason: String,
}

/// Every record file of the store: the usable ones and the others.
#[derive(Debug, Default)]
pub struct Records {
    pub pods: Vec<PodRecord>,
    pub bad: Vec<BadRecord>,
}

/// The directory of pod records, with a lock that serialises every command that changes
/// the datapath (two `enroll`s racing for a slot, say).
///
/// The records are read once, when the lock is taken, and kept in memory while it is held:
/// every change is written to disk first, then to memory, so the two never differ. A writer
/// that comes back for the lock again (the node agent) hands in the [`Snapshot`] it left
/// with [`StateStore::release`], and the records are not read again unless another process
/// has held the lock since.
pub struct StateStore {
    dir: PathBuf,
    lock: nix::fcntl::Flock<fs::File>,
    records: BTreeMap<String, Arc<PodRecord>>,
    bad: Vec<BadRecord>,
    generation: u64,
    reloaded: bool,
}

/// The records as a writer left them when it gave the lock back, and the generation it
/// wrote (see [`StateStore::open_with`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    generation: u64,
    records: BTreeMap<String, Arc<PodRecord>>,
    bad: Vec<BadRecord>,
    /// The pods directory's modification time when the lock was given back.
    mtime: i128,
}

impl Snapshot {
    fn mtime(&self) -> i128 {
        self.mtime
    }

    /// The generation of the state directory this snapshot describes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every usable record, sorted by name.
    pub fn pods(&self) -> impl Iterator<Item = &PodRecord> {
        self.records.values().map(|r| &**r)
    }

    /// The files that are not usable records.
    pub fn bad(&self) -> &[BadRecord] {
        &self.bad
    }

    /// The record of `name`.
    pub fn get(&self, name: &str) -> Option<&PodRecord> {
        self.records.get(name).map(|r| &**r)
    }
}

/// Bytes of the generation in the lock file: a zero-padded decimal number, so that it is
/// always rewritten whole.
const GENERATION_LEN: usize = 20;

/// The generation written in the lock file at `dir/lock` (0 when there is none yet), read
/// without the lock: a reader compares it with a [`Snapshot`]'s to know whether the snapshot
/// is still what the directory holds.
pub fn generation(dir: &Path) -> Result<u64, StateError> {
    let path = dir.join("lock");
    match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => read_generation(&f).map_err(io_err(&path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn read_generation(f: &fs::File) -> io::Result<u64> {
    use std::os::unix::fs::FileExt as _;
    let mut buf = [0u8; GENERATION_LEN];
    let n = f.read_at(&mut buf, 0)?;
    // An empty lock file (one made by an older build) is generation 0; anything unreadable
    // too, which only makes the next writer read the records again.
    Ok(std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0))
}

/// Default state directory; `REDIRECT_STATE_DIR` overrides it.
pub const DEFAULT_STATE_DIR: &str = "/run/redirect";

/// The state directory in use: `REDIRECT_STATE_DIR`, else [`DEFAULT_STATE_DIR`].
pub fn state_dir() -> PathBuf {
    std::env::var_os("REDIRECT_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

impl StateStore {
    /// Opens the store, creating it if needed, takes its exclusive lock (blocking) and reads
    /// the records. The directory and every one above it must be root's alone
    /// ([`paths::check_trusted_dir`]).
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        Self::open_with(dir, None)
    }

    /// [`StateStore::open`] for a writer that held the lock before and kept what it left
    /// ([`StateStore::release`]): the records are read again only if another writer has held
    /// the lock since.
    ///
    /// Every writer, whatever its build, takes the lock; each one of this build also writes a
    /// new generation in the lock file as soon as it has the lock, before it changes anything
    /// (not synced: a crash that loses it restarts every writer anyway). A snapshot whose
    /// generation is still the one in the file was the last to hold the lock. The directory's
    /// modification time is compared too, for a writer that does not count generations.
    pub fn open_with(dir: &Path, snapshot: Option<Snapshot>) -> Result<Self, StateError> {
        paths::ensure_trusted_dir(dir).map_err(StateError::Unsafe)?;
        let pods = dir.join("pods");
        paths::ensure_trusted_dir(&pods).map_err(StateError::Unsafe)?;
        let lock_path = dir.join("lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, e)| StateError::Io {
                path: lock_path.clone(),
                source: e.into(),
            },
        )?;
        let found = read_generation(&lock).map_err(io_err(&lock_path))?;
        let generation = found.wrapping_add(1);
        {
            use std::os::unix::fs::FileExt as _;
            let text = format!("{generation:0width$}", width = GENERATION_LEN);
            lock.write_all_at(text.as_bytes(), 0)
                .map_err(io_err(&lock_path))?;
        }
        let fresh = snapshot.filter(|s| s.generation == found && found != 0);
        let (records, bad, reloaded) = match fresh {
            Some(s) if pods_mtime(dir) == s.mtime() => (s.records, s.bad, false),
            _ => {
                let all = list_records(dir)?;
                let records = all
                    .pods
                    .into_iter()
                    .map(|r| (r.name().to_owned(), Arc::new(r)))
                    .collect();
                (records, all.bad, true)
            }
        };
        Ok(StateStore {
            dir: dir.to_owned(),
            lock,
            records,
            bad,
            generation,
            reloaded,
        })
    }

    /// Gives the lock back, keeping the records for the next [`StateStore::open_with`].
    pub fn release(self) -> Snapshot {
        drop(self.lock);
        Snapshot {
            generation: self.generation,
            records: self.records,
            bad: self.bad,
            mtime: pods_mtime(&self.dir),
        }
    }

    /// Whether the records were read from disk when the lock was taken (another process held
    /// it since the snapshot, or there was none): whatever the caller kept from its last turn
    /// besides the records (open datapath handles) may be stale too.
    pub fn reloaded(&self) -> bool {
        self.reloaded
    }

    /// The generation this holder wrote.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn path(&self, name: &str) -> PathBuf {
        record_path(&self.dir, name)
    }

    /// The record of `name`. A file that is not a usable record is an error naming it: no
    /// command acts on a name whose state it cannot read (other names are not affected).
    pub fn get(&self, name: &str) -> Result<Option<PodRecord>, StateError> {
        if let Some(r) = self.records.get(name) {
            return Ok(Some((**r).clone()));
        }
        let path = self.path(name);
        match self.bad.iter().find(|b| b.path == path) {
            Some(b) => Err(StateError::BadRecord {
                path,
                reason: b.reason.clone(),
            }),
            None => Ok(None),
        }
    }

    /// Every usable record, sorted by name, without copying them.
    pub fn pods(&self) -> impl Iterator<Item = &PodRecord> {
        self.records.values().map(|r| &**r)
    }

    /// The files that are not usable records.
    pub fn bad(&self) -> &[BadRecord] {
        &self.bad
    }

    /// Whether the store holds no record at all, usable or not.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.bad.is_empty()
    }

    /// Every record, sorted by name, and the files that are not usable records.
    pub fn records(&self) -> Result<Records, StateError> {
        Ok(Records {
            pods: self.pods().cloned().collect(),
            bad: self.bad.clone(),
        })
    }

    /// Every usable record, sorted by name.
    pub fn list(&self) -> Result<Vec<PodRecord>, StateError> {
        Ok(self.pods().cloned().collect())
    }

    /// Writes the record atomically and durably (a temporary file never followed through a
    /// symlink, fsync, rename, fsync of the directory): a crash leaves the old or the new one.
    /// For the intent of a change, written before the kernel is touched.
    pub fn put(&mut self, rec: &PodRecord) -> Result<(), StateError> {
        self.write(rec, true)
    }

    /// Writes the record atomically (temporary file, rename) without waiting for the disk:
    /// for the end of a change whose intent [`StateStore::put`] made durable. A process killed
    /// after it leaves the new record (the page cache has it); only a crash of the machine
    /// can lose it, and then the record that stays is the durable intent, which the next
    /// command rolls back. The kernel's side (bpffs) does not survive that crash either.
    pub fn put_done(&mut self, rec: &PodRecord) -> Result<(), StateError> {
        self.write(rec, false)
    }

    fn write(&mut self, rec: &PodRecord, durable: bool) -> Result<(), StateError> {
        let path = self.path(rec.name());
        let tmp = self
            .dir
            .join("pods")
            .join(format!(".{}.json.tmp", rec.name()));
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&tmp)(e)),
        }
        let data = serde_json::to_vec_pretty(rec).expect("PodRecord serializes");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(&data).map_err(io_err(&tmp))?;
        if durable {
            f.sync_all().map_err(io_err(&tmp))?;
        }
        drop(f);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        if durable {
            self.sync_dir()?;
        }
        self.bad.retain(|b| b.path != path);
        self.records
            .insert(rec.name().to_owned(), Arc::new(rec.clone()));
        Ok(())
    }

    /// Removes the record of `name`, whatever its content. Not synced: a record that comes
    /// back after a crash is the durable intent of the change that removed it, which the
    /// next command completes.
    pub fn remove(&mut self, name: &str) -> Result<(), StateError> {
        let path = self.path(name);
        remove_file(&path)?;
        self.records.remove(name);
        self.bad.retain(|b| b.path != path);
        Ok(())
    }

    /// Removes a record file that is not a usable record (see [`Records::bad`]).
    pub fn remove_bad(&mut self, bad: &BadRecord) -> Result<(), StateError> {
        // Only files directly in our pods directory: a BadRecord comes from our own listing.
        if bad.path.parent() != Some(&self.dir.join("pods")) {
            return Ok(());
        }
        remove_file(&bad.path)?;
        self.bad.retain(|b| b.path != bad.path);
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), StateError> {
        let pods = self.dir.join("pods");
        fs::File::open(&pods)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&pods))
    }
}

/// The modification time of the pods directory (changed by every record created, renamed or
/// removed), in nanoseconds; 0 when it cannot be read.
fn pods_mtime(dir: &Path) -> i128 {
    fs::symlink_metadata(dir.join("pods"))
        .map(|m| i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()))
        .unwrap_or(0)
}

fn remove_file(path: &Path) -> Result<(), StateError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StateError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn record_path(dir: &Path, name: &str) -> PathBuf {
    dir.join("pods").join(format!("{name}.json"))
}

/// Reads one record: a regular file (never through a symlink), root's, not writable by others,
/// holding a record whose name matches the file's.
fn read_record(path: &Path) -> Result<Option<PodRecord>, String> {
    let f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err("a symlink, not a record".into())
        }
        Err(e) => return Err(e.to_string()),
    };
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.uid() != 0 {
        return Err(format!(
            "owned by uid {}, not root: not written by redirect",
            meta.uid()
        ));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err("writable by group or others: not trusted".into());
    }
    let data = io::read_to_string(f).map_err(|e| e.to_string())?;
    if data.trim().is_empty() {
        return Err("empty record".into());
    }
    let rec: PodRecord = serde_json::from_str(&data).map_err(|e| format!("corrupt record: {e}"))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if rec.name() != stem {
        return Err(format!(
            "record of {:?} in the file of {stem:?}",
            rec.name()
        ));
    }
    Ok(Some(rec))
}

/// Reads every pod record under `dir` without taking the lock (for read-only commands).
/// Files that are not usable records are returned apart, with the reason: one bad file never
/// hides the others, nor blocks a command.
pub fn list_records(dir: &Path) -> Result<Records, StateError> {
    let pods = dir.join("pods");
    let entries = match fs::read_dir(&pods) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Records::default()),
        Err(source) => return Err(StateError::Io { path: pods, source }),
    };
    let mut out = Records::default();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || path.extension().is_none_or(|e| e != "json") {
            continue; // Temporary files of a write in progress, or not ours.
        }
        match read_record(&path) {
            Ok(Some(rec)) => out.pods.push(rec),
            Ok(None) => {}
            Err(reason) => out.bad.push(BadRecord { path, reason }),
        }
    }
    out.pods.sort_by(|a, b| a.name().cmp(b.name()));
    out.bad.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}
