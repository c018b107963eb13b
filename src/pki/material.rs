//! Raw secret material as sources hand it over, before any check.

use bytes::Bytes;
use zeroize::Zeroizing;

/// Bytes that may hold a private key: zeroized on drop and never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KeyBytes(Zeroizing<Vec<u8>>);

impl KeyBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl AsRef<[u8]> for KeyBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// [`KeyBytes`] behind a shared, immutable [`Bytes`] handle: what is served is handed to
/// every stream's send queue without a copy, and zeroized when the last handle drops.
#[derive(Clone)]
pub struct SharedKeyBytes(Bytes);

impl SharedKeyBytes {
    /// Another handle on the same bytes (no copy).
    pub fn handle(&self) -> Bytes {
        self.0.clone()
    }
}

impl std::ops::Deref for SharedKeyBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<KeyBytes> for SharedKeyBytes {
    fn from(k: KeyBytes) -> Self {
        Self(Bytes::from_owner(k))
    }
}

impl std::fmt::Debug for SharedKeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedKeyBytes(<{} bytes redacted>)", self.0.len())
    }
}

impl From<Vec<u8>> for KeyBytes {
    fn from(v: Vec<u8>) -> Self {
        Self::new(v)
    }
}

impl std::fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyBytes(<{} bytes redacted>)", self.0.len())
    }
}

/// What a source found for one secret name.
#[derive(Clone, PartialEq, Eq)]
pub enum Material {
    /// A certificate chain (PEM, any order) and its private key (PEM), with an optional
    /// OCSP response for the leaf (DER, Istio's `tls.ocsp-staple`) to staple.
    Tls { cert_chain_pem: Vec<u8>, key_pem: KeyBytes, ocsp_staple: Option<Vec<u8>> },
    /// A CA bundle (PEM) to validate peers, with an optional CRL (PEM).
    Validation { ca_pem: Vec<u8>, crl_pem: Option<Vec<u8>> },
    /// TLS session ticket keys, each exactly 80 bytes.
    SessionTicketKeys(Vec<KeyBytes>),
    /// An opaque secret (Envoy `generic_secret`).
    Generic(KeyBytes),
}

/// PEM inputs are shown by size only: a chain file may carry a pasted private key.
impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Material::Tls { cert_chain_pem, key_pem, ocsp_staple } => f
                .debug_struct("Tls")
                .field("cert_chain_pem", &Size(cert_chain_pem))
                .field("key_pem", key_pem)
                .field("ocsp_staple", &ocsp_staple.as_deref().map(Size))
                .finish(),
            Material::Validation { ca_pem, crl_pem } => f
                .debug_struct("Validation")
                .field("ca_pem", &Size(ca_pem))
                .field("crl_pem", &crl_pem.as_deref().map(Size))
                .finish(),
            Material::SessionTicketKeys(keys) => f.debug_tuple("SessionTicketKeys").field(keys).finish(),
            Material::Generic(secret) => f.debug_tuple("Generic").field(secret).finish(),
        }
    }
}

struct Size<'a>(&'a [u8]);

impl std::fmt::Debug for Size<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_handles_point_at_the_same_bytes_and_hide_them() {
        let shared = SharedKeyBytes::from(KeyBytes::new(b"-----BEGIN TEST-----".to_vec()));
        let (a, b) = (shared.handle(), shared.handle());
        assert_eq!(a.as_ptr(), b.as_ptr(), "no copy per handle");
        assert_eq!(a.as_ptr(), shared.as_ptr());
        assert!(!format!("{shared:?}").contains("BEGIN"));
    }

    #[test]
    fn debug_shows_sizes_only() {
        let tls = Material::Tls {
            cert_chain_pem: b"-----BEGIN CERTIFICATE-----".to_vec(),
            key_pem: KeyBytes::new(b"-----BEGIN PRIVATE KEY-----".to_vec()),
            ocsp_staple: Some(vec![0x30, 0x03, 0x0a, 0x01, 0x00]),
        };
        assert_eq!(
            format!("{tls:?}"),
            "Tls { cert_chain_pem: <27 bytes>, key_pem: KeyBytes(<27 bytes redacted>), ocsp_staple: Some(<5 bytes>) }"
        );
    }
}
