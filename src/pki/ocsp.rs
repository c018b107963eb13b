//! OCSP staples (`tls.ocsp-staple`, Istio's key): a DER `OCSPResponse` served with the
//! certificate as Envoy's `TlsCertificate.ocsp_staple`, which Envoy hands to clients
//! that ask for the status of the certificate in the handshake.
//!
//! Envoy refuses a whole secret whose staple does not parse, is not `successful`, does
//! not hold exactly one response, or names another serial; it silently stops stapling
//! one past its `nextUpdate` (or without one). So the staple is checked here, with the
//! rest of the secret, before anything is served: a bad staple is refused like any bad
//! update, and the last good version (with its staple) stays. The check is stricter than
//! Envoy's serial comparison: the CertID must name the leaf's issuer too, and a response
//! that says the certificate is revoked or unknown is refused, since stapling it tells
//! every client to reject the certificate.
//!
//! The response's signature is not verified, as Envoy does not verify it either
//! (source/common/tls/ocsp/ocsp.cc: "responses are expected to be delivered from a
//! reliable source"): whoever writes the staple can write the certificate and key
//! too, and it is the client that verifies the signature against the issuer it trusts.
//!
//! Staples certwire fetches itself (src/stapling, `[ocsp]`) are another matter: they come
//! over a network nobody vouched for, so [`verify`] checks their signature (by the issuer
//! or a delegated responder) as well; [`target`] and [`request_der`] make the request.

use ring::digest::{self, Algorithm};
use x509_cert::der::Decode as _;
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::der::oid::db::{rfc5912, rfc6960};
use x509_ocsp::{BasicOcspResponse, CertId, CertStatus, OcspGeneralizedTime, OcspResponse, OcspResponseStatus};
use x509_parser::certificate::X509Certificate;

use super::{CheckOptions, PkiError};
use crate::unix_time;

/// Checks the DER `staple` for `leaf`, whose issuer is `issuer` when the chain holds it.
pub(super) fn check(
    staple: &[u8],
    leaf: &X509Certificate<'_>,
    issuer: Option<&X509Certificate<'_>>,
    opts: &CheckOptions,
) -> Result<(), PkiError> {
    let bad = |why: String| PkiError::BadOcspStaple(why);
    if staple.starts_with(b"-----BEGIN") {
        return Err(bad(
            "it is PEM; the staple must be the DER OCSP response (`openssl ocsp -respout` writes DER)".into()
        ));
    }
    let response = OcspResponse::from_der(staple).map_err(|e| bad(format!("not a DER OCSP response: {e}")))?;
    if response.response_status != OcspResponseStatus::Successful {
        return Err(bad(format!("response status is {:?}, not successful", response.response_status)));
    }
    let bytes = response.response_bytes.ok_or_else(|| bad("successful, but carries no response".into()))?;
    if bytes.response_type != rfc6960::ID_PKIX_OCSP_BASIC {
        return Err(bad(format!("response type {} is not id-pkix-ocsp-basic", bytes.response_type)));
    }
    let basic = BasicOcspResponse::from_der(bytes.response.as_bytes())
        .map_err(|e| bad(format!("not a DER basic OCSP response: {e}")))?;
    let single = match &basic.tbs_response_data.responses[..] {
        [single] => single,
        [] => return Err(bad("holds no certificate status".into())),
        more => {
            return Err(bad(format!(
                "holds {} certificate statuses; Envoy staples a response about one certificate only",
                more.len()
            )));
        }
    };
    matches_leaf(&single.cert_id, leaf, issuer).map_err(bad)?;

    let serial = serial_hex(leaf.raw_serial());
    match &single.cert_status {
        CertStatus::Good(_) => {}
        CertStatus::Revoked(info) => {
            let reason = info.revocation_reason.map(|r| format!(", reason {r:?}")).unwrap_or_default();
            return Err(bad(format!(
                "the certificate is REVOKED: the responder says serial {serial} was revoked at {}{reason}; \
                 clients must not trust it, replace the certificate",
                rfc3339(&info.revocation_time)
            )));
        }
        CertStatus::Unknown(_) => {
            return Err(bad(format!("certificate status is unknown: the responder does not know serial {serial}")));
        }
    }

    // allow_expired does not apply: a stale staple is never stapled by Envoy, and one
    // from the future is a clock or responder problem, not an old certificate.
    let now = unix_time::secs(opts.now);
    let this_update = secs(&single.this_update);
    if this_update > now + CLOCK_SKEW_SECS {
        return Err(PkiError::OcspStapleNotYetValid { this_update: unix_time::rfc3339(this_update) });
    }
    match single.next_update.as_ref().map(secs) {
        None => Err(bad("it has no nextUpdate; Envoy takes such a response as expired and never staples it".into())),
        Some(next) if now > next => Err(bad(format!(
            "it expired: nextUpdate {} is past; fetch a fresh response from the responder",
            unix_time::rfc3339(next)
        ))),
        Some(_) => Ok(()),
    }
}

/// The CertID names the leaf: its serial, the hash of its issuer's name and, when the
/// issuer is at hand, the hash of the issuer's key.
fn matches_leaf(id: &CertId, leaf: &X509Certificate<'_>, issuer: Option<&X509Certificate<'_>>) -> Result<(), String> {
    let (theirs, ours) = (strip_zeros(id.serial_number.as_bytes()), strip_zeros(leaf.raw_serial()));
    if theirs != ours {
        return Err(format!(
            "it is for another certificate: serial {}, the leaf's is {}",
            serial_hex(theirs),
            serial_hex(leaf.raw_serial())
        ));
    }
    let alg = hash_algorithm(&id.hash_algorithm.oid)?;
    let issuer_name = leaf.issuer();
    if digest::digest(alg, issuer_name.as_raw()).as_ref() != id.issuer_name_hash.as_bytes() {
        return Err(format!(
            "it is for another certificate: serial {} of an issuer other than {issuer_name} (issuerNameHash differs)",
            serial_hex(theirs)
        ));
    }
    // A self-issued leaf is its own issuer.
    let issuer = issuer.or_else(|| (leaf.subject().as_raw() == issuer_name.as_raw()).then_some(leaf));
    if let Some(issuer) = issuer
        && digest::digest(alg, &issuer.public_key().subject_public_key.data).as_ref() != id.issuer_key_hash.as_bytes()
    {
        return Err(format!(
            "it is for another certificate: serial {} issued under another key than that of {issuer_name} in the \
             chain (issuerKeyHash differs)",
            serial_hex(theirs)
        ));
    }
    Ok(())
}

fn hash_algorithm(oid: &ObjectIdentifier) -> Result<&'static Algorithm, String> {
    match *oid {
        rfc5912::ID_SHA_1 => Ok(&digest::SHA1_FOR_LEGACY_USE_ONLY),
        rfc5912::ID_SHA_256 => Ok(&digest::SHA256),
        rfc5912::ID_SHA_384 => Ok(&digest::SHA384),
        rfc5912::ID_SHA_512 => Ok(&digest::SHA512),
        _ => Err(format!("its CertID hash algorithm {oid} is not supported (SHA-1, SHA-256, SHA-384, SHA-512 are)")),
    }
}

fn secs(t: &OcspGeneralizedTime) -> i64 {
    i64::try_from(t.0.to_unix_duration().as_secs()).unwrap_or(i64::MAX)
}

fn rfc3339(t: &OcspGeneralizedTime) -> String {
    unix_time::rfc3339(secs(t))
}

fn strip_zeros(raw: &[u8]) -> &[u8] {
    &raw[raw.iter().position(|&b| b != 0).unwrap_or(raw.len())..]
}

