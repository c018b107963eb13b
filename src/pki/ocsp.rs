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
    if this_update > now {
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
