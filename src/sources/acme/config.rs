//! The `[acme]` table of the config file, and its checks: everything wrong with it is
//! refused at start with a message naming the certificate and the key, never found
//! out at the first order.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use zeroize::Zeroizing;

/// `[acme]`: one ACME account and the certificates it keeps issued.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The CA's directory URL, e.g. Let's Encrypt staging
    /// `https://acme-staging-v02.api.letsencrypt.org/directory`.
    pub directory: String,
    /// Contact addresses for the account: `ops@example.com` or `mailto:ops@example.com`.
    #[serde(default)]
    pub contact: Vec<String>,
    /// Account key, issued certificates (file-source layout, one folder per name).
    pub state_dir: PathBuf,
    /// External Account Binding, for CAs that require it.
    pub eab: Option<EabConfig>,
    /// PEM bundle of roots trusted for the directory's HTTPS (a private ACME CA);
    /// default: the platform's roots.
    pub ca_file: Option<PathBuf>,
    /// Allow an `http://` directory URL. For test CAs on loopback only: ACME over plain
    /// HTTP gives the certificate's key material away to anyone on the path.
    #[serde(default)]
    pub insecure_http_directory: bool,
    /// First retry delay after a failed order; doubled per failure (with jitter).
    #[serde(default, with = "duration_opt")]
    pub retry_base: Option<Duration>,
    /// Longest delay between retries.
    #[serde(default, with = "duration_opt")]
    pub retry_max: Option<Duration>,
    /// Where the http-01 responder listens (only started when a certificate uses
    /// http-01): port 80 of the domain's address, or a port the gateway routes
    /// `/.well-known/acme-challenge/` to.
    pub http01_listen: Option<SocketAddr>,
    /// Where the tls-alpn-01 responder listens (only started when a certificate uses
    /// tls-alpn-01): port 443 of the domain's address, or where the gateway passes
    /// connections with ALPN `acme-tls/1`.
    pub tls_alpn01_listen: Option<SocketAddr>,
    /// RFC 2136 dynamic DNS servers for dns-01, one per zone.
    #[serde(default)]
    pub rfc2136: Vec<Rfc2136Config>,
    /// How long dns-01 waits for every authoritative server to answer the TXT record.
    #[serde(default, with = "duration_opt")]
    pub dns_propagation_timeout: Option<Duration>,
    #[serde(default)]
    pub certificates: Vec<CertificateConfig>,
    /// Also store the account and every issued certificate as Kubernetes Secrets in
    /// this namespace (certificate `NAME`: Secret `NAME`, type `kubernetes.io/tls`), and
    /// load them from there first at start.
    pub kubernetes_secret_namespace: Option<String>,
    /// The Opaque Secret holding the account credentials (default `certwire-acme-account`).
    pub kubernetes_account_secret: Option<String>,
    /// Kubernetes credentials for the Secrets and the Lease; default: `--kubeconfig` /
    /// `[kubernetes] kubeconfig`, else in-cluster, else `KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Several replicas: only the holder of this Lease orders; the others serve what
    /// is stored in the Secrets and take over when the holder stops renewing it.
    pub lease: Option<LeaseConfig>,
}

/// `lease = { name, namespace, duration }` of `[acme]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// The `coordination.k8s.io/v1` Lease (default `certwire-acme`).
    #[serde(default = "default_lease_name")]
    pub name: String,
    /// Default: `kubernetes_secret_namespace`.
    pub namespace: Option<String>,
    /// How long the holder's lease lasts without renewal (default `15s`): a dead
    /// holder is replaced after at most this long.
    #[serde(default, with = "duration_opt")]
    pub duration: Option<Duration>,
}

fn default_lease_name() -> String {
    "certwire-acme".into()
}

pub const DEFAULT_ACCOUNT_SECRET: &str = "certwire-acme-account";
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EabConfig {
    pub kid: String,
    /// The HMAC key as the CA hands it out: base64url (padding optional).
    pub hmac_key: Option<Secret>,
    /// Or a file holding it.
    pub hmac_key_file: Option<PathBuf>,
}

impl std::fmt::Debug for EabConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EabConfig").field("kid", &self.kid).finish_non_exhaustive()
    }
}

/// One zone updated over RFC 2136, signed with TSIG (the interface of BIND, knot,
/// PowerDNS and cert-manager's rfc2136 solver).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rfc2136Config {
    /// The primary server taking updates, `IP:PORT` (port 53 usually).
    pub server: SocketAddr,
    /// The zone the `_acme-challenge` records go into, e.g. `example.com`.
    pub zone: String,
    pub tsig_key_name: String,
    /// `hmac-sha256` (default), `hmac-sha384` or `hmac-sha512`.
    #[serde(default = "default_tsig_algorithm")]
    pub tsig_algorithm: String,
    /// The TSIG secret, base64 (as in knot.conf, named.conf and `nsupdate -y`).
    pub tsig_secret: Option<Secret>,
    /// Or a file holding it.
    pub tsig_secret_file: Option<PathBuf>,
}