/// As status shows serials: lowercase hex without the sign byte.
fn serial_hex(raw: &[u8]) -> String {
    match strip_zeros(raw) {
        [] => "0".into(),
        digits => hex::encode(digits),
    }
}

// ---------------------------------------------------------------------------------
// Fetched staples (src/stapling): what to ask a responder, and a full verification of
// what it answers. Unlike a staple the source supplies, a fetched response arrives over
// a network nobody vouched for, so its signature is verified against the issuer.
// ---------------------------------------------------------------------------------

/// A served leaf that can be asked about: its issuer is known and it names a responder.
#[derive(Clone, PartialEq, Eq)]
pub struct OcspTarget {
    pub leaf_der: Vec<u8>,
    pub issuer_der: Vec<u8>,
    /// The first `http://` (or `https://`) OCSP URL of the leaf's AIA extension.
    pub url: String,
    /// Lowercase hex without the sign byte, as status shows serials.
    pub serial_hex: String,
}

impl std::fmt::Debug for OcspTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OcspTarget").field("serial", &self.serial_hex).field("url", &self.url).finish_non_exhaustive()
    }
}

/// The AIA access method naming an OCSP responder (id-ad-ocsp).
const ID_AD_OCSP: &str = "1.3.6.1.5.5.7.48.1";

/// What to ask about the leaf of `cert_chain_pem` (the first certificate, as sources
/// and Envoy order it), or why it cannot be asked about: no OCSP URL in its AIA, or its
/// issuer is neither in the chain nor among `issuers` (DER, e.g. a CA the source has).
pub fn target(cert_chain_pem: &[u8], issuers: &[Vec<u8>]) -> Result<OcspTarget, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let ders: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(cert_chain_pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate chain does not parse as PEM: {e}"))?;
    let leaf_der = ders.first().ok_or("the chain holds no certificate")?.clone();
    let (_, leaf) =
        x509_parser::parse_x509_certificate(&leaf_der).map_err(|e| format!("the leaf does not parse: {e}"))?;
    let url = ocsp_url(&leaf).ok_or("the certificate names no OCSP responder (no http:// OCSP URL in its AIA)")?;
    let issuer_der = ders[1..]
        .iter()
        .chain(issuers)
        .find(|der| {
            x509_parser::parse_x509_certificate(der).is_ok_and(|(_, c)| c.subject().as_raw() == leaf.issuer().as_raw())
        })
        .cloned()
        .or_else(|| (leaf.subject().as_raw() == leaf.issuer().as_raw()).then(|| leaf_der.clone()))
        .ok_or_else(|| {
            format!("the issuer {} is not in the chain: its key is needed to ask and to verify", leaf.issuer())
        })?;
    Ok(OcspTarget { serial_hex: serial_hex(leaf.raw_serial()), leaf_der, issuer_der, url })
}

fn ocsp_url(leaf: &X509Certificate<'_>) -> Option<String> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    leaf.extensions().iter().find_map(|ext| match ext.parsed_extension() {
        ParsedExtension::AuthorityInfoAccess(aia) => aia.iter().find_map(|desc| match &desc.access_location {
            GeneralName::URI(uri)
                if desc.access_method.to_id_string() == ID_AD_OCSP
                    && (uri.starts_with("http://") || uri.starts_with("https://")) =>
            {
                Some((*uri).to_owned())
            }
            _ => None,
        }),
        _ => None,
    })
}

/// The DER `OCSPRequest` for `target`: one CertID hashed with SHA-1, as RFC 5019
/// responders (and CDN caches in front of them) expect; no nonce, so a cached answer
/// is acceptable, which is what a staple is.
pub fn request_der(target: &OcspTarget) -> Result<Vec<u8>, String> {
    use x509_cert::der::Encode as _;
    use x509_cert::der::asn1::{Null, OctetString};
    use x509_cert::serial_number::SerialNumber;
    use x509_cert::spki::AlgorithmIdentifierOwned;
    use x509_ocsp::{OcspRequest, Request, TbsRequest, Version};
    let parse = |der: &[u8], what: &str| -> Result<Vec<u8>, String> {
        x509_parser::parse_x509_certificate(der)
            .map(|_| der.to_vec())
            .map_err(|e| format!("the {what} does not parse: {e}"))
    };
    let (leaf_der, issuer_der) = (parse(&target.leaf_der, "leaf")?, parse(&target.issuer_der, "issuer")?);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).map_err(|e| e.to_string())?;
    let (_, issuer) = x509_parser::parse_x509_certificate(&issuer_der).map_err(|e| e.to_string())?;
    let sha1 = &digest::SHA1_FOR_LEGACY_USE_ONLY;
    let id = CertId {
        hash_algorithm: AlgorithmIdentifierOwned {
            oid: rfc5912::ID_SHA_1,
            parameters: Some(x509_cert::der::Any::from(Null)),
        },
        issuer_name_hash: OctetString::new(digest::digest(sha1, issuer.subject().as_raw()).as_ref())
            .map_err(|e| e.to_string())?,
        issuer_key_hash: OctetString::new(digest::digest(sha1, &issuer.public_key().subject_public_key.data).as_ref())
            .map_err(|e| e.to_string())?,
        serial_number: SerialNumber::new(leaf.raw_serial()).map_err(|e| format!("the leaf's serial: {e}"))?,
    };
    let request = OcspRequest {
        tbs_request: TbsRequest {
            version: Version::V1,
            requestor_name: None,
            request_list: vec![Request { req_cert: id, single_request_extensions: None }],
            request_extensions: None,
        },
        optional_signature: None,
    };
    request.to_der().map_err(|e| format!("encoding the OCSP request: {e}"))
}

/// What a verified response says about the leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OcspCertStatus {
    Good,
    /// Revocation time (unix seconds) and reason, when the responder gives one.
    Revoked {
        at: i64,
        reason: Option<String>,
    },
}

/// A response that passed [`verify`]: signed by the issuer or its delegated responder,
/// about the leaf, current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcspAnswer {
    pub status: OcspCertStatus,
    pub this_update: i64,
    pub next_update: i64,
    pub produced_at: i64,
    /// Who signed it: `issuer` or `delegated responder CN=...`.
    pub signer: String,
}

/// How far in the future a response's thisUpdate may be: a responder's clock a little
/// ahead of ours is not a bad response (OpenSSL's `OCSP_check_validity` allows the same
/// 5 minutes; Envoy only warns).
pub const CLOCK_SKEW_SECS: i64 = 300;

