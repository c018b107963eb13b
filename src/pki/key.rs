//! Private key parsing, reduced at once to the public key: the private half never
//! leaves this module, so nothing downstream can log or keep it.

use rustls::crypto::ring::sign::any_supported_type;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::{self, PemObject};
use x509_parser::oid_registry::{OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;
use zeroize::Zeroizing;

use super::PkiError;
use super::material::KeyBytes;

/// The public key of a parsed private key, as SubjectPublicKeyInfo DER.
pub(super) struct KeyPublic {
    spki: Vec<u8>,
}

impl std::fmt::Debug for KeyPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPublic({})", hex::encode(&self.spki))
    }
}

/// Parses the first private key of `pem` (PKCS#8, SEC1 or PKCS#1) and derives its public key.
/// Errors never carry key bytes: PEM errors are described by kind only.
pub(super) fn parse(pem: &KeyBytes) -> Result<KeyPublic, PkiError> {
    let der = match PrivateKeyDer::from_pem_slice(pem.as_slice()) {
        Ok(der) => Zeroizing::new(der),
        Err(pem::Error::NoItemsFound) if contains(pem.as_slice(), b"ENCRYPTED PRIVATE KEY") => {
            return Err(PkiError::BadKey("encrypted private keys are not supported".into()));
        }
        Err(pem::Error::NoItemsFound) => return Err(PkiError::NoKey),
        Err(e) => return Err(PkiError::BadPem(describe_pem_error(&e))),
    };
    let signing = any_supported_type(&der).map_err(|_| PkiError::BadKey(unsupported(&der).into()))?;
    let spki = signing.public_key().ok_or_else(|| PkiError::BadKey("public key unavailable".into()))?;
    Ok(KeyPublic { spki: spki.as_ref().to_vec() })
}

impl KeyPublic {
    /// Whether a certificate's SubjectPublicKeyInfo holds this public key.
    ///
    /// Byte equality covers what rustls and usual issuers both emit. The fallbacks accept
    /// the same key written differently: RSA with absent instead of NULL parameters or
    /// non-minimal integers, and EC points in compressed form.
    pub(super) fn matches(&self, cert: &SubjectPublicKeyInfo<'_>) -> bool {
        if cert.raw == self.spki.as_slice() {
            return true;
        }
        let Ok((_, ours)) = SubjectPublicKeyInfo::from_der(&self.spki) else { return false };
        if ours.algorithm.algorithm != cert.algorithm.algorithm {
            return false;
        }
        if ours.algorithm.algorithm == OID_PKCS1_RSAENCRYPTION {
            return match (ours.parsed(), cert.parsed()) {
                (Ok(PublicKey::RSA(a)), Ok(PublicKey::RSA(b))) => {
                    trim(a.modulus) == trim(b.modulus) && trim(a.exponent) == trim(b.exponent)
                }
                _ => false,
            };
        }
        if ours.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
            // The curve is in the parameters; the point alone would not name it.
            if ours.algorithm.parameters != cert.algorithm.parameters {
                return false;
            }
            let (point, theirs) = (&ours.subject_public_key.data, &cert.subject_public_key.data);
            return compress(point).is_some_and(|c| c.as_slice() == theirs.as_ref());
        }
        false
    }
}