impl std::fmt::Debug for Rfc2136Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rfc2136Config")
            .field("server", &self.server)
            .field("zone", &self.zone)
            .field("tsig_key_name", &self.tsig_key_name)
            .field("tsig_algorithm", &self.tsig_algorithm)
            .finish_non_exhaustive()
    }
}

fn default_tsig_algorithm() -> String {
    "hmac-sha256".into()
}

/// `[[acme.certificates]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// The secret name served (and its issuer chain as `NAME-cacert`).
    pub name: String,
    /// DNS names; the first is the subject. Wildcards (`*.example.com`) need dns-01.
    pub domains: Vec<String>,
    #[serde(default)]
    pub challenge: ChallengeKind,
    #[serde(default)]
    pub key_type: KeyType,
    /// Renew no later than this long before expiry (default: at 2/3 of the lifetime,
    /// or inside the CA's ARI window when it offers one).
    #[serde(default, with = "duration_opt")]
    pub renew_before: Option<Duration>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum ChallengeKind {
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    #[serde(rename = "dns-01")]
    Dns01,
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

impl ChallengeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::Dns01 => "dns-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// The certificate's key. ring cannot generate RSA keys: the `rsa` crate makes them
/// (see `order.rs`), ring signs with them like any other key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum KeyType {
    #[default]
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    #[serde(rename = "rsa-3072")]
    Rsa3072,
}

impl KeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
        }
    }
}

pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(300);
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(3600);
pub const DEFAULT_PROPAGATION_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_HTTP01_LISTEN: &str = "0.0.0.0:80";
pub const DEFAULT_TLS_ALPN01_LISTEN: &str = "0.0.0.0:443";