/// Verifies the DER response `der` fetched for `target` at `now` (unix seconds): a
/// successful basic response with exactly one status (Envoy staples no other), about
/// the leaf (CertID), signed by the issuer or by a responder certificate in the response
/// that the issuer signed, that carries the id-kp-OCSPSigning EKU and is valid now,
/// with thisUpdate past and nextUpdate future. A response without nextUpdate is refused:
/// Envoy never staples one ("newer information is always available").
pub fn verify(der: &[u8], target: &OcspTarget, now: i64) -> Result<OcspAnswer, String> {
    use x509_cert::der::Encode as _;
    let response = OcspResponse::from_der(der).map_err(|e| format!("not a DER OCSP response: {e}"))?;
    if response.response_status != OcspResponseStatus::Successful {
        return Err(format!("response status is {:?}, not successful", response.response_status));
    }
    let bytes = response.response_bytes.ok_or("successful, but carries no response")?;
    if bytes.response_type != rfc6960::ID_PKIX_OCSP_BASIC {
        return Err(format!("response type {} is not id-pkix-ocsp-basic", bytes.response_type));
    }
    let basic = BasicOcspResponse::from_der(bytes.response.as_bytes())
        .map_err(|e| format!("not a DER basic OCSP response: {e}"))?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&target.leaf_der).map_err(|e| e.to_string())?;
    let (_, issuer) = x509_parser::parse_x509_certificate(&target.issuer_der).map_err(|e| e.to_string())?;

    // DER is canonical and x509-ocsp decodes strict DER: re-encoding gives back the
    // signed bytes.
    let tbs = basic.tbs_response_data.to_der().map_err(|e| format!("re-encoding tbsResponseData: {e}"))?;
    let alg = basic.signature_algorithm.oid.to_string();
    let signature = basic.signature.as_bytes().ok_or("the signature is not a whole number of bytes")?;
    let signer = responder(&basic, &issuer, now)?;
    let signer_name = match &signer {
        Signer::Issuer => "issuer".to_owned(),
        Signer::Delegated(der) => {
            let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
            format!("delegated responder {}", c.subject())
        }
    };
    let signer_key = match &signer {
        Signer::Issuer => verify_signature(issuer.public_key(), &alg, &tbs, signature),
        Signer::Delegated(der) => {
            let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
            verify_signature(c.public_key(), &alg, &tbs, signature)
        }
    };
    signer_key.map_err(|e| format!("its signature by the {signer_name} does not verify: {e}"))?;

    let single = match &basic.tbs_response_data.responses[..] {
        [single] => single,
        [] => return Err("holds no certificate status".into()),
        more => {
            return Err(format!(
                "holds {} certificate statuses; Envoy staples a response about one certificate only",
                more.len()
            ));
        }
    };
    matches_leaf(&single.cert_id, &leaf, Some(&issuer))?;
    let this_update = secs(&single.this_update);
    if this_update > now + CLOCK_SKEW_SECS {
        return Err(format!("its thisUpdate {} is in the future", unix_time::rfc3339(this_update)));
    }
    let next_update = single
        .next_update
        .as_ref()
        .map(secs)
        .ok_or("it has no nextUpdate; Envoy takes such a response as expired and never staples it")?;
    if now >= next_update {
        return Err(format!("it is already stale: nextUpdate {} is past", unix_time::rfc3339(next_update)));
    }
    let status = match &single.cert_status {
        CertStatus::Good(_) => OcspCertStatus::Good,
        CertStatus::Revoked(info) => OcspCertStatus::Revoked {
            at: secs(&info.revocation_time),
            reason: info.revocation_reason.map(|r| format!("{r:?}")),
        },
        CertStatus::Unknown(_) => {
            return Err(format!(
                "certificate status is unknown: the responder does not know serial {}",
                target.serial_hex
            ));
        }
    };
    Ok(OcspAnswer {
        status,
        this_update,
        next_update,
        produced_at: secs(&basic.tbs_response_data.produced_at),
        signer: signer_name,
    })
}

/// Longest subject (in characters) quoted into an error text.
const MAX_QUOTED_SUBJECT: usize = 128;

/// `subject` Debug-quoted (newlines, quotes and control characters escaped) and cut to
/// [`MAX_QUOTED_SUBJECT`] characters, for a certificate nobody vouched for yet.
fn quoted_subject(subject: &str) -> String {
    match subject.char_indices().nth(MAX_QUOTED_SUBJECT) {
        Some((cut, _)) => format!("{:?}... ({} bytes, cut)", &subject[..cut], subject.len()),
        None => format!("{subject:?}"),
    }
}

enum Signer {
    Issuer,
    /// DER of the delegated responder's certificate, checked.
    Delegated(Vec<u8>),
}

/// Who signed `basic`, by its ResponderID: the issuer itself, or one of the certificates
/// the response carries, which must be a responder the issuer delegated to (RFC 6960
/// 4.2.2.2: issued by the issuer, id-kp-OCSPSigning).
fn responder(basic: &BasicOcspResponse, issuer: &X509Certificate<'_>, now: i64) -> Result<Signer, String> {
    use x509_cert::der::Encode as _;
    use x509_ocsp::ResponderId;
    let sha1 = &digest::SHA1_FOR_LEGACY_USE_ONLY;
    let names = |c: &X509Certificate<'_>| match &basic.tbs_response_data.responder_id {
        ResponderId::ByName(name) => name.to_der().is_ok_and(|der| der == c.subject().as_raw()),
        ResponderId::ByKey(hash) => {
            digest::digest(sha1, &c.public_key().subject_public_key.data).as_ref() == hash.as_bytes()
        }
    };
    if names(issuer) {
        return Ok(Signer::Issuer);
    }
    for cert in basic.certs.iter().flatten() {
        let der = cert.to_der().map_err(|e| format!("re-encoding a responder certificate: {e}"))?;
        let Ok((_, c)) = x509_parser::parse_x509_certificate(&der) else { continue };
        if !names(&c) {
            continue;
        }
        // Unverified until the checks below pass: whatever its subject says goes into
        // error text (logs, status) quoted and capped, never raw.
        let who = quoted_subject(&c.subject().to_string());
        if c.issuer().as_raw() != issuer.subject().as_raw() {
            return Err(format!("signed by {who}, which the issuer {} did not issue", issuer.subject()));
        }
        verify_signature(
            issuer.public_key(),
            &c.signature_algorithm.algorithm.to_id_string(),
            c.tbs_certificate.as_ref(),
            &c.signature_value.data,
        )
        .map_err(|e| format!("signed by {who}, whose certificate's signature by the issuer does not verify: {e}"))?;
        let ocsp_signing = matches!(c.extended_key_usage(), Ok(Some(eku)) if eku.value.ocsp_signing);
        if !ocsp_signing {
            return Err(format!(
                "signed by {who}, a certificate of the issuer without the id-kp-OCSPSigning extended key usage: \
                 not a delegated OCSP responder"
            ));
        }
        let validity = c.validity();
        if now < validity.not_before.timestamp() || now > validity.not_after.timestamp() {
            return Err(format!("signed by the delegated responder {who}, whose certificate is not valid now"));
        }
        return Ok(Signer::Delegated(der));
    }
    Err(format!(
        "signed by a responder that is neither the issuer {} nor a certificate in the response",
        issuer.subject()
    ))
}

