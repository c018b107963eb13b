//! The state of one ticket name in a directory that several certwire replicas share (a
//! volume mounted by each): the keys in the format the files and Kubernetes sources
//! read, written as the kubelet updates a mounted Secret, so the directory is itself a
//! secret directory an operator can copy or point the files source at:
//!
//! ```text
//! STATE/.lock                                 flock(2): shared to read, exclusive to write
//! STATE/..data -> ..v<ms>_<hex>                swapped in one rename
//! STATE/tls.session-ticket-keys -> ..data/…   raw 80-byte keys, the first encrypts
//! STATE/tls.session-ticket-keys.meta.json     times only (no key bytes)
//! ```
//!
//! Both files live in one payload directory behind `..data`, so a crash between two
//! writes can never pair new keys with old times. Writers decide under the exclusive
//! lock from what they read under it, so two replicas racing for a rotation write once.
//!
//! **The directory is not trusted further than its root.** Whoever can write in it (any
//! process of the replicas' user, a pod mounting the volume) could otherwise make
//! certwire read another file as keys or create one elsewhere. So `..data` must name one
//! `..v…` entry of the root (no `/`, not absolute), the payload directory is opened
//! without following a link and the two files are opened through that open directory
//! (`/proc/self/fd/N/NAME`) without following a link, and must be regular files within
//! the size bound; `.lock` is opened without following a link. A link in any of these
//! places is refused as a corrupt state, before anything is read through it.
//!
//! **A held lock does not block a follower.** The lock is tried without blocking until
//! [`LOCK_WAIT`] has passed, then the read fails as `lock_held` and is retried at the
//! next re-read, so one hung replica (or a process that took the lock by hand) cannot
//! stall the others' startup or re-reads.

use std::fs::{self, File};
use std::io::{ErrorKind, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use serde::{Deserialize, Serialize};

use super::schedule::{KEY_LEN, Key, Plan, State, Step};
use crate::pki::KeyBytes;
use crate::sources::files::{Capped, read_capped};

/// The keys file, in the format the files and Kubernetes sources read.
pub const KEYS_FILE: &str = crate::sources::secret_keys::SESSION_TICKET_KEYS;
/// Rotation times beside it.
pub const META_FILE: &str = "tls.session-ticket-keys.meta.json";
const LOCK_FILE: &str = ".lock";
const DATA: &str = "..data";
const PAYLOAD_PREFIX: &str = "..v";
const FORMAT: &str = "certwire-tickets/v1";

/// Most keys a state may hold: `keep` (at most 16) + active + pending, with room for a
/// state written under a larger `keep` by another version. Bounds what a file in the
/// shared directory can make certwire read.
pub const MAX_KEYS: usize = 64;
/// Most bytes of metadata read.
pub const MAX_META_BYTES: u64 = 16 * 1024;
/// How long a read or an update tries to take the state's lock before it gives up with
/// a `lock_held` error (retried at the next re-read). A write takes milliseconds; a lock
/// held longer is a hung or foreign holder.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);
/// Pause between two tries of the lock.
const LOCK_RETRY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("ticket state {path}: {op}: {source}")]
    Io { path: String, op: &'static str, source: std::io::Error },
    #[error("ticket state {path}: {op}: {source}")]
    Kube { path: String, op: &'static str, source: kube::Error },
    #[error("ticket state {path}: other replicas kept writing it at the same time; retried at the next re-read")]
    Conflict { path: String },
    #[error(
        "ticket state {path}: {reason}; left as it is (the last good keys stay served): repair it, or move the \
         directory away and certwire makes new keys"
    )]
    Corrupt { path: String, reason: String },
    #[error("ticket state {path}: over {max} bytes (limit: {what}); left as it is, the last good keys stay served")]
    TooLarge { path: String, max: u64, what: &'static str },
    #[error(
        "ticket state {path}: the lock is held by another process for over {waited:?}; retried at the next re-read \
         (the last good keys stay served)"
    )]
    LockHeld { path: String, waited: Duration },
}

impl StateError {
    /// A fixed code for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            StateError::Io { .. } => "io",
            StateError::Kube { .. } => "kubernetes",
            StateError::Conflict { .. } => "conflict",
            StateError::Corrupt { .. } => "corrupt",
            StateError::TooLarge { .. } => "too_large",
            StateError::LockHeld { .. } => "lock_held",
        }
    }
}

