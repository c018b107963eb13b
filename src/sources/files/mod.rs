//! File source: a root directory whose subdirectories each hold one secret in the layout
//! of a Kubernetes-mounted Secret (`tls.crt`, `tls.key`, optional `tls.ocsp-staple`,
//! `ca.crt`, `ca.crl`, usually symlinks through the `..data` link the kubelet swaps
//! atomically).
//! Subdirectory `NAME` serves `NAME` (the pair) and `NAME-cacert` (the CA bundle).
//! Instead of a pair, `NAME` may hold session ticket keys (`tls.session-ticket-keys`) or
//! a generic secret (`secret`), see [`secret_keys`].
//!
//! Any event in `root/NAME` re-reads that directory at once, with no debounce: a
//! rotation is pushed as soon as the files are consistent. What is pushed is remembered
//! by digest, so the burst of events of one swap pushes once. A periodic full rescan is
//! the safety net for events the watch missed.
//!
//! Every file is read off the async workers, refused without being opened when it is not
//! a regular file inside the root, and read up to a cap (see [`read`]). A file that
//! cannot be read is a rejection like a failed check: logged, counted and shown in
//! status, the last good version kept.
//!
//! The root and each secret directory are watched on their own, not recursively: the
//! kubelet's swap is a rename of `..data_tmp` onto `..data` in the secret directory, and
//! plain writes of `tls.crt` and `tls.key` happen there too, so the `..TIMESTAMP`
//! directories below need no watch. That halves the watches, and their bookkeeping is
//! much of the memory a stored secret costs.

mod read;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::shutdown::Shutdown;
use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::ingest::Intake;
use crate::pki::{self, CheckOptions, KeyBytes, Material, PkiError};
use crate::sources::secret_keys;
use crate::version::Version;

pub use read::DEFAULT_MAX_FILE_BYTES;
use read::Limits;
pub(crate) use read::{Capped, read_capped};

/// Tuning of the file source. `Options::default()` is meant for production.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Period of the full rescan that catches events the watch missed.
    pub rescan: Duration,
    /// How long a secret that looks mid-write (a pair that does not match yet, files
    /// gone) may take to settle before it is reported as it is. New content that passes
    /// the checks is never held back.
    pub settle: Duration,
    /// The largest secret file read (certificate chain, key, CA bundle, CRL); a larger
    /// one is refused with reason `too_large`.
    pub max_file_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rescan: Duration::from_secs(30),
            settle: Duration::from_millis(500),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is {kind}, not a regular file; it is not opened", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error(
        "{} is too large: {}over the limit of {max} bytes for a secret file",
        path.display(),
        size.map(|s| format!("{s} bytes, ")).unwrap_or_default()
    )]
    TooLarge { path: PathBuf, size: Option<u64>, max: u64 },
    #[error(
        "{} leads to {}, outside the root {}; only links that stay inside the root are followed",
        path.display(),
        target.display(),
        root.display()
    )]
    OutsideRoot { path: PathBuf, target: PathBuf, root: PathBuf },
    #[error("{} {source}", path.display())]
    Ambiguous { path: PathBuf, source: secret_keys::Ambiguous },
    #[error("cannot watch {}: {source}", path.display())]
    Watch { path: PathBuf, source: notify::Error },
    #[error("cannot list the files root {}: {source}; every secret read from it keeps its last good version", path.display())]
    Root { path: PathBuf, source: io::Error },
}

impl FilesError {
    /// The `reason` label of `certwire_updates_rejected_total` for a file that was not
    /// read.
    pub fn reason(&self) -> &'static str {
        match self {
            FilesError::Read { .. } => "read_error",
            FilesError::NotAFile { .. } => "not_a_file",
            FilesError::TooLarge { .. } => "too_large",
            FilesError::OutsideRoot { .. } => "outside_root",
            FilesError::Ambiguous { .. } => secret_keys::Ambiguous::REASON,
            FilesError::Watch { .. } => "watch_error",
            FilesError::Root { .. } => "root_unreadable",
        }
    }
}

/// Loads every secret under `root`, then watches it until `shutdown`, with default options.
pub async fn start(root: PathBuf, intake: Intake, shutdown: Shutdown) -> Result<JoinHandle<()>, FilesError> {
    start_with(root, intake, shutdown, Options::default()).await
}