/// Verifies `signature` over `message` with `spki`, for the algorithms ring verifies
/// and responders use: RSA PKCS#1 v1.5 with SHA-256/384/512, ECDSA P-256/P-384.
fn verify_signature(
    spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
    alg: &str,
    message: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    use ring::signature as sig;
    const RSA: &str = "1.2.840.113549.1.1.1";
    const EC: &str = "1.2.840.10045.2.1";
    const P256: &str = "1.2.840.10045.3.1.7";
    const P384: &str = "1.3.132.0.34";
    let key_alg = spki.algorithm.algorithm.to_id_string();
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
    let verifier: &dyn sig::VerificationAlgorithm = match (alg, key_alg.as_str(), curve.as_deref()) {
        ("1.2.840.113549.1.1.11", RSA, _) => &sig::RSA_PKCS1_2048_8192_SHA256,
        ("1.2.840.113549.1.1.12", RSA, _) => &sig::RSA_PKCS1_2048_8192_SHA384,
        ("1.2.840.113549.1.1.13", RSA, _) => &sig::RSA_PKCS1_2048_8192_SHA512,
        ("1.2.840.10045.4.3.2", EC, Some(P256)) => &sig::ECDSA_P256_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", EC, Some(P256)) => &sig::ECDSA_P256_SHA384_ASN1,
        ("1.2.840.10045.4.3.2", EC, Some(P384)) => &sig::ECDSA_P384_SHA256_ASN1,
        ("1.2.840.10045.4.3.3", EC, Some(P384)) => &sig::ECDSA_P384_SHA384_ASN1,
        _ => {
            return Err(format!(
                "signature algorithm {alg} with a {key_alg} key{} is not supported (RSA PKCS#1 with SHA-256/384/512, \
                 ECDSA P-256/P-384 with SHA-256/384 are)",
                curve.map(|c| format!(" on curve {c}")).unwrap_or_default()
            ));
        }
    };
    sig::UnparsedPublicKey::new(verifier, &spki.subject_public_key.data)
        .verify(message, signature)
        .map_err(|_| "the signature is wrong".to_owned())
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! OCSP responses built with x509-ocsp's encoder. Their signature is a dummy: the
    //! check does not verify it (see the module comment).

    use std::time::{Duration, SystemTime};

    use ring::digest;
    use x509_cert::der::Encode as _;
    use x509_cert::der::asn1::{BitString, Null, ObjectIdentifier, OctetString};
    use x509_cert::der::oid::db::{rfc5912, rfc6960};
    use x509_cert::der::{Any, asn1::GeneralizedTime};
    use x509_cert::serial_number::SerialNumber;
    use x509_cert::spki::AlgorithmIdentifierOwned;
    use x509_ocsp::{
        BasicOcspResponse, CertId, CertStatus, OcspGeneralizedTime, OcspResponse, OcspResponseStatus, ResponderId,
        ResponseBytes, ResponseData, RevokedInfo, SingleResponse, Version,
    };
    use x509_parser::parse_x509_certificate;

    pub fn at(t: SystemTime) -> OcspGeneralizedTime {
        // Whole seconds: DER GeneralizedTime has no fraction here.
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        OcspGeneralizedTime(GeneralizedTime::from_unix_duration(Duration::from_secs(secs)).unwrap())
    }

    pub fn hours(h: i64) -> OcspGeneralizedTime {
        let now = SystemTime::now();
        let d = Duration::from_secs(h.unsigned_abs() * 3600);
        at(if h < 0 { now - d } else { now + d })
    }

    /// The CertID of `leaf_der` issued by `issuer_der`, hashed with `hash` (SHA-1 or
    /// SHA-256, as OpenSSL and most responders use).
    pub fn cert_id(leaf_der: &[u8], issuer_der: &[u8], hash: &'static digest::Algorithm) -> CertId {
        let (_, leaf) = parse_x509_certificate(leaf_der).unwrap();
        let (_, issuer) = parse_x509_certificate(issuer_der).unwrap();
        let oid = if hash == &digest::SHA256 { rfc5912::ID_SHA_256 } else { rfc5912::ID_SHA_1 };
        CertId {
            hash_algorithm: AlgorithmIdentifierOwned { oid, parameters: Some(Any::from(Null)) },
            // From the issuer's own subject, not the leaf's issuer field.
            issuer_name_hash: OctetString::new(digest::digest(hash, issuer.subject().as_raw()).as_ref()).unwrap(),
            issuer_key_hash: OctetString::new(
                digest::digest(hash, &issuer.public_key().subject_public_key.data).as_ref(),
            )
            .unwrap(),
            serial_number: SerialNumber::new(leaf.raw_serial()).unwrap(),
        }
    }

    /// A good status for `id`, valid from an hour ago for a day.
    pub fn good(id: CertId) -> SingleResponse {
        SingleResponse {
            cert_id: id,
            cert_status: CertStatus::good(),
            this_update: hours(-1),
            next_update: Some(hours(24)),
            single_extensions: None,
        }
    }

    pub fn revoked(id: CertId) -> SingleResponse {
        let info = RevokedInfo {
            revocation_time: hours(-2),
            revocation_reason: Some(x509_cert::ext::pkix::CrlReason::KeyCompromise),
        };
        SingleResponse { cert_status: CertStatus::revoked(info), ..good(id) }
    }

    pub fn unknown(id: CertId) -> SingleResponse {
        SingleResponse { cert_status: CertStatus::unknown(), ..good(id) }
    }

    /// A successful basic response holding `responses`, DER.
    pub fn response(responses: Vec<SingleResponse>) -> Vec<u8> {
        OcspResponse::successful(basic(responses)).unwrap().to_der().unwrap()
    }

    pub fn basic(responses: Vec<SingleResponse>) -> BasicOcspResponse {
        BasicOcspResponse {
            tbs_response_data: ResponseData {
                version: Version::V1,
                responder_id: ResponderId::ByKey(OctetString::new([7u8; 20]).unwrap()),
                produced_at: hours(-1),
                responses,
                response_extensions: None,
            },
            signature_algorithm: AlgorithmIdentifierOwned { oid: rfc5912::ECDSA_WITH_SHA_256, parameters: None },
            signature: BitString::from_bytes(&[0x30, 0x00]).unwrap(),
            certs: None,
        }
    }

    /// A response with `status` and no body, as a responder answers an error.
    pub fn status_only(status: OcspResponseStatus) -> Vec<u8> {
        OcspResponse { response_status: status, response_bytes: None }.to_der().unwrap()
    }

    /// A successful response whose body is of another type than basic.
    pub fn other_type(oid: ObjectIdentifier) -> Vec<u8> {
        let body = basic(Vec::new()).to_der().unwrap();
        let bytes = ResponseBytes { response_type: oid, response: OctetString::new(body).unwrap() };
        OcspResponse { response_status: OcspResponseStatus::Successful, response_bytes: Some(bytes) }.to_der().unwrap()
    }

    pub const BASIC: ObjectIdentifier = rfc6960::ID_PKIX_OCSP_BASIC;
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use ring::digest::{SHA1_FOR_LEGACY_USE_ONLY as SHA1, SHA256};
    use x509_cert::der::oid::db::rfc6960;
    use x509_ocsp::{OcspResponseStatus, SingleResponse};
    use x509_parser::parse_x509_certificate;

    use super::super::chain::fixtures::{self, Alg, days};
    use super::fixtures::*;
    use super::*;
    use crate::pki::{KeyBytes, Material, check as check_secret};

    struct Pki {
        root: fixtures::Authority,
        inter: fixtures::Authority,
        leaf: fixtures::Issued,
    }

    fn pki() -> Pki {
        let root = fixtures::root("OCSP Root");
        let inter = root.intermediate("OCSP Intermediate", days(-1, 365));
        let leaf = inter.leaf(Alg::P256, "leaf.example.com", days(-1, 30));
        Pki { root, inter, leaf }
    }

    impl Pki {
        fn id(&self, hash: &'static ring::digest::Algorithm) -> x509_ocsp::CertId {
            cert_id(self.leaf.cert.der(), self.inter.cert.der(), hash)
        }

        /// Runs the check on the leaf with or without its issuer.
        fn check_with(&self, staple: &[u8], with_issuer: bool, now: SystemTime) -> Result<(), PkiError> {
            let (_, leaf) = parse_x509_certificate(self.leaf.cert.der()).unwrap();
            let (_, inter) = parse_x509_certificate(self.inter.cert.der()).unwrap();
            check(staple, &leaf, with_issuer.then_some(&inter), &CheckOptions { allow_expired: false, now })
        }

        fn check(&self, staple: &[u8]) -> Result<(), PkiError> {
            self.check_with(staple, true, SystemTime::now())
        }

        fn material(&self, staple: Option<Vec<u8>>) -> Material {
            Material::Tls {
                cert_chain_pem: (self.leaf.cert.pem() + &self.inter.cert.pem()).into_bytes(),
                key_pem: KeyBytes::new(self.leaf.key_pem.clone().into_bytes()),
                ocsp_staple: staple,
            }
        }
    }

    /// The message of a `BadOcspStaple`, or a panic.
    fn why(result: Result<(), PkiError>) -> String {
        match result {
            Err(e @ PkiError::BadOcspStaple(_)) => {
                assert_eq!(e.reason(), "bad_ocsp_staple");
                e.to_string()
            }
            other => panic!("not a bad staple: {other:?}"),
        }
    }

    #[test]
    fn a_good_response_for_the_leaf_passes_with_sha1_and_sha256() {
        let p = pki();
        for hash in [&SHA1, &SHA256] {
            let staple = response(vec![good(p.id(hash))]);
            assert_eq!(p.check(&staple), Ok(()));
            assert_eq!(p.check_with(&staple, false, SystemTime::now()), Ok(()), "without the issuer in the chain");
        }
    }

    #[test]
    fn what_does_not_parse_is_refused() {
        let p = pki();
        let staple = response(vec![good(p.id(&SHA1))]);
        let mut trailing = staple.clone();
        trailing.push(0);
        assert!(why(p.check(&trailing)).contains("trailing data"), "{}", why(p.check(&trailing)));
        assert!(why(p.check(&staple[..staple.len() - 1])).contains("not a DER OCSP response"));
        assert!(why(p.check(b"")).contains("not a DER OCSP response"));
        assert!(why(p.check(b"garbage")).contains("not a DER OCSP response"));
        let pem = b"-----BEGIN OCSP RESPONSE-----\nMAA=\n-----END OCSP RESPONSE-----\n";
        assert!(why(p.check(pem)).contains("it is PEM"));
        // The basic response inside with a byte too many.
        let mut basic_der = x509_cert::der::Encode::to_der(&basic(vec![good(p.id(&SHA1))])).unwrap();
        basic_der.push(0);
        let bytes = x509_ocsp::ResponseBytes {
            response_type: BASIC,
            response: x509_cert::der::asn1::OctetString::new(basic_der).unwrap(),
        };
        let outer =
            x509_ocsp::OcspResponse { response_status: OcspResponseStatus::Successful, response_bytes: Some(bytes) };
        let outer = x509_cert::der::Encode::to_der(&outer).unwrap();
        let msg = why(p.check(&outer));
        assert!(msg.contains("not a DER basic OCSP response") && msg.contains("trailing data"), "{msg}");
    }

    #[test]
    fn unsuccessful_and_non_basic_responses_are_refused() {
        let p = pki();
        for status in [OcspResponseStatus::TryLater, OcspResponseStatus::Unauthorized] {
            let msg = why(p.check(&status_only(status)));
            assert!(msg.contains(&format!("{status:?}")) && msg.contains("not successful"), "{msg}");
        }
        assert!(why(p.check(&status_only(OcspResponseStatus::Successful))).contains("carries no response"));
        let msg = why(p.check(&other_type(rfc6960::ID_PKIX_OCSP_NONCE)));
        assert!(msg.contains("1.3.6.1.5.5.7.48.1.2") && msg.contains("not id-pkix-ocsp-basic"), "{msg}");
    }

    #[test]
    fn exactly_one_status_is_needed() {
        let p = pki();
        assert!(why(p.check(&response(Vec::new()))).contains("holds no certificate status"));
        let two = response(vec![good(p.id(&SHA1)), good(p.id(&SHA256))]);
        assert!(why(p.check(&two)).contains("holds 2 certificate statuses"));
    }

    #[test]
    fn a_response_for_another_certificate_is_refused() {
        let p = pki();
        // Another leaf of the same issuer, with another serial.
        let (_, leaf) = parse_x509_certificate(p.leaf.cert.der()).unwrap();
        let mut id = p.id(&SHA256);
        id.serial_number = x509_cert::serial_number::SerialNumber::new(&[0x12, 0x34]).unwrap();
        let msg = why(p.check(&response(vec![good(id)])));
        assert!(msg.contains("another certificate: serial 1234, the leaf's is 8f01"), "{msg}");

        // The same serial (the fixtures all use 8f01) from another issuer name.
        let other = p.root.leaf(Alg::P256, "leaf.example.com", days(-1, 30));
        let id = cert_id(other.cert.der(), p.root.cert.der(), &SHA1);
        let msg = why(p.check(&response(vec![good(id)])));
        assert!(msg.contains("of an issuer other than CN=OCSP Intermediate (issuerNameHash differs)"), "{msg}");

        // The same serial and issuer name, another key: a CA of the same name.
        let twin = fixtures::root("OCSP Root").intermediate("OCSP Intermediate", days(-1, 365));
        let id = cert_id(p.leaf.cert.der(), twin.cert.der(), &SHA256);
        let staple = response(vec![good(id)]);
        let msg = why(p.check(&staple));
        assert!(msg.contains("issuerKeyHash differs"), "{msg}");
        assert_eq!(p.check_with(&staple, false, SystemTime::now()), Ok(()), "without the issuer, the key is unknown");
        assert_eq!(leaf.raw_serial(), [0x00, 0x8f, 0x01]);
    }

    #[test]
    fn unsupported_hash_algorithms_are_named() {
        let p = pki();
        let mut id = p.id(&SHA1);
        id.hash_algorithm.oid = rfc5912::ID_MD_5;
        let msg = why(p.check(&response(vec![good(id)])));
        assert!(msg.contains("hash algorithm 1.2.840.113549.2.5 is not supported"), "{msg}");
    }

    #[test]
    fn revoked_and_unknown_certificates_are_refused_loudly() {
        let p = pki();
        let msg = why(p.check(&response(vec![revoked(p.id(&SHA1))])));
        assert!(msg.contains("REVOKED") && msg.contains("serial 8f01") && msg.contains("KeyCompromise"), "{msg}");
        let msg = why(p.check(&response(vec![unknown(p.id(&SHA1))])));
        assert!(msg.contains("status is unknown") && msg.contains("serial 8f01"), "{msg}");
    }

    #[test]
    fn the_response_must_be_current_even_with_allow_expired() {
        let p = pki();
        let now = SystemTime::now();
        let stale = SingleResponse { this_update: hours(-48), next_update: Some(hours(-24)), ..good(p.id(&SHA1)) };
        let staple = response(vec![stale]);
        assert!(why(p.check(&staple)).contains("it expired: nextUpdate"), "{}", why(p.check(&staple)));
        assert_eq!(p.check_with(&staple, true, now - Duration::from_secs(36 * 3600)), Ok(()), "CheckOptions.now");

        let early = SingleResponse { this_update: hours(2), ..good(p.id(&SHA1)) };
        let staple = response(vec![early]);
        let err = p.check(&staple).unwrap_err();
        assert!(matches!(err, PkiError::OcspStapleNotYetValid { .. }), "{err:?}");
        assert_eq!(err.reason(), "bad_ocsp_staple");
        assert!(err.to_string().contains("thisUpdate") && err.to_string().contains("future"), "{err}");
        assert_eq!(p.check_with(&staple, true, now + Duration::from_secs(3 * 3600)), Ok(()));
        // A responder clock a minute ahead is tolerated (CLOCK_SKEW_SECS).
        let ahead = SingleResponse { this_update: at(now + Duration::from_secs(60)), ..good(p.id(&SHA1)) };
        assert_eq!(p.check(&response(vec![ahead])), Ok(()));

        let open_ended = SingleResponse { next_update: None, ..good(p.id(&SHA1)) };
        assert!(why(p.check(&response(vec![open_ended]))).contains("no nextUpdate"));

        // allow_expired lifts certificate expiry, not the staple's.
        let expired = SingleResponse { this_update: hours(-48), next_update: Some(hours(-24)), ..good(p.id(&SHA1)) };
        let material = p.material(Some(response(vec![expired])));
        let err = check_secret("web", &material, &CheckOptions { allow_expired: true, now }).unwrap_err();
        assert_eq!(err.reason(), "bad_ocsp_staple");
    }

    #[test]
    fn the_whole_check_serves_a_good_staple_and_refuses_a_bad_one() {
        use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret::Type};
        use prost::Message as _;

        let p = pki();
        let staple = response(vec![good(p.id(&SHA1))]);
        let checked = check_secret("web", &p.material(Some(staple.clone())), &CheckOptions::default()).unwrap();
        let Some(Type::TlsCertificate(tls)) = Secret::decode(checked.resource.as_slice()).unwrap().r#type else {
            panic!("not a TLS certificate")
        };
        assert_eq!(tls.ocsp_staple.and_then(|s| s.specifier), Some(Specifier::InlineBytes(staple)));

        let without = check_secret("web", &p.material(None), &CheckOptions::default()).unwrap();
        let Some(Type::TlsCertificate(tls)) = Secret::decode(without.resource.as_slice()).unwrap().r#type else {
            panic!("not a TLS certificate")
        };
        assert_eq!(tls.ocsp_staple, None);
        assert_ne!(checked.resource.as_slice(), without.resource.as_slice(), "the staple is part of the version");

        // A leaf whose chain has no intermediate: serial and issuer name still checked.
        let alone = Material::Tls {
            cert_chain_pem: p.leaf.cert.pem().into_bytes(),
            key_pem: KeyBytes::new(p.leaf.key_pem.clone().into_bytes()),
            ocsp_staple: Some(response(vec![good(p.id(&SHA256))])),
        };
        assert!(check_secret("web", &alone, &CheckOptions::default()).is_ok());

        let other = fixtures::root("Other Root").leaf(Alg::P256, "leaf.example.com", days(-1, 30));
        let wrong = response(vec![good(cert_id(other.cert.der(), p.root.cert.der(), &SHA1))]);
        let err = check_secret("web", &p.material(Some(wrong)), &CheckOptions::default()).unwrap_err();
        assert_eq!(err.reason(), "bad_ocsp_staple");
        assert!(err.to_string().contains("another certificate"), "{err}");
    }

    /// The CertID OpenSSL computes is the one matched here: a response made by
    /// `openssl ocsp` as a responder, as the end-to-end tests and users make them.
    #[test]
    fn a_response_made_by_openssl_passes_and_one_for_another_leaf_does_not() {
        let p = pki();
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        std::fs::write(path("inter.pem"), p.inter.cert.pem()).unwrap();
        std::fs::write(path("inter.key"), &p.inter.key_pem).unwrap();
        std::fs::write(path("leaf.pem"), p.leaf.cert.pem()).unwrap();
        let (_, leaf) = parse_x509_certificate(p.leaf.cert.der()).unwrap();
        let expiry = leaf.validity().not_after.to_datetime();
        let expiry = format!(
            "{:02}{:02}{:02}{:02}{:02}{:02}Z",
            expiry.year() % 100,
            u8::from(expiry.month()),
            expiry.day(),
            expiry.hour(),
            expiry.minute(),
            expiry.second()
        );
        std::fs::write(path("index.txt"), format!("V\t{expiry}\t\t8F01\tunknown\t/CN=leaf.example.com\n")).unwrap();
        let respond = |cert: &str, out: &str| {
            fixtures::openssl(
                &["ocsp", "-issuer", &path("inter.pem"), "-cert", cert, "-reqout", &path("req.der")],
                b"",
            );
            fixtures::openssl(
                &[
                    "ocsp",
                    "-index",
                    &path("index.txt"),
                    "-rsigner",
                    &path("inter.pem"),
                    "-rkey",
                    &path("inter.key"),
                    "-CA",
                    &path("inter.pem"),
                    "-reqin",
                    &path("req.der"),
                    "-respout",
                    &path(out),
                    "-ndays",
                    "1",
                ],
                b"",
            );
            std::fs::read(path(out)).unwrap()
        };
        let staple = respond(&path("leaf.pem"), "resp.der");
        assert_eq!(p.check(&staple), Ok(()));
        assert!(check_secret("web", &p.material(Some(staple)), &CheckOptions::default()).is_ok());

        // Same serial and issuer name, another issuer key: a response from a twin CA.
        let twin = fixtures::root("OCSP Root").intermediate("OCSP Intermediate", days(-1, 365));
        std::fs::write(path("inter.pem"), twin.cert.pem()).unwrap();
        std::fs::write(path("inter.key"), &twin.key_pem).unwrap();
        let twin_leaf = twin.leaf(Alg::P256, "leaf.example.com", days(-1, 30));
        std::fs::write(path("leaf.pem"), twin_leaf.cert.pem()).unwrap();
        let staple = respond(&path("leaf.pem"), "twin.der");
        assert!(why(p.check(&staple)).contains("issuerKeyHash differs"));
    }
}
#[cfg(test)]
pub(crate) mod signed {
    //! Really signed OCSP responses, for the verification of fetched ones: a P-256 CA
    //! made with rcgen, responses signed with ring.

    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    use x509_cert::der::asn1::{BitString, OctetString};
    use x509_cert::der::oid::db::rfc5912;
    use x509_cert::der::{Decode as _, Encode as _};
    use x509_cert::spki::AlgorithmIdentifierOwned;
    use x509_ocsp::{BasicOcspResponse, OcspResponse, ResponderId, ResponseData, SingleResponse, Version};

