//! The store: per secret name, the current good version, encoded once and shared by
//! every stream.
//!
//! Every subscriber holds a `watch` receiver per name, so wake-ups are latest-wins: a
//! slow proxy skips intermediate versions, never blocks another, and no queue grows.
//! Several sources may offer one name; the source registered first wins and the others
//! are kept as shadowed candidates so a collision is visible in status and takes over
//! when the winner withdraws.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use dashmap::DashMap;
use smallvec::SmallVec;
use tokio::sync::{broadcast, watch};

use crate::pki::{self, CertIdentity, CheckOptions, Checked, SecretKind, SecretMeta, SharedKeyBytes};
use crate::policy::{OnDelete, OnInvalid, Placeholder, PlaceholderCause, Policy};
use crate::unix_time;
use crate::version::Version;

/// One good version of a secret, as served. Cheap to clone through `Arc`.
pub struct Served {
    pub name: Arc<str>,
    pub version: Version,
    pub kind: SecretKind,
    /// Encoded Envoy `Secret`; the SDS codec wraps it in a `google.protobuf.Any`.
    pub resource: SharedKeyBytes,
    /// The rest of what status shows is read from `resource` on demand
    /// ([`pki::identity`]): kept here, it would cost more than the PEM it describes.
    pub meta: SecretMeta,
    pub source: Arc<str>,
    pub updated: SystemTime,
    /// When the source noticed the change; start of the change-to-push latency. Status
    /// shows it on the wall clock, for benchmarks in other processes.
    pub detected_at: Instant,
    /// Set when this is the placeholder standing in for the secret (see [`crate::policy`]).
    pub placeholder: Option<PlaceholderCause>,
}

impl Served {
    /// The same version served under another name (see [`crate::xds::names`]); `None`
    /// if the resource cannot be renamed.
    pub fn renamed(&self, name: &str) -> Option<Served> {
        Some(Served {
            name: Arc::from(name),
            version: self.version,
            kind: self.kind,
            resource: pki::renamed(&self.resource, name)?.into(),
            meta: self.meta,
            source: self.source.clone(),
            updated: self.updated,
            detected_at: self.detected_at,
            placeholder: self.placeholder,
        })
    }

    /// A placeholder for a deleted secret: Delta streams announce the removal instead.
    pub fn withdrawn(&self) -> bool {
        self.placeholder == Some(PlaceholderCause::Deleted)
    }
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// What subscribers see for a name: the served version, or none yet / deleted.
pub type Current = Option<Arc<Served>>;

/// A source's place in the precedence order (lower wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank(pub usize);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The served content changed.
    Changed,
    /// Same content as already stored: nothing pushed.
    Unchanged,
    /// Stored, but another source with precedence serves this name.
    Shadowed { by: Arc<str> },
}

struct Entry {
    /// Created on the first subscription and dropped with the last one: most stored
    /// secrets have no subscriber on a given replica, and a channel costs ~0.5 KiB.
    tx: Option<watch::Sender<Current>>,
    /// Good versions per offering source, by precedence; the first is served.
    candidates: ByRank<Arc<Served>>,
    /// Served when no source offers a good version and the policy asks for it.
    placeholder: Option<Arc<Served>>,
    /// Last rejection per source, cleared by that source's next good update. Rare, hence
    /// boxed.
    errors: Option<Box<ByRank<Rejection>>>,
    /// Set when a served secret disappeared from all sources.
    deleted: bool,
}

impl Entry {
    fn new() -> Self {
        Self { tx: None, candidates: ByRank::default(), placeholder: None, errors: None, deleted: false }
    }

    /// What is served now.
    fn current(&self) -> Current {
        self.candidates.values().next().or(self.placeholder.as_ref()).cloned()
    }

    /// Publishes the winner if it differs from `before`, what subscribers have. Returns
    /// whether it did, and how the number of served names changed (-1, 0 or 1).
    fn publish(&mut self, before: Current) -> (bool, isize) {
        let next = self.current();
        let (same, delta) = match (&before, &next) {
            (Some(a), Some(b)) => (a.version == b.version && a.source == b.source, 0),
            (None, None) => (true, 0),
            (None, Some(_)) => (false, 1),
            (Some(_), None) => (false, -1),
        };
        if same {
            return (false, 0);
        }
        self.deleted = next.as_ref().is_none_or(|n| n.withdrawn());
        if let Some(tx) = &self.tx {
            tx.send_replace(next);
        }
        (true, delta)
    }

