//! `[upstream]`: certwire as a forwarder. It asks another ("central") certwire over SDS
//! for the names its own proxies ask for, checks what it gets, and serves it locally,
//! typically on a Unix socket in the gateway's pod: the pod then needs no Kubernetes
//! credentials for Secrets, and the central certwire decides who gets which key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Default of how long a name nobody subscribes to locally is still followed upstream.
pub const FORGET_AFTER: Duration = Duration::from_secs(10 * 60);
/// Default of the most names followed upstream.
pub const MAX_NAMES: usize = 1_000;
/// Default of the largest response accepted from upstream.
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `https://HOST:PORT` (TLS, `ca` required), `unix:/path`, or `http://HOST:PORT` on a
    /// loopback address only (keys would cross the network in the clear).
    pub address: String,
    /// CA bundle (PEM) the upstream's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate chain and key (PEM) presented upstream; re-read at each
    /// connection, so a renewed certificate is used from the next reconnect.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Name the upstream's certificate must have [default: the host of `address`].
    pub server_name: Option<String>,
    /// Node id sent upstream (status there shows it) [default: the host name].
    pub node_id: Option<String>,
    pub node_cluster: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub forget_after: Option<Duration>,
    pub max_names: Option<usize>,
    pub max_response_bytes: Option<usize>,
}

/// Where the upstream is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tls { host: String, port: u16, server_name: String },
    Plain(SocketAddr),
    Unix(PathBuf),
}

impl UpstreamConfig {
    /// Checks the settings; the error says what to change.
    pub fn target(&self) -> Result<Target, String> {
        if self.cert.is_some() != self.key.is_some() {
            return Err("[upstream] cert and key go together".into());
        }
        if let Some(path) = self.address.strip_prefix("unix:") {
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = self.address.strip_prefix("http://") {
            let addr: SocketAddr = rest
                .trim_end_matches('/')
                .parse()
                .map_err(|e| format!("[upstream] address {:?}: http:// takes an IP:PORT ({e})", self.address))?;
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "[upstream] address {:?}: plaintext to a non-loopback address would send private keys in the \
                     clear; use https:// with ca (and cert, key)",
                    self.address
                ));
            }
            return Ok(Target::Plain(addr));
        }
        let Some(rest) = self.address.strip_prefix("https://") else {
            return Err(format!(
                "[upstream] address {:?}: expected https://HOST:PORT, unix:/path or http://IP:PORT",
                self.address
            ));
        };
        let (host, port) = rest
            .trim_end_matches('/')
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_owned(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| format!("[upstream] address {:?}: expected https://HOST:PORT", self.address))?;
        if self.ca.is_none() {
            return Err("[upstream] https:// needs ca: the CA bundle the upstream's certificate chains to".into());
        }
        let server_name = self.server_name.clone().unwrap_or_else(|| host.clone());
        Ok(Target::Tls { host, port, server_name })
    }

    pub fn forget_after(&self) -> Duration {
        self.forget_after.unwrap_or(FORGET_AFTER)
    }

    pub fn max_names(&self) -> usize {
        self.max_names.unwrap_or(MAX_NAMES)
    }

    pub fn max_response_bytes(&self) -> usize {
        self.max_response_bytes.unwrap_or(MAX_RESPONSE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(address: &str) -> UpstreamConfig {
        toml::from_str(&format!("address = {address:?}\nca = \"/ca.crt\"\n")).unwrap()
    }

    #[test]
    fn addresses_and_their_rules() {
        assert_eq!(
            config("https://certwire.certwire.svc:18000").target(),
            Ok(Target::Tls {
                host: "certwire.certwire.svc".into(),
                port: 18000,
                server_name: "certwire.certwire.svc".into()
            })
        );
        assert_eq!(config("unix:/run/certwire/sds.sock").target(), Ok(Target::Unix("/run/certwire/sds.sock".into())));
        assert_eq!(config("http://127.0.0.1:18000").target(), Ok(Target::Plain("127.0.0.1:18000".parse().unwrap())));
        assert!(config("http://10.0.0.1:18000").target().unwrap_err().contains("in the clear"));
        assert!(config("ftp://x").target().unwrap_err().contains("expected"));
        let no_ca: UpstreamConfig = toml::from_str("address = \"https://a:1\"").unwrap();
        assert!(no_ca.target().unwrap_err().contains("needs ca"));
        let half: UpstreamConfig = toml::from_str("address = \"unix:/s\"\ncert = \"/c\"").unwrap();
        assert!(half.target().unwrap_err().contains("go together"));
    }
}