impl AcmeConfig {
    /// Refuses what cannot work, naming the certificate and the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let url = self.directory.as_str();
        if url.starts_with("http://") {
            if !self.insecure_http_directory {
                bail!(
                    "acme.directory {url:?} is plain HTTP: refused (set insecure_http_directory = true \
                     only for a test CA on loopback)"
                );
            }
        } else if !url.starts_with("https://") {
            bail!("acme.directory {url:?} is not an https:// URL");
        }
        if self.eab.as_ref().is_some_and(|e| e.hmac_key.is_some() == e.hmac_key_file.is_some()) {
            bail!("acme.eab: give exactly one of hmac_key and hmac_key_file");
        }
        let base = self.retry_base.unwrap_or(DEFAULT_RETRY_BASE);
        let max = self.retry_max.unwrap_or(DEFAULT_RETRY_MAX);
        if base.is_zero() || base > max {
            bail!("acme.retry_base ({base:?}) must be above zero and at most acme.retry_max ({max:?})");
        }
        let mut zones = HashSet::new();
        for (i, r) in self.rfc2136.iter().enumerate() {
            if r.tsig_secret.is_some() == r.tsig_secret_file.is_some() {
                bail!("acme.rfc2136[{i}] (zone {}): give exactly one of tsig_secret and tsig_secret_file", r.zone);
            }
            if !zones.insert(normalize_domain(&r.zone)) {
                bail!("acme.rfc2136: zone {} is configured twice", r.zone);
            }
        }
        if self.certificates.is_empty() {
            bail!("acme: no [[acme.certificates]] configured");
        }
        let mut names = HashSet::new();
        for cert in &self.certificates {
            let name = &cert.name;
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                bail!("acme.certificates: name {name:?} must be non-empty, without '/', not starting with '.'");
            }
            if name.ends_with("-cacert") {
                bail!("acme.certificates {name}: names ending in -cacert are the issuer chains of other names");
            }
            if !names.insert(name.clone()) {
                bail!("acme.certificates: name {name} is configured twice");
            }
            if cert.domains.is_empty() {
                bail!("acme.certificates {name}: no domains");
            }
            for domain in &cert.domains {
                check_domain(domain).with_context(|| format!("acme.certificates {name}: domain {domain:?}"))?;
                if domain.starts_with("*.") && cert.challenge != ChallengeKind::Dns01 {
                    bail!(
                        "acme.certificates {name}: wildcard {domain} needs challenge = \"dns-01\" (CAs validate \
                         wildcards over DNS only), not {}",
                        cert.challenge.as_str()
                    );
                }
                if cert.challenge == ChallengeKind::Dns01 && self.zone_for(domain).is_none() {
                    bail!(
                        "acme.certificates {name}: dns-01 for {domain} but no [[acme.rfc2136]] zone contains it \
                         (zones: {})",
                        self.rfc2136.iter().map(|r| r.zone.as_str()).collect::<Vec<_>>().join(", ")
                    );
                }
            }
        }
        self.validate_kubernetes()
    }

    /// The Kubernetes store and the Lease: names the API server would refuse are
    /// refused here, and a Lease needs the Secrets (the other replicas read them).
    fn validate_kubernetes(&self) -> anyhow::Result<()> {
        let Some(ns) = &self.kubernetes_secret_namespace else {
            if self.lease.is_some() {
                bail!(
                    "acme.lease needs acme.kubernetes_secret_namespace: replicas that do not hold the lease \
                     serve the certificates the holder stores there"
                );
            }
            if self.kubernetes_account_secret.is_some() {
                bail!("acme.kubernetes_account_secret needs acme.kubernetes_secret_namespace");
            }
            return Ok(());
        };
        check_k8s_name(ns, 63).context("acme.kubernetes_secret_namespace")?;
        check_k8s_name(self.account_secret(), 253).context("acme.kubernetes_account_secret")?;
        for cert in &self.certificates {
            check_k8s_name(&cert.name, 253)
                .with_context(|| format!("acme.certificates {}: the name is the Secret's name in {ns}", cert.name))?;
            if cert.name == self.account_secret() {
                bail!("acme.certificates {}: that Secret name holds the ACME account", cert.name);
            }
        }
        if let Some(lease) = &self.lease {
            check_k8s_name(&lease.name, 253).context("acme.lease.name")?;
            check_k8s_name(lease.namespace.as_deref().unwrap_or(ns), 63).context("acme.lease.namespace")?;
            let d = lease.duration.unwrap_or(DEFAULT_LEASE_DURATION);
            if d < Duration::from_secs(2) || d.subsec_nanos() != 0 {
                bail!("acme.lease.duration ({d:?}) must be whole seconds, at least 2s");
            }
        }
        Ok(())
    }

    pub fn account_secret(&self) -> &str {
        self.kubernetes_account_secret.as_deref().unwrap_or(DEFAULT_ACCOUNT_SECRET)
    }

    /// The RFC 2136 zone (longest match) that holds `_acme-challenge.DOMAIN`.
    pub fn zone_for(&self, domain: &str) -> Option<&Rfc2136Config> {
        let domain = normalize_domain(domain.trim_start_matches("*."));
        self.rfc2136
            .iter()
            .filter(|r| {
                let zone = normalize_domain(&r.zone);
                domain == zone || domain.ends_with(&format!(".{zone}"))
            })
            .max_by_key(|r| r.zone.len())
    }

    pub fn uses(&self, kind: ChallengeKind) -> bool {
        self.certificates.iter().any(|c| c.challenge == kind)
    }
}

/// Lowercase, without the trailing dot.
pub fn normalize_domain(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

fn check_domain(domain: &str) -> anyhow::Result<()> {
    let bare = domain.strip_prefix("*.").unwrap_or(domain);
    if bare.is_empty() || bare.len() > 253 {
        bail!("not a DNS name");
    }
    for label in bare.trim_end_matches('.').split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            bail!("label {label:?} is not a valid DNS label (a wildcard may only be the leading \"*.\")");
        }
    }
    Ok(())
}

/// A DNS-1123 name (subdomain when `max` is 253, label when 63).
fn check_k8s_name(name: &str, max: usize) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (max > 63 && c == '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        bail!(
            "{name:?} is not a valid Kubernetes name (lowercase letters, digits, '-'{})",
            if max > 63 { ", '.'" } else { "" }
        );
    }
    Ok(())
}

/// Reads a secret given inline or as a file, trimmed.
pub fn read_secret(inline: Option<&Secret>, file: Option<&Path>) -> anyhow::Result<Zeroizing<String>> {
    match (inline, file) {
        (Some(s), _) => Ok(Zeroizing::new(s.0.trim().to_owned())),
        (None, Some(path)) => {
            let text = Zeroizing::new(
                std::fs::read_to_string(path).with_context(|| format!("reading secret file {}", path.display()))?,
            );
            Ok(Zeroizing::new(text.trim().to_owned()))
        }
        (None, None) => bail!("no secret given"),
    }
}

/// A secret given inline in the config: zeroized on drop, never printed.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Secret(Zeroizing::new(s)))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// serde adapter for optional humantime durations ("30s", "5m").
mod duration_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> AcmeConfig {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}"))
    }

    const BASE: &str = r#"
