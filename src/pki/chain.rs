//! Certificate chains and CA bundles: parse, find the leaf by its key, order leaf -> issuer,
//! check validity windows, and read the public facts shown in status.

use ring::digest::{SHA256, digest};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::{parse_x509_certificate, parse_x509_crl};

use super::key::{KeyPublic, describe_pem_error};
use super::{CertIdentity, CheckOptions, PkiError, SecretMeta};
use crate::unix_time;

/// Certificates re-encoded as PEM in serving order, with their public facts.
#[derive(Debug)]
pub(super) struct Bundle {
    pub pem: Vec<u8>,
    pub meta: SecretMeta,
    pub identity: CertIdentity,
}

impl Bundle {
    fn new(pem: Vec<u8>, certs: &[&X509Certificate<'_>]) -> Result<Self, PkiError> {
        Ok(Self { pem, meta: meta(certs), identity: identity(certs[0])? })
    }
}

/// Checks a TLS chain against its key (and its OCSP staple, DER, if any) and returns it
/// leaf first.
pub(super) fn tls(
    chain_pem: &[u8],
    key: &KeyPublic,
    ocsp_staple: Option<&[u8]>,
    opts: &CheckOptions,
) -> Result<Bundle, PkiError> {
    let ders = read_pem(chain_pem)?;
    let certs = decode(&ders)?;
    if let Some(dup) = (1..certs.len()).find(|&i| ders[..i].contains(&ders[i])) {
        return Err(PkiError::BrokenChain(format!("certificate {} appears more than once", subject(&certs[dup]))));
    }
    let matching: Vec<usize> = (0..certs.len()).filter(|&i| key.matches(certs[i].public_key())).collect();
    let leaf = match matching[..] {
        [leaf] => leaf,
        [] => return Err(PkiError::KeyMismatch { subject: subject(&certs[0]) }),
        _ => return Err(PkiError::BrokenChain(format!("{} certificates match the private key", matching.len()))),
    };
    let path = order(&certs, leaf)?;
    let ordered: Vec<&X509Certificate<'_>> = path.iter().map(|&i| &certs[i]).collect();
    check_validity(&ordered, opts)?;
    if let Some(staple) = ocsp_staple {
        super::ocsp::check(staple, ordered[0], ordered.get(1).copied(), opts)?;
    }
    Bundle::new(to_pem("CERTIFICATE", path.iter().map(|&i| ders[i].as_ref())), &ordered)
}

/// Checks a CA bundle: at least one certificate, each inside its validity window.
/// Order is kept; the first certificate describes the bundle.
pub(super) fn ca_bundle(ca_pem: &[u8], opts: &CheckOptions) -> Result<Bundle, PkiError> {
    let ders = read_pem(ca_pem)?;
    let certs = decode(&ders)?;
    let all: Vec<&X509Certificate<'_>> = certs.iter().collect();
    check_validity(&all, opts)?;
    Bundle::new(to_pem("CERTIFICATE", ders.iter().map(|d| d.as_ref())), &all)
}

/// Parses every CRL of `crl_pem` and returns them re-encoded as PEM.
pub(super) fn crl(crl_pem: &[u8]) -> Result<Vec<u8>, PkiError> {
    let mut ders = Vec::new();
    for (i, item) in CertificateRevocationListDer::pem_slice_iter(crl_pem).enumerate() {
        let der = item.map_err(|e| PkiError::BadCrl(format!("CRL {}: {}", i + 1, describe_pem_error(&e))))?;
        match parse_x509_crl(&der) {
            Ok(([], _)) => ders.push(der),
            Ok(_) => return Err(PkiError::BadCrl(format!("CRL {}: trailing data", i + 1))),
            Err(e) => return Err(PkiError::BadCrl(format!("CRL {}: {e}", i + 1))),
        }
    }
    if ders.is_empty() {
        return Err(PkiError::BadCrl("no X509 CRL in PEM".into()));
    }
    Ok(to_pem("X509 CRL", ders.iter().map(|d| d.as_ref())))
}

fn read_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let ders = CertificateDer::pem_slice_iter(pem)
        .enumerate()
        .map(|(i, r)| r.map_err(|e| PkiError::BadPem(format!("certificate {}: {}", i + 1, describe_pem_error(&e)))))
        .collect::<Result<Vec<_>, _>>()?;
    if ders.is_empty() {
        return Err(PkiError::NoCertificate);
    }
    Ok(ders)
}

