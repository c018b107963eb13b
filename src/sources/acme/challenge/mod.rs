//! The three challenge types behind one interface: an order publishes an answer per
//! authorization, tells the CA, and withdraws every answer afterwards (success,
//! failure or shutdown alike).

pub mod dns01;
pub mod http01;
pub mod tlsalpn01;

use std::sync::Arc;
use std::time::Duration;

use super::config::{ChallengeKind, normalize_domain};
use super::dns::DnsProvider;

/// The responders and DNS providers an order can use.
pub struct Solvers {
    pub http01: Option<Arc<http01::Http01>>,
    pub tls_alpn01: Option<Arc<tlsalpn01::TlsAlpn01>>,
    /// (zone, provider), any order.
    pub dns: Vec<(String, Arc<dyn DnsProvider>)>,
    pub dns_propagation_timeout: Duration,
}

/// (record name, value) pairs.
type Records = Vec<(String, String)>;

/// One published answer, to withdraw later.
pub enum Published {
    Http01 { token: String },
    TlsAlpn01 { domain: String },
    Dns01 { provider: Arc<dyn DnsProvider>, name: String, value: String },
}

impl Solvers {
    /// The DNS provider whose zone (longest match) holds `domain`'s record.
    pub fn dns_for(&self, domain: &str) -> Option<&Arc<dyn DnsProvider>> {
        let domain = normalize_domain(domain.trim_start_matches("*."));
        self.dns
            .iter()
            .filter(|(zone, _)| domain == *zone || domain.ends_with(&format!(".{zone}")))
            .max_by_key(|(zone, _)| zone.len())
            .map(|(_, p)| p)
    }

    /// Publishes the answer for one authorization.
    /// `domain` is the identifier (with `*.` for a wildcard authorization).
    pub async fn publish(
        &self,
        kind: ChallengeKind,
        domain: &str,
        token: &str,
        key_authorization: &instant_acme::KeyAuthorization,
    ) -> anyhow::Result<Published> {
        match kind {
            ChallengeKind::Http01 => {
                let http01 =
                    self.http01.as_ref().ok_or_else(|| anyhow::anyhow!("the http-01 responder is not running"))?;
                http01.publish(token, key_authorization.as_str());
                Ok(Published::Http01 { token: token.to_owned() })
            }
            ChallengeKind::TlsAlpn01 => {
                let alpn = self
                    .tls_alpn01
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("the tls-alpn-01 responder is not running"))?;
                alpn.publish(domain, key_authorization.digest().as_ref())?;
                Ok(Published::TlsAlpn01 { domain: domain.to_owned() })
            }
            ChallengeKind::Dns01 => {
                let provider =
                    self.dns_for(domain).ok_or_else(|| anyhow::anyhow!("no DNS provider for the zone of {domain}"))?;
                let name = dns01::record_name(domain);
                let value = key_authorization.dns_value();
                provider
                    .add_txt(&name, &value)
                    .await
                    .map_err(|e| anyhow::anyhow!("publishing TXT {name} via {}: {e}", provider.describe()))?;
                tracing::info!(record = %name, provider = %provider.describe(), "dns-01 TXT record added");
                Ok(Published::Dns01 { provider: provider.clone(), name, value })
            }
        }
    }

    /// Waits until every published TXT record is answered by the authoritative
    /// servers (a no-op for http-01 and tls-alpn-01).
    pub async fn wait_visible(&self, published: &[Published]) -> anyhow::Result<()> {
        let mut by_provider: Vec<(Arc<dyn DnsProvider>, Records)> = Vec::new();
        for p in published {
            if let Published::Dns01 { provider, name, value } = p {
                match by_provider.iter_mut().find(|(q, _)| Arc::ptr_eq(q, provider)) {
                    Some((_, records)) => records.push((name.clone(), value.clone())),
                    None => by_provider.push((provider.clone(), vec![(name.clone(), value.clone())])),
                }
            }
        }
        for (provider, records) in by_provider {
            dns01::wait_published(provider.as_ref(), &records, self.dns_propagation_timeout)
                .await
                .map_err(|e| anyhow::anyhow!("waiting for {}: {e}", provider.describe()))?;
        }
        Ok(())
    }

    /// Withdraws everything published; failures are logged, not returned: a stale TXT
    /// record harms nothing but is worth a warning.
    pub async fn withdraw(&self, certificate: &str, published: Vec<Published>) {
        for p in published {
            match p {
                Published::Http01 { token } => {
                    if let Some(h) = &self.http01 {
                        h.withdraw(&token);
                    }
                }
                Published::TlsAlpn01 { domain } => {
                    if let Some(t) = &self.tls_alpn01 {
                        t.withdraw(&domain);
                    }
                }
                Published::Dns01 { provider, name, value } => {
                    let removal = tokio::time::timeout(Duration::from_secs(30), provider.remove_txt(&name, &value));
                    match removal.await {
                        Ok(Ok(())) => {
                            tracing::info!(certificate = %certificate, record = %name, "dns-01 TXT record removed")
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(certificate = %certificate, record = %name, error = %e, "could not remove a dns-01 TXT record")
                        }
                        Err(_) => {
                            tracing::warn!(certificate = %certificate, record = %name, "removing a dns-01 TXT record timed out")
                        }
                    }
                }
            }
        }
    }
}