/// Like [`start`]. Returns once the initial load is in the store.
pub async fn start_with(
    root: PathBuf,
    intake: Intake,
    shutdown: Shutdown,
    options: Options,
) -> Result<JoinHandle<()>, FilesError> {
    let (tx, events) = mpsc::unbounded_channel();
    // The watch setup and the first load are blocking I/O over many files.
    let source = tokio::task::spawn_blocking(move || {
        std::fs::read_dir(&root).map_err(|source| FilesError::Read { path: root.clone(), source })?;
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            if !is_only_access(&event) {
                let _ = tx.send((Instant::now(), event));
            }
        })
        .map_err(|source| FilesError::Watch { path: root.clone(), source })?;
        // Watch before loading so that a change in between is not lost.
        watcher
            .watch(&root, RecursiveMode::NonRecursive)
            .map_err(|source| FilesError::Watch { path: root.clone(), source })?;
        let mut source = FileSource {
            root,
            intake,
            watcher,
            settle: options.settle,
            max_file_bytes: options.max_file_bytes,
            dirs: HashMap::new(),
            settling: HashMap::new(),
            root_error: None,
        };
        // One summary line for the initial load ("file source loaded"), not one per secret.
        source.intake.set_loading(true);
        source.scan(Pass::Initial, Instant::now());
        source.intake.set_loading(false);
        Ok::<_, FilesError>(source)
    })
    .await
    .expect("file source setup panicked")?;
    tracing::info!(source = source.intake.source(), directories = source.dirs.len(), "file source loaded");
    Ok(tokio::spawn(source.run(events, shutdown, options.rescan)))
}

/// Our own reads show up as open and close events; of all accesses only a finished write
/// matters. Dropping them here keeps every scan from flooding the channel.
fn is_only_access(event: &notify::Result<Event>) -> bool {
    match event {
        Ok(e) => matches!(e.kind, EventKind::Access(k) if k != AccessKind::Close(AccessMode::Write)),
        Err(_) => false,
    }
}

/// Reads directory `dir` into its pair (`NAME`) and its CA bundle (`NAME-cacert`), as
/// `--files` would with `dir`'s parent as the root, and the default cap.
/// `Ok(None)`: the files are absent. `Err`: a file exists but was not read (see
/// [`FilesError::reason`]).
pub fn read_secret_dir(dir: &Path) -> (Result<Option<Material>, FilesError>, Result<Option<Material>, FilesError>) {
    let root = match dir.parent() {
        Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
        Some(parent) => parent,
        None => dir,
    };
    match canonical_root(root) {
        Ok(root) => read_secret_dir_within(Limits { root: &root, max_file_bytes: DEFAULT_MAX_FILE_BYTES }, dir),
        Err(e) => {
            let error =
                || Err(FilesError::Read { path: root.to_owned(), source: io::Error::new(e.kind(), e.to_string()) });
            (error(), error())
        }
    }
}

fn canonical_root(root: &Path) -> io::Result<PathBuf> {
    std::fs::canonicalize(root)
}

fn read_secret_dir_within(
    limits: Limits<'_>,
    dir: &Path,
) -> (Result<Option<Material>, FilesError>, Result<Option<Material>, FilesError>) {
    (read_own(limits, dir), read_ca(limits, dir))
}

/// What directory `dir` serves under its own name: its pair, its session ticket keys or
/// its generic secret (see [`secret_keys`]); an empty file is none, as an empty Secret
/// key is.
fn read_own(limits: Limits<'_>, dir: &Path) -> Result<Option<Material>, FilesError> {
    let pair = read_pair(limits, dir)?;
    let optional = |file: &str, make: fn(&[u8]) -> Material| -> Result<Option<Material>, FilesError> {
        Ok(read::read_file(limits, &dir.join(file))?.filter(|b| !b.is_empty()).map(|b| make(&b)))
    };
    let tickets = optional(secret_keys::SESSION_TICKET_KEYS, secret_keys::ticket_keys)?;
    let generic = optional(secret_keys::GENERIC_SECRET, secret_keys::generic)?;
    secret_keys::one_of([
        ("tls.crt", pair),
        (secret_keys::SESSION_TICKET_KEYS, tickets),
        (secret_keys::GENERIC_SECRET, generic),
    ])
    .map_err(|source| FilesError::Ambiguous { path: dir.to_owned(), source })
}