fn decode<'a>(ders: &'a [CertificateDer<'static>]) -> Result<Vec<X509Certificate<'a>>, PkiError> {
    let bad = |i: usize, why: String| PkiError::BadCertificate(format!("certificate {}: {why}", i + 1));
    let mut certs = Vec::with_capacity(ders.len());
    for (i, der) in ders.iter().enumerate() {
        match parse_x509_certificate(der) {
            Ok(([], cert)) => certs.push(cert),
            Ok(_) => return Err(bad(i, "trailing data".into())),
            Err(e) => return Err(bad(i, e.to_string())),
        }
    }
    Ok(certs)
}

/// Indices of the path from `leaf` up through its issuers. Every certificate must be on it:
/// Envoy serves the whole chain, and a stray certificate is a sign of a mixed-up secret.
fn order(certs: &[X509Certificate<'_>], leaf: usize) -> Result<Vec<usize>, PkiError> {
    let mut rest: Vec<usize> = (0..certs.len()).filter(|&i| i != leaf).collect();
    let mut path = vec![leaf];
    loop {
        let current = &certs[path[path.len() - 1]];
        if current.subject().as_raw() == current.issuer().as_raw() {
            break;
        }
        let issuers: Vec<usize> = rest.iter().copied().filter(|&j| issued_by(current, &certs[j])).collect();
        match issuers[..] {
            [] => break,
            [issuer] => {
                path.push(issuer);
                rest.retain(|&j| j != issuer);
            }
            _ => {
                let msg = format!("more than one certificate could have issued {}", subject(current));
                return Err(PkiError::BrokenChain(msg));
            }
        }
    }
    match rest.first() {
        None => Ok(path),
        Some(&stray) => Err(PkiError::BrokenChain(format!(
            "certificate {} is not part of the chain of {}",
            subject(&certs[stray]),
            subject(&certs[leaf])
        ))),
    }
}

/// Names match and, when both sides carry key identifiers, those match too: a renewed CA
/// keeps its name but not its key, and a chain through the old one would fail in clients.
fn issued_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    if child.issuer().as_raw() != parent.subject().as_raw() {
        return false;
    }
    let aki = child.iter_extensions().find_map(|e| match e.parsed_extension() {
        ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|k| k.0),
        _ => None,
    });
    let ski = parent.iter_extensions().find_map(|e| match e.parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0),
        _ => None,
    });
    match (aki, ski) {
        (Some(a), Some(s)) => a == s,
        _ => true,
    }
}

/// `allow_expired` lifts both bounds: it is an escape hatch, not a policy.
fn check_validity(certs: &[&X509Certificate<'_>], opts: &CheckOptions) -> Result<(), PkiError> {
    if opts.allow_expired {
        return Ok(());
    }
    let now = unix_time::secs(opts.now);
    for cert in certs {
        let (not_before, not_after) = (cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp());
        if now < not_before {
            return Err(PkiError::NotYetValid { subject: subject(cert), not_before: unix_time::rfc3339(not_before) });
        }
        if now > not_after {
            return Err(PkiError::Expired { subject: subject(cert), not_after: unix_time::rfc3339(not_after) });
        }
    }
    Ok(())
}

/// Validity of the first certificate, with the earliest expiry of all.
fn meta(certs: &[&X509Certificate<'_>]) -> SecretMeta {
    SecretMeta {
        not_before_unix: Some(certs[0].validity().not_before.timestamp()),
        not_after_unix: certs.iter().map(|c| c.validity().not_after.timestamp()).min(),
        certificates: certs.len(),
    }
}

fn identity(cert: &X509Certificate<'_>) -> Result<CertIdentity, PkiError> {
    Ok(CertIdentity {
        fingerprint_sha256: Some(hex::encode(digest(&SHA256, cert.as_raw()))),
        subject: Some(subject(cert)),
        serial: Some(serial_hex(cert.raw_serial())),
        sans: sans(cert)?,
    })
}

/// The identity of the first certificate of `pem`, a chain or bundle this module wrote.
pub(super) fn first_identity(pem: &[u8]) -> Option<CertIdentity> {
    let der = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    let (_, cert) = parse_x509_certificate(&der).ok()?;
    identity(&cert).ok()
}

fn sans(cert: &X509Certificate<'_>) -> Result<Vec<String>, PkiError> {
    let ext = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate(format!("{}: subjectAltName: {e}", subject(cert))))?;
    let names = ext.map(|e| e.value.general_names.as_slice()).unwrap_or_default();
    Ok(names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => Some(s.to_string()),
            GeneralName::IPAddress(b) => ip(b),
            _ => None,
        })
        .collect())
}

