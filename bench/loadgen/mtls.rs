//! Mutual TLS for the fan-out: certwire's listener certificate and the CA of the
//! proxies' client certificates (written for `certwire serve --tls-cert --tls-key
//! --tls-client-ca`), the `[[authz.rules]]` that let the bench's identities read the
//! secret, and the client side: every simulated proxy presents a certificate of its own
//! whose only URI SAN is a SPIFFE ID, as an Envoy in a mesh does.
//!
//! The client CA's key goes to the workers, which mint their proxies' certificates
//! themselves (before the measured connection setup): 10,000 certificates made in the
//! coordinator and sent over stdin would cost seconds and megabytes for nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use time::{Duration as TimeDuration, OffsetDateTime};

use crate::files::SecretDir;
use crate::pki::Ca;

/// The name certwire's certificate carries and the clients send as SNI and verify.
pub const SERVER_NAME: &str = "certwire.bench.test";
const CLIENT_CA_NAME: &str = "loadgen proxies' client CA";
/// Every simulated proxy is `spiffe://loadgen.bench/ns/loadgen/sa/proxy-N`.
const IDENTITY_PREFIX: &str = "spiffe://loadgen.bench/ns/loadgen/sa/proxy-";
/// Refused by the first rule; used by the check that authorization really decides.
pub const INTRUDER: &str = "spiffe://loadgen.bench/ns/loadgen/sa/intruder";

/// The SPIFFE ID of proxy `index`.
pub fn identity(index: usize) -> String {
    format!("{IDENTITY_PREFIX}{index}")
}

/// `[[authz.rules]]` for `--authz policy`: the intruder is denied by the first rule,
/// every bench proxy may read `secret` by the second (a pattern, matched per subscribed
/// name), nothing else is allowed.
pub fn policy_toml(secret: &str) -> String {
    format!(
        "[[authz.rules]]\nidentities = [\"{INTRUDER}\"]\nsecrets = [\"*\"]\naction = \"deny\"\n\n\
         [[authz.rules]]\nidentities = [\"{IDENTITY_PREFIX}*\"]\nsecrets = [\"{secret}\"]\n"
    )
}

/// Everything a worker needs to connect over mutual TLS.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClientSide {
    /// The CA certwire's certificate chains to.
    pub server_ca_pem: String,
    /// The client CA's key: the worker issues its proxies' certificates.
    pub client_ca_key_pem: String,
    /// TLS 1.3 only; else at most TLS 1.2, as Envoy by default (see [`provider`]).
    pub tls13: bool,
}

/// certwire's side, written to files, and what the workers get.
pub struct Pki {
    /// `tls.crt`, `tls.key`, `ca.crt` (the client CA) in one directory.
    dir: SecretDir,
    pub clients: ClientSide,
}

impl Pki {
    /// Mints both CAs and certwire's certificate (ECDSA P-256, as every key here) under `root`.
    pub fn create(root: &Path, tls13: bool) -> Pki {
        let server_ca = Ca::new("loadgen certwire server CA");
        let server = server_ca.server(SERVER_NAME);
        let client_ca_key = KeyPair::generate().expect("client CA key");
        let client_ca = client_ca_params().self_signed(&client_ca_key).expect("self-sign client CA");
        let dir = SecretDir::create_tls(root, "certwire-tls", &server, Some(&client_ca.pem()));
        let clients = ClientSide {
            server_ca_pem: server_ca.cert_pem().to_owned(),
            client_ca_key_pem: client_ca_key.serialize_pem(),
            tls13,
        };
        Pki { dir, clients }
    }

    /// `--tls-cert F --tls-key F --tls-client-ca F`.
    pub fn serve_args(&self) -> Vec<PathBuf> {
        let f = |name: &str| self.dir.file(name);
        vec![
            "--tls-cert".into(),
            f(crate::files::TLS_CRT),
            "--tls-key".into(),
            f(crate::files::TLS_KEY),
            "--tls-client-ca".into(),
            f(crate::files::CA_CRT),
        ]
    }
}

/// The client CA, rebuilt the same in every process from its key: the issuer name and
/// key identifier are all a leaf takes from it.
fn client_ca_params() -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, CLIENT_CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - TimeDuration::days(1);
    params.not_after = now + TimeDuration::days(30);
    params
}

/// Issues the proxies' client certificates in a worker.
pub struct ClientIssuer {
    issuer: Issuer<'static, KeyPair>,
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    version: &'static rustls::SupportedProtocolVersion,
}

impl ClientIssuer {
    pub fn new(side: &ClientSide) -> anyhow::Result<ClientIssuer> {
        let key = KeyPair::from_pem(&side.client_ca_key_pem)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(side.server_ca_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        let (provider, version) = provider(side.tls13);
        Ok(ClientIssuer { issuer: Issuer::new(client_ca_params(), key), roots: Arc::new(roots), provider, version })
    }

    /// A TLS client for one proxy: its own key and certificate for `spiffe_id`, HTTP/2
    /// by ALPN, no session resumption (every connection is a proxy's first).
    /// Each proxy needs a configuration of its own: rustls holds the client certificate
    /// there.
    pub fn client(&self, spiffe_id: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let (chain, key) = self.issue(spiffe_id)?;
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[self.version])?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }

    fn issue(&self, spiffe_id: &str) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        params.distinguished_name.push(DnType::CommonName, "loadgen proxy");
        let now = OffsetDateTime::now_utc();
        params.not_before = now - TimeDuration::hours(1);
        params.not_after = now + TimeDuration::days(1);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone()], key))
    }
}