fn read_pair(limits: Limits<'_>, dir: &Path) -> Result<Option<Material>, FilesError> {
    let Some(cert_chain_pem) = read::read_file(limits, &dir.join("tls.crt"))? else { return Ok(None) };
    let Some(mut key_pem) = read::read_file(limits, &dir.join("tls.key"))? else { return Ok(None) };
    // Optional, and an empty file is none, as an empty Secret key is.
    let ocsp_staple = read::read_file(limits, &dir.join(OCSP_STAPLE))?.map(take).filter(|s| !s.is_empty());
    Ok(Some(Material::Tls {
        cert_chain_pem: take(cert_chain_pem),
        key_pem: KeyBytes::new(std::mem::take(&mut *key_pem)),
        ocsp_staple,
    }))
}

/// The OCSP response (DER) stapled with the pair: Istio's Secret key, as a file.
const OCSP_STAPLE: &str = "tls.ocsp-staple";

fn read_ca(limits: Limits<'_>, dir: &Path) -> Result<Option<Material>, FilesError> {
    let Some(ca_pem) = read::read_file(limits, &dir.join("ca.crt"))? else { return Ok(None) };
    let crl_pem = read::read_file(limits, &dir.join("ca.crl"))?;
    Ok(Some(Material::Validation { ca_pem: take(ca_pem), crl_pem: crl_pem.map(take) }))
}

/// The bytes of a file that holds no key, out of their zeroizing buffer.
fn take(mut bytes: zeroize::Zeroizing<Vec<u8>>) -> Vec<u8> {
    std::mem::take(&mut *bytes)
}

/// Why a directory is being read; decides how a doubtful state is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Startup: report what is there, the caller waits for a definitive load.
    Initial,
    /// A watch event: the files may be mid-write.
    Event,
    /// A second look after `settle`: report what is there.
    Confirm,
    /// The periodic safety net; also retries content refused for a reason time can heal
    /// (a certificate not yet valid becomes valid without its files changing).
    Periodic,
}

impl Pass {
    fn settles(self) -> bool {
        matches!(self, Pass::Event | Pass::Periodic)
    }
}

/// SHA-256 of each file of a secret, truncated to 128 bits (plenty to tell a change):
/// tells what changed without keeping a second copy of every key in memory. The OCSP
/// staple counts with the certificate it is about, so a new staple alone is a change.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Digests([Version; 2]);

impl Digests {
    fn of(material: &Material) -> Self {
        let (a, b): (&[u8], &[u8]) = match material {
            Material::Tls { cert_chain_pem, key_pem, ocsp_staple: Some(staple) } => {
                let (chain, staple) = (Version::of(cert_chain_pem).text(), Version::of(staple).text());
                let both = [chain.as_bytes(), staple.as_bytes()].concat();
                return Self([Version::of(&both), Version::of(key_pem.as_slice())]);
            }
            Material::Tls { cert_chain_pem, key_pem, ocsp_staple: None } => (cert_chain_pem, key_pem.as_slice()),
            Material::Validation { ca_pem, crl_pem } => (ca_pem, crl_pem.as_deref().unwrap_or_default()),
            Material::SessionTicketKeys(keys) => {
                // Sized once, so no reallocation leaves key bytes behind.
                let mut all = zeroize::Zeroizing::new(Vec::with_capacity(keys.iter().map(KeyBytes::len).sum()));
                keys.iter().for_each(|k| all.extend_from_slice(k.as_slice()));
                return Self([Version::of(&all), Version::of(&[])]);
            }
            Material::Generic(secret) => (secret.as_slice(), &[]),
        };
        Self([Version::of(a), Version::of(b)])
    }

    /// Every file changed at once: an atomic swap, not a write in progress.
    fn all_differ(&self, other: &Self) -> bool {
        self.0[0] != other.0[0] && self.0[1] != other.0[1]
    }
}

/// What was last reported to the intake for one secret.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reported {
    /// Material with these digests (accepted or refused by the checks).
    Material(Digests),
    /// A file was not read; the digest of the error, so the same failure is reported once.
    Unread(Version),
}

#[derive(Default)]
struct Slot {
    last: Option<Reported>,
    /// The intake refused it for a reason that depends on the clock.
    retry: bool,
}

/// Whether a secret directory has its own watch.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Watch {
    #[default]
    None,
    Added,
    /// Adding it failed (e.g. the inotify watch limit); retried on each read of the
    /// directory, which the periodic rescan keeps doing meanwhile.
    Failed,
}

/// One secret directory: what was reported for its two secrets, and its watch.
#[derive(Default)]
struct Dir {
    tls: Slot,
    /// Boxed, and only while something was reported: most directories have no `ca.crt`.
    ca: Option<Box<Slot>>,
    watch: Watch,
}