/// What an update did.
#[derive(Debug)]
pub struct Updated {
    pub state: State,
    /// `None`: another replica had already written what was needed.
    pub step: Option<Step>,
}

#[derive(Debug, Clone)]
pub struct DirState {
    root: PathBuf,
    name: String,
    /// [`LOCK_WAIT`]; shorter in tests.
    lock_wait: Duration,
}

impl DirState {
    pub fn new(root: PathBuf, name: &str) -> Self {
        Self { root, name: name.to_owned(), lock_wait: LOCK_WAIT }
    }

    #[cfg(test)]
    pub(super) fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io(&self, path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StateError {
        let path = path.display().to_string();
        move |source| StateError::Io { path, op, source }
    }

    fn corrupt(&self, path: &Path, reason: impl Into<String>) -> StateError {
        StateError::Corrupt { path: path.display().to_string(), reason: reason.into() }
    }

    /// The current state, `None` when none was written yet. Blocking.
    pub fn read(&self) -> Result<Option<State>, StateError> {
        let _lock = self.lock(false)?;
        self.read_locked()
    }

    /// Reads under the exclusive lock, asks `plan` what to do, and writes it. Blocking.
    pub fn update(&self, plan: impl FnOnce(Option<&State>) -> Plan) -> Result<Updated, StateError> {
        let _lock = self.lock(true)?;
        let current = self.read_locked()?;
        match (plan(current.as_ref()), current) {
            (Plan::Write(state, step), _) => {
                self.write_locked(&state)?;
                Ok(Updated { state, step: Some(step) })
            }
            (Plan::Wait { .. }, Some(state)) => Ok(Updated { state, step: None }),
            (Plan::Wait { .. }, None) => Err(self.corrupt(&self.root, "no state and nothing planned")),
        }
    }

    fn lock(&self, exclusive: bool) -> Result<File, StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(self.io(&self.root, "creating the directory"))?;
        let path = self.root.join(LOCK_FILE);
        // O_NOFOLLOW: a `.lock` link would make certwire create or open its target
        // read-write, wherever it is.
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
            .map_err(|e| self.open_error(&path, "opening the lock file", e))?;
        let meta = file.metadata().map_err(self.io(&path, "opening the lock file"))?;
        if !meta.file_type().is_file() {
            return Err(self.corrupt(&path, "is not a regular file"));
        }
        // flock(2) on Unix: released when `file` is closed. Tried without blocking until
        // `lock_wait`, so a holder that never lets go cannot stall this follower.
        let deadline = Instant::now() + self.lock_wait;
        loop {
            let tried = if exclusive { file.try_lock() } else { file.try_lock_shared() };
            match tried {
                Ok(()) => return Ok(file),
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => std::thread::sleep(LOCK_RETRY),
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(StateError::LockHeld { path: path.display().to_string(), waited: self.lock_wait });
                }
                Err(fs::TryLockError::Error(e)) => return Err(self.io(&path, "locking")(e)),
            }
        }
    }

    /// An open(2) error; a link where certwire follows none is a corrupt state.
    fn open_error(&self, path: &Path, op: &'static str, e: std::io::Error) -> StateError {
        if e.raw_os_error() == Some(libc::ELOOP) {
            return self.corrupt(path, "is a symbolic link: certwire follows no link inside the state directory");
        }
        self.io(path, op)(e)
    }

    fn read_locked(&self) -> Result<Option<State>, StateError> {
        let data = self.root.join(DATA);
        let target = match fs::read_link(&data) {
            Ok(target) => target,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let keys = self.root.join(KEYS_FILE);
                if fs::symlink_metadata(&keys).is_ok() {
                    return Err(self.corrupt(
                        &keys,
                        format!("has {KEYS_FILE} but no {DATA} with rotation metadata: not written by certwire's tickets source"),
                    ));
                }
                return Ok(None);
            }
            Err(e) => return Err(self.io(&data, "reading the link")(e)),
        };
        // One entry of the root: an absolute target would replace the root when joined,
        // `../x` or `a/b` would lead out of it or through other links.
        let name = target.as_os_str().as_bytes();
        if name.contains(&b'/') || !name.starts_with(PAYLOAD_PREFIX.as_bytes()) {
            return Err(self.corrupt(
                &data,
                format!(
                    "points to {:?}: expected a payload directory {PAYLOAD_PREFIX}… of the state directory itself",
                    target.display()
                ),
            ));
        }
        let dir_path = self.root.join(&target);
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&dir_path)
            .map_err(|e| match e.raw_os_error() {
                // O_DIRECTORY wins over O_NOFOLLOW: a link is "not a directory".
                Some(libc::ENOTDIR) if fs::symlink_metadata(&dir_path).is_ok_and(|m| m.is_symlink()) => {
                    self.open_error(&dir_path, "", std::io::Error::from_raw_os_error(libc::ELOOP))
                }
                Some(libc::ENOTDIR) => self.corrupt(&dir_path, "is not a directory"),
                _ => self.open_error(&dir_path, "opening the payload directory", e),
            })?;
        let keys_path = dir_path.join(KEYS_FILE);
        let meta_path = dir_path.join(META_FILE);
        let max_keys = (MAX_KEYS * KEY_LEN) as u64;
        let keys = self.read_in(&dir, &dir_path, KEYS_FILE, max_keys, "ticket state keys")?;
        let meta = self.read_in(&dir, &dir_path, META_FILE, MAX_META_BYTES, "ticket state metadata")?;
        match parse(&self.name, &keys, &meta) {
            Ok(state) => Ok(Some(state)),
            Err(Bad::Keys(reason)) => Err(self.corrupt(&keys_path, reason)),
            Err(Bad::Meta(reason)) => Err(self.corrupt(&meta_path, reason)),
        }
    }

    /// File `name` of the payload directory open as `dir` (at `dir_path`), read whole if
    /// it is a regular file of at most `max` bytes. No link is followed: the file is
    /// opened through the open directory (`/proc/self/fd`), so a payload directory
    /// swapped meanwhile changes nothing.
    fn read_in(
        &self,
        dir: &File,
        dir_path: &Path,
        name: &str,
        max: u64,
        what: &'static str,
    ) -> Result<Zeroizing<Vec<u8>>, StateError> {
        let path = dir_path.join(name);
        let proc_dir = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        let through_proc = fs::metadata(&proc_dir).is_ok_and(|m| m.is_dir());
        let open_at = if through_proc { proc_dir.join(name) } else { path.clone() };
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&open_at)
            .map_err(|e| self.open_error(&path, "opening", e))?;
        if !through_proc {
            // Without /proc: the payload directory must still be the one opened.
            let now = fs::symlink_metadata(dir_path).map_err(self.io(dir_path, "checking"))?;
            let opened = dir.metadata().map_err(self.io(dir_path, "checking"))?;
            if (now.dev(), now.ino()) != (opened.dev(), opened.ino()) {
                return Err(self.io(dir_path, "reading")(std::io::Error::other("replaced while being read")));
            }
        }
        let meta = file.metadata().map_err(self.io(&path, "reading"))?;
        if !meta.file_type().is_file() {
            return Err(self.corrupt(&path, "is not a regular file"));
        }
        let too_large = || StateError::TooLarge { path: path.display().to_string(), max, what };
        if meta.len() > max {
            return Err(too_large());
        }
        match read_capped(file, meta.len(), max) {
            Ok(bytes) => Ok(bytes),
            Err(Capped::Over) => Err(too_large()),
            Err(Capped::Io(e)) => Err(self.io(&path, "reading")(e)),
        }
    }

    fn write_locked(&self, state: &State) -> Result<(), StateError> {
        let (keys, meta) = encode(&self.name, state);

        let payload = self.create_payload()?;
        let dir = self.root.join(&payload);
        write_file(&dir.join(KEYS_FILE), &keys).map_err(self.io(&dir.join(KEYS_FILE), "writing"))?;
        write_file(&dir.join(META_FILE), &meta).map_err(self.io(&dir.join(META_FILE), "writing"))?;
        sync_dir(&dir).map_err(self.io(&dir, "syncing"))?;

        let tmp = self.root.join("..data_tmp");
        remove_if_exists(&tmp).map_err(self.io(&tmp, "removing"))?;
        std::os::unix::fs::symlink(&payload, &tmp).map_err(self.io(&tmp, "creating the link"))?;
        let data = self.root.join(DATA);
        fs::rename(&tmp, &data).map_err(self.io(&data, "swapping"))?;
        for file in [KEYS_FILE, META_FILE] {
            self.link_into_data(file)?;
        }
        for entry in fs::read_dir(&self.root).map_err(self.io(&self.root, "listing"))? {
            let entry = entry.map_err(self.io(&self.root, "listing"))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(PAYLOAD_PREFIX) && *name != *payload {
                let path = entry.path();
                fs::remove_dir_all(&path).map_err(self.io(&path, "removing an old payload"))?;
            }
        }
        sync_dir(&self.root).map_err(self.io(&self.root, "syncing"))
    }

    fn create_payload(&self) -> Result<String, StateError> {
        let mut nonce = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce);
        let now = crate::unix_time::secs(std::time::SystemTime::now());
        let name = format!("{PAYLOAD_PREFIX}{now}_{}", hex::encode(nonce));
        let path = self.root.join(&name);
        fs::DirBuilder::new().mode(0o700).create(&path).map_err(self.io(&path, "creating a payload directory"))?;
        Ok(name)
    }

    fn link_into_data(&self, file: &str) -> Result<(), StateError> {
        let link = self.root.join(file);
        let target = Path::new(DATA).join(file);
        if fs::read_link(&link).is_ok_and(|t| t == target) {
            return Ok(());
        }
        let tmp = self.root.join(format!("..{file}.tmp"));
        remove_if_exists(&tmp).map_err(self.io(&tmp, "removing"))?;
        std::os::unix::fs::symlink(&target, &tmp).map_err(self.io(&tmp, "creating the link"))?;
        fs::rename(&tmp, &link).map_err(self.io(&link, "replacing with a link"))
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    format: String,
    /// The ticket name the state belongs to: a directory shared by mistake between two
    /// names is refused, not rotated by both.
    name: String,
    active_since_ms: u64,
    /// Per key, in file order.
    created_ms: Vec<u64>,
    /// The last key is the pending (decrypt-only) one.
    pending: bool,
}