    pub struct Authority {
        pub der: Vec<u8>,
        pub pem: String,
        pkcs8: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
    }

    /// A leaf: its chain PEM (leaf, then issuer) and key PEM.
    pub struct Leaf {
        pub der: Vec<u8>,
        pub chain_pem: String,
        pub key_pem: String,
    }

    /// The AIA extension naming `url` as the OCSP responder.
    pub fn aia(url: &str) -> CustomExtension {
        let mut location = vec![0x86, url.len() as u8];
        location.extend_from_slice(url.as_bytes());
        let mut desc = vec![0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01];
        desc.extend(location);
        let mut inner = vec![0x30, desc.len() as u8];
        inner.extend(desc);
        let mut outer = vec![0x30, inner.len() as u8];
        outer.extend(inner);
        CustomExtension::from_oid_content(&[1, 3, 6, 1, 5, 5, 7, 1, 1], outer)
    }

    impl Authority {
        pub fn new(cn: &str) -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key).unwrap();
            let pkcs8 = key.serialize_der();
            Self { der: cert.der().to_vec(), pem: cert.pem(), pkcs8, issuer: Issuer::new(params, key) }
        }

        /// A server certificate naming `url` (if any) as its OCSP responder.
        pub fn leaf(&self, cn: &str, url: Option<&str>) -> Leaf {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec![cn.to_owned()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.custom_extensions.extend(url.map(aia));
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            Leaf { der: cert.der().to_vec(), chain_pem: cert.pem() + &self.pem, key_pem: key.serialize_pem() }
        }

        /// A responder certificate this authority issues, with id-kp-OCSPSigning or not.
        pub fn responder(&self, cn: &str, ocsp_signing: bool) -> Authority {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = if ocsp_signing {
                vec![ExtendedKeyUsagePurpose::OcspSigning]
            } else {
                vec![ExtendedKeyUsagePurpose::ServerAuth]
            };
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let pkcs8 = key.serialize_der();
            Authority { der: cert.der().to_vec(), pem: cert.pem(), pkcs8, issuer: Issuer::new(params, key) }
        }

        pub fn sign(&self, message: &[u8]) -> Vec<u8> {
            let rng = ring::rand::SystemRandom::new();
            let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &self.pkcs8, &rng).unwrap();
            key.sign(&rng, message).unwrap().as_ref().to_vec()
        }

        fn key_hash(&self) -> Vec<u8> {
            let (_, cert) = x509_parser::parse_x509_certificate(&self.der).unwrap();
            ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &cert.public_key().subject_public_key.data)
                .as_ref()
                .to_vec()
        }
    }

    /// The basic response holding `responses`, signed by `signer` (named by key hash),
    /// carrying `certs`.
    pub fn basic(signer: &Authority, responses: Vec<SingleResponse>, certs: &[&Authority]) -> BasicOcspResponse {
        let tbs = ResponseData {
            version: Version::V1,
            responder_id: ResponderId::ByKey(OctetString::new(signer.key_hash()).unwrap()),
            produced_at: super::fixtures::hours(0),
            responses,
            response_extensions: None,
        };
        let signature = signer.sign(&tbs.to_der().unwrap());
        BasicOcspResponse {
            tbs_response_data: tbs,
            signature_algorithm: AlgorithmIdentifierOwned { oid: rfc5912::ECDSA_WITH_SHA_256, parameters: None },
            signature: BitString::from_bytes(&signature).unwrap(),
            certs: (!certs.is_empty())
                .then(|| certs.iter().map(|c| x509_cert::Certificate::from_der(&c.der).unwrap()).collect()),
        }
    }

    pub fn signed(signer: &Authority, responses: Vec<SingleResponse>, certs: &[&Authority]) -> Vec<u8> {
        OcspResponse::successful(basic(signer, responses, certs)).unwrap().to_der().unwrap()
    }
}

