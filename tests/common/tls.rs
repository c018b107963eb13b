//! A TLS probe: a fresh handshake that trusts anything and reports what the server
//! presented, followed by one HTTP request so that a refused client certificate
//! shows up even under TLS 1.3 (where the server's verdict on it arrives only after
//! the client considers the handshake done).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::pki::{self, Issued};
use super::util::{self, WAIT};

/// One attempt must not hang a poll loop when Envoy accepts and then stalls.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server presented on one handshake.
#[derive(Debug, Clone)]
pub struct ServedCert {
    /// Lowercase hex, as in [`pki::Issued::serial_hex`] and Envoy's `/certs`.
    pub serial_hex: String,
    pub sha256_hex: String,
    pub leaf_der: Vec<u8>,
    /// Number of certificates in the presented chain, leaf included.
    pub chain_len: usize,
    /// Status of the `GET /` sent after the handshake.
    pub http_status: u16,
}

/// Connects to `addr`, sends `sni`, presents `client` if given, and completes one
/// `GET /`. Any failure (refused connection, handshake alert, a client certificate
/// rejected after the handshake, no HTTP answer) is an error.
pub async fn handshake(addr: SocketAddr, sni: &str, client: Option<&Issued>) -> anyhow::Result<ServedCert> {
    tokio::time::timeout(ATTEMPT_TIMEOUT, handshake_inner(addr, sni, client))
        .await
        .with_context(|| format!("TLS probe of {addr} timed out"))?
}

async fn handshake_inner(addr: SocketAddr, sni: &str, client: Option<&Issued>) -> anyhow::Result<ServedCert> {
    let config = client_config(client)?;
    let server_name = ServerName::try_from(sni.to_string()).context("bad SNI")?;
    let tcp = TcpStream::connect(addr).await.context("connect")?;
    // Without it the GET after the handshake waits for the server's delayed ACK (~40 ms).
    tcp.set_nodelay(true).context("nodelay")?;
    let mut tls = TlsConnector::from(Arc::new(config)).connect(server_name, tcp).await.context("TLS handshake")?;

    let (leaf_der, chain_len) = {
        let (_, conn) = tls.get_ref();
        let chain = conn.peer_certificates().context("server presented no certificate")?;
        let leaf = chain.first().context("empty certificate chain")?;
        (leaf.to_vec(), chain.len())
    };

    let request = format!("GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.context("send request")?;
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    // Only the status line matters; stop as soon as it is complete.
    while !response.windows(2).any(|w| w == b"\r\n") {
        let n = tls.read(&mut buf).await.context("read response (client certificate refused?)")?;
        if n == 0 {
            bail!("connection closed without an HTTP response (client certificate refused?)");
        }
        response.extend_from_slice(&buf[..n]);
    }
    let status_line = String::from_utf8_lossy(&response);
    let http_status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP status line: {status_line:?}"))?;

    Ok(ServedCert {
        serial_hex: pki::serial_hex(&leaf_der),
        sha256_hex: pki::sha256_hex(&leaf_der),
        chain_len,
        http_status,
        leaf_der,
    })
}

/// A handshake with an SDS server (certwire's TLS listener), presenting `client` if
/// given: what the server presented, once the server has shown it accepts the client
/// by answering the HTTP/2 preface (under TLS 1.3 a refused client certificate is only
/// seen then).
pub async fn sds_handshake(addr: SocketAddr, client: Option<&Issued>) -> anyhow::Result<ServedCert> {
    tokio::time::timeout(ATTEMPT_TIMEOUT, async {
        let mut config = client_config(client)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(addr).await.context("connect")?;
        let name = ServerName::try_from("localhost").context("SNI")?;
        let mut tls = TlsConnector::from(Arc::new(config)).connect(name, tcp).await.context("TLS handshake")?;
        let leaf_der = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).context("no certificate")?.to_vec();
        let chain_len = tls.get_ref().1.peer_certificates().map_or(0, |c| c.len());
        // The client preface and an empty SETTINGS frame; the server answers with its own.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.context("send preface")?;
        let mut buf = [0u8; 9];
        let n = tls.read(&mut buf).await.context("read (client certificate refused?)")?;
        if n == 0 {
            bail!("connection closed before any HTTP/2 frame (client certificate refused?)");
        }
        Ok(ServedCert {
            serial_hex: pki::serial_hex(&leaf_der),
            sha256_hex: pki::sha256_hex(&leaf_der),
            chain_len,
            http_status: 0,
            leaf_der,
        })
    })
    .await
    .with_context(|| format!("SDS TLS probe of {addr} timed out"))?
}

fn client_config(client: Option<&Issued>) -> anyhow::Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)));
    Ok(match client {
        Some(identity) => {
            let (certs, key) = identity.rustls_identity();
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    })
}

/// Holds for `hold` that fresh handshakes (with `client`, if given) keep presenting
/// `serial_hex`: shows that a rejected or torn update is never served.
pub async fn keeps_serving(addr: SocketAddr, sni: &str, client: Option<&Issued>, serial_hex: &str, hold: Duration) {
    let result = util::holds_for(hold, move || async move {
        match handshake(addr, sni, client).await {
            Ok(served) if served.serial_hex == serial_hex => Ok(()),
            Ok(served) => Err(format!("served serial {} instead of {serial_hex}", served.serial_hex)),
            Err(err) => Err(format!("handshake failed: {err:#}")),
        }
    })
    .await;
    if let Err(what) = result {
        panic!("expected {addr} to keep serving serial {serial_hex}, but: {what}");
    }
}

/// Polls fresh handshakes until the server presents the certificate with
/// `serial_hex`; panics after `timeout` with the last thing seen.
pub async fn wait_served_serial(addr: SocketAddr, sni: &str, serial_hex: &str, timeout: Duration) -> ServedCert {
    wait_served_serial_with(addr, sni, None, serial_hex, timeout).await
}

/// [`wait_served_serial`] presenting a client certificate (mutual TLS listeners).
pub async fn wait_served_serial_with(
    addr: SocketAddr,
    sni: &str,
    client: Option<&Issued>,
    serial_hex: &str,
    timeout: Duration,
) -> ServedCert {
    poll_handshakes(addr, sni, client, timeout, |served| served.serial_hex == serial_hex).await.unwrap_or_else(|last| {
        panic!("{addr} (SNI {sni}) did not serve serial {serial_hex} within {timeout:?}; last: {last}")
    })
}

/// Polls until a handshake succeeds at all (the listener has its certificate).
pub async fn wait_served(addr: SocketAddr, sni: &str, client: Option<&Issued>) -> ServedCert {
    poll_handshakes(addr, sni, client, WAIT, |_| true)
        .await
        .unwrap_or_else(|last| panic!("{addr} (SNI {sni}) served no certificate within {WAIT:?}; last: {last}"))
}

/// Fresh handshakes every [`util::POLL`] until one is accepted by `wanted`; the
/// error is a description of the last attempt.
pub async fn poll_handshakes(
    addr: SocketAddr,
    sni: &str,
    client: Option<&Issued>,
    timeout: Duration,
    wanted: impl Fn(&ServedCert) -> bool,
) -> Result<ServedCert, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match handshake(addr, sni, client).await {
            Ok(served) if wanted(&served) => return Ok(served),
            Ok(served) => format!("served serial {}", served.serial_hex),
            Err(err) => format!("{err:#}"),
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(util::POLL).await;
    }
}

/// Trusts every server certificate (the probe checks serials, not trust) but still
/// checks the handshake signature, so the presented key really matches the leaf.
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