/// Which half of a state is bad, and why.
pub(super) enum Bad {
    Keys(String),
    Meta(String),
}

/// A state from its two halves, the same in a directory and in a Secret: `keys` the raw
/// concatenation (first encrypts, pending last), `meta` the JSON times.
pub(super) fn parse(name: &str, keys: &[u8], meta: &[u8]) -> Result<State, Bad> {
    let meta: Meta =
        serde_json::from_slice(meta).map_err(|e| Bad::Meta(format!("metadata is not valid JSON of {FORMAT}: {e}")))?;
    if meta.format != FORMAT {
        return Err(Bad::Meta(format!("format {:?}, expected {FORMAT:?}", meta.format)));
    }
    if meta.name != name {
        return Err(Bad::Meta(format!(
            "belongs to ticket name {:?}, not {name:?}: each name needs its own state",
            meta.name
        )));
    }
    if !keys.len().is_multiple_of(KEY_LEN) || keys.is_empty() {
        return Err(Bad::Keys(format!(
            "{} bytes: expected a non-empty concatenation of {KEY_LEN}-byte keys",
            keys.len()
        )));
    }
    let count = keys.len() / KEY_LEN;
    if count > MAX_KEYS {
        return Err(Bad::Keys(format!("{count} keys, at most {MAX_KEYS}")));
    }
    if meta.created_ms.len() != count {
        return Err(Bad::Meta(format!("times for {} keys, but there are {count} keys", meta.created_ms.len())));
    }
    if meta.pending && count < 2 {
        return Err(Bad::Meta("a pending key but no active one".into()));
    }
    let mut all: Vec<Key> = keys
        .chunks_exact(KEY_LEN)
        .zip(&meta.created_ms)
        .map(|(bytes, &created_ms)| Key { bytes: KeyBytes::new(bytes.to_vec()), created_ms })
        .collect();
    let pending = if meta.pending { all.pop() } else { None };
    let previous = all.split_off(1);
    let active = all.pop().expect("at least one key");
    Ok(State { active, active_since_ms: meta.active_since_ms, previous, pending })
}