#[cfg(test)]
mod fetched_tests {
    use std::time::SystemTime;

    use ring::digest::SHA1_FOR_LEGACY_USE_ONLY as SHA1;
    use x509_cert::der::Encode as _;
    use x509_ocsp::{OcspRequest, OcspResponse, SingleResponse};

    use super::fixtures::{cert_id, good, hours, revoked, unknown};
    use super::signed::{Authority, Leaf, basic, signed};
    use super::*;

    const URL: &str = "http://127.0.0.1:9/ocsp";

    fn setup() -> (Authority, Leaf, OcspTarget) {
        let ca = Authority::new("Fetch CA");
        let leaf = ca.leaf("fetch.example.com", Some(URL));
        let target = target(leaf.chain_pem.as_bytes(), &[]).unwrap();
        (ca, leaf, target)
    }

    fn now() -> i64 {
        unix_time::secs(SystemTime::now())
    }

    fn id(leaf: &Leaf, ca: &Authority) -> CertId {
        cert_id(&leaf.der, &ca.der, &SHA1)
    }

    #[test]
    fn the_target_is_the_leaf_its_issuer_and_its_aia_url() {
        let (ca, leaf, t) = setup();
        assert_eq!((t.url.as_str(), &t.leaf_der, &t.issuer_der), (URL, &leaf.der, &ca.der));
        let none = ca.leaf("plain.example.com", None);
        let err = target(none.chain_pem.as_bytes(), &[]).unwrap_err();
        assert!(err.contains("no OCSP responder"), "{err}");
        let alone = ca.leaf("alone.example.com", Some(URL));
        let leaf_only = alone.chain_pem.split_inclusive("-----END CERTIFICATE-----\n").next().unwrap();
        let err = target(leaf_only.as_bytes(), &[]).unwrap_err();
        assert!(err.contains("issuer CN=Fetch CA is not in the chain"), "{err}");
        assert_eq!(
            target(leaf_only.as_bytes(), std::slice::from_ref(&ca.der)).unwrap().issuer_der,
            ca.der,
            "a CA given aside"
        );
        assert!(format!("{t:?}").contains(URL) && !format!("{t:?}").contains("leaf_der"));
    }

