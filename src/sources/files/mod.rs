//! File source: a root directory whose subdirectories each hold one secret in the layout
//! of a Kubernetes-mounted Secret (`tls.crt`, `tls.key`, optional `ca.crt`, `ca.crl`,
//! usually symlinks through the `..data` link the kubelet swaps atomically).
//! Subdirectory `NAME` serves `NAME` (the pair) and `NAME-cacert` (the CA bundle).
//!
//! Any event in `root/NAME` re-reads that directory at once, with no debounce: a
//! rotation is pushed as soon as the files are consistent. What is pushed is remembered
//! by digest, so the burst of events of one swap pushes once. A periodic full rescan is
//! the safety net for events the watch missed.
//!
//! Two doubtful states wait `settle` (500 ms) for a second look instead: files gone (a
//! writer that deletes and then creates, or renames the old file away first, would
//! otherwise withdraw the secret and serve it again a moment later, and nothing is
//! gained by withdrawing early: Envoy keeps what it has either way), and a pair changed
//! in one file only that does not match (a certificate written before its key), which
//! is reported as a rejection only if it still does not match then. Content that passes
//! the checks is never held back.
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
//! much of the memory a stored secret costs. inotify is used directly (see [`watch`]).

mod read;
mod watch;

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use smallvec::SmallVec;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::ingest::Sink;
use crate::pki::{self, CheckOptions, KeyBytes, Material, PkiError};
use crate::version::Version;

pub use read::DEFAULT_MAX_FILE_BYTES;
use read::Limits;
use watch::{Watcher, Wd};

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
    #[error("cannot watch {}: {source}", path.display())]
    Watch { path: PathBuf, source: io::Error },
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
            FilesError::Watch { .. } => "watch_error",
        }
    }
}

/// Loads every secret under `root`, then watches it until `shutdown`, with default options.
pub async fn start(root: PathBuf, sink: Sink, shutdown: CancellationToken) -> Result<JoinHandle<()>, FilesError> {
    start_with(root, sink, shutdown, Options::default()).await
}

/// Like [`start`]. Returns once the initial load is in the store.
pub async fn start_with(
    root: PathBuf,
    sink: Sink,
    shutdown: CancellationToken,
    options: Options,
) -> Result<JoinHandle<()>, FilesError> {
    // The watch setup and the first load are blocking I/O over many files.
    let (source, events) = tokio::task::spawn_blocking(move || {
        std::fs::read_dir(&root).map_err(|source| FilesError::Read { path: root.clone(), source })?;
        let watch_error = |source| FilesError::Watch { path: root.clone(), source };
        let (watcher, events) = watch::new().map_err(watch_error)?;
        // Watch before loading so that a change in between is not lost.
        let root_wd = watcher.watch_root(&root).map_err(watch_error)?;
        let mut source = FileSource {
            root,
            sink,
            watcher,
            root_wd: Some(root_wd),
            watched: DirWatches::default(),
            settle: options.settle,
            max_file_bytes: options.max_file_bytes,
            dirs: HashMap::new(),
            settling: HashMap::new(),
        };
        source.scan(Pass::Initial, Instant::now(), false);
        Ok::<_, FilesError>((source, events))
    })
    .await
    .expect("file source setup panicked")?;
    tracing::info!(source = source.sink.source(), directories = source.dirs.len(), "file source loaded");
    Ok(tokio::spawn(source.run(events, shutdown, options.rescan)))
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
    (read_pair(limits, dir), read_ca(limits, dir))
}

fn read_pair(limits: Limits<'_>, dir: &Path) -> Result<Option<Material>, FilesError> {
    let Some(cert_chain_pem) = read::read_file(limits, &dir.join("tls.crt"))? else { return Ok(None) };
    let Some(mut key_pem) = read::read_file(limits, &dir.join("tls.key"))? else { return Ok(None) };
    Ok(Some(Material::Tls {
        cert_chain_pem: take(cert_chain_pem),
        key_pem: KeyBytes::new(std::mem::take(&mut *key_pem)),
    }))
}

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
/// tells what changed without keeping a second copy of every key in memory.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Digests([Version; 2]);

