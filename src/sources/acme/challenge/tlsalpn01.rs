//! The tls-alpn-01 responder (RFC 8737): a TLS server that, for a ClientHello with
//! ALPN `acme-tls/1` and the domain as SNI, presents a self-signed certificate for the
//! domain carrying the critical acmeIdentifier extension (SHA-256 of the key
//! authorization), then closes. Runs for the process's life on the configured address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use crate::shutdown::Shutdown;
use anyhow::Context;
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Challenge certificates currently published: lowercase domain -> certificate.
#[derive(Default, Debug)]
pub struct TlsAlpn01 {
    certs: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl TlsAlpn01 {
    /// Publishes the challenge certificate for `domain`.
    pub fn publish(&self, domain: &str, key_authorization_sha256: &[u8]) -> anyhow::Result<()> {
        let domain = domain.to_ascii_lowercase();
        let certified = challenge_cert(&domain, key_authorization_sha256)?;
        self.certs.write().expect("tls-alpn-01 lock").insert(domain, Arc::new(certified));
        Ok(())
    }

    pub fn withdraw(&self, domain: &str) {
        self.certs.write().expect("tls-alpn-01 lock").remove(&domain.to_ascii_lowercase());
    }

    /// Binds `addr` now (a taken port fails the start) and serves until `shutdown`.
    pub async fn serve(self: Arc<Self>, addr: SocketAddr, shutdown: Shutdown) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the ACME tls-alpn-01 responder on {addr}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(self);
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        tracing::info!(%addr, "ACME tls-alpn-01 responder listening");
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(%addr, error = %e, "ACME tls-alpn-01 accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(mut tls)) => {
                            let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                            tracing::info!(%peer, sni = %sni, "ACME tls-alpn-01 challenge presented");
                            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "ACME tls-alpn-01 handshake failed"),
                        Err(_) => tracing::debug!(%peer, "ACME tls-alpn-01 handshake timed out"),
                    }
                });
            }
        });
        Ok(())
    }
}

impl ResolvesServerCert for TlsAlpn01 {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // Only validation connections: ALPN acme-tls/1 offered (RFC 8737 §3).
        let acme = hello.alpn().is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if !acme {
            return None;
        }
        let sni = hello.server_name()?.to_ascii_lowercase();
        self.certs.read().expect("tls-alpn-01 lock").get(&sni).cloned()
    }
}

/// A self-signed certificate for `domain` with the acmeIdentifier extension.
fn challenge_cert(domain: &str, digest: &[u8]) -> anyhow::Result<CertifiedKey> {
    anyhow::ensure!(digest.len() == 32, "key authorization digest must be SHA-256");
    let key = KeyPair::generate().context("generating the tls-alpn-01 key")?;
    let mut params = CertificateParams::new(vec![domain.to_owned()]).context("tls-alpn-01 certificate")?;
    params.distinguished_name = DistinguishedName::new();
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).context("signing the tls-alpn-01 certificate")?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::ring::sign::any_supported_type(&der).context("tls-alpn-01 signing key")?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        // webpki refuses the critical acmeIdentifier extension; the validator (the CA)
        // checks it itself, and so does this test.
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    async fn connect(addr: SocketAddr, sni: &str, alpn: &[u8]) -> anyhow::Result<Vec<u8>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(sni.to_owned())?, tcp)
            .await?;
        Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
    }

    #[tokio::test]
    async fn presents_the_acme_identifier_for_acme_tls_only() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let responder = Arc::new(TlsAlpn01::default());
        let shutdown = Shutdown::new();
        responder.clone().serve(addr, shutdown.clone()).await.unwrap();
        let digest = [7u8; 32];
        responder.publish("Web.Example.com", &digest).unwrap();

        let der = connect(addr, "web.example.com", ACME_TLS_ALPN).await.unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        assert_eq!(ext.value, [&[0x04, 32][..], &digest[..]].concat(), "an OCTET STRING of the digest");
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(format!("{:?}", san.value.general_names), "[DNSName(\"web.example.com\")]");

        assert!(connect(addr, "web.example.com", b"h2").await.is_err(), "not for ordinary TLS");
        assert!(connect(addr, "other.example.com", ACME_TLS_ALPN).await.is_err(), "not for other names");
        responder.withdraw("web.example.com");
        assert!(connect(addr, "web.example.com", ACME_TLS_ALPN).await.is_err(), "withdrawn");
        shutdown.trigger();
    }
}
