//! Builds the rustls configuration of the SDS listener from PEM: certwire's chain and
//! key, and the CA bundle (with optional CRLs) that client certificates must chain to.
//! Pure: the reloader reads files or the store and calls this.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::pki::{CheckOptions, KeyBytes, Material, PkiError};

/// What the listener needs, as PEM.
pub struct Pems {
    pub chain: Vec<u8>,
    pub key: KeyBytes,
    /// Client certificates are required, and must chain to one of these, when set.
    pub client_ca: Option<Vec<u8>>,
    pub client_crl: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server certificate: {0}")]
    Certificate(#[from] PkiError),
    #[error("client CA: {0}")]
    ClientCa(String),
    #[error("{0}")]
    Rustls(String),
}

impl TlsError {
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::Certificate(e) => e.reason(),
            TlsError::ClientCa(_) => "bad_client_ca",
            TlsError::Rustls(_) => "rustls",
        }
    }
}

/// Checks the pair as any served secret is checked (key matches leaf, chain order,
/// validity), then builds the config. HTTP/2 only: SDS is gRPC.
pub fn build(pems: &Pems) -> Result<Arc<ServerConfig>, TlsError> {
    // The same checks and messages as for served secrets; the resource is not kept.
    let material = Material::Tls { cert_chain_pem: pems.chain.clone(), key_pem: pems.key.clone(), ocsp_staple: None };
    crate::pki::check("sds-tls", &material, &CheckOptions::default())?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pems.chain)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Certificate(PkiError::BadPem(e.to_string())))?;
    let key = PrivateKeyDer::from_pem_slice(pems.key.as_slice())
        .map_err(|e| TlsError::Certificate(PkiError::BadKey(e.to_string())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &pems.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|e| TlsError::ClientCa(format!("invalid PEM: {e}")))?;
                roots.add(cert).map_err(|e| TlsError::ClientCa(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(TlsError::ClientCa("no CA certificate in the bundle".into()));
            }
            let crls: Vec<CertificateRevocationListDer<'static>> = match &pems.client_crl {
                Some(crl) => CertificateRevocationListDer::pem_slice_iter(crl)
                    .collect::<Result<_, _>>()
                    .map_err(|e| TlsError::ClientCa(format!("CRL: invalid PEM: {e}")))?,
                None => Vec::new(),
            };
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .with_crls(crls)
                .build()
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::KeyBytes;

    fn pair(cn: &str) -> (Vec<u8>, KeyBytes) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![cn.to_owned()]).unwrap().self_signed(&key).unwrap();
        (cert.pem().into_bytes(), KeyBytes::new(key.serialize_pem().into_bytes()))
    }

    #[test]
    fn builds_with_and_without_client_ca() {
        let (chain, key) = pair("certwire");
        let (ca, _) = pair("ca");
        let config =
            build(&Pems { chain: chain.clone(), key: key.clone(), client_ca: None, client_crl: None }).unwrap();
        assert_eq!(config.alpn_protocols, [b"h2".to_vec()]);
        build(&Pems { chain, key, client_ca: Some(ca), client_crl: None }).unwrap();
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let (chain, _) = pair("certwire");
        let (_, other_key) = pair("other");
        let err = build(&Pems { chain: chain.clone(), key: other_key, client_ca: None, client_crl: None }).unwrap_err();
        assert_eq!(err.reason(), "key_mismatch", "{err}");
        let (chain2, key2) = pair("certwire");
        let err = build(&Pems { chain: chain2, key: key2, client_ca: Some(b"garbage".to_vec()), client_crl: None })
            .unwrap_err();
        assert_eq!(err.reason(), "bad_client_ca", "{err}");
        assert!(err.to_string().contains("no CA certificate"), "{err}");
        let _ = chain;
    }
}