/// Why rustls refused a key. ring cannot derive the public point of an EC key (BoringSSL
/// in Envoy can), so such keys need re-encoding: say how.
fn unsupported(der: &PrivateKeyDer<'_>) -> &'static str {
    const EC_PUBLIC_KEY_OID: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    let ec = match der {
        PrivateKeyDer::Sec1(_) => true,
        PrivateKeyDer::Pkcs8(k) => contains(k.secret_pkcs8_der(), EC_PUBLIC_KEY_OID),
        _ => false,
    };
    if ec {
        "ECDSA keys must be P-256 or P-384 and include their public key (`openssl ec` adds it)"
    } else {
        "not an RSA (2048 bits or more), ECDSA P-256/P-384 or Ed25519 key"
    }
}

/// SEC1 compressed form (02/03 || X) of an uncompressed point (04 || X || Y).
fn compress(point: &[u8]) -> Option<Vec<u8>> {
    let (&tag, coords) = point.split_first()?;
    if tag != 0x04 || coords.is_empty() || coords.len() % 2 != 0 {
        return None;
    }
    let (x, y) = coords.split_at(coords.len() / 2);
    let mut out = vec![0x02 | (y[y.len() - 1] & 1)];
    out.extend_from_slice(x);
    Some(out)
}

fn trim(int: &[u8]) -> &[u8] {
    let start = int.iter().position(|&b| b != 0).unwrap_or(int.len());
    &int[start..]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A PEM error without its payload: base64 errors name an offending byte, which may be
/// part of a key.
pub(super) fn describe_pem_error(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => {
            format!("missing {}", String::from_utf8_lossy(end_marker).trim())
        }
        pem::Error::IllegalSectionStart { .. } => "malformed BEGIN line".into(),
        pem::Error::Base64Decode(_) => "invalid base64".into(),
        pem::Error::SectionTooLarge => "PEM section too large".into(),
        _ => "unreadable PEM".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::chain::fixtures::{self, Alg};
    use super::*;
    use x509_parser::parse_x509_certificate;

    fn key_matches_cert(key_pem: &str, cert_der: &[u8]) -> bool {
        let key = parse(&KeyBytes::new(key_pem.as_bytes().to_vec())).unwrap();
        let (_, cert) = parse_x509_certificate(cert_der).unwrap();
        key.matches(cert.public_key())
    }

    #[test]
    fn every_supported_key_type_and_encoding_matches_its_certificate() {
        for alg in Alg::ALL {
            let leaf = fixtures::leaf(alg);
            assert!(key_matches_cert(&leaf.key_pem, leaf.cert.der()), "{alg:?}");
            // The same key in every encoding openssl offers for it.
            for (encoding, other) in fixtures::other_encodings(&leaf.key_pem, alg) {
                let label = match encoding {
                    "pkcs1" => "RSA PRIVATE KEY",
                    "sec1" => "EC PRIVATE KEY",
                    _ => "PRIVATE KEY",
                };
                assert!(other.starts_with(&format!("-----BEGIN {label}-----")), "{other}");
                assert!(key_matches_cert(&other, leaf.cert.der()), "{alg:?} {encoding}");
            }
        }
    }

    #[test]
    fn ec_key_without_its_public_point_is_refused_with_a_hint() {
        let leaf = fixtures::leaf(Alg::P256);
        let sec1 = fixtures::openssl(&["ec", "-no_public"], leaf.key_pem.as_bytes());
        let pkcs8 = fixtures::openssl(&["pkcs8", "-topk8", "-nocrypt"], sec1.as_bytes());
        for pem in [sec1, pkcs8] {
            let err = parse(&KeyBytes::new(pem.into_bytes())).unwrap_err();
            assert!(matches!(err, PkiError::BadKey(ref m) if m.contains("include their public key")), "{err:?}");
        }
    }

    #[test]
    fn openssl_keys_and_certificates_agree_byte_for_byte() {
        let rsa_pkcs1 = fixtures::other_encodings(&fixtures::leaf(Alg::Rsa).key_pem, Alg::Rsa).pop().unwrap().1;
        let keys = [
            // SEC1 preceded by an EC PARAMETERS block, as `ecparam -genkey` writes it.
            fixtures::openssl(&["ecparam", "-genkey", "-name", "prime256v1"], b""),
            fixtures::openssl(&["ecparam", "-genkey", "-name", "secp384r1"], b""),
            fixtures::openssl(&["genpkey", "-algorithm", "ed25519"], b""),
            rsa_pkcs1,
        ];
        for key_pem in keys {
            let args =
                ["req", "-x509", "-new", "-key", "/dev/stdin", "-subj", "/CN=k", "-days", "1", "-outform", "DER"];
            let cert_der = fixtures::openssl_bytes(&args, key_pem.as_bytes());
            let key = parse(&KeyBytes::new(key_pem.into_bytes())).unwrap();
            let (_, cert) = parse_x509_certificate(&cert_der).unwrap();
            // rustls writes SPKI as OpenSSL does (rsaEncryption with NULL parameters, named
            // curves, uncompressed points), so the exact comparison is the usual path.
            assert_eq!(hex::encode(&key.spki), hex::encode(cert.public_key().raw));
        }
    }

    #[test]
    fn a_different_key_does_not_match() {
        let a = fixtures::leaf(Alg::P256);
        let b = fixtures::leaf(Alg::P256);
        assert!(!key_matches_cert(&a.key_pem, b.cert.der()));
        let rsa = fixtures::leaf(Alg::Rsa);
        assert!(!key_matches_cert(&rsa.key_pem, a.cert.der()));
    }

    #[test]
    fn rsa_without_null_parameters_and_compressed_ec_points_still_match() {
        let rsa = fixtures::leaf(Alg::Rsa);
        let key = parse(&KeyBytes::new(rsa.key_pem.into_bytes())).unwrap();
        // SEQUENCE { SEQUENCE { OID rsaEncryption }, BIT STRING } without the NULL.
        let (_, ours) = SubjectPublicKeyInfo::from_der(&key.spki).unwrap();
        let oid = [0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
        let bits = &key.spki[key.spki.len() - ours.subject_public_key.data.len() - 1..];
        let spki = der_seq(&[der_seq(&oid), der_bitstring(bits)].concat());
        let (_, theirs) = SubjectPublicKeyInfo::from_der(&spki).unwrap();
        assert!(key.matches(&theirs));

        let ec = fixtures::leaf(Alg::P256);
        let key = parse(&KeyBytes::new(ec.key_pem.into_bytes())).unwrap();
        let (_, ours) = SubjectPublicKeyInfo::from_der(&key.spki).unwrap();
        let point = compress(&ours.subject_public_key.data).unwrap();
        let alg = &key.spki[2..2 + 2 + key.spki[3] as usize];
        let spki = der_seq(&[alg, &der_bitstring(&[&[0u8][..], &point].concat())].concat());
        let (_, theirs) = SubjectPublicKeyInfo::from_der(&spki).unwrap();
        assert!(key.matches(&theirs));
        // The other parity is another point.
        let mut flipped = point.clone();
        flipped[0] ^= 1;
        let spki = der_seq(&[alg, &der_bitstring(&[&[0u8][..], &flipped].concat())].concat());
        let (_, theirs) = SubjectPublicKeyInfo::from_der(&spki).unwrap();
        assert!(!key.matches(&theirs));
    }

    fn der_seq(body: &[u8]) -> Vec<u8> {
        der_tlv(0x30, body)
    }
    fn der_bitstring(body_with_unused_bits: &[u8]) -> Vec<u8> {
        der_tlv(0x03, body_with_unused_bits)
    }
    fn der_tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let len = body.len();
        let mut out = vec![tag];
        match len {
            0..0x80 => out.push(len as u8),
            0x80..0x100 => out.extend([0x81, len as u8]),
            _ => out.extend([0x82, (len >> 8) as u8, len as u8]),
        }
        out.extend_from_slice(body);
        out
    }

    /// A PEM block with a made-up body, built at run time: no key-shaped text is kept in
    /// the source.
    fn fake_pem(label: &str, body: &str) -> KeyBytes {
        KeyBytes::new(format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n").into_bytes())
    }

    #[test]
    fn missing_encrypted_and_garbage_keys_are_refused_without_echoing_them() {
        let empty = parse(&KeyBytes::new(Vec::new())).unwrap_err();
        assert_eq!(empty, PkiError::NoKey);
        let cert_only = fixtures::leaf(Alg::P256).cert.pem();
        assert_eq!(parse(&KeyBytes::new(cert_only.into_bytes())).unwrap_err(), PkiError::NoKey);

        let encrypted = fake_pem("ENCRYPTED PRIVATE KEY", "MIIB");
        assert!(matches!(parse(&encrypted), Err(PkiError::BadKey(_))));

        let bad_b64 = fake_pem("PRIVATE KEY", "S3Cr*t!");
        let err = parse(&bad_b64).unwrap_err();
        assert_eq!(err, PkiError::BadPem("invalid base64".into()));

        let not_a_key = fake_pem("PRIVATE KEY", "U2VjcmV0U2VjcmV0");
        let err = parse(&not_a_key).unwrap_err();
        assert!(matches!(err, PkiError::BadKey(_)));
        assert!(!format!("{err:?} {err}").contains("U2Vj"));
    }
}
