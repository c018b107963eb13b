//! The embedded default: an in-memory dev CA that mints a short-lived certificate for any
//! name a proxy asks for (`NAME-cacert` gets the CA bundle) and re-mints all of them on an
//! interval, so hot rotation can be tried with nothing but certwire and Envoy.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::ingest::Sink;
use crate::pki::{KeyBytes, Material};

/// Clock skew allowance for freshly minted certificates.
const BACKDATE: Duration = Duration::from_secs(60);

pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    lifetime: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("dev CA: {0}")]
pub struct DevError(#[from] rcgen::Error);

impl DevCa {
    pub fn new(lifetime: Duration) -> Result<Self, DevError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "certwire dev CA");
        dn.push(DnType::OrganizationName, "certwire (development only)");
        params.distinguished_name = dn;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::from_secs(365 * 24 * 3600);
        let ca_pem = params.self_signed(&key)?.pem();
        Ok(Self { issuer: Issuer::new(params, key), ca_pem, lifetime })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// What the dev CA serves for `name`.
    pub fn material(&self, name: &str) -> Result<Material, DevError> {
        if name.ends_with("-cacert") {
            return Ok(Material::Validation { ca_pem: self.ca_pem.clone().into_bytes(), crl_pem: None });
        }
        let key = KeyPair::generate()?;
        let host = host_part(name);
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::DnsName(host.try_into()?)];
        if host != "localhost" {
            params.subject_alt_names.push(SanType::DnsName("localhost".try_into()?));
        }
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + self.lifetime;
        let cert = params.signed_by(&key, &self.issuer)?;
        let chain = format!("{}{}", cert.pem(), self.ca_pem);
        Ok(Material::Tls {
            cert_chain_pem: chain.into_bytes(),
            key_pem: KeyBytes::new(key.serialize_pem().into_bytes()),
        })
    }
}

/// The DNS name to put in the certificate: `kubernetes://ns/web-tls` -> `web-tls`; names
/// that are not hostnames fall back to `localhost`.
fn host_part(name: &str) -> &str {
    let last = name.rsplit('/').next().unwrap_or(name);
    let ok = !last.is_empty()
        && last.len() <= 253
        && last.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '*')
        && !last.starts_with('-');
    if ok { last } else { "localhost" }
}

/// Runs the dev source until `shutdown`: mints on demand and re-mints on `rotate_every`.
pub fn start(
    sink: Sink,
    rotate_every: Duration,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, DevError> {
    // The certificate outlives two rotations so a slow proxy never holds an expired one.
    let ca = DevCa::new(rotate_every * 2 + BACKDATE)?;
    let mut demand = sink.store().demand();
    let handle = tokio::spawn(async move {
        let mut names = BTreeSet::new();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + rotate_every, rotate_every);
        for name in sink.store().wanted_unserved() {
            mint(&ca, &sink, &name);
            names.insert(name);
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                wanted = demand.recv() => match wanted {
                    Ok(name) => {
                        if names.insert(name.clone()) {
                            mint(&ca, &sink, &name);
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        for name in sink.store().wanted_unserved() {
                            names.insert(name.clone());
                            mint(&ca, &sink, &name);
                        }
                    }
                    Err(RecvError::Closed) => break,
                },
                _ = tick.tick() => {
                    tracing::info!(secrets = names.len(), "dev CA rotating all certificates");
                    for name in &names {
                        mint(&ca, &sink, name);
                    }
                }
            }
        }
    });
    Ok(handle)
}

fn mint(ca: &DevCa, sink: &Sink, name: &str) {
    let detected = Instant::now();
    match ca.material(name) {
        // Rejections are logged and counted by the sink.
        Ok(material) => {
            let _ = sink.update(name, &material, detected);
        }
        Err(err) => tracing::error!(secret = name, error = %err, "dev CA could not mint a certificate"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CheckOptions, check};

    #[test]
    fn minted_material_passes_the_checks() {
        let ca = DevCa::new(Duration::from_secs(600)).unwrap();
        for name in ["web", "kubernetes://default/web-tls", "weird name!"] {
            let m = ca.material(name).unwrap();
            let checked = check(name, &m, &CheckOptions::default()).unwrap();
            assert_eq!(checked.meta.certificates, 2, "{name}: leaf + CA");
        }
        let checked = check("web-cacert", &ca.material("web-cacert").unwrap(), &CheckOptions::default()).unwrap();
        assert_eq!(checked.kind, crate::pki::SecretKind::ValidationContext);
    }

    #[test]
    fn host_part_extracts_a_hostname() {
        assert_eq!(host_part("kubernetes://ns/web-tls"), "web-tls");
        assert_eq!(host_part("example.com"), "example.com");
        assert_eq!(host_part("has space"), "localhost");
    }
}
