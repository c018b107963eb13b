//! DNS for dns-01: a [`DnsProvider`] publishes and removes TXT records (RFC 2136 is
//! implemented; Cloudflare, Route 53 or Google Cloud DNS fit the same trait), and
//! [`wire`] asks authoritative servers directly whether they answer them yet.

pub mod rfc2136;
pub mod wire;

use std::net::SocketAddr;

use futures_util::future::BoxFuture;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DnsError(pub String);

impl DnsError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Where dns-01 TXT records are published.
pub trait DnsProvider: Send + Sync {
    /// For logs, e.g. `rfc2136 127.0.0.1:53 zone example.com`.
    fn describe(&self) -> String;

    /// Adds the value to the TXT set at `fqdn` (other values stay: a wildcard and its
    /// base name share one `_acme-challenge` name).
    fn add_txt<'a>(&'a self, fqdn: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), DnsError>>;

    /// Removes that one value again.
    fn remove_txt<'a>(&'a self, fqdn: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), DnsError>>;

    /// The servers that must all answer the record before the CA is told to look.
    fn authoritative_servers(&self) -> BoxFuture<'_, Result<Vec<SocketAddr>, DnsError>>;
}
