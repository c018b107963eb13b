//! The Envoy `Secret` resource: run the checks for each kind of material, then encode the
//! `Secret` once so every stream shares the same bytes. The `Any` around it is written
//! by the SDS codec as it sends: its type URL is the same for every secret, and stored
//! per secret it would cost some 70 bytes each.

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, GenericSecret, Secret, TlsCertificate, TlsSessionTicketKeys, secret::Type,
};
use prost::Message;
use zeroize::Zeroize;

use super::material::{KeyBytes, Material};
use super::{CertIdentity, CheckOptions, Checked, PkiError, SecretKind, SecretMeta, chain, key};

pub const SECRET_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Envoy wants 16 bytes name, 32 bytes HMAC secret and 32 bytes AES key per ticket key.
const TICKET_KEY_LEN: usize = 80;

pub(super) fn build(name: &str, material: &Material, opts: &CheckOptions) -> Result<Checked, PkiError> {
    // Key bytes are copied only after every check passed, so a refusal leaves no copy.
    let (kind, secret_type, meta, identity) = match material {
        Material::Tls { cert_chain_pem, key_pem, ocsp_staple } => {
            let public = key::parse(key_pem)?;
            let chain = chain::tls(cert_chain_pem, &public, ocsp_staple.as_deref(), opts)?;
            let tls = TlsCertificate {
                certificate_chain: Some(inline(chain.pem)),
                private_key: Some(inline(key_pem.as_slice().to_vec())),
                ocsp_staple: ocsp_staple.clone().map(inline),
                ..Default::default()
            };
            (SecretKind::TlsCertificate, Type::TlsCertificate(tls), chain.meta, chain.identity)
        }
        Material::Validation { ca_pem, crl_pem } => {
            let bundle = chain::ca_bundle(ca_pem, opts)?;
            let crl = crl_pem.as_deref().map(chain::crl).transpose()?;
            let validation = CertificateValidationContext {
                trusted_ca: Some(inline(bundle.pem)),
                crl: crl.map(inline),
                ..Default::default()
            };
            (SecretKind::ValidationContext, Type::ValidationContext(validation), bundle.meta, bundle.identity)
        }
        Material::SessionTicketKeys(keys) => {
            check_ticket_keys(keys)?;
            let keys = TlsSessionTicketKeys { keys: keys.iter().map(|k| inline(k.as_slice().to_vec())).collect() };
            (
                SecretKind::SessionTicketKeys,
                Type::SessionTicketKeys(keys),
                SecretMeta::default(),
                CertIdentity::default(),
            )
        }
        Material::Generic(secret) => {
            let generic = GenericSecret { secret: Some(inline(secret.as_slice().to_vec())), ..Default::default() };
            (SecretKind::GenericSecret, Type::GenericSecret(generic), SecretMeta::default(), CertIdentity::default())
        }
    };
    Ok(Checked { kind, resource: encode(name, secret_type), meta, identity })
}

/// The identity of the first certificate of a resource [`build`] encoded. Secrets
/// without certificates have none.
pub fn identity(resource: &[u8]) -> CertIdentity {
    let Ok(secret) = SecretCertificates::decode(resource) else { return CertIdentity::default() };
    secret
        .tls_certificate
        .or(secret.validation_context)
        .and_then(|certs| certs.pem)
        .and_then(|pem| chain::first_identity(&pem.inline_bytes))
        .unwrap_or_default()
}

/// The PEM a served `tls_certificate` resource carries: chain and key, for a consumer
/// inside certwire (the SDS listener's own certificate from the store).
pub fn tls_pems(resource: &[u8]) -> Option<(Vec<u8>, KeyBytes)> {
    let mut secret = SecretTls::decode(resource).ok()?;
    let tls = secret.tls_certificate.take()?;
    // Moved, not copied, into zeroizing storage.
    let key = KeyBytes::new(std::mem::take(&mut tls.private_key?.inline_bytes));
    Some((tls.certificate_chain?.inline_bytes, key))
}

/// The CA bundle (and CRL) a served `validation_context` resource carries.
pub fn ca_pems(resource: &[u8]) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    let secret = SecretCertificates::decode(resource).ok()?;
    let ca = secret.validation_context?;
    Some((ca.pem?.inline_bytes, ca.crl.map(|c| c.inline_bytes)))
}

/// `Secret` down to `tls_certificate`'s chain and key.
#[derive(Clone, PartialEq, Message)]
struct SecretTls {
    #[prost(message, optional, tag = "2")]
    tls_certificate: Option<TlsPair>,
}