/// TLS as an Envoy offers it to its SDS cluster (an `UpstreamTlsContext` without
/// `tls_params`, as `certwire bootstrap --sds-tls-dir` writes): at most TLS 1.2, ECDHE-ECDSA
/// with AES-128-GCM or ChaCha20 first, then AES-256-GCM; curves X25519, P-256 (Envoy's
/// `ClientContextConfigImpl` defaults). With `tls13`, TLS 1.3 only, its suites in
/// BoringSSL's order (AES-128-GCM first; certwire follows the client's order).
fn provider(tls13: bool) -> (Arc<rustls::crypto::CryptoProvider>, &'static rustls::SupportedProtocolVersion) {
    use rustls::crypto::ring::{cipher_suite as cs, kx_group};
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1];
    let version = if tls13 {
        provider.cipher_suites =
            vec![cs::TLS13_AES_128_GCM_SHA256, cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_CHACHA20_POLY1305_SHA256];
        &rustls::version::TLS13
    } else {
        provider.cipher_suites = vec![
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ];
        &rustls::version::TLS12
    };
    (Arc::new(provider), version)
}

/// The name the clients verify certwire's certificate against.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("valid DNS name")
}

/// What a handshake negotiated, e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519`.
pub fn negotiated(conn: &rustls::ClientConnection) -> String {
    let version = conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_else(|| "?".into());
    let suite = conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_else(|| "?".into());
    let group = conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())).unwrap_or_else(|| "?".into());
    format!("{version} {suite} {group}")
}

/// How certwire's SDS listener is secured in a fan-out run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Nothing on the command line: plaintext, `--authz open` (the loopback default).
    Default,
    /// Plaintext, `--authz open` given explicitly: the baseline of the mTLS rows.
    Plain,
    /// `--tls-cert --tls-key --tls-client-ca` and `--authz policy` with
    /// [`policy_toml`]: every subscription goes through the rules.
    MtlsPolicy,
    /// The same mutual TLS with `--authz open`: tells TLS from authorization.
    MtlsOpen,
}

impl Security {
    pub fn label(self) -> &'static str {
        match self {
            Security::Default => "",
            Security::Plain => "plaintext, --authz open",
            Security::MtlsPolicy => "mTLS, --authz policy",
            Security::MtlsOpen => "mTLS, --authz open",
        }
    }

    /// certwire's arguments; the files (certificates, config) are written under `dir`.
    /// With TLS, also what the clients need.
    pub fn server_args(
        self,
        dir: &Path,
        secret: &str,
        tls13: bool,
    ) -> anyhow::Result<(Vec<std::ffi::OsString>, Option<ClientSide>)> {
        let authz = |mode: &str| vec!["--authz".into(), mode.into()];
        Ok(match self {
            Security::Default => (Vec::new(), None),
            Security::Plain => (authz("open"), None),
            Security::MtlsPolicy | Security::MtlsOpen => {
                let pki = Pki::create(dir, tls13);
                let mut args: Vec<std::ffi::OsString> = pki.serve_args().into_iter().map(Into::into).collect();
                if self == Security::MtlsPolicy {
                    let config = dir.join("certwire-authz.toml");
                    std::fs::write(&config, policy_toml(secret))?;
                    args.extend(authz("policy"));
                    args.extend(["--config".into(), config.into_os_string()]);
                } else {
                    args.extend(authz("open"));
                }
                (args, Some(pki.clients))
            }
        })
    }
}

/// After a run with `--authz policy`: that every stream was opened by a bench SPIFFE
/// identity and served (status), and that the rules decide: a proxy whose certificate
/// names the intruder, from the same CA, opens a stream for `secret` and gets nothing
/// in a second while the denial is counted. Returns a sentence for the report.
pub async fn check_authz(server: &crate::server::Server, side: &ClientSide, secret: &str) -> anyhow::Result<String> {
    use crate::client::{self, Identity, Protocol, Tracker};
    let streams = server.proxies_status().await?;
    let ours = streams
        .iter()
        .filter(|s| s["identity"].as_str().is_some_and(|i| i.starts_with(IDENTITY_PREFIX)))
        .filter(|s| s["secrets"].as_array().is_some_and(|n| n.iter().all(|n| n["denied"].is_null())))
        .count();
    let denials_before = server.metric_sum("certwire_authz_denials_total").await?;
    let config = ClientIssuer::new(side)?.client(INTRUDER)?;
    let source = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    let conn = client::connect(source, server.sds, Some(config)).await?;
    let tracker = Tracker::new([secret.to_owned()]);
    let identity = Identity { node: crate::node::envoy_like("loadgen-intruder"), every_request: true };
    let mut stream = tokio::task::JoinSet::new();
    client::open_stream(&mut stream, conn.channel, Protocol::Sotw, identity, tracker.clone(), 0).await?;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let refused = tracker.initial_pending() == 1;
    let denials = (server.metric_sum("certwire_authz_denials_total").await? - denials_before) as u64;
    let failures = server.metric_sum("certwire_tls_handshake_failures_total").await? as u64;
    Ok(format!(
        "{ours} of {} streams by a bench SPIFFE identity and none denied; an intruder's identity (same CA) {} \
         ({denials} denial counted); TLS handshake failures {failures}",
        streams.len(),
        if refused { "got nothing in 1 s" } else { "WAS SERVED" }
    ))
}
