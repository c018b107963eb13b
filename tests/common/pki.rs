//! A throwaway PKI made with rcgen: CAs, server leaves, client certificates.
//!
//! Serials are the handle tests use to tell certificates apart on the wire (Envoy's
//! `/certs` and a probe handshake both show them), so every issued certificate gets a
//! distinct one unless the test picks it.

use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration as TimeDuration, OffsetDateTime};

/// A certificate with its key, as PEM and DER.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
    /// Lowercase hex of the serial's bytes without leading zero bytes: the form
    /// Envoy's `/certs` prints and [`serial_hex`] computes.
    pub serial_hex: String,
    /// Lowercase hex SHA-256 of the DER.
    pub sha256_hex: String,
}

impl Issued {
    fn new(cert: &rcgen::Certificate, key: &KeyPair) -> Issued {
        let der = cert.der().to_vec();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial_hex: serial_hex(&der),
            sha256_hex: sha256_hex(&der),
            der,
        }
    }

    /// The certificate and key in the form rustls takes for client authentication.
    pub fn rustls_identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = rustls::pki_types::pem::PemObject::from_pem_slice(self.key_pem.as_bytes())
            .map(|k: PrivatePkcs8KeyDer<'static>| PrivateKeyDer::Pkcs8(k))
            .expect("rcgen writes PKCS#8 keys");
        (vec![CertificateDer::from(self.der.clone())], key)
    }
}

/// What to issue. Defaults: a server certificate for the DNS names, valid from an
/// hour ago for a day, with a fresh unique serial.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub serial: Option<u64>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub client: bool,
    /// URI SANs, e.g. a SPIFFE ID.
    pub uris: Vec<String>,
}

impl LeafSpec {
    pub fn server(dns: &str) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            common_name: dns.to_string(),
            dns_names: vec![dns.to_string()],
            serial: None,
            not_before: now - TimeDuration::hours(1),
            not_after: now + TimeDuration::days(1),
            client: false,
            uris: Vec::new(),
        }
    }

    pub fn client(common_name: &str) -> LeafSpec {
        LeafSpec { dns_names: Vec::new(), client: true, ..LeafSpec::server(common_name) }
    }

    /// A client certificate whose identity is the SPIFFE ID `uri` (its only URI SAN).
    pub fn spiffe(uri: &str) -> LeafSpec {
        LeafSpec { uris: vec![uri.to_string()], ..LeafSpec::client("spiffe workload") }
    }

    pub fn common_name(mut self, common_name: &str) -> LeafSpec {
        self.common_name = common_name.to_owned();
        self
    }

    pub fn serial(mut self, serial: u64) -> LeafSpec {
        self.serial = Some(serial);
        self
    }

    pub fn validity(mut self, not_before: OffsetDateTime, not_after: OffsetDateTime) -> LeafSpec {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Valid now for `lifetime` (from a minute ago, to tolerate clock rounding).
    pub fn lifetime(self, lifetime: std::time::Duration) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        let lifetime = TimeDuration::try_from(lifetime).expect("lifetime fits");
        self.validity(now - TimeDuration::minutes(1), now + lifetime)
    }

    /// Already expired: valid from two days ago until yesterday.
    pub fn expired(self) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        self.validity(now - TimeDuration::days(2), now - TimeDuration::days(1))
    }
}

/// A self-signed certificate authority.
pub struct Ca {
    pub name: String,
    pub cert: Issued,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(next_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - TimeDuration::days(1);
        params.not_after = now + TimeDuration::days(30);
        let cert = params.self_signed(&key).expect("self-sign CA");
        let cert = Issued::new(&cert, &key);
        Ca { name: name.to_string(), cert, issuer: Issuer::new(params, key) }
    }

    /// An intermediate CA signed by this one; its leaves need `cert` in the chain.
    pub fn intermediate(&self, name: &str) -> Ca {
        let key = KeyPair::generate().expect("generate intermediate key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("intermediate params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(next_serial());
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - TimeDuration::days(1);
        params.not_after = now + TimeDuration::days(20);
        let cert = params.signed_by(&key, &self.issuer).expect("sign intermediate");
        Ca { name: name.to_string(), cert: Issued::new(&cert, &key), issuer: Issuer::new(params, key) }
    }

    pub fn issue(&self, spec: &LeafSpec) -> Issued {
        let key = KeyPair::generate().expect("generate leaf key");
        let mut params = CertificateParams::new(spec.dns_names.clone()).expect("leaf params");
        for uri in &spec.uris {
            params.subject_alt_names.push(rcgen::SanType::URI(uri.as_str().try_into().expect("URI SAN")));
        }
        params.distinguished_name.push(DnType::CommonName, spec.common_name.as_str());
        params.serial_number = Some(match spec.serial {
            Some(serial) => serial_number(serial),
            None => next_serial(),
        });
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![if spec.client { ExtendedKeyUsagePurpose::ClientAuth } else { ExtendedKeyUsagePurpose::ServerAuth }];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Issued::new(&cert, &key)
    }

    /// A server certificate for `dns`, valid now, with a fresh serial.
    pub fn server(&self, dns: &str) -> Issued {
        self.issue(&LeafSpec::server(dns))
    }

    /// A client certificate (clientAuth EKU) for mutual TLS.
    pub fn client(&self, common_name: &str) -> Issued {
        self.issue(&LeafSpec::client(common_name))
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert.cert_pem
    }
}

/// Serials start at a per-process base so two test processes never agree by chance.
fn next_serial() -> SerialNumber {
    static COUNTER: AtomicU32 = AtomicU32::new(1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() & 0x00ff_ffff;
    // A non-zero first byte below 0x80 keeps the DER integer positive and its hex
    // form free of leading zeros, so every tool prints the same 16 hex digits.
    serial_number((0x2a << 56) | (u64::from(pid) << 32) | u64::from(n))
}

fn serial_number(serial: u64) -> SerialNumber {
    let bytes = serial.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len() - 1);
    let mut minimal = bytes[first..].to_vec();
    // DER integers are signed: a set high bit needs a zero byte in front.
    if minimal[0] & 0x80 != 0 {
        minimal.insert(0, 0);
    }
    SerialNumber::from_slice(&minimal)
}

/// The serial of a DER certificate as lowercase hex without leading zero bytes.
pub fn serial_hex(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse certificate");
    let raw = cert.tbs_certificate.raw_serial();
    let first = raw.iter().position(|b| *b != 0).unwrap_or(raw.len().saturating_sub(1));
    hex(&raw[first..])
}

/// The serial of the first certificate in a PEM bundle.
pub fn serial_hex_of_pem(pem: &str) -> String {
    serial_hex(&pem_decode_first(pem))
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The DER of the first certificate in a PEM bundle.
pub fn pem_decode_first(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate in the PEM")
        .expect("valid PEM")
        .to_vec()
}
