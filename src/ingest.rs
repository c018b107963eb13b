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
pub struct Sink {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    rank: Rank,
    source: Arc<str>,
    allow_expired: bool,
}

impl Sink {
    /// Registers a source named `source` (e.g. `files:/etc/certs`); earlier sinks win.
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>, source: &str, allow_expired: bool) -> Self {
        let (rank, source) = store.register_source(source);
        Self { store, metrics, rank, source, allow_expired }
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

    /// Like [`Sink::update`] for one piece of material served under several names (a
    /// Kubernetes Secret is `kubernetes://ns/name`, `kubernetes://name` and `name`): a
    /// rejection is logged and counted once, and recorded for every name. The outcome is
    /// that of the first name.
    pub fn update_aliases<N>(&self, names: &[N], material: &Material, detected_at: Instant) -> Result<Outcome, PkiError>
    where
        N: AsRef<str> + Clone + Into<Arc<str>>,
    {
        let opts = CheckOptions { allow_expired: self.allow_expired, now: std::time::SystemTime::now() };
        let mut first = None;
        for name in names {
            // The Envoy Secret carries its name, so each alias is encoded on its own;
            // the checks cannot pass for one name and fail for another.
            let checked = match pki::check(name.as_ref(), material, &opts) {
                Ok(checked) => checked,
                Err(err) => return Err(self.rejected(names, err)),
            };
            let outcome = self.store_checked(name.clone().into(), checked, detected_at);
            first.get_or_insert(outcome);
        }
        Ok(first.unwrap_or(Outcome::Unchanged))
    }

    fn store_checked(&self, name: Arc<str>, checked: pki::Checked, detected_at: Instant) -> Outcome {
        let fingerprint = checked.identity.fingerprint_sha256.clone();
        let outcome = self.store.upsert(self.rank, &self.source, name.clone(), checked, detected_at);
        let name = &*name;
        match &outcome {
            Outcome::Changed => {
                self.metrics.updates_applied.get_or_create(&SourceLabel { source: self.source.to_string() }).inc();
                tracing::info!(secret = name, source = %self.source, fingerprint = fingerprint.as_deref().unwrap_or("-"), "secret updated");
            }
            Outcome::Shadowed { by } => {
                tracing::warn!(secret = name, source = %self.source, served_by = %by, "secret offered by two sources; the first configured one is served");
            }
            Outcome::Unchanged => {
                tracing::debug!(secret = name, source = %self.source, "secret unchanged");
            }
        }
        outcome
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

    /// Like [`Sink::reject`] for many names that failed for one reason (a files root that
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

    /// The source no longer has `name`. Proxies keep what they have (Envoy semantics).
    pub fn remove(&self, name: &str) {
        if self.store.remove(self.rank, name) {
            tracing::info!(secret = name, source = %self.source, "secret removed");
        }
    }
}
