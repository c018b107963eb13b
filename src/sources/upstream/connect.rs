//! One connection to the upstream certwire: TCP with TLS (certwire's client certificate
//! read from its files at each attempt), plaintext TCP on loopback, or a Unix socket.

use std::sync::Arc;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Channel, Endpoint};

use super::config::{Target, UpstreamConfig};

/// Connects once; the caller retries with backoff.
pub async fn channel(config: &UpstreamConfig, target: &Target) -> anyhow::Result<Channel> {
    // The URI is not dialled (the connector is) but names the :authority sent.
    let endpoint = Endpoint::from_static("http://certwire-upstream")
        .connect_timeout(std::time::Duration::from_secs(10))
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true);
    match target.clone() {
        Target::Unix(path) => endpoint
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
            .context("connecting over the unix socket"),
        Target::Plain(addr) => endpoint
            .connect_with_connector(tower::service_fn(move |_| async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::TcpStream::connect(addr).await?))
            }))
            .await
            .context("connecting"),
        Target::Tls { host, port, server_name } => {
            let tls = tokio_rustls::TlsConnector::from(client_config(config)?);
            let server_name = ServerName::try_from(server_name.clone())
                .with_context(|| format!("[upstream] server name {server_name:?}"))?;
            endpoint
                .connect_with_connector(tower::service_fn(move |_| {
                    let (tls, host, server_name) = (tls.clone(), host.clone(), server_name.clone());
                    async move {
                        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                        tcp.set_nodelay(true)?;
                        Ok::<_, std::io::Error>(TokioIo::new(tls.connect(server_name, tcp).await?))
                    }
                }))
                .await
                .context("connecting with TLS")
        }
    }
}

/// TLS 1.2+ with the configured CA only (no system roots: the upstream is certwire, with
/// a certificate from the operator's CA), HTTP/2, and the client certificate if set.
fn client_config(config: &UpstreamConfig) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let ca_path = config.ca.as_ref().context("[upstream] ca is required with https://")?;
    let ca = std::fs::read(ca_path).with_context(|| format!("reading [upstream] ca {}", ca_path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        let cert = cert.with_context(|| format!("[upstream] ca {}", ca_path.display()))?;
        roots.add(cert).with_context(|| format!("[upstream] ca {}", ca_path.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots);
    let mut tls = match (&config.cert, &config.key) {
        (Some(cert_path), Some(key_path)) => {
            let chain =
                std::fs::read(cert_path).with_context(|| format!("reading [upstream] cert {}", cert_path.display()))?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain)
                .collect::<Result<_, _>>()
                .with_context(|| format!("[upstream] cert {}", cert_path.display()))?;
            let key = zeroize::Zeroizing::new(
                std::fs::read(key_path).with_context(|| format!("reading [upstream] key {}", key_path.display()))?,
            );
            let key = PrivateKeyDer::from_pem_slice(&key)
                .map_err(|e| anyhow::anyhow!("[upstream] key {}: {e}", key_path.display()))?;
            builder.with_client_auth_cert(chain, key).context("[upstream] cert and key")?
        }
        _ => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(tls))
}
