//! One watch of Kubernetes Secrets as a plain control loop: it is fed the events of a
//! kube-runtime watcher stream (list, relist, apply, delete, errors) and reports what
//! each Secret offers to the store. Built by `super::start` with a real watcher; unit
//! tests feed it a fixed list of events.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use crate::shutdown::Shutdown;
use futures_util::Stream;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt as _;
use kube::runtime::watcher::{self, Event};
use ring::digest;

use super::events::Rejections;
use super::follow::{self, Follower};
use super::names::{self, cacert_name, served_names};
use crate::health::Health;
use crate::ingest::Intake;
use crate::pki::{Material, SecretKind};

/// The names one Secret currently offers, and the digest of their content.
struct Offered {
    digest: [u8; 32],
    names: Vec<String>,
}

pub struct Watch {
    intake: Intake,
    default_ns: String,
    /// Keyed by `ns/name`.
    offered: HashMap<String, Offered>,
    /// The CA bundle of each Secret that has one, by `ns/name`: a Secret `P-cacert`
    /// (see [`separate_ca_of`]) takes `P-cacert` over from `P`, and gives it back when
    /// it goes. Bundles are public and small; keys are never kept.
    cas: HashMap<String, Material>,
    /// Secrets `P-cacert` currently serving their CA as `P-cacert`.
    separate_cas: HashSet<String>,
    health: Arc<Health>,
    component: String,
    /// Kubernetes Events on rejected Secrets; none in unit tests.
    recorder: Option<Rejections>,
    /// A `secret` key is served as a generic secret (`--generic-secrets`).
    generic_secrets: bool,
}

impl Watch {
    /// A watch reporting to `intake`, not ready (`component` in /readyz) until its first
    /// list is complete. Secrets in `default_ns` are also served by their bare names.
    pub fn new(mut intake: Intake, default_ns: String, health: Arc<Health>, component: String) -> Self {
        health.not_ready(&component, "waiting for the first list from the API server");
        intake.set_loading(true);
        Self {
            intake,
            default_ns,
            offered: HashMap::new(),
            cas: HashMap::new(),
            separate_cas: HashSet::new(),
            health,
            component,
            recorder: None,
            generic_secrets: false,
        }
    }

    /// Serves a Secret's `secret` key as a generic secret.
    pub fn serve_generic_secrets(&mut self, on: bool) {
        self.generic_secrets = on;
    }

    /// Posts a Warning Event on each rejected Secret.
    pub fn report_rejections(&mut self, recorder: Rejections) {
        self.recorder = Some(recorder);
    }

    /// Follows `events` until `shutdown` or their end.
    pub async fn run<S>(mut self, events: S, shutdown: Shutdown)
    where
        S: Stream<Item = Result<Event<Secret>, watcher::Error>> + Send,
    {
        let (health, component) = (self.health.clone(), self.component.clone());
        follow::run(&mut self, events, shutdown, health, &component).await;
    }