directory = "https://acme.example/directory"
state_dir = "/tmp/x"
[[rfc2136]]
server = "127.0.0.1:53"
zone = "example.com"
tsig_key_name = "k"
tsig_secret = "c2VjcmV0"
"#;

    fn with_cert(cert: &str) -> AcmeConfig {
        parse(&format!("{BASE}\n[[certificates]]\n{cert}"))
    }

    #[test]
    fn a_full_config_parses_and_validates() {
        let c = with_cert(
            "name = \"web\"\ndomains = [\"example.com\", \"*.example.com\"]\nchallenge = \"dns-01\"\nkey_type = \"ecdsa-p384\"\nrenew_before = \"30d\"",
        );
        c.validate().unwrap();
        let cert = &c.certificates[0];
        assert_eq!(cert.key_type, KeyType::EcdsaP384);
        assert_eq!(cert.renew_before, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(c.zone_for("*.example.com").unwrap().zone, "example.com");
        assert!(format!("{:?}", c.rfc2136[0]).find("c2VjcmV0").is_none(), "secret not in Debug");
    }

    #[test]
    fn defaults_are_http01_and_p256() {
        let c = with_cert("name = \"web\"\ndomains = [\"www.example.com\"]");
        c.validate().unwrap();
        assert_eq!(c.certificates[0].challenge, ChallengeKind::Http01);
        assert_eq!(c.certificates[0].key_type, KeyType::EcdsaP256);
    }

    #[test]
    fn refusals_name_the_problem() {
        let cases = [
            ("name = \"w\"\ndomains = [\"*.example.com\"]", "needs challenge = \"dns-01\""),
            ("name = \"w\"\ndomains = [\"a.other.org\"]\nchallenge = \"dns-01\"", "no [[acme.rfc2136]] zone"),
            ("name = \"w\"\ndomains = []", "no domains"),
            ("name = \"w-cacert\"\ndomains = [\"a.example.com\"]", "-cacert"),
            ("name = \"w\"\ndomains = [\"a..example.com\"]", "not a valid DNS label"),
            ("name = \"w\"\ndomains = [\"a.*.example.com\"]", "not a valid DNS label"),
        ];
        for (cert, want) in cases {
            let err = format!("{:#}", with_cert(cert).validate().unwrap_err());
            assert!(err.contains(want), "{cert}: {err}");
        }
    }

    #[test]
    fn plain_http_directory_needs_the_opt_in() {
        let text = BASE.replace("https://acme.example", "http://127.0.0.1:4000");
        let mut c = parse(&format!("{text}\n[[certificates]]\nname = \"w\"\ndomains = [\"a.example.com\"]"));
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("insecure_http_directory"));
        c.insecure_http_directory = true;
        c.validate().unwrap();
    }

    #[test]
    fn retry_base_is_at_most_retry_max() {
        let mut c = with_cert("name = \"w\"\ndomains = [\"a.example.com\"]");
        c.retry_base = Some(Duration::from_secs(60));
        c.retry_max = Some(Duration::from_secs(4));
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("retry_base"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<AcmeConfig>(&format!("{BASE}\nretry_bse = \"1s\"")).unwrap_err();
        assert!(err.to_string().contains("retry_bse"), "{err}");
    }

    #[test]
    fn kubernetes_store_and_lease() {
        let mut c = with_cert("name = \"web\"\ndomains = [\"a.example.com\"]");
        c.lease = Some(LeaseConfig { name: "l".into(), namespace: None, duration: None });
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("kubernetes_secret_namespace"));
        c.kubernetes_secret_namespace = Some("ingress".into());
        c.validate().unwrap();
        c.lease.as_mut().unwrap().duration = Some(Duration::from_millis(1500));
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("at least 2s"));
        c.lease = None;
        c.certificates[0].name = "Web_1".into();
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("not a valid Kubernetes name"));
        let text = format!(
            "kubernetes_secret_namespace = \"gw\"\nlease = {{ name = \"x\", duration = \"5s\" }}\n{BASE}\n\
             [[certificates]]\nname = \"w\"\ndomains = [\"a.example.com\"]"
        );
        let c = parse(&text);
        c.validate().unwrap();
        assert_eq!(c.lease.as_ref().unwrap().duration, Some(Duration::from_secs(5)));
        assert_eq!(c.account_secret(), DEFAULT_ACCOUNT_SECRET);
    }

    #[test]
    fn longest_zone_wins() {
        let mut c = with_cert("name = \"w\"\ndomains = [\"a.example.com\"]");
        let mut sub = c.rfc2136[0].clone();
        sub.zone = "dev.example.com.".into();
        c.rfc2136.push(sub);
        assert_eq!(c.zone_for("x.dev.example.com").unwrap().zone, "dev.example.com.");
        assert_eq!(c.zone_for("example.com").unwrap().zone, "example.com");
        assert!(c.zone_for("notexample.com").is_none());
    }
}
