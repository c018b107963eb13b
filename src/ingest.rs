//! The one path from a source into the store: every update is checked (pki) before it
//! can be stored, and every rejection is logged, counted and recorded in status with the
//! secret's name and the reason, while the last good version keeps being served.

use std::sync::Arc;
use std::time::Instant;

use crate::metrics::{Metrics, RejectLabel, SourceLabel};
use crate::pki::{self, CheckOptions, Material, PkiError, SecretKind};
use crate::policy::{AllowExpired, kind_of};
use crate::store::{Outcome, Rank, Store};

/// Handed to each source: reports what the source found for a name.
#[derive(Clone)]
pub struct Intake {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    rank: Rank,
    source: Arc<str>,
    allow_expired: AllowExpired,
    /// The source is loading what already exists: one summary line from the source
    /// says what it loaded, not one line per secret (1,000 Secrets made 3,000 lines).
    loading: bool,
    /// `[ocsp]`: attaches fetched OCSP staples to TLS material (src/stapling).
    stapler: Option<crate::stapling::Stapler>,
}

impl Intake {
    /// Registers a source named `source` (e.g. `files:/etc/certs`); earlier intakes win.
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>, source: &str, allow_expired: AllowExpired) -> Self {
        let (rank, source) = store.register_source(source);
        Self { store, metrics, rank, source, allow_expired, loading: false, stapler: None }
    }

    /// OCSP staples fetched by `stapler` are attached to this source's TLS material.
    pub fn with_stapler(mut self, stapler: Option<crate::stapling::Stapler>) -> Self {
        self.stapler = stapler;
        self
    }

    /// The OCSP stapler this intake's TLS material goes through, if any.
    pub fn stapler(&self) -> Option<&crate::stapling::Stapler> {
        self.stapler.as_ref()
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
        let prepared = self.stapler.as_ref().map(|s| s.prepare(self, names, material));
        self.submit(names, material, detected_at, prepared)
    }

    /// [`Intake::update_aliases`] with what the stapler prepared (src/stapling): its
    /// material is checked and stored, and it is committed only if the store took it.
    pub(crate) fn submit<N>(
        &self,
        names: &[N],
        material: &Material,
        detected_at: Instant,
        mut prepared: Option<crate::stapling::Prepared>,
    ) -> Result<Outcome, PkiError>
    where
        N: AsRef<str> + Clone + Into<Arc<str>>,
    {
        if let Some(err) = prepared.as_mut().and_then(|p| p.take_refusal()) {
            return Err(self.rejected(names, material, err));
        }
        let material = prepared.as_ref().map_or(material, |p| p.material(material));
        let now = std::time::SystemTime::now();
        let mut opts = CheckOptions { allow_expired: self.allow_expired == AllowExpired::Always, now };
        let mut expired = None;
        let mut first = None;
        let mut fingerprint = None;
        for name in names {
            // The Envoy Secret carries its name, so each alias is encoded on its own;
            // the checks cannot pass for one name and fail for another.
            let checked = match pki::check(name.as_ref(), material, &opts) {
                Ok(checked) => checked,
                Err(err @ PkiError::Expired { .. }) if self.may_serve_expired(names) => {
                    opts.allow_expired = true;
                    let checked =
                        pki::check(name.as_ref(), material, &opts).map_err(|e| self.rejected(names, material, e))?;
                    expired = Some(err);
                    checked
                }
                Err(err) => return Err(self.rejected(names, material, err)),
            };
            fingerprint.get_or_insert_with(|| checked.identity.fingerprint_sha256.clone());
            let outcome = self.store.upsert(self.rank, &self.source, name.clone().into(), checked, detected_at);
            first.get_or_insert(outcome);
        }
        if let Some(prepared) = prepared {
            prepared.commit();
        }
        let outcome = first.unwrap_or(Outcome::Unchanged);
        let fingerprint = fingerprint.flatten();
        match expired {
            Some(err) => self.serving_expired(names, &outcome, &err),
            None => self.log_outcome(names, &outcome, fingerprint.as_deref()),
        }
        Ok(outcome)
    }

    /// `allow_expired = "when-nothing-else"` and no valid version of the name is served
    /// (by any source): an expired certificate is better than none (Istio's choice).
    fn may_serve_expired<N: AsRef<str>>(&self, names: &[N]) -> bool {
        if self.allow_expired != AllowExpired::WhenNothingElse {
            return false;
        }
        let Some(name) = names.first() else { return false };
        match self.store.get(name.as_ref()) {
            None => true,
            Some(served) => {
                served.placeholder.is_some()
                    || served
                        .meta
                        .not_after_unix
                        .is_some_and(|t| t < crate::unix_time::secs(std::time::SystemTime::now()))
            }
        }
    }

    /// An expired certificate went in under `allow_expired = "when-nothing-else"`: said
    /// loudly, counted, and kept as the name's `last_error` until a valid version comes.
    fn serving_expired<N>(&self, names: &[N], outcome: &Outcome, err: &PkiError)
    where
        N: AsRef<str> + Clone + Into<Arc<str>>,
    {
        let message =
            format!("{err}; served anyway because no valid version exists (allow_expired = \"when-nothing-else\")");
        if *outcome == Outcome::Changed {
            self.metrics.expired_served.get_or_create(&SourceLabel { source: self.source.to_string() }).inc();
            let name = names.first().map(AsRef::as_ref).unwrap_or_default();
            tracing::error!(secret = name, aliases = names.len(), source = %self.source, error = %err, "serving an expired certificate: no valid version exists");
        }
        for name in names {
            self.store.reject(self.rank, &self.source, name.clone(), message.clone(), None);
        }
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

    fn rejected<N: AsRef<str> + Clone + Into<Arc<str>>>(
        &self,
        names: &[N],
        material: &Material,
        err: PkiError,
    ) -> PkiError {
        self.record_rejection(names, Some(kind_of(material)), err.reason(), &err);
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
        self.record_rejection(std::slice::from_ref(&name), None, reason, error);
    }

    /// Like [`Intake::reject`] for many names that failed for one reason (a files root that
    /// cannot be listed): logged and counted once, recorded in status for every name.
    pub fn reject_all<N>(&self, names: &[N], reason: &'static str, error: &dyn std::fmt::Display)
    where
        N: AsRef<str> + Clone + Into<Arc<str>>,
    {
        if !names.is_empty() {
            self.record_rejection(names, None, reason, error);
        }
    }

    /// Like [`Intake::reject_all`] for content known to be of `kind` (a Kubernetes TLS
    /// Secret with an empty key): a name with nothing served may get the placeholder.
    pub fn reject_all_of_kind<N>(
        &self,
        names: &[N],
        kind: SecretKind,
        reason: &'static str,
        error: &dyn std::fmt::Display,
    ) where
        N: AsRef<str> + Clone + Into<Arc<str>>,
    {
        if !names.is_empty() {
            self.record_rejection(names, Some(kind), reason, error);
        }
    }

    fn record_rejection<N>(
        &self,
        names: &[N],
        kind: Option<SecretKind>,
        reason: &'static str,
        error: &dyn std::fmt::Display,
    ) where
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
        let mut placeholders = 0;
        for name in names {
            placeholders +=
                usize::from(self.store.reject(self.rank, &self.source, name.clone(), error.to_string(), kind));
        }
        if placeholders > 0 {
            tracing::warn!(secret = name, aliases = names.len(), source = %self.source, "serving the placeholder: no valid version exists (on_invalid = \"serve-placeholder\")");
        }
    }

    /// A failure of the source itself for `name` that is about no content (an ACME order
    /// that failed): shown as the name's `last_error` in status until [`Intake::clear_error`]
    /// or the next good update; what is served does not change, and no update is counted
    /// as rejected. `message` must not carry key material.
    pub fn report_error(&self, name: &str, message: String) {
        self.store.reject(self.rank, &self.source, name, message, None);
    }

    /// Clears what [`Intake::report_error`] recorded for `name`.
    pub fn clear_error(&self, name: &str) {
        self.store.clear_error(self.rank, name);
    }

    /// Takes this source's version of `names` out of the store, so that a refused
    /// resubmission falls back to `on_invalid` (the stapler: a revoked certificate, a
    /// must-staple certificate whose staple went stale).
    pub(crate) fn withdraw(&self, names: &[Arc<str>]) {
        for name in names {
            self.store.remove(self.rank, name);
        }
    }

    /// The source no longer has `name`. Proxies keep what they have (Envoy semantics).
    pub fn remove(&self, name: &str) {
        if let Some(stapler) = &self.stapler {
            stapler.forget(self, name);
        }
        if self.store.remove(self.rank, name) {
            tracing::info!(secret = name, source = %self.source, "secret removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::KeyBytes;
    use crate::policy::{OnDelete, OnInvalid, PlaceholderCause, Policy};
    use time::{Duration, OffsetDateTime};

    /// A self-signed pair valid from `from` to `to` days relative to now.
    fn pair(cn: &str, from: i64, to: i64) -> Material {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![cn.to_owned()]).unwrap();
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) = (now + Duration::days(from), now + Duration::days(to));
        let cert = params.self_signed(&key).unwrap();
        Material::Tls {
            cert_chain_pem: cert.pem().into_bytes(),
            key_pem: KeyBytes::new(key.serialize_pem().into_bytes()),
            ocsp_staple: None,
        }
    }

    fn make(allow_expired: AllowExpired, policy: Policy) -> (Intake, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        (Intake::new(Arc::new(Store::with_policy(policy)), metrics.clone(), "files:/x", allow_expired), metrics)
    }

    #[test]
    fn an_expired_certificate_is_served_only_when_nothing_else_is() {
        let (intake, metrics) = make(AllowExpired::WhenNothingElse, Policy::default());
        let store = intake.store().clone();
        // Nothing served: the expired certificate goes in, said loudly.
        assert_eq!(intake.update("gw", &pair("old", -30, -1), Instant::now()).unwrap(), Outcome::Changed);
        let st = &store.status()[0];
        assert!(st.expired);
        assert!(st.last_error.as_deref().unwrap().contains("when-nothing-else"), "{:?}", st.last_error);
        let label = SourceLabel { source: "files:/x".into() };
        assert_eq!(metrics.expired_served.get_or_create(&label).get(), 1);
        // A newer expired one replaces it: nothing valid is served.
        assert_eq!(intake.update("gw", &pair("older", -60, -2), Instant::now()).unwrap(), Outcome::Changed);
        // A valid one replaces it and clears the warning.
        intake.update("gw", &pair("good", -1, 30), Instant::now()).unwrap();
        let st = &store.status()[0];
        assert!(!st.expired && st.last_error.is_none());
        // Now an expired update is refused: a valid version is served.
        let err = intake.update("gw", &pair("stale", -30, -1), Instant::now()).unwrap_err();
        assert_eq!(err.reason(), "expired");
        assert!(!store.status()[0].expired);
        assert_eq!(metrics.expired_served.get_or_create(&label).get(), 2);
    }

    #[test]
    fn never_refuses_expired_and_not_yet_valid_is_not_expired() {
        let (intake, _) = make(AllowExpired::Never, Policy::default());
        assert_eq!(intake.update("gw", &pair("old", -30, -1), Instant::now()).unwrap_err().reason(), "expired");
        let (intake, _) = make(AllowExpired::WhenNothingElse, Policy::default());
        let err = intake.update("gw", &pair("future", 1, 30), Instant::now()).unwrap_err();
        assert_eq!(err.reason(), "not_yet_valid");
        assert!(intake.store().get("gw").is_none());
    }

    #[test]
    fn a_refused_pair_gets_the_placeholder_under_serve_placeholder() {
        let policy = Policy { on_invalid: OnInvalid::ServePlaceholder, on_delete: OnDelete::Keep };
        let (intake, _) = make(AllowExpired::Never, policy);
        let mismatched = match (pair("a", -1, 30), pair("b", -1, 30)) {
            (Material::Tls { cert_chain_pem, .. }, Material::Tls { key_pem, .. }) => {
                Material::Tls { cert_chain_pem, key_pem, ocsp_staple: None }
            }
            _ => unreachable!(),
        };
        intake.update_aliases(&["kubernetes://ns/gw", "gw"], &mismatched, Instant::now()).unwrap_err();
        for name in ["kubernetes://ns/gw", "gw"] {
            let served = intake.store().get(name).unwrap();
            assert_eq!(served.placeholder, Some(PlaceholderCause::Invalid), "{name}");
            assert_eq!(&*served.name, name);
        }
    }
}
