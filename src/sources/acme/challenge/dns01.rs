//! dns-01: the TXT record name for a domain, and the wait until every authoritative
//! server answers the published value before the CA is told to look (a CA that asks
//! a server that has not got the record yet fails the challenge for good).

use std::net::SocketAddr;
use std::time::Duration;

use super::super::dns::{DnsError, DnsProvider, wire};

/// How often the authoritative servers are asked again while waiting.
const POLL: Duration = Duration::from_millis(500);

/// `_acme-challenge.DOMAIN` (a wildcard's `*.` dropped: RFC 8555 §8.4).
pub fn record_name(domain: &str) -> String {
    format!("_acme-challenge.{}", domain.trim_start_matches("*.").trim_end_matches('.'))
}

/// Waits until every authoritative server of `provider`'s zone answers each of
/// `records` (name, value) without recursion, or fails after `timeout` naming the
/// servers that did not.
pub async fn wait_published(
    provider: &dyn DnsProvider,
    records: &[(String, String)],
    timeout: Duration,
) -> Result<(), DnsError> {
    let servers = provider.authoritative_servers().await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut missing = Vec::new();
        for server in &servers {
            for (name, value) in records {
                if let Err(why) = answers(*server, name, value).await {
                    missing.push(format!("{server} ({name}: {why})"));
                }
            }
        }
        if missing.is_empty() {
            tracing::debug!(servers = ?servers, records = records.len(), "dns-01 records visible on every authoritative server");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DnsError::new(format!(
                "TXT records not answered by every authoritative server within {timeout:?}: {}",
                missing.join("; ")
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn answers(server: SocketAddr, name: &str, value: &str) -> Result<(), String> {
    let fqdn = wire::fqdn(name).map_err(|e| e.to_string())?;
    match wire::txt(server, &fqdn).await {
        Ok(found) if found.iter().any(|v| v == value) => Ok(()),
        Ok(found) => Err(format!("{} other TXT value(s), not ours yet", found.len())),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_share_the_base_name() {
        assert_eq!(record_name("*.app.example.com"), "_acme-challenge.app.example.com");
        assert_eq!(record_name("app.example.com."), "_acme-challenge.app.example.com");
    }
}