impl Digests {
    fn of(material: &Material) -> Self {
        let (a, b): (&[u8], &[u8]) = match material {
            Material::Tls { cert_chain_pem, key_pem } => (cert_chain_pem, key_pem.as_slice()),
            Material::Validation { ca_pem, crl_pem } => (ca_pem, crl_pem.as_deref().unwrap_or_default()),
            Material::SessionTicketKeys(_) | Material::Generic(_) => (&[], &[]),
        };
        Self([Version::of(a), Version::of(b)])
    }

    /// Every file changed at once: an atomic swap, not a write in progress.
    fn all_differ(&self, other: &Self) -> bool {
        self.0[0] != other.0[0] && self.0[1] != other.0[1]
    }
}

/// What was last reported to the sink for one secret.
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
    /// The sink refused it for a reason that depends on the clock.
    retry: bool,
}

/// Whether a secret directory has its own watch.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Watch {
    #[default]
    None,
    Added(Wd),
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
    sink: Sink,
    watcher: Watcher,
    /// The root's own watch; `None` once the root is gone (added again by a scan).
    root_wd: Option<Wd>,
    watched: DirWatches,
    settle: Duration,
    max_file_bytes: u64,
    /// Per directory NAME that exists or still has something reported. The name is
    /// shared with the store's entry for the pair.
    dirs: HashMap<Arc<str>, Dir>,
    /// Directories to read again once settled: (when, first detection of the change).
    settling: HashMap<String, (Instant, Instant)>,
}

/// Directories touched by a batch of events, in the order they were first seen, with
/// that moment and whether the directory itself appeared (see `handle_events`).
#[derive(Default)]
struct Batch {
    dirs: Vec<(Arc<str>, Instant, bool)>,
    index: HashMap<Arc<str>, usize>,
    rescan: Option<Instant>,
}

impl Batch {
    fn touch(&mut self, name: &Arc<str>, at: Instant, appeared: bool) {
        match self.index.get(name) {
            Some(&i) => self.dirs[i].2 |= appeared,
            None => {
                self.index.insert(name.clone(), self.dirs.len());
                self.dirs.push((name.clone(), at, appeared));
            }
        }
    }
}