struct FileSource {
    root: PathBuf,
    intake: Intake,
    watcher: RecommendedWatcher,
    settle: Duration,
    max_file_bytes: u64,
    /// Per directory NAME that exists or still has something reported. The name is
    /// shared with the store's entry for the pair.
    dirs: HashMap<Arc<str>, Dir>,
    /// Directories to read again once settled: (when, first detection of the change).
    settling: HashMap<String, (Instant, Instant)>,
    /// Why the root could not be listed at the last scan, while it cannot.
    root_error: Option<String>,
}

/// Directories touched by a batch of events, with the earliest detection and whether
/// the directory itself appeared (see `handle_events`).
#[derive(Default)]
struct Batch {
    dirs: HashMap<String, (Instant, bool)>,
    rescan: Option<Instant>,
}

impl FileSource {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<(Instant, notify::Result<Event>)>,
        shutdown: Shutdown,
        rescan: Duration,
    ) {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + rescan, rescan);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_settle = self.settling.values().map(|(at, _)| *at).min();
            let settled = async {
                match next_settle {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(first) = events.recv() => {
                    // Drain the burst first: one swap is a dozen events for one directory.
                    let mut batch = Batch::default();
                    self.classify(first, &mut batch);
                    while let Ok(more) = events.try_recv() {
                        self.classify(more, &mut batch);
                    }
                    self = self.off_workers(move |source| source.handle_events(batch)).await;
                }
                _ = ticker.tick() => self = self.off_workers(|source| source.scan(Pass::Periodic, Instant::now())).await,
                _ = settled => self = self.off_workers(Self::settle_due).await,
            }
        }
        tracing::debug!(source = self.intake.source(), "file source stopped");
    }

    fn classify(&self, (at, event): (Instant, notify::Result<Event>), batch: &mut Batch) {
        let event = match event {
            Ok(event) if !event.need_rescan() => event,
            Ok(_) => {
                tracing::warn!(source = self.intake.source(), "file watch lost events; rescanning");
                batch.rescan.get_or_insert(at);
                return;
            }
            Err(err) => {
                tracing::warn!(source = self.intake.source(), error = %err, "file watch error; rescanning");
                batch.rescan.get_or_insert(at);
                return;
            }
        };
        for path in &event.paths {
            let Ok(rel) = path.strip_prefix(&self.root) else { continue };
            let mut parts = rel.components();
            let name = match parts.next() {
                Some(Component::Normal(name)) => name.to_str(),
                // The root itself changed (moved, deleted, remounted): look at everything.
                None => {
                    batch.rescan.get_or_insert(at);
                    continue;
                }
                _ => None,
            };
            let Some(name) = name.filter(|n| !n.starts_with('.')) else { continue };
            let appeared = parts.next().is_none()
                && matches!(event.kind, EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_)));
            let entry = batch.dirs.entry(name.to_owned()).or_insert((at, false));
            entry.1 |= appeared;
        }
    }

    /// Runs `work` on the blocking pool: every file read happens there, so a slow or
    /// stuck file system holds this source, never a thread that serves proxies or probes.
    async fn off_workers(mut self, work: impl FnOnce(&mut Self) + Send + 'static) -> Self {
        tokio::task::spawn_blocking(move || {
            work(&mut self);
            self
        })
        .await
        .expect("file source panicked")
    }

    fn handle_events(&mut self, batch: Batch) {
        let earliest = batch.dirs.values().map(|(at, _)| *at).chain(batch.rescan).min();
        if let Some(at) = earliest
            && !self.root_lists_as_before()
        {
            return self.scan(Pass::Event, at);
        }
        if let Some(at) = batch.rescan {
            // Lost events may hide a directory replaced in between, whose old watch notify
            // dropped: watch them all again (adding an existing watch is harmless).
            self.dirs.values_mut().for_each(|dir| dir.watch = Watch::None);
            return self.scan(Pass::Event, at);
        }
        let root = self.canonical_root();
        // In the order the changes were seen: one directory's burst of events may span
        // another's.
        let mut dirs: Vec<_> = batch.dirs.into_iter().collect();
        dirs.sort_unstable_by_key(|(_, (at, _))| *at);
        for (name, (at, appeared)) in dirs {
            // A directory deleted and created again under the same name lost its watch
            // with the old one.
            if appeared && let Some(dir) = self.dirs.get_mut(name.as_str()) {
                dir.watch = Watch::None;
            }
            self.refresh(&root, &name, Pass::Event, at);
        }
    }

    fn settle_due(&mut self) {
        let now = Instant::now();
        if !self.root_lists_as_before() {
            return self.scan(Pass::Confirm, now);
        }
        let due: Vec<_> = self.settling.extract_if(|_, (at, _)| *at <= now).collect();
        let root = self.canonical_root();
        for (name, (_, detected_at)) in due {
            self.refresh(&root, &name, Pass::Confirm, detected_at);
        }
    }

    /// False when the root cannot be listed, or could not be until now: then only a
    /// full scan may decide anything, since a secret that cannot be read in an unreadable
    /// root is not a secret that was deleted.
    fn root_lists_as_before(&self) -> bool {
        self.root_error.is_none() && std::fs::read_dir(&self.root).is_ok()
    }

    /// The root without links, which every file read must stay inside. Taken again for
    /// each batch of work, so a root that is itself a link may be moved. When it cannot
    /// be resolved (gone), the root as configured: nothing under it can be read then.
    fn canonical_root(&self) -> PathBuf {
        canonical_root(&self.root).unwrap_or_else(|_| self.root.clone())
    }

    /// Reads every directory under the root, and every one known before (to notice removals).
    fn scan(&mut self, pass: Pass, detected_at: Instant) {
        let mut names: BTreeSet<String> = self.dirs.keys().map(|name| name.to_string()).collect();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(err) => return self.root_unreadable(err),
        };
        if self.root_error.take().is_some() {
            self.root_readable_again();
        }
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                tracing::warn!(source = self.intake.source(), path = %entry.path().display(), "ignoring directory: name is not UTF-8");
                continue;
            };
            if !name.starts_with('.') && entry.path().is_dir() {
                names.insert(name.to_owned());
            }
        }
        let root = self.canonical_root();
        for name in names {
            self.refresh(&root, &name, pass, detected_at);
        }
    }

    /// The root cannot be listed (its permissions changed, its volume went away): that
    /// says nothing about the secrets, so none is withdrawn. Each one read from it keeps
    /// its last good version and shows the reason in status, recorded once per distinct
    /// failure (one log line and one count for the whole root), until a rescan lists it
    /// again and reads every secret anew.
    fn root_unreadable(&mut self, err: io::Error) {
        let error = FilesError::Root { path: self.root.clone(), source: err };
        let message = error.to_string();
        if self.root_error.as_deref() == Some(message.as_str()) {
            return;
        }
        let unread = Reported::Unread(Version::of(message.as_bytes()));
        let mut names: Vec<Arc<str>> = Vec::new();
        for (name, dir) in &mut self.dirs {
            if dir.tls.last.is_some() {
                dir.tls = Slot { last: Some(unread), retry: false };
                names.push(name.clone());
            }
            if let Some(ca) = dir.ca.as_deref_mut() {
                *ca = Slot { last: Some(unread), retry: false };
                names.push(format!("{name}-cacert").into());
            }
        }
        self.settling.clear();
        self.root_error = Some(message);
        self.intake.reject_all(&names, error.reason(), &error);
    }

    /// The root lists again: it may be another directory than before (a volume mounted
    /// anew), whose watch is then gone; watch it again. The scan that follows reads every
    /// secret, since each was marked unread.
    fn root_readable_again(&mut self) {
        tracing::info!(source = self.intake.source(), path = %self.root.display(), "files root readable again; reading every secret");
        let _ = self.watcher.unwatch(&self.root);
        if let Err(err) = self.watcher.watch(&self.root, RecursiveMode::NonRecursive) {
            tracing::warn!(source = self.intake.source(), path = %self.root.display(), error = %err, "cannot watch the files root; new secret directories are seen by the periodic rescan only");
        }
    }

    /// Watches directory `name` if it exists, re-reads it (files inside `root`, the
    /// canonical root) and reports what changed through the intake.
    fn refresh(&mut self, root: &Path, name: &str, pass: Pass, detected_at: Instant) {
        let path = self.root.join(name);
        let exists = path.is_dir();
        let name = match self.dirs.get_key_value(name) {
            Some((known, _)) => known.clone(),
            None if exists => {
                let name: Arc<str> = Arc::from(name);
                self.dirs.insert(name.clone(), Dir::default());
                name
            }
            None => return,
        };
        let dir = self.dirs.get_mut(&name).expect("found or inserted above");
        // The watch comes before the read: a write after it raises an event, one before it
        // is in what we read.
        match (exists, dir.watch) {
            (true, Watch::None | Watch::Failed) => {
                dir.watch = watch_dir(&mut self.watcher, &path, dir.watch, &self.intake)
            }
            // notify drops the watch of a deleted directory by itself, hence no error here.
            (false, Watch::Added) => {
                let _ = self.watcher.unwatch(&path);
                dir.watch = Watch::None;
            }
            _ => {}
        }
        let limits = Limits { root, max_file_bytes: self.max_file_bytes };
        let (pair, ca) = read_secret_dir_within(limits, &path);
        let pair_waits = report(&self.intake, &name, &mut dir.tls, pair, pass, detected_at);
        let mut ca_slot = dir.ca.take().map(|slot| *slot).unwrap_or_default();
        let ca_name = format!("{name}-cacert").into();
        let ca_waits = report(&self.intake, &ca_name, &mut ca_slot, ca, pass, detected_at);
        dir.ca = ca_slot.last.is_some().then(|| Box::new(ca_slot));
        if !exists && dir.tls.last.is_none() && dir.ca.is_none() {
            self.dirs.remove(&name);
        }
        if pair_waits || ca_waits {
            self.settling.entry(name.to_string()).or_insert((Instant::now() + self.settle, detected_at));
        }
    }
}

