//! The SDS v3 protocol: StreamSecrets (SotW), DeltaSecrets and FetchSecrets over gRPC.
//! One task per connection ([`conn`]); state per stream lives in [`session::Session`].

mod codec;
mod delta;
mod fetch;
pub mod names;
pub mod proxies;
mod requests;
mod service;
mod session;
mod sotw;
mod stream;
pub mod transport;

pub use transport::{limits, listen};

use std::sync::Arc;

use tonic::Status;

use crate::authz::{Authorizer, Identity};
use crate::metrics::Metrics;
use crate::pki::SECRET_TYPE_URL;
use crate::shutdown::Shutdown;
use crate::store::Store;
use proxies::Proxies;
use transport::limits::{Budget, Limits};

/// What every stream task needs. Cloned per stream (all `Arc`s).
#[derive(Clone)]
pub struct ServerState {
    pub store: Arc<Store>,
    pub proxies: Arc<Proxies>,
    pub metrics: Arc<Metrics>,
    /// SIGTERM: streams end cleanly so proxies reconnect elsewhere.
    pub shutdown: Shutdown,
    /// Who may read which name; asked when a stream subscribes.
    pub authz: Arc<Authorizer>,
    pub limits: Arc<Limits>,
    /// Request bytes held in unfinished messages, process-wide.
    pub budget: Arc<Budget>,
    /// Open connections, in total and per IP address.
    pub connections: Arc<listen::Connections>,
    /// Requested names that stand for stored ones (`sds://NAME`, `[aliases]`).
    pub names: Arc<names::Names>,
}

impl ServerState {
    pub fn new(
        store: Arc<Store>,
        proxies: Arc<Proxies>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
        authz: Arc<Authorizer>,
        limits: Limits,
    ) -> Self {
        let budget = Arc::new(Budget::new(&limits, &metrics));
        Self {
            store,
            proxies,
            metrics,
            shutdown,
            authz,
            budget,
            connections: Arc::new(listen::Connections::default()),
            limits: Arc::new(limits),
            names: Arc::default(),
        }
    }

    pub fn with_names(mut self, names: names::Names) -> Self {
        self.names = Arc::new(names);
        self
    }
}

/// The other end of a connection, as the transport proves it.
#[derive(Debug)]
pub struct Peer {
    /// `IP:PORT`, or `unix` for a Unix socket: for status and logs.
    pub address: String,
    pub identity: Identity,
}

/// Refuses a type URL other than Secret (empty is allowed: only the first request of a
/// stream must carry it).
fn check_type_url(type_url: &[u8]) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE_URL.as_bytes() {
        Ok(())
    } else {
        let shown = String::from_utf8_lossy(type_url);
        let shown = limits::truncate(&shown, 256);
        Err(Status::invalid_argument(format!("this is an SDS server; type_url {shown} is not served")))
    }
}

#[cfg(test)]
mod tests;
