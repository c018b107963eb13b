//! Pure certificate checks: parse PEM, match key to leaf, order the chain, read SANs and
//! validity, and build the Envoy `Secret` resource. No I/O here, so every rule is unit
//! tested in place and sources can share one definition of "good".

mod chain;
mod key;
mod material;
/// OCSP staples: the check of a supplied one, and the request and verification of a
/// fetched one (src/stapling).
pub mod ocsp;
mod resource;

pub use material::{KeyBytes, Material, SharedKeyBytes};
/// OCSP responses for the tests of the sources.
#[cfg(test)]
pub(crate) use ocsp::fixtures as ocsp_fixtures;
pub use resource::{SECRET_TYPE_URL, ca_pems, identity, renamed, tls_pems};

use std::time::SystemTime;

/// How strict the checks are. Expired certificates are refused unless `allow_expired`.
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    pub allow_expired: bool,
    pub now: SystemTime,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self { allow_expired: false, now: SystemTime::now() }
    }
}

/// What kind of Envoy secret a resource is; shown in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretKind {
    TlsCertificate,
    ValidationContext,
    SessionTicketKeys,
    GenericSecret,
}

impl SecretKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretKind::TlsCertificate => "tls_certificate",
            SecretKind::ValidationContext => "validation_context",
            SecretKind::SessionTicketKeys => "session_ticket_keys",
            SecretKind::GenericSecret => "generic_secret",
        }
    }
}

/// Public facts about a checked secret that the store keeps with every version: its
/// validity and size. Never key material.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SecretMeta {
    pub not_before_unix: Option<i64>,
    /// Earliest expiry over the chain (or CA bundle): the moment something breaks.
    pub not_after_unix: Option<i64>,
    /// Number of certificates in the served chain or bundle.
    pub certificates: usize,
}

/// Who the leaf (or first CA) certificate is, for people reading status or logs. The
/// store does not keep it: [`identity`] reads it again from the served bytes, which
/// costs a parse per status request instead of memory per stored secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CertIdentity {
    /// SHA-256 of the certificate DER, lowercase hex.
    pub fingerprint_sha256: Option<String>,
    pub subject: Option<String>,
    pub serial: Option<String>,
    pub sans: Vec<String>,
}

/// A checked secret: the encoded Envoy `Secret` (shared by every stream) and its public
/// metadata.
pub struct Checked {
    pub kind: SecretKind,
    /// Encoded `Secret` (the SDS codec wraps it in an `Any`). Holds the private key,
    /// hence zeroized.
    pub resource: KeyBytes,
    pub meta: SecretMeta,
    pub identity: CertIdentity,
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked")
            .field("kind", &self.kind)
            .field("meta", &self.meta)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Why an update was refused. `reason()` is the stable label used in metrics.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PkiError {
    #[error("no certificate found in PEM")]
    NoCertificate,
    #[error("invalid PEM: {0}")]
    BadPem(String),
    #[error("no private key found in PEM")]
    NoKey,
    #[error("unsupported or invalid private key: {0}")]
    BadKey(String),
    #[error("invalid certificate: {0}")]
    BadCertificate(String),
    #[error("private key does not match the leaf certificate (leaf subject {subject})")]
    KeyMismatch { subject: String },
    #[error("certificate {subject} expired at {not_after}")]
    Expired { subject: String, not_after: String },
    #[error("certificate {subject} is not valid before {not_before}")]
    NotYetValid { subject: String, not_before: String },
    #[error("chain is broken: {0}")]
    BrokenChain(String),
    #[error("invalid CRL: {0}")]
    BadCrl(String),
    #[error("invalid session ticket keys: {0}")]
    BadTicketKeys(String),
    /// The OCSP staple does not parse, is not a good and current status of the leaf.
    #[error("bad OCSP staple: {0}")]
    BadOcspStaple(String),
    /// The OCSP staple's thisUpdate is ahead of the clock: it may become good by itself.
    #[error("bad OCSP staple: its thisUpdate {this_update} is in the future")]
    OcspStapleNotYetValid { this_update: String },
    /// `[ocsp] mode = "must-staple"` and no current verified staple is at hand yet.
    #[error("OCSP staple required: {0}")]
    OcspStapleRequired(String),
    /// The fetched OCSP response says the certificate is revoked (`on_revoked = "withhold"`).
    #[error("certificate revoked: {0}")]
    OcspRevoked(String),
}

impl PkiError {
    pub fn reason(&self) -> &'static str {
        match self {
            PkiError::NoCertificate => "no_certificate",
            PkiError::BadPem(_) => "bad_pem",
            PkiError::NoKey => "no_key",
            PkiError::BadKey(_) => "bad_key",
            PkiError::BadCertificate(_) => "bad_certificate",
            PkiError::KeyMismatch { .. } => "key_mismatch",
            PkiError::Expired { .. } => "expired",
            PkiError::NotYetValid { .. } => "not_yet_valid",
            PkiError::BrokenChain(_) => "broken_chain",
            PkiError::BadCrl(_) => "bad_crl",
            PkiError::BadTicketKeys(_) => "bad_ticket_keys",
            PkiError::BadOcspStaple(_) | PkiError::OcspStapleNotYetValid { .. } => "bad_ocsp_staple",
            PkiError::OcspStapleRequired(_) => "ocsp_staple_required",
            PkiError::OcspRevoked(_) => "ocsp_revoked",
        }
    }
}

/// Checks `material` for secret `name` and builds the Envoy resource.
///
/// - TLS: certificates parse, a private key (PKCS#8, SEC1 or PKCS#1; RSA, ECDSA P-256/P-384,
///   Ed25519) matches exactly one certificate which becomes the leaf, the chain is put in
///   leaf -> issuer order (extra unrelated certificates are an error), and every
///   certificate is inside its validity window unless `allow_expired`.
///   An OCSP staple (DER) must be a successful basic response with exactly one status,
///   for the leaf (serial, issuer name and, with the issuer in the chain, issuer key),
///   good, and current (thisUpdate past, nextUpdate future; `allow_expired` or not).
/// - Validation context: at least one CA certificate, valid CRL when given.
pub fn check(name: &str, material: &Material, opts: &CheckOptions) -> Result<Checked, PkiError> {
    resource::build(name, material, opts)
}