/// `TlsCertificate.certificate_chain` and `private_key`.
#[derive(Clone, PartialEq, Message)]
struct TlsPair {
    #[prost(message, optional, tag = "1")]
    certificate_chain: Option<InlineBytes>,
    #[prost(message, optional, tag = "2")]
    private_key: Option<InlineBytes>,
}

/// `Secret`, decoded down to its certificates only: prost skips every field not named
/// here, so the private key is never copied. Field numbers are those of the generated
/// types (checked by the identity tests below).
#[derive(Clone, PartialEq, Message)]
struct SecretCertificates {
    #[prost(message, optional, tag = "2")]
    tls_certificate: Option<Certificates>,
    #[prost(message, optional, tag = "4")]
    validation_context: Option<Certificates>,
}

/// `TlsCertificate.certificate_chain` or `CertificateValidationContext.trusted_ca`
/// (and the latter's `crl`).
#[derive(Clone, PartialEq, Message)]
struct Certificates {
    #[prost(message, optional, tag = "1")]
    pem: Option<InlineBytes>,
    #[prost(message, optional, tag = "7")]
    crl: Option<InlineBytes>,
}

/// `DataSource.inline_bytes`.
#[derive(Clone, PartialEq, Message)]
struct InlineBytes {
    #[prost(bytes = "vec", tag = "2")]
    inline_bytes: Vec<u8>,
}

fn check_ticket_keys(keys: &[KeyBytes]) -> Result<(), PkiError> {
    if keys.is_empty() {
        return Err(PkiError::BadTicketKeys("no keys".into()));
    }
    match keys.iter().position(|k| k.len() != TICKET_KEY_LEN) {
        Some(i) => {
            Err(PkiError::BadTicketKeys(format!("key {} is {} bytes, want {TICKET_KEY_LEN}", i + 1, keys[i].len())))
        }
        None => Ok(()),
    }
}

fn inline(bytes: Vec<u8>) -> DataSource {
    DataSource { specifier: Some(Specifier::InlineBytes(bytes)), ..Default::default() }
}

/// The encoded `Secret` `resource` under another `name`, the rest byte for byte. prost
/// writes fields in tag order, so the name (field 1) comes first and is replaced in
/// place: no decoding, so no unzeroized copy of the key. `None` if `resource` does not
/// start with a name (not one this module encoded).
pub fn renamed(resource: &[u8], name: &str) -> Option<KeyBytes> {
    const NAME_TAG: u8 = 0x0a; // field 1, length-delimited
    let rest = resource.strip_prefix(&[NAME_TAG])?;
    let mut cursor = rest;
    let len = prost::encoding::decode_varint(&mut cursor).ok()?;
    let rest = cursor.get(usize::try_from(len).ok()?..)?;
    let mut out = Vec::with_capacity(1 + 10 + name.len() + rest.len());
    out.push(NAME_TAG);
    prost::encoding::encode_varint(name.len() as u64, &mut out);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(rest);
    Some(KeyBytes::new(out))
}