    fn set_error(&mut self, rank: Rank, source: Arc<str>, reason: String) {
        self.errors.get_or_insert_default().insert(rank, (source, reason));
    }

    fn clear_error(&mut self, rank: Rank) {
        if let Some(errors) = &mut self.errors {
            errors.remove(rank);
            if errors.is_empty() {
                self.errors = None;
            }
        }
    }

    fn first_error(&self) -> Option<&Rejection> {
        self.errors.as_ref()?.values().next()
    }

    /// Nothing served, rejected or deleted: only a subscription keeps the entry.
    fn is_vacant(&self) -> bool {
        self.candidates.is_empty() && self.placeholder.is_none() && self.errors.is_none() && !self.deleted
    }

    fn subscribers(&self) -> usize {
        self.tx.as_ref().map_or(0, |tx| tx.receiver_count())
    }
}

/// Source name and reason.
type Rejection = (Arc<str>, String);

/// One value per source, ordered by precedence. Almost always one, held inline: a map
/// node or a vector's buffer would cost more than the rest of the entry.
struct ByRank<T>(SmallVec<[(Rank, T); 1]>);

impl<T> Default for ByRank<T> {
    fn default() -> Self {
        Self(SmallVec::new())
    }
}

impl<T> ByRank<T> {
    fn get(&self, rank: Rank) -> Option<&T> {
        self.0.iter().find(|(r, _)| *r == rank).map(|(_, v)| v)
    }

    fn insert(&mut self, rank: Rank, value: T) {
        match self.0.binary_search_by_key(&rank, |(r, _)| *r) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (rank, value)),
        }
    }

    fn remove(&mut self, rank: Rank) -> Option<T> {
        let i = self.0.iter().position(|(r, _)| *r == rank)?;
        let (_, value) = self.0.remove(i);
        if self.0.spilled() && self.0.len() <= 1 {
            self.0.shrink_to_fit();
        }
        Some(value)
    }

    fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|(_, v)| v)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Public status of one secret (for /status/secrets and the status API).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecretStatus {
    pub name: String,
    pub kind: Option<SecretKind>,
    pub version: Option<String>,
    pub source: Option<String>,
    #[serde(flatten)]
    pub identity: CertIdentity,
    #[serde(flatten)]
    pub meta: SecretMeta,
    pub deleted: bool,
    /// Why the placeholder is served instead of the secret, if it is.
    pub placeholder: Option<PlaceholderCause>,
    /// The served certificate has expired (`allow_expired`): served only because
    /// nothing valid is, and said here so that nobody mistakes it for healthy.
    pub expired: bool,
    pub subscribers: usize,
    pub updated_unix_ms: Option<i64>,
    /// When the source noticed the change now served, in µs since the epoch: lets a
    /// benchmark measure latency from the source change rather than from its own clock.
    pub detected_unix_us: Option<i64>,
    /// Latest rejection, naming the source and the reason.
    pub last_error: Option<String>,
    pub shadowed_sources: Vec<String>,
    /// OCSP stapling by certwire (`[ocsp]`), when on for this secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ocsp: Option<crate::stapling::OcspStatus>,
}

