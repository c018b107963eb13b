//! One ACME order, start to finish: new order, publish an answer per pending
//! authorization, wait until DNS answers (dns-01), tell the CA, poll until every
//! authorization is decided, finalize with a fresh key's CSR, download the chain.
//!
//! Authorization statuses are checked directly: some CAs (acme2certifier) mark a
//! failed challenge and its authorization `invalid` without an `error` and leave the
//! order `pending`, so waiting for the order alone would wait forever.

use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewOrder, Order, OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use super::challenge::{Published, Solvers};
use super::config::{CertificateConfig, ChallengeKind, KeyType};
use crate::pki::KeyBytes;

/// How long the CA may take to decide the authorizations once told to look.
const AUTHZ_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the CA may take to issue once finalized.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(120);

/// The step an order failed at, for logs and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Account,
    NewOrder,
    Authorization,
    Publish,
    Propagation,
    Validation,
    Finalize,
    Download,
    Check,
    Store,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Account => "account",
            Step::NewOrder => "new-order",
            Step::Authorization => "authorization",
            Step::Publish => "challenge-publish",
            Step::Propagation => "dns-propagation",
            Step::Validation => "challenge-validation",
            Step::Finalize => "finalize",
            Step::Download => "certificate-download",
            Step::Check => "certificate-check",
            Step::Store => "certificate-store",
        }
    }
}

#[derive(Debug)]
pub struct OrderError {
    pub step: Step,
    pub message: String,
}

impl std::fmt::Display for OrderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step.as_str(), self.message)
    }
}

impl std::error::Error for OrderError {}

pub fn fail(step: Step, message: impl std::fmt::Display) -> OrderError {
    OrderError { step, message: message.to_string() }
}

/// What an order produced: the chain as the CA sent it and the new key.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: KeyBytes,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("chain_pem", &self.chain_pem.len()).finish_non_exhaustive()
    }
}

fn challenge_type(kind: ChallengeKind) -> ChallengeType {
    match kind {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::Dns01 => ChallengeType::Dns01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
    }
}