impl FileSource {
    async fn run(mut self, mut events: watch::Events, shutdown: CancellationToken, rescan: Duration) {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + rescan, rescan);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Kept across iterations: reading is cancelled only before anything was read.
        let mut raw = Vec::new();
        let mut watching = true;
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
                read = events.read(&mut raw), if watching => {
                    // One read drains the burst: one swap is a dozen events for one directory.
                    let at = Instant::now();
                    let mut batch = Batch::default();
                    match read {
                        Ok(()) => raw.drain(..).for_each(|event| self.classify(event, at, &mut batch)),
                        Err(err) => {
                            tracing::error!(source = self.sink.source(), error = %err, "cannot read file watch events; changes are seen by the periodic rescan only");
                            watching = false;
                            batch.rescan = Some(at);
                        }
                    }
                    self = self.off_workers(move |source| source.handle_events(batch)).await;
                }
                _ = ticker.tick() => self = self.off_workers(|source| source.scan(Pass::Periodic, Instant::now(), false)).await,
                _ = settled => self = self.off_workers(Self::settle_due).await,
            }
        }
        tracing::debug!(source = self.sink.source(), "file source stopped");
    }

    fn classify(&mut self, event: watch::Event, at: Instant, batch: &mut Batch) {
        if event.overflowed() {
            tracing::warn!(source = self.sink.source(), "file watch lost events (kernel queue full); rescanning");
            batch.rescan.get_or_insert(at);
            return;
        }
        if Some(event.wd) == self.root_wd {
            if event.watch_gone() {
                self.root_wd = None;
            }
            // The root itself changed (moved, deleted, unmounted): look at everything.
            if event.watch_gone() || event.about_itself() {
                batch.rescan.get_or_insert(at);
                return;
            }
            let Some(name) = event.name.as_deref().and_then(OsStr::to_str) else { return };
            if !name.starts_with('.') {
                batch.touch(&Arc::from(name), at, event.entry_appeared());
            }
            return;
        }
        if event.watch_gone() {
            // Its directory was deleted (or replaced, or unmounted): read again, which
            // watches what is there now or withdraws the secrets.
            for name in self.watched.0.remove(&event.wd).unwrap_or_default() {
                if let Some(dir) = self.dirs.get_mut(&name)
                    && dir.watch == Watch::Added(event.wd)
                {
                    dir.watch = Watch::None;
                }
                batch.touch(&name, at, false);
            }
            return;
        }
        for name in self.watched.0.get(&event.wd).into_iter().flatten() {
            batch.touch(name, at, false);
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
        if let Some(at) = batch.rescan {
            // Lost events may hide a directory replaced in between: check every watch.
            return self.scan(Pass::Event, at, true);
        }
        let root = self.canonical_root();
        for (name, at, appeared) in batch.dirs {
            self.refresh(&root, &name, Pass::Event, at, appeared);
        }
    }

    fn settle_due(&mut self) {
        let now = Instant::now();
        let due: Vec<_> = self.settling.extract_if(|_, (at, _)| *at <= now).collect();
        let root = self.canonical_root();
        for (name, (_, detected_at)) in due {
            self.refresh(&root, &name, Pass::Confirm, detected_at, false);
        }
    }

    /// The root without links, which every file read must stay inside. Taken again for
    /// each batch of work, so a root that is itself a link may be moved. When it cannot
    /// be resolved (gone), the root as configured: nothing under it can be read then.
    fn canonical_root(&self) -> PathBuf {
        canonical_root(&self.root).unwrap_or_else(|_| self.root.clone())
    }

    /// Reads every directory under the root, and every one known before (to notice
    /// removals). `recheck_watches`: whether each watch still is on the directory now at
    /// its path, after events were lost.
    fn scan(&mut self, pass: Pass, detected_at: Instant, recheck_watches: bool) {
        if self.root_wd.is_none() {
            // The root went away (deleted, unmounted); if it is back, so is its watch.
            self.root_wd = self.watcher.watch_root(&self.root).ok();
        }
        let mut names: BTreeSet<String> = self.dirs.keys().map(|name| name.to_string()).collect();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(err) => {
                tracing::warn!(source = self.sink.source(), path = %self.root.display(), error = %err, "cannot list secret directories; last good versions kept");
                return;
            }
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                tracing::warn!(source = self.sink.source(), path = %entry.path().display(), "ignoring directory: name is not UTF-8");
                continue;
            };
            if !name.starts_with('.') && entry.path().is_dir() {
                names.insert(name.to_owned());
            }
        }
        let root = self.canonical_root();
        for name in names {
            self.refresh(&root, &name, pass, detected_at, recheck_watches);
        }
    }

    /// Watches directory `name` if it exists, re-reads it (files inside `root`, the
    /// canonical root) and reports what changed through the sink. `appeared`: an entry
    /// was created or renamed under that name, so the directory there may be another one
    /// than the one watched.
    fn refresh(&mut self, root: &Path, name: &str, pass: Pass, detected_at: Instant, appeared: bool) {
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
        let watch = match (exists, dir.watch) {
            (true, Watch::Added(wd)) if !appeared => Watch::Added(wd),
            // Watching the directory at the path again returns the same watch if it is the
            // same directory, and a new one if it was replaced.
            (true, before) => self.watched.add(&self.watcher, self.root_wd, &path, &name, before, &self.sink),
            (false, _) => Watch::None,
        };
        if let Watch::Added(old) = dir.watch
            && watch != dir.watch
        {
            self.watched.release(&self.watcher, self.root_wd, old, &name);
        }
        dir.watch = watch;
        let limits = Limits { root, max_file_bytes: self.max_file_bytes };
        let (pair, ca) = read_secret_dir_within(limits, &path);
        let pair_waits = report(&self.sink, &name, &mut dir.tls, pair, pass, detected_at);
        let mut ca_slot = dir.ca.take().map(|slot| *slot).unwrap_or_default();
        let ca_name = format!("{name}-cacert").into();
        let ca_waits = report(&self.sink, &ca_name, &mut ca_slot, ca, pass, detected_at);
        dir.ca = ca_slot.last.is_some().then(|| Box::new(ca_slot));
        if !exists && dir.tls.last.is_none() && dir.ca.is_none() {
            self.dirs.remove(&name);
        }
        if pair_waits || ca_waits {
            self.settling.entry(name.to_string()).or_insert((Instant::now() + self.settle, detected_at));
        }
    }
}