pub struct Store {
    /// The key is shared with every `Served::name` of the entry.
    entries: DashMap<Arc<str>, Entry>,
    sources: std::sync::Mutex<Vec<Arc<str>>>,
    /// Names subscribed but not stored: on-demand sources (dev CA) mint them.
    demand: broadcast::Sender<String>,
    /// Names currently served; kept as a count so updates stay O(1) with many secrets.
    served: AtomicUsize,
    policy: Policy,
    /// Made the first time a policy needs it.
    placeholder: std::sync::OnceLock<Placeholder>,
    /// OCSP stapling state per name, set by the stapler (src/stapling); empty unless
    /// `[ocsp]` is on.
    ocsp: DashMap<Arc<str>, crate::stapling::OcspStatus>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        Self::with_policy(Policy::default())
    }

    pub fn with_policy(policy: Policy) -> Self {
        let (demand, _) = broadcast::channel(1024);
        let placeholder = std::sync::OnceLock::new();
        if policy.uses_placeholder() {
            // Made now rather than on first use, under a store lock.
            placeholder.get_or_init(Placeholder::generate);
        }
        Self {
            entries: DashMap::new(),
            sources: Default::default(),
            demand,
            served: AtomicUsize::new(0),
            policy,
            placeholder,
            ocsp: DashMap::new(),
        }
    }

    /// Sets (or clears) what status shows about OCSP stapling for `name`.
    pub fn set_ocsp(&self, name: &str, status: Option<crate::stapling::OcspStatus>) {
        match status {
            Some(status) => {
                self.ocsp.insert(Arc::from(name), status);
            }
            None => {
                self.ocsp.remove(name);
            }
        }
    }

    /// The placeholder standing in for `name`, or `None` for a kind without one.
    fn placeholder(&self, name: &Arc<str>, kind: SecretKind, cause: PlaceholderCause) -> Option<Arc<Served>> {
        let material = self.placeholder.get_or_init(Placeholder::generate).material(kind)?;
        let checked = match pki::check(name, material, &CheckOptions::default()) {
            Ok(checked) => checked,
            Err(err) => {
                tracing::error!(secret = &**name, error = %err, "the placeholder failed its own checks; withheld");
                return None;
            }
        };
        Some(Arc::new(Served {
            name: name.clone(),
            version: Version::of_served(kind, checked.resource.as_slice()),
            kind,
            resource: checked.resource.into(),
            meta: checked.meta,
            source: Arc::from("placeholder"),
            updated: SystemTime::now(),
            detected_at: Instant::now(),
            placeholder: Some(cause),
        }))
    }

    /// Registers a source; registration order is precedence order.
    pub fn register_source(&self, name: &str) -> (Rank, Arc<str>) {
        let mut sources = self.sources.lock().expect("sources lock");
        let name: Arc<str> = Arc::from(name);
        sources.push(name.clone());
        (Rank(sources.len() - 1), name)
    }

    /// Stores a checked version offered by `source` for `name`. A new entry keeps `name`
    /// as it is given, so a caller holding an `Arc<str>` shares it.
    pub fn upsert(
        &self,
        rank: Rank,
        source: &Arc<str>,
        name: impl Into<Arc<str>>,
        checked: Checked,
        detected_at: Instant,
    ) -> Outcome {
        let version = Version::of_served(checked.kind, checked.resource.as_slice());
        let mut entry = self.entries.entry(name.into()).or_insert_with(Entry::new);
        entry.clear_error(rank);
        if let Some(existing) = entry.candidates.get(rank)
            && existing.version == version
        {
            return Outcome::Unchanged;
        }
        let served = Arc::new(Served {
            name: entry.key().clone(),
            version,
            kind: checked.kind,
            resource: checked.resource.into(),
            meta: checked.meta,
            source: source.clone(),
            updated: SystemTime::now(),
            detected_at,
            placeholder: None,
        });
        let before = entry.current();
        entry.placeholder = None;
        entry.candidates.insert(rank, served);
        let (changed, delta) = entry.publish(before);
        self.count(delta);
        if changed {
            Outcome::Changed
        } else {
            match entry.current() {
                Some(w) if w.source != *source => Outcome::Shadowed { by: w.source.clone() },
                _ => Outcome::Unchanged,
            }
        }
    }

    /// Records a rejected update of a secret of `kind` (when known). What is served does
    /// not change, except that a name with nothing served gets the placeholder when
    /// `on_invalid = "serve-placeholder"`. Returns whether it did.
    pub fn reject(
        &self,
        rank: Rank,
        source: &Arc<str>,
        name: impl Into<Arc<str>>,
        reason: String,
        kind: Option<SecretKind>,
    ) -> bool {
        let mut entry = self.entries.entry(name.into()).or_insert_with(Entry::new);
        entry.set_error(rank, source.clone(), reason);
        let (Some(kind), OnInvalid::ServePlaceholder) = (kind, self.policy.on_invalid) else { return false };
        if !entry.candidates.is_empty() || entry.placeholder.is_some() {
            return false;
        }
        let Some(placeholder) = self.placeholder(entry.key(), kind, PlaceholderCause::Invalid) else { return false };
        entry.placeholder = Some(placeholder);
        let (changed, delta) = entry.publish(None);
        self.count(delta);
        changed
    }

    /// Drops `rank`'s recorded error for `name`; what is served does not change.
    pub fn clear_error(&self, rank: Rank, name: &str) {
        if let Some(mut entry) = self.entries.get_mut(name) {
            entry.clear_error(rank);
        }
    }

    /// `source` no longer offers `name`. Returns true when what is served changed. With
    /// `on_delete = "withdraw"`, a secret no source offers any more is replaced by the
    /// placeholder.
    pub fn remove(&self, rank: Rank, name: &str) -> bool {
        let Some(mut entry) = self.entries.get_mut(name) else { return false };
        entry.clear_error(rank);
        let before = entry.current();
        let kind = match entry.candidates.remove(rank) {
            Some(removed) => removed.kind,
            // The placeholder for content never good stays while a source still reports
            // an error for the name; once none does, the name is gone like any other.
            None => match &entry.placeholder {
                Some(p) if p.placeholder == Some(PlaceholderCause::Invalid) && entry.errors.is_none() => p.kind,
                _ => return false,
            },
        };
        if entry.candidates.is_empty() {
            entry.placeholder = match self.policy.on_delete {
                OnDelete::Withdraw => self.placeholder(entry.key(), kind, PlaceholderCause::Deleted),
                OnDelete::Keep => None,
            };
        }
        let (changed, delta) = entry.publish(before);
        self.count(delta);
        changed
    }

    fn count(&self, delta: isize) {
        match delta {
            1 => self.served.fetch_add(1, Ordering::Relaxed),
            -1 => self.served.fetch_sub(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// Subscribes to a name. Unknown names are announced on the demand channel so an
    /// on-demand source can mint them; the subscriber is woken the moment they exist.
    pub fn subscribe(&self, name: &str) -> watch::Receiver<Current> {
        let mut entry = self.entries.entry(Arc::from(name)).or_insert_with(Entry::new);
        let current = entry.current();
        let rx = entry.tx.get_or_insert_with(|| watch::channel(current).0).subscribe();
        let missing = entry.candidates.is_empty();
        drop(entry);
        if missing {
            // No receiver simply means no on-demand source runs.
            let _ = self.demand.send(name.to_owned());
        }
        rx
    }

    /// Called when a subscriber let go of `name`: drops the channel when it was the last
    /// one, and the whole entry when nothing is served or recorded for the name.
    pub fn release(&self, name: &str) {
        let Some(mut entry) = self.entries.get_mut(name) else { return };
        if entry.subscribers() > 0 {
            return;
        }
        entry.tx = None;
        let forget = entry.is_vacant();
        drop(entry);
        if forget {
            self.entries.remove_if(name, |_, e| e.is_vacant() && e.subscribers() == 0);
        }
    }

    pub fn get(&self, name: &str) -> Current {
        self.entries.get(name).and_then(|e| e.current())
    }

    pub fn demand(&self) -> broadcast::Receiver<String> {
        self.demand.subscribe()
    }

    /// Follows `name` if the store knows it (served, rejected, deleted or subscribed),
    /// like [`Store::subscribe`] but never creating an entry nor announcing demand: for
    /// observers (the rollout watch), so asking about a name mints or keeps nothing. The
    /// caller calls [`Store::release`] once the receiver is dropped.
    pub fn watch_known(&self, name: &str) -> Option<watch::Receiver<Current>> {
        let mut entry = self.entries.get_mut(name)?;
        let current = entry.current();
        Some(entry.tx.get_or_insert_with(|| watch::channel(current).0).subscribe())
    }

    /// How many receivers follow `name` now (streams and observers).
    pub fn subscribers(&self, name: &str) -> usize {
        self.entries.get(name).map_or(0, |e| e.subscribers())
    }

    /// Forgets `name` entirely, without the "deleted" mark a removal leaves, when no source
    /// offers it, none recorded an error and nobody subscribes: an on-demand source (dev
    /// CA) withdraws a name it made up, and the store keeps nothing of every name a client
    /// once asked for. Returns whether it was forgotten.
    pub fn purge(&self, name: &str) -> bool {
        self.entries
            .remove_if(name, |_, e| e.candidates.is_empty() && e.errors.is_none() && e.subscribers() == 0)
            .is_some()
    }

    /// Names some stream waits for that no source serves (yet).
    pub fn wanted_unserved(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.candidates.is_empty() && e.subscribers() > 0)
            .map(|e| e.key().to_string())
            .collect()
    }

    /// Served secrets that expire, with the first expiry, by name. Placeholders are not
    /// secrets: their expiry would only be noise.
    pub fn expiries(&self) -> Vec<(Arc<str>, i64)> {
        let mut out: Vec<(Arc<str>, i64)> = self
            .entries
            .iter()
            .filter_map(|e| {
                let current = e.current().filter(|c| c.placeholder.is_none())?;
                Some((e.key().clone(), current.meta.not_after_unix?))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Names served by a placeholder, by cause.
    pub fn placeholders(&self) -> [(PlaceholderCause, usize); 2] {
        let (mut invalid, mut deleted) = (0, 0);
        for e in self.entries.iter().filter(|e| e.candidates.is_empty()) {
            match e.placeholder.as_ref().and_then(|p| p.placeholder) {
                Some(PlaceholderCause::Invalid) => invalid += 1,
                Some(PlaceholderCause::Deleted) => deleted += 1,
                None => {}
            }
        }
        [(PlaceholderCause::Invalid, invalid), (PlaceholderCause::Deleted, deleted)]
    }

    pub fn served_count(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> Vec<SecretStatus> {
        // Identities are parsed after the shard locks are released.
        let mut rows: Vec<(SecretStatus, Current)> = self
            .entries
            .iter()
            .filter(|e| !e.is_vacant())
            .map(|e| {
                let current = e.current();
                let shadowed_sources = e.candidates.values().skip(1).map(|s| s.source.to_string()).collect();
                let last_error = e.first_error().map(|(src, why)| format!("{src}: {why}"));
                let status = SecretStatus {
                    name: e.key().to_string(),
                    kind: current.as_ref().map(|c| c.kind),
                    version: current.as_ref().map(|c| c.version.to_string()),
                    source: current.as_ref().map(|c| c.source.to_string()),
                    identity: CertIdentity::default(),
                    meta: current.as_ref().map(|c| c.meta).unwrap_or_default(),
                    deleted: e.deleted,
                    placeholder: current.as_ref().and_then(|c| c.placeholder),
                    expired: current.as_ref().is_some_and(|c| {
                        c.placeholder.is_none()
                            && c.meta.not_after_unix.is_some_and(|t| t < unix_time::secs(SystemTime::now()))
                    }),
                    subscribers: e.subscribers(),
                    updated_unix_ms: current.as_ref().map(|c| unix_time::millis(c.updated)),
                    detected_unix_us: current
                        .as_ref()
                        .map(|c| unix_time::micros(SystemTime::now() - c.detected_at.elapsed())),
                    last_error,
                    shadowed_sources,
                    ocsp: self.ocsp.get(e.key()).map(|s| s.clone()),
                };
                (status, current)
            })
            .collect();
        for (status, current) in &mut rows {
            if let Some(current) = current {
                status.identity = pki::identity(&current.resource);
            }
        }
        let mut out: Vec<SecretStatus> = rows.into_iter().map(|(status, _)| status).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The version the store gives `checked(content)`.
    fn version_of(content: &[u8]) -> Version {
        Version::of_served(SecretKind::GenericSecret, content)
    }

    fn checked(content: &[u8]) -> Checked {
        Checked {
            kind: SecretKind::GenericSecret,
            resource: crate::pki::KeyBytes::new(content.to_vec()),
            meta: SecretMeta::default(),
            identity: CertIdentity::default(),
        }
    }

    #[test]
    fn upsert_publishes_once_per_content() {
        let store = Store::new();
        let (rank, src) = store.register_source("files:/a");
        let mut rx = store.subscribe("s");
        assert!(rx.borrow_and_update().is_none());
        assert_eq!(store.upsert(rank, &src, "s", checked(b"one"), Instant::now()), Outcome::Changed);
        assert!(rx.has_changed().unwrap());
        let v1 = rx.borrow_and_update().clone().unwrap().version;
        assert_eq!(store.upsert(rank, &src, "s", checked(b"one"), Instant::now()), Outcome::Unchanged);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(store.upsert(rank, &src, "s", checked(b"two"), Instant::now()), Outcome::Changed);
        assert_ne!(rx.borrow_and_update().clone().unwrap().version, v1);
    }

    #[test]
    fn new_entry_keeps_the_name_it_is_given() {
        let store = Store::new();
        let (rank, src) = store.register_source("files:/a");
        let name: Arc<str> = Arc::from("s");
        store.upsert(rank, &src, name.clone(), checked(b"one"), Instant::now());
        store.upsert(rank, &src, "s", checked(b"two"), Instant::now());
        assert!(Arc::ptr_eq(&store.get("s").unwrap().name, &name), "one copy of the name");
    }

    #[test]
    fn latest_wins_for_a_slow_subscriber() {
        let store = Store::new();
        let (rank, src) = store.register_source("files:/a");
        let mut rx = store.subscribe("s");
        for i in 0..100u8 {
            store.upsert(rank, &src, "s", checked(&[i]), Instant::now());
        }
        // One pending wake-up, and it shows only the last version.
        assert_eq!(rx.borrow_and_update().clone().unwrap().version, version_of(&[99]));
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn first_source_wins_and_shadowed_takes_over() {
        let store = Store::new();
        let (r1, s1) = store.register_source("files:/first");
        let (r2, s2) = store.register_source("files:/second");
        assert_eq!(store.upsert(r2, &s2, "s", checked(b"second"), Instant::now()), Outcome::Changed);
        assert_eq!(store.upsert(r1, &s1, "s", checked(b"first"), Instant::now()), Outcome::Changed);
        assert_eq!(
            store.upsert(r2, &s2, "s", checked(b"second-2"), Instant::now()),
            Outcome::Shadowed { by: s1.clone() }
        );
        let st = &store.status()[0];
        assert_eq!(st.source.as_deref(), Some("files:/first"));
        assert_eq!(st.shadowed_sources, vec!["files:/second".to_string()]);
        assert!(store.remove(r1, "s"));
        assert_eq!(store.get("s").unwrap().source, s2);
    }

    #[test]
    fn reject_keeps_last_good_and_is_reported() {
        let store = Store::new();
        let (rank, src) = store.register_source("files:/a");
        store.upsert(rank, &src, "s", checked(b"good"), Instant::now());
        store.upsert(rank, &src, "other", checked(b"fine"), Instant::now());
        store.reject(rank, &src, "s", "key mismatch".into(), None);
        assert_eq!(store.get("s").unwrap().version, version_of(b"good"));
        let st = store.status();
        assert_eq!(st[1].last_error.as_deref(), Some("files:/a: key mismatch"));
        assert!(st[0].last_error.is_none(), "other secret untouched");
        // The next good update clears the error.
        store.upsert(rank, &src, "s", checked(b"good2"), Instant::now());
        assert!(store.status()[1].last_error.is_none());
    }

    #[test]
    fn delete_marks_deleted_and_notifies() {
        let store = Store::new();
        let (rank, src) = store.register_source("files:/a");
        store.upsert(rank, &src, "s", checked(b"x"), Instant::now());
        let mut rx = store.subscribe("s");
        rx.borrow_and_update();
        assert_eq!(store.served_count(), 1);
        assert!(store.remove(rank, "s"));
        assert!(rx.borrow_and_update().is_none());
        assert!(store.status()[0].deleted);
        assert_eq!(store.served_count(), 0);
    }

    #[test]
    fn channel_lives_only_while_subscribed() {
        let store = Store::new();
        let (rank, src) = store.register_source("files:/a");
        store.upsert(rank, &src, "s", checked(b"x"), Instant::now());
        let rx = store.subscribe("s");
        assert_eq!(store.status()[0].subscribers, 1);
        drop(rx);
        store.release("s");
        assert_eq!(store.status()[0].subscribers, 0);
        assert!(store.get("s").is_some(), "content stays when the channel goes");
        // A later subscriber gets the current content at once.
        let rx = store.subscribe("s");
        assert_eq!(rx.borrow().clone().unwrap().version, version_of(b"x"));
        store.upsert(rank, &src, "s", checked(b"y"), Instant::now());
        assert_eq!(rx.borrow().clone().unwrap().version, version_of(b"y"));
    }

    fn tls(content: &[u8]) -> Checked {
        Checked { kind: SecretKind::TlsCertificate, ..checked(content) }
    }

    fn with(on_invalid: OnInvalid, on_delete: OnDelete) -> Store {
        Store::with_policy(Policy { on_invalid, on_delete })
    }

    #[test]
    fn a_name_never_good_gets_the_placeholder_only_when_asked() {
        let store = with(OnInvalid::Withhold, OnDelete::Keep);
        let (rank, src) = store.register_source("files:/a");
        assert!(!store.reject(rank, &src, "s", "key mismatch".into(), Some(SecretKind::TlsCertificate)));
        assert!(store.get("s").is_none(), "withheld");

        let store = with(OnInvalid::ServePlaceholder, OnDelete::Keep);
        let (rank, src) = store.register_source("files:/a");
        let mut rx = store.subscribe("s");
        assert!(!store.reject(rank, &src, "s", "unreadable".into(), None), "no kind, no placeholder");
        assert!(store.reject(rank, &src, "s", "key mismatch".into(), Some(SecretKind::TlsCertificate)));
        let placeholder = rx.borrow_and_update().clone().unwrap();
        assert_eq!(
            (placeholder.placeholder, placeholder.kind),
            (Some(PlaceholderCause::Invalid), SecretKind::TlsCertificate)
        );
        assert!(!store.reject(rank, &src, "s", "key mismatch".into(), Some(SecretKind::TlsCertificate)), "made once");
        assert!(!rx.has_changed().unwrap());
        let st = &store.status()[0];
        assert_eq!((st.placeholder, st.source.as_deref()), (Some(PlaceholderCause::Invalid), Some("placeholder")));
        assert!(st.last_error.as_deref().unwrap().contains("key mismatch"), "the reason stays visible");
        assert_eq!(store.placeholders()[0], (PlaceholderCause::Invalid, 1));
        assert!(store.expiries().is_empty(), "a placeholder has no expiry worth alerting on");
        // The first good version replaces it.
        store.upsert(rank, &src, "s", tls(b"good"), Instant::now());
        assert_eq!(rx.borrow_and_update().clone().unwrap().version, Version::of(b"good"));
        assert_eq!(store.placeholders()[0], (PlaceholderCause::Invalid, 0));
        // A later bad update keeps the good version: the placeholder is for nothing else.
        assert!(!store.reject(rank, &src, "s", "key mismatch".into(), Some(SecretKind::TlsCertificate)));
        assert_eq!(store.get("s").unwrap().version, Version::of(b"good"));
    }

    #[test]
    fn a_ca_name_gets_a_placeholder_ca() {
        let store = with(OnInvalid::ServePlaceholder, OnDelete::Keep);
        let (rank, src) = store.register_source("files:/a");
        store.reject(rank, &src, "s-cacert", "bad CA".into(), Some(SecretKind::ValidationContext));
        assert_eq!(store.get("s-cacert").unwrap().kind, SecretKind::ValidationContext);
        store.reject(rank, &src, "keys", "bad keys".into(), Some(SecretKind::SessionTicketKeys));
        assert!(store.get("keys").is_none(), "no harmless stand-in for ticket keys");
    }

    #[test]
    fn deletion_keeps_or_withdraws() {
        let store = with(OnInvalid::Withhold, OnDelete::Keep);
        let (rank, src) = store.register_source("files:/a");
        store.upsert(rank, &src, "s", tls(b"x"), Instant::now());
        assert!(store.remove(rank, "s"));
        assert!(store.get("s").is_none());

        let store = with(OnInvalid::Withhold, OnDelete::Withdraw);
        let (rank, src) = store.register_source("files:/a");
        store.upsert(rank, &src, "s", tls(b"x"), Instant::now());
        let mut rx = store.subscribe("s");
        rx.borrow_and_update();
        assert!(store.remove(rank, "s"));
        let withdrawn = rx.borrow_and_update().clone().unwrap();
        assert!(withdrawn.withdrawn());
        let st = &store.status()[0];
        assert!(st.deleted && st.placeholder == Some(PlaceholderCause::Deleted));
        assert_eq!(store.served_count(), 1, "the placeholder is served");
        // Back again: the secret replaces the placeholder.
        store.upsert(rank, &src, "s", tls(b"y"), Instant::now());
        assert_eq!(rx.borrow_and_update().clone().unwrap().version, Version::of(b"y"));
        assert!(!store.status()[0].deleted);
    }

    #[test]
    fn a_placeholder_for_bad_content_goes_with_the_content() {
        let store = with(OnInvalid::ServePlaceholder, OnDelete::Keep);
        let (rank, src) = store.register_source("files:/a");
        store.reject(rank, &src, "s", "key mismatch".into(), Some(SecretKind::TlsCertificate));
        assert!(store.get("s").is_some());
        assert!(store.remove(rank, "s"), "the source dropped the broken secret");
        assert!(store.get("s").is_none());
        assert!(store.status()[0].deleted);
    }

    #[tokio::test]
    async fn unknown_name_is_demanded() {
        let store = Store::new();
        let mut demand = store.demand();
        let _rx = store.subscribe("new-name");
        assert_eq!(demand.recv().await.unwrap(), "new-name");
    }
}
