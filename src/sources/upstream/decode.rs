//! An SDS `Secret` received from an upstream certwire, back into [`Material`] so that it
//! passes this certwire's own checks before it is served. Key bytes are moved into
//! zeroizing storage, and every other copy is wiped.

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret::Type};
use prost::Message;
use zeroize::Zeroize;

use crate::pki::{KeyBytes, Material};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not an envoy.extensions.transport_sockets.tls.v3.Secret: {0}")]
    NotASecret(String),
    #[error("the Secret is named {got:?}, not {want:?}")]
    Name { got: String, want: String },
    #[error("the Secret carries no content")]
    Empty,
    #[error("{0} is not given inline (a file or environment variable of the upstream host)")]
    NotInline(&'static str),
}

/// Decodes `bytes` (an `Any`'s value) as the Secret `name`. `bytes` is wiped.
pub fn material(name: &str, bytes: &mut Vec<u8>) -> Result<Material, DecodeError> {
    let decoded = Secret::decode(bytes.as_slice());
    bytes.zeroize();
    let mut secret = decoded.map_err(|e| DecodeError::NotASecret(e.to_string()))?;
    if secret.name != name {
        return Err(DecodeError::Name { got: std::mem::take(&mut secret.name), want: name.to_owned() });
    }
    let material = match secret.r#type.take() {
        Some(Type::TlsCertificate(mut tls)) => Material::Tls {
            cert_chain_pem: inline(tls.certificate_chain.take(), "certificate_chain")?,
            key_pem: KeyBytes::new(inline(tls.private_key.take(), "private_key")?),
            ocsp_staple: tls.ocsp_staple.take().map(|s| inline(Some(s), "ocsp_staple")).transpose()?,
        },
        Some(Type::ValidationContext(mut ca)) => Material::Validation {
            ca_pem: inline(ca.trusted_ca.take(), "trusted_ca")?,
            crl_pem: ca.crl.take().map(|c| inline(Some(c), "crl")).transpose()?,
        },
        Some(Type::SessionTicketKeys(mut keys)) => Material::SessionTicketKeys(
            keys.keys
                .drain(..)
                .map(|k| inline(Some(k), "session ticket key").map(KeyBytes::new))
                .collect::<Result<_, _>>()?,
        ),
        Some(Type::GenericSecret(mut generic)) => {
            Material::Generic(KeyBytes::new(inline(generic.secret.take(), "secret")?))
        }
        None => return Err(DecodeError::Empty),
    };
    Ok(material)
}

/// The inline bytes of a data source, moved out (a refused one is wiped).
fn inline(source: Option<DataSource>, what: &'static str) -> Result<Vec<u8>, DecodeError> {
    match source.and_then(|s| s.specifier) {
        Some(Specifier::InlineBytes(bytes)) => Ok(bytes),
        Some(Specifier::InlineString(text)) => Ok(text.into_bytes()),
        Some(Specifier::Filename(_)) | Some(Specifier::EnvironmentVariable(_)) => Err(DecodeError::NotInline(what)),
        None => Err(DecodeError::Empty),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CheckOptions, check};
    use crate::policy::Placeholder;

    #[test]
    fn what_certwire_encodes_decodes_to_the_same_material() {
        let placeholder = Placeholder::generate();
        for kind in [crate::pki::SecretKind::TlsCertificate, crate::pki::SecretKind::ValidationContext] {
            let original = placeholder.material(kind).unwrap();
            let checked = check("web", original, &CheckOptions::default()).unwrap();
            let mut bytes = checked.resource.as_slice().to_vec();
            let decoded = material("web", &mut bytes).unwrap();
            assert!(bytes.is_empty() || bytes.iter().all(|&b| b == 0), "wiped");
            let again = check("web", &decoded, &CheckOptions::default()).unwrap();
            assert_eq!(again.resource.as_slice(), checked.resource.as_slice(), "{kind:?}");
        }
        let generic = check("g", &Material::Generic(KeyBytes::new(b"s3cret".to_vec())), &Default::default()).unwrap();
        let decoded = material("g", &mut generic.resource.as_slice().to_vec()).unwrap();
        assert_eq!(decoded, Material::Generic(KeyBytes::new(b"s3cret".to_vec())));
    }

    #[test]
    fn another_name_or_no_content_is_refused() {
        let generic = check("g", &Material::Generic(KeyBytes::new(b"s".to_vec())), &Default::default()).unwrap();
        let err = material("other", &mut generic.resource.as_slice().to_vec()).unwrap_err();
        assert_eq!(err, DecodeError::Name { got: "g".into(), want: "other".into() });
        let empty = Secret { name: "e".into(), r#type: None }.encode_to_vec();
        assert_eq!(material("e", &mut empty.clone()), Err(DecodeError::Empty));
        assert!(matches!(material("e", &mut vec![0xff, 0xff]), Err(DecodeError::NotASecret(_))));
        let by_file = Secret {
            name: "f".into(),
            r#type: Some(Type::GenericSecret(
                envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::GenericSecret {
                    secret: Some(DataSource {
                        specifier: Some(Specifier::Filename("/etc/shadow".into())),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )),
        }
        .encode_to_vec();
        assert_eq!(material("f", &mut by_file.clone()), Err(DecodeError::NotInline("secret")));
    }
}