    /// Reports a Secret's content; returns its key.
    fn apply(&mut self, secret: &Secret) -> String {
        let key = key_of(secret);
        let extracted = names::extract(secret.data.as_ref(), self.generic_secrets);
        if extracted.is_empty() {
            // Not (or no longer) a certificate secret.
            self.withdraw(&key);
            return key;
        }
        let digest = digest_of(&extracted);
        if self.offered.get(&key).is_some_and(|s| s.digest == digest) {
            return key;
        }
        let detected = Instant::now();
        let ns = secret.namespace().unwrap_or_default();
        let bases = served_names(&ns, &secret.name_any(), &self.default_ns);
        let separate_ca = separate_ca_of(&key).is_some() && extracted.ca.is_some();
        match &extracted.ca {
            Some(Material::Validation { ca_pem, crl_pem }) if !separate_ca => {
                let ca = Material::Validation { ca_pem: ca_pem.clone(), crl_pem: crl_pem.clone() };
                self.cas.insert(key.clone(), ca);
            }
            _ => {
                self.cas.remove(&key);
            }
        }
        let cacert_names: Vec<String> = bases.iter().map(|b| cacert_name(b)).collect();
        // Istio's rule: `P-cacert` is the CA of the Secret `P-cacert` when there is
        // one with a CA, else `P`'s. A name ending in `-cacert` is a CA name.
        let ca_only = separate_ca_of(&key).is_some();
        let (tls_names, ca_names) = if separate_ca {
            (Vec::new(), bases.iter().chain(&cacert_names).cloned().collect())
        } else if ca_only {
            // Nothing else is served under a CA name; its own CA (if any) is `...-cacert-cacert`.
            (Vec::new(), cacert_names)
        } else if self.separate_cas.contains(&format!("{key}-cacert")) {
            (bases.clone(), Vec::new())
        } else {
            (bases.clone(), cacert_names)
        };
        let mut names = Vec::new();
        let mut error: Option<(&'static str, String)> = None;
        if let Some(problem) = extracted.problem.as_ref().filter(|_| !ca_only) {
            // The last good pair stays served under these names.
            match problem {
                names::ExtractError::EmptyPair(..) => {
                    self.intake.reject_all_of_kind(&bases, SecretKind::TlsCertificate, problem.reason(), problem)
                }
                names::ExtractError::Ambiguous(..) => self.intake.reject_all(&bases, problem.reason(), problem),
            }
            error = Some((problem.reason(), problem.to_string()));
            names.extend(bases.iter().cloned());
        }
        let tls = extracted.tls.as_ref().filter(|_| !ca_only);
        for (aliases, material) in [(tls_names, tls), (ca_names, extracted.ca.as_ref())] {
            let Some(material) = material.filter(|_| !aliases.is_empty()) else { continue };
            let refs: Vec<&str> = aliases.iter().map(String::as_str).collect();
            if let Err(e) = self.intake.update_aliases(&refs, material, detected) {
                error.get_or_insert_with(|| (e.reason(), e.to_string()));
            }
            names.extend(aliases);
        }
        // Names this Secret no longer offers (ca.crt removed, say).
        if let Some(old) = self.offered.get(&key) {
            for name in old.names.iter().filter(|n| !names.contains(n)) {
                self.intake.remove(name);
            }
        }
        if let Some(recorder) = &self.recorder {
            match error {
                Some((reason, err)) => recorder.rejected(secret, &key, reason, &err),
                None => recorder.forget(&key),
            }
        }
        self.offered.insert(key.clone(), Offered { digest, names });
        match (separate_ca, self.separate_cas.contains(&key)) {
            (true, false) => self.take_over_ca(&key),
            (false, true) => self.give_back_ca(&key),
            _ => {}
        }
        key
    }

    /// Secret `P-cacert` now serves `P-cacert`: `P` no longer offers it (its names are
    /// overwritten in the store already, so nothing is removed).
    fn take_over_ca(&mut self, key: &str) {
        self.separate_cas.insert(key.to_owned());
        let Some(parent) = separate_ca_of(key) else { return };
        let taken: HashSet<String> =
            self.offered.get(key).map(|o| o.names.iter().cloned().collect()).unwrap_or_default();
        if let Some(offered) = self.offered.get_mut(parent) {
            offered.names.retain(|n| !taken.contains(n));
        }
    }

    /// Secret `P-cacert` no longer serves `P-cacert` (its names are removed already):
    /// `P`'s own CA, if it has one, is served again.
    fn give_back_ca(&mut self, key: &str) {
        self.separate_cas.remove(key);
        let Some(parent) = separate_ca_of(key) else { return };
        let (Some(ca), Some((ns, name))) = (self.cas.get(parent), parent.split_once('/')) else { return };
        let aliases: Vec<String> = served_names(ns, name, &self.default_ns).iter().map(|b| cacert_name(b)).collect();
        let refs: Vec<&str> = aliases.iter().map(String::as_str).collect();
        // A refused bundle is recorded in status and logged by the intake.
        let _ = self.intake.update_aliases(&refs, ca, Instant::now());
        if let Some(offered) = self.offered.get_mut(parent) {
            offered.names.extend(aliases);
        }
    }

    fn withdraw(&mut self, key: &str) {
        if let Some(recorder) = &self.recorder {
            recorder.forget(key);
        }
        self.cas.remove(key);
        if let Some(old) = self.offered.remove(key) {
            tracing::info!(secret = key, "kubernetes secret deleted; proxies keep what they have");
            for name in &old.names {
                self.intake.remove(name);
            }
        }
        if self.separate_cas.contains(key) {
            self.give_back_ca(key);
        }
    }
}

impl Follower<Secret> for Watch {
    fn apply(&mut self, secret: &Secret) -> String {
        Watch::apply(self, secret)
    }

    fn delete(&mut self, secret: &Secret) {
        self.withdraw(&key_of(secret));
    }

    fn keys(&self) -> Vec<String> {
        self.offered.keys().cloned().collect()
    }

    fn withdraw(&mut self, key: &str) {
        Watch::withdraw(self, key);
    }

    fn listed(&mut self) {
        self.intake.set_loading(false);
        tracing::info!(scope = %self.component, secrets = self.offered.len(), "kubernetes source listed");
    }
}

/// `ns/P` for a Secret `ns/P-cacert`: the Secret whose CA name it would serve.
fn separate_ca_of(key: &str) -> Option<&str> {
    key.strip_suffix("-cacert").filter(|parent| !parent.ends_with('/'))
}

fn key_of(secret: &Secret) -> String {
    format!("{}/{}", secret.namespace().unwrap_or_default(), secret.name_any())
}

/// Digest of what is served from a Secret, to skip re-checking unchanged ones on relists.
fn digest_of(e: &names::Extracted) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for m in [&e.tls, &e.ca] {
        match m {
            Some(Material::Tls { cert_chain_pem, key_pem, ocsp_staple }) => {
                ctx.update(b"tls");
                ctx.update(&(cert_chain_pem.len() as u64).to_be_bytes());
                ctx.update(cert_chain_pem);
                ctx.update(&(key_pem.len() as u64).to_be_bytes());
                ctx.update(key_pem.as_slice());
                ctx.update(ocsp_staple.as_deref().unwrap_or_default());
            }
            Some(Material::Validation { ca_pem, crl_pem }) => {
                ctx.update(b"ca");
                ctx.update(&(ca_pem.len() as u64).to_be_bytes());
                ctx.update(ca_pem);
                ctx.update(crl_pem.as_deref().unwrap_or_default());
            }
            Some(Material::SessionTicketKeys(keys)) => {
                ctx.update(b"tickets");
                keys.iter().for_each(|k| ctx.update(k.as_slice()));
            }
            Some(Material::Generic(secret)) => {
                ctx.update(b"generic");
                ctx.update(secret.as_slice());
            }
            None => ctx.update(b"-"),
        }
    }
    if let Some(problem) = &e.problem {
        ctx.update(problem.to_string().as_bytes());
    }
    ctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

#[cfg(test)]
mod tests;