/// Encodes the `Secret`, wiping the intermediate copies of secret bytes. `encode_to_vec`
/// allocates the exact length up front, so no reallocation leaves a copy behind.
fn encode(name: &str, secret_type: Type) -> KeyBytes {
    let mut secret = Secret { name: name.to_owned(), r#type: Some(secret_type) };
    let out = secret.encode_to_vec();
    wipe(&mut secret);
    KeyBytes::new(out)
}

fn wipe(secret: &mut Secret) {
    let sources: Vec<&mut DataSource> = match &mut secret.r#type {
        Some(Type::TlsCertificate(tls)) => tls.private_key.iter_mut().collect(),
        Some(Type::SessionTicketKeys(keys)) => keys.keys.iter_mut().collect(),
        Some(Type::GenericSecret(generic)) => generic.secret.iter_mut().collect(),
        Some(Type::ValidationContext(_)) | None => Vec::new(),
    };
    for source in sources {
        if let Some(Specifier::InlineBytes(bytes)) = &mut source.specifier {
            bytes.zeroize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::chain::fixtures::{self, Alg, days};
    use super::*;
    use crate::pki::check;

    fn decode(checked: &Checked) -> Secret {
        Secret::decode(checked.resource.as_slice()).unwrap()
    }

    fn inline_bytes(source: Option<DataSource>) -> Vec<u8> {
        match source.and_then(|s| s.specifier) {
            Some(Specifier::InlineBytes(b)) => b,
            other => panic!("not inline bytes: {other:?}"),
        }
    }

    fn tls_material(cert_chain_pem: String, key_pem: &str) -> Material {
        Material::Tls {
            cert_chain_pem: cert_chain_pem.into_bytes(),
            key_pem: KeyBytes::new(key_pem.as_bytes().to_vec()),
            ocsp_staple: None,
        }
    }

    #[test]
    fn renamed_changes_the_name_and_nothing_else() {
        let root = fixtures::root("Renamed Root");
        let leaf = root.leaf(Alg::Rsa, "web.test", days(-1, 30));
        let material = tls_material(leaf.cert.pem(), &leaf.key_pem);
        let checked = check("web", &material, &CheckOptions::default()).unwrap();
        let long = "sds://".to_string() + &"w".repeat(200);
        for name in ["sds://web", long.as_str(), ""] {
            let renamed = super::renamed(checked.resource.as_slice(), name).unwrap();
            let mut a = Secret::decode(checked.resource.as_slice()).unwrap();
            let b = Secret::decode(renamed.as_slice()).unwrap();
            assert_eq!(b.name, name);
            a.name = name.to_owned();
            assert_eq!(a, b, "everything but the name is as it was");
        }
        assert!(super::renamed(b"\x12\x00", "x").is_none(), "no name first");
        assert!(super::renamed(b"\x0a\x05ab", "x").is_none(), "a name longer than the bytes");
    }

    #[test]
    fn tls_secret_decodes_with_name_ordered_chain_and_key_as_given() {
        let root = fixtures::root("Test Root");
        let inter = root.intermediate("Test Intermediate", days(-1, 365));
        let leaf = inter.leaf(Alg::Rsa, "leaf.example.com", days(-1, 30));
        // The PKCS#1 form, as `openssl genrsa -traditional` and many secrets carry it.
        let (_, pkcs1) = fixtures::other_encodings(&leaf.key_pem, Alg::Rsa).pop().unwrap();
        use rustls_pki_types::pem::PemObject;
        assert!(matches!(
            rustls_pki_types::PrivateKeyDer::from_pem_slice(pkcs1.as_bytes()),
            Ok(rustls_pki_types::PrivateKeyDer::Pkcs1(_))
        ));
        let material = tls_material(inter.cert.pem() + &leaf.cert.pem(), &pkcs1);

        let checked = check("kubernetes://default/web", &material, &CheckOptions::default()).unwrap();
        assert_eq!(checked.kind, SecretKind::TlsCertificate);
        assert_eq!(checked.meta.certificates, 2);
        assert_eq!(checked.identity.subject.as_deref(), Some("CN=leaf.example.com"));
        assert_eq!(identity(checked.resource.as_slice()), checked.identity, "read back from the served bytes");
        let secret = decode(&checked);
        assert_eq!(secret.name, "kubernetes://default/web");
        let Some(Type::TlsCertificate(tls)) = secret.r#type else { panic!("{:?}", secret.r#type) };
        assert_eq!(inline_bytes(tls.certificate_chain), (leaf.cert.pem() + &inter.cert.pem()).into_bytes());
        assert_eq!(inline_bytes(tls.private_key), pkcs1.as_bytes());
    }

    #[test]
    fn every_key_type_passes_the_whole_check() {
        for alg in Alg::ALL {
            let leaf = fixtures::leaf(alg);
            let material = tls_material(leaf.cert.pem(), &leaf.key_pem);
            assert!(check("web", &material, &CheckOptions::default()).is_ok(), "{alg:?}");
        }
    }

    #[test]
    fn mismatched_key_is_refused() {
        let leaf = fixtures::leaf(Alg::P256);
        let other = fixtures::leaf(Alg::Ed25519);
        let err = check("web", &tls_material(leaf.cert.pem(), &other.key_pem), &CheckOptions::default()).unwrap_err();
        assert_eq!(err, PkiError::KeyMismatch { subject: "CN=leaf.example.com".into() });
        assert_eq!(err.reason(), "key_mismatch");
    }

    #[test]
    fn validation_context_carries_bundle_and_crl() {
        let root = fixtures::root("Test Root");
        let crl = root.crl_pem();
        let material =
            Material::Validation { ca_pem: root.cert.pem().into_bytes(), crl_pem: Some(crl.clone().into_bytes()) };
        let checked = check("web-cacert", &material, &CheckOptions::default()).unwrap();
        assert_eq!(checked.kind, SecretKind::ValidationContext);
        assert_eq!(checked.identity.subject.as_deref(), Some("CN=Test Root"));
        assert_eq!(identity(checked.resource.as_slice()), checked.identity, "read back from the served bytes");
        let secret = decode(&checked);
        assert_eq!(secret.name, "web-cacert");
        let Some(Type::ValidationContext(v)) = secret.r#type else { panic!("{:?}", secret.r#type) };
        assert_eq!(inline_bytes(v.trusted_ca), root.cert.pem().as_bytes());
        assert_eq!(inline_bytes(v.crl), crl.as_bytes());

        let without = Material::Validation { ca_pem: root.cert.pem().into_bytes(), crl_pem: None };
        let Some(Type::ValidationContext(v)) = decode(&check("ca", &without, &CheckOptions::default()).unwrap()).r#type
        else {
            panic!()
        };
        assert!(v.crl.is_none());

        let bad_crl = Material::Validation { ca_pem: root.cert.pem().into_bytes(), crl_pem: Some(b"junk".to_vec()) };
        let err = check("ca", &bad_crl, &CheckOptions::default()).unwrap_err();
        assert_eq!(err.reason(), "bad_crl");
        let empty = Material::Validation { ca_pem: Vec::new(), crl_pem: None };
        assert_eq!(check("ca", &empty, &CheckOptions::default()).unwrap_err(), PkiError::NoCertificate);
    }

    #[test]
    fn session_ticket_keys_must_be_80_bytes_each() {
        let good = KeyBytes::new(vec![7; 80]);
        let material = Material::SessionTicketKeys(vec![good.clone(), KeyBytes::new(vec![8; 80])]);
        let checked = check("tickets", &material, &CheckOptions::default()).unwrap();
        assert_eq!(checked.kind, SecretKind::SessionTicketKeys);
        let Some(Type::SessionTicketKeys(t)) = decode(&checked).r#type else { panic!() };
        assert_eq!(t.keys.into_iter().map(|k| inline_bytes(Some(k))).collect::<Vec<_>>(), [vec![7; 80], vec![8; 80]]);

        let short = Material::SessionTicketKeys(vec![good, KeyBytes::new(vec![1; 48])]);
        let err = check("tickets", &short, &CheckOptions::default()).unwrap_err();
        assert_eq!(err, PkiError::BadTicketKeys("key 2 is 48 bytes, want 80".into()));
        let none = Material::SessionTicketKeys(Vec::new());
        assert_eq!(check("tickets", &none, &CheckOptions::default()).unwrap_err().reason(), "bad_ticket_keys");
    }

    #[test]
    fn generic_secret_is_inline_bytes() {
        let checked = check("token", &Material::Generic(KeyBytes::new(b"s3cret".to_vec())), &CheckOptions::default());
        let checked = checked.unwrap();
        assert_eq!(checked.kind, SecretKind::GenericSecret);
        assert_eq!(checked.meta, SecretMeta::default());
        assert_eq!(checked.identity, CertIdentity::default());
        assert_eq!(identity(checked.resource.as_slice()), CertIdentity::default());
        let secret = decode(&checked);
        assert_eq!(secret.name, "token");
        let Some(Type::GenericSecret(g)) = secret.r#type else { panic!() };
        assert_eq!(inline_bytes(g.secret), b"s3cret");
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let leaf = fixtures::leaf(Alg::P256);
        let body = leaf.key_pem.lines().nth(1).unwrap().to_owned();
        let key_bytes = format!("{:?}", leaf.key_pem.as_bytes());
        let key_bytes = &key_bytes[1..key_bytes.len() - 1];
        let forbidden = |s: &str| s.contains("PRIVATE KEY") || s.contains(&body) || s.contains(key_bytes);

        let good = tls_material(leaf.cert.pem(), &leaf.key_pem);
        // A key pasted into the chain file must not leak either.
        let combined = tls_material(leaf.cert.pem() + &leaf.key_pem, &leaf.key_pem);
        let mismatched = tls_material(fixtures::leaf(Alg::P256).cert.pem(), &leaf.key_pem);
        let mut shown = vec![format!("{good:?}"), format!("{combined:?}"), format!("{good:#?}")];
        shown.push(format!("{:?}", check("web", &good, &CheckOptions::default()).unwrap()));
        shown.push(format!("{:?}", check("web", &combined, &CheckOptions::default()).unwrap()));
        for err in [check("web", &mismatched, &CheckOptions::default()).unwrap_err(), key_error(&leaf.key_pem)] {
            shown.push(format!("{err:?} {err}"));
        }
        for s in &shown {
            assert!(!forbidden(s), "{s}");
        }
    }

    /// The key with one byte of its body changed: still PEM, no longer a key.
    fn key_error(key_pem: &str) -> PkiError {
        let mut lines: Vec<String> = key_pem.lines().map(str::to_owned).collect();
        lines[1].replace_range(..4, "AAAA");
        let material = tls_material(fixtures::leaf(Alg::P256).cert.pem(), &lines.join("\n"));
        check("web", &material, &CheckOptions::default()).unwrap_err()
    }
}
