//! The one path from a source into the store: every update is checked (pki) before it
//! can be stored, and every rejection is logged, counted and recorded in status with the
//! secret's name and the reason, while the last good version keeps being served.

use std::sync::Arc;
use std::time::Instant;

use crate::metrics::{Metrics, RejectLabel, SourceLabel};
use crate::pki::{self, CheckOptions, Material, PkiError};
use crate::store::{Outcome, Rank, Store};

/// Handed to each source: reports what the source found for a name.
#[derive(Clone)]
pub struct Intake {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    rank: Rank,
    source: Arc<str>,
    allow_expired: bool,
    /// The source is loading what already exists: one summary line from the source
    /// says what it loaded, not one line per secret (1,000 Secrets made 3,000 lines).
    loading: bool,
}

impl Intake {
    /// Registers a source named `source` (e.g. `files:/etc/certs`); earlier intakes win.
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>, source: &str, allow_expired: bool) -> Self {
        let (rank, source) = store.register_source(source);
        Self { store, metrics, rank, source, allow_expired, loading: false }
    }

    /// Marks the start (true) or the end (false) of this intake's initial load: while
    /// loading, accepted updates are logged at debug. Rejections are always errors.
    pub fn set_loading(&mut self, loading: bool) {
        self.loading = loading;
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Checks and stores `material` for `name`, noticed by the source at `detected_at`.
    /// A source that keeps the name as an `Arc<str>` passes that: a new store entry is
    /// keyed by the same copy.
    pub fn update<N>(&self, name: N, material: &Material, detected_at: Instant) -> Result<Outcome, PkiError>
    where
        N: AsRef<str> + Clone + Into<Arc<str>>,
    {
        self.update_aliases(std::slice::from_ref(&name), material, detected_at)
    }

    /// Like [`Intake::update`] for one piece of material served under several names (a
    /// Kubernetes Secret is `kubernetes://ns/name`, `kubernetes://name` and `name`): a
    /// rejection is logged and counted once, and recorded for every name. The outcome is
    /// that of the first name.
    pub fn update_aliases<N>(&self, names: &[N], material: &Material, detected_at: Instant) -> Result<Outcome, PkiError>
    where
        N: AsRef<str> + Clone + Into<Arc<str>>,
    {
        let opts = CheckOptions { allow_expired: self.allow_expired, now: std::time::SystemTime::now() };
        let mut first = None;
        let mut fingerprint = None;
        for name in names {
            // The Envoy Secret carries its name, so each alias is encoded on its own;
            // the checks cannot pass for one name and fail for another.
            let checked = match pki::check(name.as_ref(), material, &opts) {
                Ok(checked) => checked,
                Err(err) => return Err(self.rejected(names, err)),
            };
            fingerprint.get_or_insert_with(|| checked.identity.fingerprint_sha256.clone());
            let outcome = self.store.upsert(self.rank, &self.source, name.clone().into(), checked, detected_at);
            first.get_or_insert(outcome);
        }
        let outcome = first.unwrap_or(Outcome::Unchanged);
        let fingerprint = fingerprint.flatten();
        self.log_outcome(names, &outcome, fingerprint.as_deref());
        Ok(outcome)
    }

    /// One line per update, however many names it is served under.
    fn log_outcome<N: AsRef<str>>(&self, names: &[N], outcome: &Outcome, fingerprint: Option<&str>) {
        let name = names.first().map(AsRef::as_ref).unwrap_or_default();
        let aliases = names.len();
        match outcome {
            Outcome::Changed => {
                self.metrics.updates_applied.get_or_create(&SourceLabel { source: self.source.to_string() }).inc();
                let fingerprint = fingerprint.unwrap_or("-");
                if self.loading {
                    tracing::debug!(secret = name, aliases, source = %self.source, fingerprint, "secret loaded");
                } else {
                    tracing::info!(secret = name, aliases, source = %self.source, fingerprint, "secret updated");
                }
            }
            Outcome::Shadowed { by } => {
                tracing::warn!(secret = name, aliases, source = %self.source, served_by = %by, "secret offered by two sources; the first configured one is served");
            }
            Outcome::Unchanged => {
                tracing::debug!(secret = name, aliases, source = %self.source, "secret unchanged");
            }
        }
    }

    fn rejected<N: AsRef<str> + Clone + Into<Arc<str>>>(&self, names: &[N], err: PkiError) -> PkiError {
        self.record_rejection(names, err.reason(), &err);
        err
    }

    /// The source could not even get `name`'s material (a file too large, not a regular
    /// file, outside its root, unreadable): a rejection like a failed check, logged,
    /// counted under `reason` and recorded in status, while the last good version stays.
    /// `error` names what failed and why; it must not carry key material.
    pub fn reject<N>(&self, name: N, reason: &'static str, error: &dyn std::fmt::Display)
    where
        N: AsRef<str> + Clone + Into<Arc<str>>,
    {
        self.record_rejection(std::slice::from_ref(&name), reason, error);
    }

    /// Like [`Intake::reject`] for many names that failed for one reason (a files root that
    /// cannot be listed): logged and counted once, recorded in status for every name.
    pub fn reject_all<N>(&self, names: &[N], reason: &'static str, error: &dyn std::fmt::Display)
    where
        N: AsRef<str> + Clone + Into<Arc<str>>,
    {
        if !names.is_empty() {
            self.record_rejection(names, reason, error);
        }
    }

    fn record_rejection<N>(&self, names: &[N], reason: &'static str, error: &dyn std::fmt::Display)
    where
        N: AsRef<str> + Clone + Into<Arc<str>>,
    {
        self.metrics.updates_rejected.get_or_create(&RejectLabel { source: self.source.to_string(), reason }).inc();
        let name = names.first().map(AsRef::as_ref).unwrap_or_default();
        let served = self.store.get(name).map(|s| s.version.to_string());
        tracing::error!(
            secret = name,
            aliases = names.len(),
            source = %self.source,
            reason,
            error = %error,
            still_serving = served.as_deref().unwrap_or("nothing"),
            "secret update rejected; last good version kept"
        );
        for name in names {
            self.store.reject(self.rank, &self.source, name.clone(), error.to_string());
        }
    }

    /// A failure of the source itself for `name` that is about no content (an ACME order
    /// that failed): shown as the name's `last_error` in status until [`Intake::clear_error`]
    /// or the next good update; what is served does not change, and no update is counted
    /// as rejected. `message` must not carry key material.
    pub fn report_error(&self, name: &str, message: String) {
        self.store.reject(self.rank, &self.source, name, message);
    }

    /// Clears what [`Intake::report_error`] recorded for `name`.
    pub fn clear_error(&self, name: &str) {
        self.store.clear_error(self.rank, name);
    }

    /// The source no longer has `name`. Proxies keep what they have (Envoy semantics).
    pub fn remove(&self, name: &str) {
        if self.store.remove(self.rank, name) {
            tracing::info!(secret = name, source = %self.source, "secret removed");
        }
    }
}
