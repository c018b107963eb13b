//! The certificate a task serves: the checks a stored or issued certificate passes
//! (the intake's own, plus the facts planning needs), and serving it through the intake as
//! `NAME` (leaf + chain) and `NAME-cacert` (the issuer chain): at start from what is
//! stored, after an issuance, or as another replica stored it.

use std::time::{Instant, SystemTime};

use crate::shutdown::Shutdown;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::{self, PemObject, SectionKind};

use super::config::{CertificateConfig, normalize_domain};
use super::order::{OrderError, Step, fail};
use super::persist::Persist;
use super::schedule::{CertFacts, Validity, rfc3339};
use super::state_dir::Stored;
use crate::ingest::Intake;
use crate::pki::{self, CheckOptions, KeyBytes, Material};

/// The certificate being served, as far as the task cares.
#[derive(Debug, Clone)]
pub struct ServingCert {
    pub validity: Validity,
    pub leaf_der: Vec<u8>,
    pub serial: String,
    /// Its SANs include every configured domain.
    pub covers_config: bool,
}

impl ServingCert {
    pub fn facts(&self) -> CertFacts {
        CertFacts { validity: self.validity, covers_config: self.covers_config }
    }
}

/// The same checks the intake runs, plus the facts scheduling needs.
pub fn check(spec: &CertificateConfig, chain_pem: &[u8], key_pem: &KeyBytes) -> Result<ServingCert, OrderError> {
    let material = Material::Tls { cert_chain_pem: chain_pem.to_vec(), key_pem: key_pem.clone(), ocsp_staple: None };
    let opts = CheckOptions { allow_expired: false, now: SystemTime::now() };
    let checked = pki::check(&spec.name, &material, &opts).map_err(|e| fail(Step::Check, e))?;
    let (meta, identity) = (checked.meta, checked.identity);
    let (Some(nb), Some(na)) = (meta.not_before_unix, meta.not_after_unix) else {
        return Err(fail(Step::Check, "certificate has no validity window"));
    };
    let leaf_der = CertificateDer::pem_slice_iter(chain_pem)
        .next()
        .and_then(Result::ok)
        .map(|c| c.to_vec())
        .ok_or_else(|| fail(Step::Check, "no certificate in the chain"))?;
    let sans: Vec<String> = identity.sans.iter().map(|s| normalize_domain(s)).collect();
    let covers_config = spec.domains.iter().all(|d| sans.contains(&normalize_domain(d)));
    Ok(ServingCert {
        validity: Validity::from_unix(nb, na),
        leaf_der,
        serial: identity.serial.unwrap_or_default(),
        covers_config,
    })
}

/// Serves `stored` as `name` and its issuer chain as `name-cacert`. A rejection is
/// logged and counted by the intake.
pub fn serve(intake: &Intake, name: &str, stored: &Stored, detected: Instant) -> Result<(), OrderError> {
    let tls =
        Material::Tls { cert_chain_pem: stored.chain_pem.clone(), key_pem: stored.key_pem.clone(), ocsp_staple: None };
    intake.update(name, &tls, detected).map_err(|e| fail(Step::Check, e))?;
    if !stored.ca_pem.is_empty() {
        let ca = Material::Validation { ca_pem: stored.ca_pem.clone(), crl_pem: None };
        let _ = intake.update(format!("{name}-cacert"), &ca, detected);
    }
    Ok(())
}

/// The stored certificate (the Kubernetes Secret first, then the state directory),
/// served at once when it passes the checks.
pub async fn load_and_serve(
    spec: &CertificateConfig,
    intake: &Intake,
    persist: &Persist,
    shutdown: &Shutdown,
) -> Option<ServingCert> {
    let name = &spec.name;
    if let Some(stored) = persist.cert_from_kube(name, shutdown).await {
        match check(spec, &stored.chain_pem, &stored.key_pem) {
            Ok(current) if serve(intake, name, &stored, Instant::now()).is_ok() => {
                tracing::info!(
                    certificate = %name,
                    serial = %current.serial,
                    not_after = %rfc3339(current.validity.not_after),
                    "stored certificate served from its Kubernetes Secret"
                );
                return Some(current);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(certificate = %name, error = %e.message, "certificate in the Kubernetes Secret not usable; trying the state directory");
            }
        }
    }
    let stored = persist.cert_from_dir(name)?;
    match check(spec, &stored.chain_pem, &stored.key_pem) {
        Ok(current) => {
            serve(intake, name, &stored, Instant::now()).ok()?;
            tracing::info!(
                certificate = %name,
                serial = %current.serial,
                not_after = %rfc3339(current.validity.not_after),
                "stored certificate served"
            );
            Some(current)
        }
        Err(e) => {
            tracing::warn!(certificate = %name, error = %e.message, "stored certificate not usable; ordering a new one");
            None
        }
    }
}

/// Serves `stored` (another replica's issuance) when it is another certificate than
/// `serving` and passes the checks; true when it did.
pub fn adopt(
    spec: &CertificateConfig,
    intake: &Intake,
    stored: &Stored,
    serving: &mut Option<ServingCert>,
    what: &str,
) -> bool {
    let name = &spec.name;
    match check(spec, &stored.chain_pem, &stored.key_pem) {
        Ok(new) => {
            if serving.as_ref().is_some_and(|c| c.leaf_der == new.leaf_der) {
                return false;
            }
            if serve(intake, name, stored, Instant::now()).is_err() {
                return false;
            }
            tracing::info!(certificate = %name, serial = %new.serial, not_after = %rfc3339(new.validity.not_after), "{what}");
            *serving = Some(new);
            true
        }
        Err(e) => {
            tracing::warn!(certificate = %name, error = %e.message, "stored certificate not usable; keeping the current one");
            false
        }
    }
}

/// The issuer chain of a PEM chain: the text after its first certificate (the leaf),
/// as the CA sent it; empty without one. rustls-pki-types reads the PEM sections, so
/// only the bytes it consumed are cut off: nothing is decoded and encoded again.
pub fn issuer_chain(chain_pem: &[u8]) -> Vec<u8> {
    let mut rest: &[u8] = chain_pem;
    loop {
        match pem::from_buf(&mut rest) {
            Ok(Some((SectionKind::Certificate, _))) => break,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return Vec::new(),
        }
    }
    let start = rest.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(rest.len());
    let chain = &rest[start..];
    // Only certificates count: trailing text alone is no chain.
    if CertificateDer::pem_slice_iter(chain).next().is_none() { Vec::new() } else { chain.to_vec() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    const B: &str = "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n";

    #[test]
    fn acme_issuer_chain_is_what_follows_the_leaf() {
        assert_eq!(issuer_chain(format!("{A}\n{B}").as_bytes()), B.as_bytes());
        assert_eq!(issuer_chain(format!("junk\n{A}{B}{B}").as_bytes()), format!("{B}{B}").as_bytes());
        assert_eq!(issuer_chain(format!("{A}\r\n{B}").as_bytes()), B.as_bytes(), "CRLF line ends");
        assert!(issuer_chain(A.as_bytes()).is_empty(), "a lone leaf has no issuer chain");
        assert!(issuer_chain(format!("{A}trailing text\n").as_bytes()).is_empty());
        assert!(issuer_chain(b"none").is_empty());
        let key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(issuer_chain(format!("{key}{A}{B}").as_bytes()), B.as_bytes(), "other sections are skipped");
    }
}
