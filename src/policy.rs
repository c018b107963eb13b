//! What is served for a secret that is not valid, or no longer offered: the `on_invalid`,
//! `allow_expired` and `on_delete` settings, and the placeholder certificate that stands
//! in for a secret when a policy asks for one.
//!
//! A placeholder is a self-signed certificate made at start, with a subject that says
//! what it is. No client trusts it, so a listener using it warms at once and only the
//! hostname behind it fails its handshakes, instead of Envoy holding the whole listener
//! until its initial fetch timeout (15 s) and then dropping the filter chain.

use serde::Deserialize;

use crate::pki::{KeyBytes, Material, SecretKind};

/// `on_invalid`: a name whose source only ever offered bad content.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnInvalid {
    /// No answer: Envoy keeps the listener warming until its initial fetch timeout.
    #[default]
    Withhold,
    /// The placeholder, marked as such in status and metrics.
    ServePlaceholder,
}

/// `allow_expired`: whether an expired certificate may be served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AllowExpired {
    /// Never: an expired certificate is refused like any bad update.
    Never,
    /// Only for a name with no valid version served (Istio serves expired certificates;
    /// withholding them broke gateways, istio#46868). An expired update is still refused
    /// while a valid version is served.
    #[default]
    WhenNothingElse,
    /// Always (and certificates not valid yet too): an escape hatch for tests.
    Always,
}

/// `true`/`false` as in earlier releases (`always`/`never`), or the policy by name.
impl<'de> Deserialize<'de> for AllowExpired {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Named(String),
        }
        match Raw::deserialize(d)? {
            Raw::Flag(true) => Ok(Self::Always),
            Raw::Flag(false) => Ok(Self::Never),
            Raw::Named(name) => <Self as clap::ValueEnum>::from_str(&name, false).map_err(|_| {
                serde::de::Error::custom(format!(
                    "allow_expired = {name:?}: expected \"never\", \"when-nothing-else\", \"always\", true or false"
                ))
            }),
        }
    }
}

/// `on_delete`: a served secret that every source stopped offering. Delta streams are
/// told of the removal either way (`removed_resources`); this is for SotW streams, which
/// cannot be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnDelete {
    /// Envoy keeps serving what it has (xDS semantics for SDS).
    #[default]
    Keep,
    /// SotW streams get the placeholder, so the deleted certificate stops being served.
    Withdraw,
}

/// The store's part of the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub on_invalid: OnInvalid,
    pub on_delete: OnDelete,
}

impl Policy {
    pub fn uses_placeholder(&self) -> bool {
        self.on_invalid == OnInvalid::ServePlaceholder || self.on_delete == OnDelete::Withdraw
    }
}

/// Why a placeholder is served; shown in status (`placeholder`) and metrics (`cause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlaceholderCause {
    /// Every version offered was refused.
    Invalid,
    /// The secret was deleted at every source (`on_delete = "withdraw"`).
    Deleted,
}

impl PlaceholderCause {
    pub fn as_str(self) -> &'static str {
        match self {
            PlaceholderCause::Invalid => "invalid",
            PlaceholderCause::Deleted => "deleted",
        }
    }
}

/// The subject every placeholder carries, so that whoever sees it in a handshake or in
/// `openssl s_client` output knows where it comes from.
pub const PLACEHOLDER_SUBJECT: &str = "certwire placeholder (not trusted: the real secret is invalid or deleted)";

/// The placeholder's material: a TLS pair, and the same certificate as a CA bundle for a
/// validation context (which then trusts no real peer).
pub struct Placeholder {
    tls: Material,
    ca: Material,
}

impl Placeholder {
    /// A fresh key and self-signed certificate (ECDSA P-256). Each certwire process makes
    /// its own: nothing about it needs to be shared, and no key is stored anywhere.
    pub fn generate() -> Self {
        let key = rcgen::KeyPair::generate().expect("generating a P-256 key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("no names to check");
        params.distinguished_name.push(rcgen::DnType::CommonName, PLACEHOLDER_SUBJECT);
        let cert = params.self_signed(&key).expect("self-signing the placeholder");
        let cert_pem = cert.pem().into_bytes();
        Self {
            tls: Material::Tls {
                cert_chain_pem: cert_pem.clone(),
                key_pem: KeyBytes::new(key.serialize_pem().into_bytes()),
                ocsp_staple: None,
            },
            ca: Material::Validation { ca_pem: cert_pem, crl_pem: None },
        }
    }

    /// What stands in for a secret of `kind`; `None` for kinds without a harmless
    /// stand-in (ticket keys and generic secrets are withheld).
    pub fn material(&self, kind: SecretKind) -> Option<&Material> {
        match kind {
            SecretKind::TlsCertificate => Some(&self.tls),
            SecretKind::ValidationContext => Some(&self.ca),
            SecretKind::SessionTicketKeys | SecretKind::GenericSecret => None,
        }
    }
}

/// The kind of secret a piece of material would be.
pub fn kind_of(material: &Material) -> SecretKind {
    match material {
        Material::Tls { .. } => SecretKind::TlsCertificate,
        Material::Validation { .. } => SecretKind::ValidationContext,
        Material::SessionTicketKeys(_) => SecretKind::SessionTicketKeys,
        Material::Generic(_) => SecretKind::GenericSecret,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CheckOptions, check};

    #[test]
    fn placeholder_passes_the_checks_and_says_what_it_is() {
        let p = Placeholder::generate();
        for kind in [SecretKind::TlsCertificate, SecretKind::ValidationContext] {
            let checked = check("gw", p.material(kind).unwrap(), &CheckOptions::default()).unwrap();
            assert_eq!(checked.kind, kind);
            assert_eq!(checked.identity.subject.as_deref(), Some(format!("CN={PLACEHOLDER_SUBJECT}").as_str()));
        }
        assert!(p.material(SecretKind::GenericSecret).is_none());
    }

    #[test]
    fn allow_expired_reads_booleans_and_names() {
        #[derive(Deserialize)]
        struct T {
            allow_expired: AllowExpired,
        }
        let read = |s: &str| toml::from_str::<T>(s).map(|t| t.allow_expired);
        assert_eq!(read("allow_expired = true").unwrap(), AllowExpired::Always);
        assert_eq!(read("allow_expired = false").unwrap(), AllowExpired::Never);
        assert_eq!(read("allow_expired = \"when-nothing-else\"").unwrap(), AllowExpired::WhenNothingElse);
        let err = read("allow_expired = \"sometimes\"").unwrap_err().to_string();
        assert!(err.contains("when-nothing-else"), "{err}");
    }
}