/// Adds the watch of one secret directory. A failure is logged once, not on every retry.
fn watch_dir(watcher: &mut RecommendedWatcher, path: &Path, before: Watch, intake: &Intake) -> Watch {
    match watcher.watch(path, RecursiveMode::NonRecursive) {
        Ok(()) => Watch::Added,
        Err(err) => {
            if before != Watch::Failed {
                tracing::warn!(source = intake.source(), path = %path.display(), error = %err, "cannot watch secret directory; its changes are seen by the periodic rescan only");
            }
            Watch::Failed
        }
    }
}

/// Reports one secret read from disk, unless it is what was reported last. Returns true
/// when the read looks like a write in progress and is worth another look once settled.
fn report(
    intake: &Intake,
    secret: &Arc<str>,
    slot: &mut Slot,
    read: Result<Option<Material>, FilesError>,
    pass: Pass,
    detected_at: Instant,
) -> bool {
    match read {
        Err(err) => {
            // Read again at every rescan; reported once until it changes.
            let unread = Reported::Unread(Version::of(err.to_string().as_bytes()));
            if slot.last != Some(unread) {
                intake.reject(secret.clone(), err.reason(), &err);
                slot.last = Some(unread);
                slot.retry = false;
            }
            false
        }
        Ok(None) if slot.last.is_none() => false,
        // Files may be replaced by delete-then-create: only a second look removes.
        Ok(None) if pass.settles() => true,
        Ok(None) => {
            slot.last = None;
            slot.retry = false;
            intake.remove(secret);
            false
        }
        Ok(Some(material)) => {
            let digests = Digests::of(&material);
            let unchanged = slot.last == Some(Reported::Material(digests));
            if unchanged && !(slot.retry && pass == Pass::Periodic) {
                return false;
            }
            // A pair where only one file changed may be half-written (certificate first, key
            // later). Check it quietly, so the transient state is not logged and counted as a
            // rejection, and give it time to settle. A pair swapped whole goes straight to the
            // intake: the common rotation pays for one check only.
            let swapped_whole = matches!(slot.last, Some(Reported::Material(last)) if last.all_differ(&digests));
            if pass.settles() && !unchanged && !swapped_whole && pki::check(secret, &material, &quiet_check()).is_err()
            {
                tracing::debug!(
                    secret = &**secret,
                    source = intake.source(),
                    "secret files inconsistent; waiting for the write to finish"
                );
                return true;
            }
            let result = intake.update(secret.clone(), &material, detected_at);
            slot.retry = matches!(
                result,
                Err(PkiError::NotYetValid { .. } | PkiError::Expired { .. } | PkiError::OcspStapleNotYetValid { .. })
            );
            slot.last = Some(Reported::Material(digests));
            false
        }
    }
}

/// Expiry is not a write in progress; the intake judges it with the configured policy.
fn quiet_check() -> CheckOptions {
    CheckOptions { allow_expired: true, now: SystemTime::now() }
}

#[cfg(test)]
mod tests;