/// The two halves of `state` for ticket `name`.
pub(super) fn encode(name: &str, state: &State) -> (zeroize::Zeroizing<Vec<u8>>, Vec<u8>) {
    let meta = Meta {
        format: FORMAT.to_owned(),
        name: name.to_owned(),
        active_since_ms: state.active_since_ms,
        created_ms: state.keys().map(|k| k.created_ms).collect(),
        pending: state.pending.is_some(),
    };
    let meta = serde_json::to_vec_pretty(&meta).expect("metadata serializes");
    let mut keys = zeroize::Zeroizing::new(Vec::with_capacity(state.count() * KEY_LEN));
    for key in state.keys() {
        keys.extend_from_slice(key.bytes.as_slice());
    }
    (keys, meta)
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut out = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    out.write_all(bytes)?;
    out.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    use super::super::schedule::Schedule;
    use super::*;

    fn schedule() -> Schedule {
        Schedule { rotate_every: Duration::from_secs(100), keep: 1, propagation: Duration::from_secs(10) }
    }

    fn random_key() -> KeyBytes {
        let mut k = vec![0u8; KEY_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k).unwrap();
        KeyBytes::new(k)
    }

    fn served(state: &State) -> Vec<u8> {
        state.keys().flat_map(|k| k.bytes.as_slice().to_vec()).collect()
    }

    #[test]
    fn two_replicas_on_one_directory_write_once_and_read_the_same_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("tickets");
        let replicas = 4;
        let barrier = Arc::new(Barrier::new(replicas));
        let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let handles: Vec<_> = (0..replicas)
            .map(|_| {
                let (root, barrier, made) = (root.clone(), barrier.clone(), made.clone());
                std::thread::spawn(move || {
                    let dir = DirState::new(root, "gw");
                    barrier.wait();
                    let updated = dir
                        .update(|current| {
                            schedule().plan(current, 1_000_000, || {
                                made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                random_key()
                            })
                        })
                        .unwrap();
                    served(&updated.state)
                })
            })
            .collect();
        let results: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 1, "one replica created the state");
        assert!(results.iter().all(|r| *r == results[0] && r.len() == KEY_LEN));

        // The operator's view: the keys file is the raw keys, readable with `cat`.
        let a = DirState::new(root.clone(), "gw");
        let b = DirState::new(root.clone(), "gw");
        assert_eq!(fs::read(root.join(KEYS_FILE)).unwrap(), results[0]);

        // Staging by one replica is seen by the other; the state rereads the same.
        let staged = a.update(|c| schedule().plan(c, 1_090_000, random_key)).unwrap();
        assert_eq!(staged.step, Some(Step::Staged));
        let seen = b.read().unwrap().unwrap();
        assert_eq!(served(&seen), served(&staged.state));
        assert_eq!(seen.active_since_ms, 1_000_000);
        assert!(seen.pending.is_some());
        // The other replica, a little late, finds nothing left to do.
        let late = b.update(|c| schedule().plan(c, 1_091_000, random_key)).unwrap();
        assert_eq!(late.step, None);
        let promoted = b.update(|c| schedule().plan(c, 1_100_000, random_key)).unwrap();
        assert_eq!(promoted.step, Some(Step::Promoted));
        let seen = a.read().unwrap().unwrap();
        assert_eq!(served(&seen), served(&promoted.state));
        assert_eq!(seen.previous.len(), 1);
        let payloads = fs::read_dir(&root)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(PAYLOAD_PREFIX))
            .count();
        assert_eq!(payloads, 1, "old payload directories are removed");
    }

    #[test]
    fn corrupt_and_foreign_states_are_named_errors_and_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("t");
        let dir = DirState::new(root.clone(), "gw");
        dir.update(|c| schedule().plan(c, 0, random_key)).unwrap();
        let data = root.join(DATA);
        let payload = root.join(fs::read_link(&data).unwrap());

        // A key of the wrong size.
        let good = fs::read(payload.join(KEYS_FILE)).unwrap();
        fs::remove_file(payload.join(KEYS_FILE)).unwrap();
        fs::write(payload.join(KEYS_FILE), &good[..79]).unwrap();
        let err = dir.read().unwrap_err();
        let text = err.to_string();
        assert!(text.contains(KEYS_FILE) && text.contains("79 bytes"), "{text}");
        assert_eq!(err.reason(), "corrupt");
        assert!(!text.contains(&hex::encode(&good[..8])), "no key bytes in the error");
        // An update refuses too, and leaves the file as it was.
        dir.update(|c| schedule().plan(c, 0, random_key)).unwrap_err();
        assert_eq!(fs::read(payload.join(KEYS_FILE)).unwrap().len(), 79);

        // Another name's state.
        fs::write(payload.join(KEYS_FILE), &good).unwrap();
        let other = DirState::new(root.clone(), "other");
        let text = other.read().unwrap_err().to_string();
        assert!(text.contains("\"gw\"") && text.contains(META_FILE), "{text}");

        // Bad metadata.
        fs::remove_file(payload.join(META_FILE)).unwrap();
        fs::write(payload.join(META_FILE), b"{\"format\":\"x\"}").unwrap();
        assert!(dir.read().unwrap_err().to_string().contains("not valid JSON"));

        // Too large: bounded read.
        fs::remove_file(payload.join(KEYS_FILE)).unwrap();
        fs::write(payload.join(KEYS_FILE), vec![0u8; (MAX_KEYS + 1) * KEY_LEN]).unwrap();
        assert_eq!(dir.read().unwrap_err().reason(), "too_large");

        // A keys file put there by hand, without metadata.
        let foreign = tmp.path().join("foreign");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join(KEYS_FILE), &good).unwrap();
        let text = DirState::new(foreign.clone(), "gw").read().unwrap_err().to_string();
        assert!(text.contains("not written by certwire"), "{text}");
        DirState::new(foreign.clone(), "gw").update(|c| schedule().plan(c, 0, random_key)).unwrap_err();
        assert_eq!(fs::read(foreign.join(KEYS_FILE)).unwrap(), good, "not overwritten");
    }

    /// Whoever can write in the state directory tries to make certwire read a file from
    /// outside it as keys, or create one: every way is refused as a corrupt state naming
    /// the link, and nothing outside is served, read into an error, or created.
    #[test]
    fn links_out_of_the_state_directory_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("t");
        let dir = DirState::new(root.clone(), "gw");
        let good = served(&dir.update(|c| schedule().plan(c, 0, random_key)).unwrap().state);
        let data = root.join(DATA);
        let payload_name = fs::read_link(&data).unwrap();
        let payload = root.join(&payload_name);

        // Outside: another secret, 80 bytes (a well-formed key), and a whole payload.
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let secret = [0x5au8; KEY_LEN];
        fs::write(outside.join("secret"), secret).unwrap();
        let fake = outside.join("payload");
        fs::create_dir(&fake).unwrap();
        fs::write(fake.join(KEYS_FILE), secret).unwrap();
        fs::copy(payload.join(META_FILE), fake.join(META_FILE)).unwrap();
        let refused = |what: &str, needle: &str| {
            let err = dir.read().unwrap_err();
            let text = err.to_string();
            assert_eq!(err.reason(), "corrupt", "{what}: {text}");
            assert!(text.contains(needle), "{what}: {text}");
            assert!(!text.contains("80 bytes") && !text.contains(&hex::encode(&secret[..4])), "{what}: {text}");
        };

        // The keys file in the payload a link to the other secret.
        let keys = payload.join(KEYS_FILE);
        let saved = fs::read(&keys).unwrap();
        fs::remove_file(&keys).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), &keys).unwrap();
        refused("keys link", "symbolic link");
        fs::remove_file(&keys).unwrap();
        fs::write(&keys, &saved).unwrap();
        // The metadata a link (its size or content would show in an error).
        let meta = payload.join(META_FILE);
        let saved_meta = fs::read(&meta).unwrap();
        fs::remove_file(&meta).unwrap();
        std::os::unix::fs::symlink(fake.join(META_FILE), &meta).unwrap();
        refused("metadata link", "symbolic link");
        fs::remove_file(&meta).unwrap();
        fs::write(&meta, &saved_meta).unwrap();
        assert_eq!(served(&dir.read().unwrap().unwrap()), good, "repaired");

        // `..data` to an absolute path, out of the root, or to a payload that is a link.
        let set_data = |target: &Path| {
            let tmp_link = root.join("..data_tmp");
            std::os::unix::fs::symlink(target, &tmp_link).unwrap();
            fs::rename(&tmp_link, &data).unwrap();
        };
        set_data(&fake);
        refused("absolute ..data", "points to");
        set_data(Path::new("../outside/payload"));
        refused("relative ..data", "points to");
        set_data(Path::new("..data"));
        refused("..data to itself", "points to");
        std::os::unix::fs::symlink(&fake, root.join("..v1_evil")).unwrap();
        set_data(Path::new("..v1_evil"));
        refused("payload link", "symbolic link");
        // A writer refuses too, and the outside payload is left as it was.
        dir.update(|c| schedule().plan(c, 0, random_key)).unwrap_err();
        assert_eq!(fs::read(fake.join(KEYS_FILE)).unwrap(), secret);
        assert!(fs::symlink_metadata(root.join("..v1_evil")).unwrap().file_type().is_symlink());
        set_data(&payload_name);
        assert_eq!(served(&dir.read().unwrap().unwrap()), good, "repaired");

        // A keys file that is not a regular file.
        fs::remove_file(&keys).unwrap();
        fs::create_dir(&keys).unwrap();
        refused("directory as keys", "not a regular file");
        fs::remove_dir(&keys).unwrap();
        fs::write(&keys, &saved).unwrap();

        // `.lock` a link: its target is neither created nor opened.
        let lock = root.join(LOCK_FILE);
        fs::remove_file(&lock).unwrap();
        std::os::unix::fs::symlink(outside.join("created"), &lock).unwrap();
        refused("lock link", "symbolic link");
        dir.update(|c| schedule().plan(c, 0, random_key)).unwrap_err();
        assert!(!outside.join("created").exists(), "nothing created outside");
        fs::remove_file(&lock).unwrap();
        assert_eq!(served(&dir.read().unwrap().unwrap()), good, "repaired");
    }

    /// A lock another process holds (a hung replica, `flock` by hand) fails the read or
    /// update after the wait instead of blocking the follower for ever.
    #[test]
    fn a_held_lock_is_an_error_not_a_wait_for_ever() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("t");
        let dir = DirState::new(root.clone(), "gw").with_lock_wait(Duration::from_millis(100));
        dir.update(|c| schedule().plan(c, 0, random_key)).unwrap();
        // flock(2) locks belong to the open file: a second open conflicts like another process.
        let holder = File::open(root.join(LOCK_FILE)).unwrap();
        holder.lock().unwrap();
        for err in [dir.read().unwrap_err(), dir.update(|c| schedule().plan(c, 0, random_key)).unwrap_err()] {
            assert_eq!(err.reason(), "lock_held", "{err}");
            assert!(err.to_string().contains(&root.join(LOCK_FILE).display().to_string()), "{err}");
        }
        drop(holder);
        dir.read().unwrap().unwrap();
        assert!(LOCK_WAIT >= Duration::from_secs(1), "a write takes milliseconds; the default waits much longer");
    }

    /// Key files are read into one zeroizing buffer sized from the file's size: no
    /// reallocation leaves a copy of the keys in freed memory.
    #[test]
    fn keys_are_read_into_one_buffer_sized_from_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("keys");
        fs::write(&path, vec![7u8; 10 * KEY_LEN]).unwrap();
        let len = fs::metadata(&path).unwrap().len();
        let bytes: Zeroizing<Vec<u8>> = match read_capped(File::open(&path).unwrap(), len, 64 * KEY_LEN as u64) {
            Ok(bytes) => bytes,
            Err(_) => panic!("fits"),
        };
        assert_eq!(bytes.len(), 10 * KEY_LEN);
        assert_eq!(bytes.capacity(), 10 * KEY_LEN + 1, "allocated once, from the size");
        // A file larger than its size said (procfs reports 0) is still cut at the cap.
        assert!(matches!(read_capped(File::open("/proc/self/status").unwrap(), 0, 8), Err(Capped::Over)));
        let all = read_capped(File::open("/proc/self/status").unwrap(), 0, 1 << 20).unwrap_or_else(|_| panic!("fits"));
        assert!(all.starts_with(b"Name:"));
    }

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("t");
        DirState::new(root.clone(), "gw").update(|c| schedule().plan(c, 0, random_key)).unwrap();
        let mode = fs::metadata(root.join(KEYS_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::metadata(&root).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