fn ip(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).to_string()),
        _ => None,
    }
}

fn subject(cert: &X509Certificate<'_>) -> String {
    cert.subject().to_string()
}

/// Lowercase hex without the DER sign byte, as Envoy's admin `/certs` shows serials.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    if start == raw.len() { "0".into() } else { hex::encode(&raw[start..]) }
}

/// PEM with 64-column base64 lines, as OpenSSL writes it.
fn to_pem<'a>(label: &str, ders: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    use base64::Engine as _;
    let mut out = Vec::new();
    for der in ders {
        out.extend_from_slice(format!("-----BEGIN {label}-----\n").as_bytes());
        for line in base64::engine::general_purpose::STANDARD.encode(der).as_bytes().chunks(64) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        out.extend_from_slice(format!("-----END {label}-----\n").as_bytes());
    }
    out
}

#[cfg(test)]
pub(super) mod fixtures {
    //! Real certificates and keys made at test time: rcgen for the PKI, openssl for RSA
    //! and for the legacy key encodings rcgen does not write.

    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType, IsCa, Issuer,
        KeyIdMethod, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    };
    use rustls_pki_types::PrivatePkcs8KeyDer;
    use rustls_pki_types::pem::PemObject;
    use std::io::Write;
    use std::process::{Command, Stdio};
    use std::sync::OnceLock;
    use time::{Duration, OffsetDateTime};

    pub use rcgen::Certificate;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Alg {
        P256,
        P384,
        Ed25519,
        Rsa,
    }

    impl Alg {
        pub const ALL: [Alg; 4] = [Alg::P256, Alg::P384, Alg::Ed25519, Alg::Rsa];

        pub fn key(self) -> KeyPair {
            match self {
                Alg::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
                Alg::P384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
                Alg::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
                Alg::Rsa => KeyPair::from_pem(rsa_pkcs8()).unwrap(),
            }
        }
    }

    /// One RSA key per test binary: 2048-bit generation is slow on a shared machine.
    fn rsa_pkcs8() -> &'static str {
        static KEY: OnceLock<String> = OnceLock::new();
        KEY.get_or_init(|| openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"], b""))
    }

    pub fn openssl(args: &[&str], stdin: &[u8]) -> String {
        String::from_utf8(openssl_bytes(args, stdin)).unwrap()
    }

    pub fn openssl_bytes(args: &[&str], stdin: &[u8]) -> Vec<u8> {
        let mut child = Command::new("openssl")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl on PATH");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// The same key as `pkcs8_pem` in the other encodings found in the wild, labelled.
    pub fn other_encodings(pkcs8_pem: &str, alg: Alg) -> Vec<(&'static str, String)> {
        let key = pkcs8_pem.as_bytes();
        match alg {
            Alg::Rsa => {
                vec![("pkcs8 by openssl", openssl(&["pkey"], key)), ("pkcs1", openssl(&["rsa", "-traditional"], key))]
            }
            Alg::P256 | Alg::P384 => {
                vec![("pkcs8 by openssl", openssl(&["pkey"], key)), ("sec1", openssl(&["ec"], key))]
            }
            Alg::Ed25519 => {
                // OpenSSL 3.0 cannot read ring's RFC 8410 v2 form; rebuild the v1 form that
                // OpenSSL and Go write from the same seed, and let openssl vouch for it.
                const V1: &[u8] =
                    &[0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
                let der = PrivatePkcs8KeyDer::from_pem_slice(key).unwrap();
                let der = der.secret_pkcs8_der();
                assert_eq!(der[5..16], V1[5..], "ring's Ed25519 PKCS#8 layout");
                let v1 = [V1, &der[16..48]].concat();
                let pem = super::to_pem("PRIVATE KEY", std::iter::once(v1.as_slice()));
                vec![("pkcs8 v1", openssl(&["pkey"], &pem))]
            }
        }
    }

    pub struct Issued {
        pub cert: Certificate,
        pub key_pem: String,
    }

    pub struct Authority {
        pub cert: Certificate,
        /// PKCS#8 PEM, for tools that sign as this authority (an `openssl ocsp` responder).
        pub key_pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    /// Validity from `from` to `to` days relative to now.
    pub fn days(from: i64, to: i64) -> (OffsetDateTime, OffsetDateTime) {
        let now = OffsetDateTime::now_utc();
        (now + Duration::days(from), now + Duration::days(to))
    }

    pub fn root(cn: &str) -> Authority {
        let key = Alg::P256.key();
        let params = ca_params(cn, days(-1, 3650));
        Authority {
            cert: params.self_signed(&key).unwrap(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf signed by a fresh root of its own.
    pub fn leaf(alg: Alg) -> Issued {
        root("Fixture Root").leaf(alg, "leaf.example.com", days(-1, 30))
    }

    fn ca_params(cn: &str, (not_before, not_after): (OffsetDateTime, OffsetDateTime)) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = (not_before, not_after);
        params
    }

    impl Authority {
        pub fn intermediate(&self, cn: &str, window: (OffsetDateTime, OffsetDateTime)) -> Authority {
            let key = Alg::P384.key();
            let params = ca_params(cn, window);
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            Authority { cert, key_pem: key.serialize_pem(), issuer: Issuer::new(params, key) }
        }

        pub fn leaf(&self, alg: Alg, cn: &str, window: (OffsetDateTime, OffsetDateTime)) -> Issued {
            let key = alg.key();
            let mut params = CertificateParams::new(vec![cn.to_string(), "10.0.0.1".into(), "::1".into()]).unwrap();
            params.subject_alt_names.push(SanType::URI("spiffe://example.com/ns/a/sa/b".try_into().unwrap()));
            params.subject_alt_names.push(SanType::Rfc822Name("ops@example.com".try_into().unwrap()));
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.use_authority_key_identifier_extension = true;
            (params.not_before, params.not_after) = window;
            params.serial_number = Some(SerialNumber::from(vec![0x00, 0x8f, 0x01]));
            Issued { cert: params.signed_by(&key, &self.issuer).unwrap(), key_pem: key.serialize_pem() }
        }

        pub fn crl_pem(&self) -> String {
            let now = OffsetDateTime::now_utc();
            let params = CertificateRevocationListParams {
                this_update: now,
                next_update: now + Duration::days(7),
                crl_number: SerialNumber::from(1u64),
                issuing_distribution_point: None,
                revoked_certs: vec![],
                key_identifier_method: KeyIdMethod::Sha256,
            };
            params.signed_by(&self.issuer).unwrap().pem().unwrap()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{Alg, Authority, Issued, days, root};
    use super::*;
    use crate::pki::material::KeyBytes;
    use std::time::Duration;
    use std::time::SystemTime;
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    struct Pki {
        root: Authority,
        inter: Authority,
        leaf: Issued,
    }

    fn pki(alg: Alg) -> Pki {
        let root = root("Test Root");
        let inter = root.intermediate("Test Intermediate", days(-1, 365));
        let leaf = inter.leaf(alg, "leaf.example.com", days(-1, 30));
        Pki { root, inter, leaf }
    }

    fn pem(certs: &[&fixtures::Certificate]) -> Vec<u8> {
        certs.iter().map(|c| c.pem()).collect::<String>().into_bytes()
    }

    fn key(issued: &Issued) -> KeyPublic {
        super::super::key::parse(&KeyBytes::new(issued.key_pem.clone().into_bytes())).unwrap()
    }

    #[test]
    fn chain_in_order_is_kept_and_described() {
        let p = pki(Alg::P256);
        let given = pem(&[&p.leaf.cert, &p.inter.cert, &p.root.cert]);
        let bundle = tls(&given, &key(&p.leaf), None, &CheckOptions::default()).unwrap();
        assert_eq!(bundle.pem, given, "re-encoding matches the usual PEM layout byte for byte");

        assert_eq!(bundle.meta.certificates, 3);
        let m = bundle.identity;
        assert_eq!(m.subject.as_deref(), Some("CN=leaf.example.com"));
        assert_eq!(m.serial.as_deref(), Some("8f01"));
        assert_eq!(
            m.sans,
            ["leaf.example.com", "10.0.0.1", "::1", "spiffe://example.com/ns/a/sa/b", "ops@example.com"]
        );
        let fp = hex::encode(digest(&SHA256, p.leaf.cert.der()));
        assert_eq!(m.fingerprint_sha256, Some(fp));
        let (_, leaf) = parse_x509_certificate(p.leaf.cert.der()).unwrap();
        assert_eq!(bundle.meta.not_before_unix, Some(leaf.validity().not_before.timestamp()));
        assert_eq!(bundle.meta.not_after_unix, Some(leaf.validity().not_after.timestamp()), "the leaf expires first");
        assert_eq!(first_identity(&bundle.pem), Some(m), "read back from the served PEM");
    }

    #[test]
    fn chain_out_of_order_is_reordered_leaf_first() {
        let p = pki(Alg::Ed25519);
        let given = pem(&[&p.root.cert, &p.leaf.cert, &p.inter.cert]);
        let bundle = tls(&given, &key(&p.leaf), None, &CheckOptions::default()).unwrap();
        assert_eq!(bundle.pem, pem(&[&p.leaf.cert, &p.inter.cert, &p.root.cert]));
        // Without the root too: the path simply ends at the intermediate.
        let given = pem(&[&p.inter.cert, &p.leaf.cert]);
        let bundle = tls(&given, &key(&p.leaf), None, &CheckOptions::default()).unwrap();
        assert_eq!(bundle.pem, pem(&[&p.leaf.cert, &p.inter.cert]));
    }

    #[test]
    fn not_after_is_the_earliest_over_the_chain() {
        let root = root("Test Root");
        let inter = root.intermediate("Short Intermediate", days(-1, 3));
        let leaf = inter.leaf(Alg::P384, "leaf.example.com", days(-1, 30));
        let bundle = tls(&pem(&[&leaf.cert, &inter.cert]), &key(&leaf), None, &CheckOptions::default()).unwrap();
        let (_, i) = parse_x509_certificate(inter.cert.der()).unwrap();
        assert_eq!(bundle.meta.not_after_unix, Some(i.validity().not_after.timestamp()));
    }

    #[test]
    fn unrelated_or_duplicate_certificate_is_refused() {
        let p = pki(Alg::P256);
        let other = root("Other Root");
        let given = pem(&[&p.leaf.cert, &p.inter.cert, &other.cert]);
        let err = tls(&given, &key(&p.leaf), None, &CheckOptions::default()).unwrap_err();
        assert_eq!(
            err,
            PkiError::BrokenChain("certificate CN=Other Root is not part of the chain of CN=leaf.example.com".into())
        );
        let given = pem(&[&p.leaf.cert, &p.inter.cert, &p.inter.cert]);
        let err = tls(&given, &key(&p.leaf), None, &CheckOptions::default()).unwrap_err();
        assert!(matches!(err, PkiError::BrokenChain(m) if m.contains("more than once")));
    }

    #[test]
    fn a_renewed_ca_with_the_same_name_is_not_taken_for_the_issuer() {
        let p = pki(Alg::P256);
        let renewed = root("Test Root").intermediate("Test Intermediate", days(-1, 365));
        let given = pem(&[&p.leaf.cert, &renewed.cert]);
        let err = tls(&given, &key(&p.leaf), None, &CheckOptions::default()).unwrap_err();
        assert!(matches!(err, PkiError::BrokenChain(m) if m.contains("CN=Test Intermediate is not part")));
    }

    #[test]
    fn key_matching_no_certificate_names_the_first_subject() {
        let p = pki(Alg::P256);
        let stranger = fixtures::leaf(Alg::P256);
        let err =
            tls(&pem(&[&p.leaf.cert, &p.inter.cert]), &key(&stranger), None, &CheckOptions::default()).unwrap_err();
        assert_eq!(err, PkiError::KeyMismatch { subject: "CN=leaf.example.com".into() });
    }

    #[test]
    fn expired_and_not_yet_valid_are_refused_unless_allowed() {
        let root = root("Test Root");
        let expired = root.leaf(Alg::P256, "old.example.com", days(-30, -1));
        let given = pem(&[&expired.cert, &root.cert]);
        let err = tls(&given, &key(&expired), None, &CheckOptions::default()).unwrap_err();
        let PkiError::Expired { subject, not_after } = err else { panic!("{err:?}") };
        assert_eq!(subject, "CN=old.example.com");
        assert!(OffsetDateTime::parse(&not_after, &Rfc3339).is_ok(), "{not_after}");
        let lenient = CheckOptions { allow_expired: true, ..CheckOptions::default() };
        assert!(tls(&given, &key(&expired), None, &lenient).is_ok());

        let future = root.leaf(Alg::P256, "new.example.com", days(2, 30));
        let err = tls(&future.cert.pem().into_bytes(), &key(&future), None, &CheckOptions::default()).unwrap_err();
        assert!(matches!(err, PkiError::NotYetValid { ref subject, .. } if subject == "CN=new.example.com"));
        // `now` is an input, so the same chain is good three days later.
        let later = CheckOptions { now: SystemTime::now() + Duration::from_secs(3 * 86400), allow_expired: false };
        assert!(tls(&future.cert.pem().into_bytes(), &key(&future), None, &later).is_ok());
    }

    #[test]
    fn garbage_and_empty_input_are_refused() {
        let p = pki(Alg::P256);
        let k = key(&p.leaf);
        let opts = CheckOptions::default();
        assert_eq!(tls(b"", &k, None, &opts).unwrap_err(), PkiError::NoCertificate);
        assert_eq!(tls(b"hello, world\n", &k, None, &opts).unwrap_err(), PkiError::NoCertificate);

        let bad_b64 = format!("{}-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n", p.leaf.cert.pem());
        assert_eq!(
            tls(bad_b64.as_bytes(), &k, None, &opts).unwrap_err(),
            PkiError::BadPem("certificate 2: invalid base64".into())
        );
        let unterminated = "-----BEGIN CERTIFICATE-----\nMIIB\n";
        assert!(matches!(tls(unterminated.as_bytes(), &k, None, &opts), Err(PkiError::BadPem(_))));

        let not_der =
            format!("{}-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n", p.leaf.cert.pem());
        let err = tls(not_der.as_bytes(), &k, None, &opts).unwrap_err();
        assert!(matches!(err, PkiError::BadCertificate(ref m) if m.starts_with("certificate 2:")), "{err:?}");
    }

    #[test]
    fn ca_bundle_and_crl() {
        let p = pki(Alg::P256);
        let given = pem(&[&p.root.cert, &p.inter.cert]);
        let bundle = ca_bundle(&given, &CheckOptions::default()).unwrap();
        assert_eq!(bundle.pem, given);
        assert_eq!(bundle.identity.subject.as_deref(), Some("CN=Test Root"));
        assert_eq!(bundle.meta.certificates, 2);
        let (_, inter) = parse_x509_certificate(p.inter.cert.der()).unwrap();
        assert_eq!(bundle.meta.not_after_unix, Some(inter.validity().not_after.timestamp()));
        assert_eq!(ca_bundle(b"", &CheckOptions::default()).unwrap_err(), PkiError::NoCertificate);

        let expired = root("Test Root").intermediate("Old CA", days(-30, -1));
        let given = pem(&[&p.root.cert, &expired.cert]);
        assert!(matches!(ca_bundle(&given, &CheckOptions::default()), Err(PkiError::Expired { .. })));

        let crl_pem = p.root.crl_pem();
        assert_eq!(crl(crl_pem.as_bytes()).unwrap(), crl_pem.as_bytes());
        assert!(matches!(crl(b""), Err(PkiError::BadCrl(_))));
        assert!(matches!(crl(p.root.cert.pem().as_bytes()), Err(PkiError::BadCrl(_))));
        let not_der = "-----BEGIN X509 CRL-----\naGVsbG8=\n-----END X509 CRL-----\n";
        assert!(matches!(crl(not_der.as_bytes()), Err(PkiError::BadCrl(m)) if m.starts_with("CRL 1:")));
    }

    #[test]
    fn serial_hex_drops_the_sign_byte_only() {
        assert_eq!(serial_hex(&[0x00, 0x8f, 0x01]), "8f01");
        assert_eq!(serial_hex(&[0x01, 0x00]), "0100");
        assert_eq!(serial_hex(&[0x00]), "0");
    }

    #[test]
    fn pem_padding_round_trips() {
        for len in 0..70 {
            let der: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
            let pem = to_pem("CERTIFICATE", std::iter::once(der.as_slice()));
            let back = CertificateDer::from_pem_slice(&pem).unwrap();
            assert_eq!(back.as_ref(), der.as_slice(), "len {len}");
        }
    }
}