/// The secret directories each watch is for: one, or several names of one directory
/// (links to it).
#[derive(Default)]
struct DirWatches(HashMap<Wd, SmallVec<[Arc<str>; 1]>>);

impl DirWatches {
    /// Watches the directory at `path` for `name`. A failure is logged once, not on every
    /// retry; a directory gone meanwhile is not a failure.
    fn add(
        &mut self,
        watcher: &Watcher,
        root_wd: Option<Wd>,
        path: &Path,
        name: &Arc<str>,
        before: Watch,
        sink: &Sink,
    ) -> Watch {
        match watcher.watch_dir(path) {
            Ok(wd) => {
                // A link to the root itself: its events are the root's.
                if Some(wd) != root_wd {
                    let names = self.0.entry(wd).or_default();
                    if !names.contains(name) {
                        names.push(name.clone());
                    }
                }
                Watch::Added(wd)
            }
            Err(err) if matches!(err.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => Watch::None,
            Err(err) => {
                if before != Watch::Failed {
                    tracing::warn!(source = sink.source(), path = %path.display(), error = %err, "cannot watch secret directory; its changes are seen by the periodic rescan only");
                }
                Watch::Failed
            }
        }
    }

    /// `name` no longer uses watch `wd`; the watch is removed with its last name.
    fn release(&mut self, watcher: &Watcher, root_wd: Option<Wd>, wd: Wd, name: &Arc<str>) {
        let Some(names) = self.0.get_mut(&wd) else { return };
        names.retain(|n| n != name);
        if names.is_empty() {
            self.0.remove(&wd);
            if Some(wd) != root_wd {
                watcher.unwatch(wd);
            }
        }
    }
}

/// Reports one secret read from disk, unless it is what was reported last. Returns true
/// when the read looks like a write in progress and is worth another look once settled.
fn report(
    sink: &Sink,
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
                sink.reject(secret.clone(), err.reason(), &err);
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
            sink.remove(secret);
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
            // sink: the common rotation pays for one check only.
            let swapped_whole = matches!(slot.last, Some(Reported::Material(last)) if last.all_differ(&digests));
            if pass.settles() && !unchanged && !swapped_whole && pki::check(secret, &material, &quiet_check()).is_err()
            {
                tracing::debug!(
                    secret = &**secret,
                    source = sink.source(),
                    "secret files inconsistent; waiting for the write to finish"
                );
                return true;
            }
            let result = sink.update(secret.clone(), &material, detected_at);
            slot.retry = matches!(result, Err(PkiError::NotYetValid { .. } | PkiError::Expired { .. }));
            slot.last = Some(Reported::Material(digests));
            false
        }
    }
}

/// Expiry is not a write in progress; the sink judges it with the configured policy.
fn quiet_check() -> CheckOptions {
    CheckOptions { allow_expired: true, now: SystemTime::now() }
}

#[cfg(test)]
mod tests;
