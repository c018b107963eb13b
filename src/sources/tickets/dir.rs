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

use std::fs::{self, File};
use std::io::{ErrorKind, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::schedule::{KEY_LEN, Key, Plan, State, Step};
use crate::pki::KeyBytes;

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
}

impl DirState {
    pub fn new(root: PathBuf, name: &str) -> Self {
        Self { root, name: name.to_owned() }
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
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(self.io(&path, "opening the lock file"))?;
        // flock(2) on Unix: released when `file` is closed.
        let locked = if exclusive { file.lock() } else { file.lock_shared() };
        locked.map_err(self.io(&path, "locking"))?;
        Ok(file)
    }

    fn read_locked(&self) -> Result<Option<State>, StateError> {
        let data = self.root.join(DATA);
        let payload = match fs::read_link(&data) {
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
        let dir = self.root.join(payload);
        let keys_path = dir.join(KEYS_FILE);
        let meta_path = dir.join(META_FILE);
        let max_keys = (MAX_KEYS * KEY_LEN) as u64;
        let keys = KeyBytes::new(read_bounded(&keys_path, max_keys, "ticket state keys").map_err(|e| self.map(e))?);
        let meta = read_bounded(&meta_path, MAX_META_BYTES, "ticket state metadata").map_err(|e| self.map(e))?;
        match parse(&self.name, keys.as_slice(), &meta) {
            Ok(state) => Ok(Some(state)),
            Err(Bad::Keys(reason)) => Err(self.corrupt(&keys_path, reason)),
            Err(Bad::Meta(reason)) => Err(self.corrupt(&meta_path, reason)),
        }
    }

    fn map(&self, err: Bounded) -> StateError {
        match err {
            Bounded::Io(path, source) => StateError::Io { path: path.display().to_string(), op: "reading", source },
            Bounded::TooLarge(path, max, what) => StateError::TooLarge { path: path.display().to_string(), max, what },
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

enum Bounded {
    Io(PathBuf, std::io::Error),
    TooLarge(PathBuf, u64, &'static str),
}

/// The whole file if it has at most `max` bytes.
fn read_bounded(path: &Path, max: u64, what: &'static str) -> Result<Vec<u8>, Bounded> {
    let file = File::open(path).map_err(|e| Bounded::Io(path.to_path_buf(), e))?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes).map_err(|e| Bounded::Io(path.to_path_buf(), e))?;
    if bytes.len() as u64 > max {
        zeroize::Zeroize::zeroize(&mut bytes);
        return Err(Bounded::TooLarge(path.to_path_buf(), max, what));
    }
    Ok(bytes)
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