    #[test]
    fn the_request_is_what_openssl_sends_without_a_nonce() {
        let (ca, leaf, t) = setup();
        let der = request_der(&t).unwrap();
        let request = OcspRequest::from_der(&der).unwrap();
        let [single] = &request.tbs_request.request_list[..] else { panic!("one request") };
        assert_eq!(single.req_cert, id(&leaf, &ca), "SHA-1 CertID of the leaf under its issuer");
        assert!(request.tbs_request.request_extensions.is_none() && request.optional_signature.is_none());
        // Byte for byte what `openssl ocsp -no_nonce` writes for the same pair.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
        let leaf_pem = leaf.chain_pem.split_inclusive("-----END CERTIFICATE-----\n").next().unwrap();
        std::fs::write(dir.path().join("leaf.pem"), leaf_pem).unwrap();
        let status = std::process::Command::new("openssl")
            .args(["ocsp", "-issuer", "ca.pem", "-cert", "leaf.pem", "-no_nonce", "-reqout", "req.der"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
        assert_eq!(der, std::fs::read(dir.path().join("req.der")).unwrap());
    }

    #[test]
    fn a_response_signed_by_the_issuer_verifies_and_says_good_or_revoked() {
        let (ca, leaf, t) = setup();
        let answer = verify(&signed(&ca, vec![good(id(&leaf, &ca))], &[]), &t, now()).unwrap();
        assert_eq!(answer.status, OcspCertStatus::Good);
        assert_eq!(answer.signer, "issuer");
        assert!(answer.this_update < now() && answer.next_update > now());
        let answer = verify(&signed(&ca, vec![revoked(id(&leaf, &ca))], &[]), &t, now()).unwrap();
        assert!(
            matches!(&answer.status, OcspCertStatus::Revoked { reason: Some(r), .. } if r == "KeyCompromise"),
            "{answer:?}"
        );
        let err = verify(&signed(&ca, vec![unknown(id(&leaf, &ca))], &[]), &t, now()).unwrap_err();
        assert!(err.contains("unknown"), "{err}");
    }

    #[test]
    fn a_delegated_responder_verifies_only_with_the_ocsp_signing_eku_and_the_issuers_signature() {
        let (ca, leaf, t) = setup();
        let responder = ca.responder("Fetch CA OCSP Responder", true);
        let answer = verify(&signed(&responder, vec![good(id(&leaf, &ca))], &[&responder]), &t, now()).unwrap();
        assert_eq!(answer.signer, "delegated responder CN=Fetch CA OCSP Responder");

        let no_eku = ca.responder("Fetch CA web server", false);
        let err = verify(&signed(&no_eku, vec![good(id(&leaf, &ca))], &[&no_eku]), &t, now()).unwrap_err();
        assert!(err.contains("without the id-kp-OCSPSigning") && err.contains("CN=Fetch CA web server"), "{err}");

        // A responder with the EKU, issued by another CA.
        let other = Authority::new("Other CA");
        let foreign = other.responder("Other CA OCSP Responder", true);
        let err = verify(&signed(&foreign, vec![good(id(&leaf, &ca))], &[&foreign]), &t, now()).unwrap_err();
        assert!(err.contains("did not issue"), "{err}");
        // Not carried in the response: nothing to check it with.
        let err = verify(&signed(&responder, vec![good(id(&leaf, &ca))], &[]), &t, now()).unwrap_err();
        assert!(err.contains("neither the issuer"), "{err}");
    }

    #[test]
    fn the_subject_of_an_unverified_responder_certificate_is_quoted_and_capped_in_errors() {
        let (ca, leaf, t) = setup();
        let other = Authority::new("Other CA");
        let forged = "x\nERROR certwire: secret rotated \u{1b}[31m".to_owned() + &"A".repeat(500);
        let foreign = other.responder(&forged, true);
        let err = verify(&signed(&foreign, vec![good(id(&leaf, &ca))], &[&foreign]), &t, now()).unwrap_err();
        assert!(err.contains("did not issue"), "{err}");
        assert!(!err.contains('\n') && !err.contains('\u{1b}'), "no raw newline or escape: {err:?}");
        assert!(err.contains("\\nERROR certwire") && err.contains("\\u{1b}"), "escaped: {err}");
        assert!(!err.contains(&"A".repeat(200)) && err.contains("cut"), "capped: {err}");
        assert!(err.len() < 400, "{} bytes: {err}", err.len());
    }

    #[test]
    fn a_wrong_signer_or_a_tampered_response_is_refused() {
        let (ca, leaf, t) = setup();
        // Named as the issuer (its key hash) but signed with another key.
        let impostor = Authority::new("Impostor");
        let mut forged = basic(&ca, vec![good(id(&leaf, &ca))], &[]);
        let sig = impostor.sign(&forged.tbs_response_data.to_der().unwrap());
        forged.signature = x509_cert::der::asn1::BitString::from_bytes(&sig).unwrap();
        let der = OcspResponse::successful(forged).unwrap().to_der().unwrap();
        let err = verify(&der, &t, now()).unwrap_err();
        assert!(err.contains("signature by the issuer does not verify"), "{err}");

        // Signed, then its nextUpdate pushed a year out.
        let mut tampered = basic(&ca, vec![good(id(&leaf, &ca))], &[]);
        tampered.tbs_response_data.responses[0].next_update = Some(hours(24 * 365));
        let der = OcspResponse::successful(tampered).unwrap().to_der().unwrap();
        let err = verify(&der, &t, now()).unwrap_err();
        assert!(err.contains("does not verify") && err.contains("the signature is wrong"), "{err}");

        // A good signature over a status of another certificate.
        let other = ca.leaf("other.example.com", Some(URL));
        let err = verify(&signed(&ca, vec![good(id(&other, &ca))], &[]), &t, now()).unwrap_err();
        assert!(err.contains("another certificate"), "{err}");
    }

    #[test]
    fn times_and_algorithms_outside_what_is_stapled_are_refused() {
        let (ca, leaf, t) = setup();
        let with = |f: &dyn Fn(&mut SingleResponse)| {
            let mut single = good(id(&leaf, &ca));
            f(&mut single);
            signed(&ca, vec![single], &[])
        };
        let err = verify(&with(&|s| s.next_update = None), &t, now()).unwrap_err();
        assert!(err.contains("no nextUpdate"), "{err}");
        let err = verify(&with(&|s| s.next_update = Some(hours(-1))), &t, now()).unwrap_err();
        assert!(err.contains("stale"), "{err}");
        let err = verify(&with(&|s| s.this_update = hours(1)), &t, now()).unwrap_err();
        assert!(err.contains("in the future"), "{err}");
        let mut ed = basic(&ca, vec![good(id(&leaf, &ca))], &[]);
        ed.signature_algorithm.oid = x509_cert::der::oid::db::rfc8410::ID_ED_25519;
        let der = OcspResponse::successful(ed).unwrap().to_der().unwrap();
        let err = verify(&der, &t, now()).unwrap_err();
        assert!(err.contains("1.3.101.112") && err.contains("not supported"), "{err}");
        let two = signed(&ca, vec![good(id(&leaf, &ca)), good(id(&leaf, &ca))], &[]);
        assert!(verify(&two, &t, now()).unwrap_err().contains("2 certificate statuses"));
        assert!(verify(b"garbage", &t, now()).unwrap_err().contains("not a DER OCSP response"));
    }
}

#[cfg(test)]
mod openssl_interop_tests {
    //! Responses made by `openssl ocsp` (RSA keys, as most private CAs have): what
    //! certwire will meet in the field verifies, or is refused with a reason.

    use std::path::Path;
    use std::process::Command;

    use super::*;

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl on PATH");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// An RSA CA, a leaf with an OCSP URL, a delegated responder (with or without the
    /// OCSPSigning EKU), and the CA's own key: everything the openssl responder needs.
    fn pki(dir: &Path) -> OcspTarget {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "3",
                "-subj",
                "/CN=Interop CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ],
        );
        std::fs::write(dir.join("leaf.cnf"), "authorityInfoAccess=OCSP;URI:http://ocsp.interop.test\n").unwrap();
        std::fs::write(dir.join("ocsp.cnf"), "extendedKeyUsage=OCSPSigning\n").unwrap();
        std::fs::write(dir.join("web.cnf"), "extendedKeyUsage=serverAuth\n").unwrap();
        for (name, ext, serial) in
            [("leaf", "leaf.cnf", "0x1001"), ("ocsp", "ocsp.cnf", "0x2"), ("web", "web.cnf", "0x3")]
        {
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let crt = format!("{name}.crt");
            let subj = format!("/CN=interop {name}");
            openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-set_serial",
                    serial,
                    "-days",
                    "2",
                    "-out",
                    &crt,
                    "-extfile",
                    ext,
                ],
            );
        }
        std::fs::write(dir.join("index.txt"), "V\t361231235959Z\t\t1001\tunknown\t/CN=interop leaf\n").unwrap();
        openssl(dir, &["ocsp", "-issuer", "ca.crt", "-cert", "leaf.crt", "-no_nonce", "-reqout", "req.der"]);
        let chain = std::fs::read_to_string(dir.join("leaf.crt")).unwrap()
            + &std::fs::read_to_string(dir.join("ca.crt")).unwrap();
        target(chain.as_bytes(), &[]).unwrap()
    }

    /// The response of `openssl ocsp` signing as `signer` (extra `args` appended).
    fn respond(dir: &Path, signer: &str, args: &[&str]) -> Vec<u8> {
        let (crt, key) = (format!("{signer}.crt"), format!("{signer}.key"));
        let mut all = vec![
            "ocsp",
            "-index",
            "index.txt",
            "-rsigner",
            &crt,
            "-rkey",
            &key,
            "-CA",
            "ca.crt",
            "-reqin",
            "req.der",
            "-respout",
            "resp.der",
            "-ndays",
            "1",
        ];
        all.extend_from_slice(args);
        openssl(dir, &all);
        std::fs::read(dir.join("resp.der")).unwrap()
    }

    #[test]
    fn openssl_responses_signed_by_the_ca_or_its_ocsp_responder_verify_and_others_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let t = pki(dir.path());
        let now = unix_time::secs(std::time::SystemTime::now());
        assert_eq!(t.url, "http://ocsp.interop.test");

        let answer = verify(&respond(dir.path(), "ca", &[]), &t, now).unwrap();
        assert_eq!((answer.status, answer.signer.as_str()), (OcspCertStatus::Good, "issuer"));
        // openssl names the responder by name; others by key hash.
        let answer = verify(&respond(dir.path(), "ca", &["-resp_key_id", "-resp_no_certs"]), &t, now).unwrap();
        assert_eq!(answer.signer, "issuer");
        let answer = verify(&respond(dir.path(), "ocsp", &[]), &t, now).unwrap();
        assert_eq!(answer.signer, "delegated responder CN=interop ocsp");
        for hash in ["sha384", "sha512"] {
            assert!(verify(&respond(dir.path(), "ca", &["-rmd", hash]), &t, now).is_ok(), "{hash}");
        }

        let err = verify(&respond(dir.path(), "web", &[]), &t, now).unwrap_err();
        assert!(err.contains("without the id-kp-OCSPSigning"), "{err}");
        let err = verify(&respond(dir.path(), "ca", &["-rmd", "sha1"]), &t, now).unwrap_err();
        assert!(err.contains("1.2.840.113549.1.1.5") && err.contains("not supported"), "{err}");
        let err = verify(&respond(dir.path(), "ocsp", &["-resp_no_certs"]), &t, now).unwrap_err();
        assert!(err.contains("neither the issuer"), "{err}");
    }
}