/// Runs one order for `spec`. Everything published is pushed to `published`, which
/// the caller withdraws whatever happens (including cancellation of this future).
pub async fn run(
    account: &Account,
    spec: &CertificateConfig,
    solvers: &Solvers,
    published: &mut Vec<Published>,
) -> Result<Issued, OrderError> {
    let identifiers: Vec<Identifier> = spec.domains.iter().map(|d| Identifier::Dns(d.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await.map_err(|e| fail(Step::NewOrder, e))?;
    tracing::info!(certificate = %spec.name, order = order.url(), domains = ?spec.domains, challenge = spec.challenge.as_str(), "ACME order created");
    let kind = spec.challenge;
    let ctype = challenge_type(kind);

    // 1. Publish an answer for every pending authorization.
    let mut authorizations = order.authorizations();
    while let Some(next) = authorizations.next().await {
        let mut authz = next.map_err(|e| fail(Step::Authorization, e))?;
        let id = authz.identifier().to_string();
        match authz.status {
            AuthorizationStatus::Valid => {
                tracing::debug!(certificate = %spec.name, identifier = %id, "authorization already valid");
                continue;
            }
            AuthorizationStatus::Pending => {}
            other => return Err(fail(Step::Authorization, format!("{id}: authorization is {other:?}"))),
        }
        let offered: Vec<String> = authz.challenges.iter().map(|c| type_name(&c.r#type)).collect();
        let Some(challenge) = authz.challenge(ctype.clone()) else {
            return Err(fail(
                Step::Authorization,
                format!("{id}: the CA does not offer {} (it offers {})", kind.as_str(), offered.join(", ")),
            ));
        };
        let key_authorization = challenge.key_authorization();
        let published_one = solvers
            .publish(kind, &id, &challenge.token, &key_authorization)
            .await
            .map_err(|e| fail(Step::Publish, format!("{id}: {e:#}")))?;
        published.push(published_one);
    }

    // 2. dns-01: every authoritative server answers before the CA looks.
    solvers.wait_visible(published).await.map_err(|e| fail(Step::Propagation, format!("{e:#}")))?;

    // 3. Tell the CA.
    let mut authorizations = order.authorizations();
    while let Some(next) = authorizations.next().await {
        let mut authz = next.map_err(|e| fail(Step::Authorization, e))?;
        if authz.status != AuthorizationStatus::Pending {
            continue;
        }
        let id = authz.identifier().to_string();
        let mut challenge =
            authz.challenge(ctype.clone()).ok_or_else(|| fail(Step::Authorization, format!("{id}: challenge gone")))?;
        challenge.set_ready().await.map_err(|e| fail(Step::Validation, format!("{id}: {e}")))?;
        tracing::debug!(certificate = %spec.name, identifier = %id, "challenge answered");
    }

    // 4. Wait until every authorization is decided.
    wait_authorizations(&mut order, &ctype, kind).await?;

    // 5. Finalize with a fresh key and download the chain.
    let status = order
        .poll_ready(&RetryPolicy::new().initial_delay(Duration::from_millis(250)).timeout(ISSUE_TIMEOUT))
        .await
        .map_err(|e| fail(Step::Finalize, format!("waiting for the order to become ready: {e}")))?;
    if status != OrderStatus::Ready {
        let why = order.state().error.as_ref().map(|p| p.to_string()).unwrap_or_else(|| "no reason given".into());
        return Err(fail(Step::Finalize, format!("order is {status:?}: {why}")));
    }
    let (csr_der, key_pem) = csr(&spec.domains, spec.key_type).map_err(|e| fail(Step::Finalize, e))?;
    order.finalize_csr(&csr_der).await.map_err(|e| fail(Step::Finalize, e))?;
    let chain_pem = order
        .poll_certificate(&RetryPolicy::new().initial_delay(Duration::from_millis(250)).timeout(ISSUE_TIMEOUT))
        .await
        .map_err(|e| fail(Step::Download, e))?;
    Ok(Issued { chain_pem, key_pem })
}

/// Polls every authorization until none is pending; any other status than valid is
/// the CA's refusal, reported with the challenge's error when the CA gives one.
async fn wait_authorizations(order: &mut Order, ctype: &ChallengeType, kind: ChallengeKind) -> Result<(), OrderError> {
    let deadline = tokio::time::Instant::now() + AUTHZ_TIMEOUT;
    let mut delay = Duration::from_millis(250);
    loop {
        let mut pending = Vec::new();
        let mut refused = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(next) = authorizations.next().await {
            let mut authz = next.map_err(|e| fail(Step::Authorization, e))?;
            let state = authz.refresh().await.map_err(|e| fail(Step::Validation, e))?;
            let id = state.identifier().to_string();
            match state.status {
                AuthorizationStatus::Valid => {}
                AuthorizationStatus::Pending => pending.push(id),
                status => {
                    let challenge = state.challenges.iter().find(|c| &c.r#type == ctype);
                    let detail = match challenge {
                        Some(c) => match &c.error {
                            Some(problem) => format!("{} challenge {:?}: {problem}", kind.as_str(), c.status),
                            None => format!(
                                "{} challenge {:?}, the CA gave no reason (its own log has it)",
                                kind.as_str(),
                                c.status
                            ),
                        },
                        None => "no such challenge".into(),
                    };
                    refused.push(format!("{id}: authorization {status:?}, {detail}"));
                }
            }
        }
        if !refused.is_empty() {
            return Err(fail(Step::Validation, format!("the CA did not validate: {}", refused.join("; "))));
        }
        if pending.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() + delay > deadline {
            return Err(fail(
                Step::Validation,
                format!("authorizations still pending after {AUTHZ_TIMEOUT:?}: {}", pending.join(", ")),
            ));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

fn type_name(t: &ChallengeType) -> String {
    match t {
        ChallengeType::Http01 => "http-01".into(),
        ChallengeType::Dns01 => "dns-01".into(),
        ChallengeType::TlsAlpn01 => "tls-alpn-01".into(),
        ChallengeType::DeviceAttest01 => "device-attest-01".into(),
        ChallengeType::Unknown(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

/// A CSR for `domains` (subject CN = the first when it fits) and its new key (PEM,
/// PKCS#8, zeroized on drop).
pub fn csr(domains: &[String], key_type: KeyType) -> Result<(Vec<u8>, KeyBytes), String> {
    let key = match key_type {
        KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
        KeyType::Rsa2048 => rsa_key(2048),
        KeyType::Rsa3072 => rsa_key(3072),
    }
    .map_err(|e| format!("generating a {} key: {e}", key_type.as_str()))?;
    let mut params = CertificateParams::new(domains.to_vec()).map_err(|e| format!("CSR names: {e}"))?;
    params.distinguished_name = DistinguishedName::new();
    if let Some(first) = domains.first().filter(|d| d.len() <= 64) {
        params.distinguished_name.push(DnType::CommonName, first.as_str());
    }
    let csr = params.serialize_request(&key).map_err(|e| format!("signing the CSR: {e}"))?;
    Ok((csr.der().to_vec(), KeyBytes::new(key.serialize_pem().into_bytes())))
}

/// ring signs with RSA keys but cannot generate them: the `rsa` crate generates the
/// key only; everything else (CSR signature, checks, TLS) stays on ring.
fn rsa_key(bits: usize) -> Result<KeyPair, rcgen::Error> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::PrivateKey::new(&mut getrandom::SysRng, bits).map_err(|_| rcgen::Error::KeyGenerationUnavailable)?;
    let der = key.to_pkcs8_der().map_err(|_| rcgen::Error::KeyGenerationUnavailable)?;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_bytes());
    KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::FromDer;

    fn is_pkcs8_pem(key: &KeyBytes) -> bool {
        use rustls_pki_types::pem::PemObject;
        matches!(
            rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_slice()),
            Ok(rustls_pki_types::PrivateKeyDer::Pkcs8(_))
        )
    }

    #[test]
    fn csr_names_every_domain_with_the_key_type() {
        let domains = vec!["example.com".to_string(), "*.example.com".to_string()];
        for (key_type, oid) in [(KeyType::EcdsaP256, "1.2.840.10045.3.1.7"), (KeyType::EcdsaP384, "1.3.132.0.34")] {
            let (der, key) = csr(&domains, key_type).unwrap();
            let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
            let info = &req.certification_request_info;
            let curve = info.subject_pki.algorithm.parameters.as_ref().unwrap().as_oid().unwrap();
            assert_eq!(curve.to_id_string(), oid, "{key_type:?}");
            let names: Vec<String> = req
                .requested_extensions()
                .into_iter()
                .flatten()
                .filter_map(|e| match e {
                    x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) => Some(san),
                    _ => None,
                })
                .flat_map(|san| san.general_names.iter().map(|n| n.to_string()))
                .collect();
            assert_eq!(names, ["DNSName(example.com)", "DNSName(*.example.com)"]);
            assert!(is_pkcs8_pem(&key));
        }
        let (der, key) = csr(&domains, KeyType::Rsa2048).unwrap();
        let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        let spki = &req.certification_request_info.subject_pki;
        assert_eq!(spki.algorithm.algorithm.to_id_string(), "1.2.840.113549.1.1.1", "rsaEncryption");
        let x509_parser::public_key::PublicKey::RSA(rsa) = spki.parsed().unwrap() else { panic!("RSA key") };
        assert_eq!(rsa.key_size(), 2048);
        assert!(is_pkcs8_pem(&key));
    }
}
