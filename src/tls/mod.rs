//! TLS on the SDS listener: certwire's certificate and the client CA that proxies'
//! certificates must chain to, hot-reloaded from files or from certwire's own store.
//! A reload applies to new handshakes; established streams keep their connection.

mod reload;
mod server_config;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;

pub use reload::start;
pub use server_config::{Pems, TlsError, build};

/// Where certwire's own certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertFrom {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// A `tls_certificate` secret served by certwire's sources (Kubernetes, ACME...).
    Secret(String),
}

/// Where the client CA bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaFrom {
    File {
        ca: PathBuf,
        crl: Option<PathBuf>,
    },
    /// A `validation_context` secret served by certwire's sources (`NAME-cacert`).
    Secret(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub cert: CertFrom,
    /// Client certificates are required when set.
    pub client_ca: Option<CaFrom>,
    /// How often files are read again (store secrets are pushed).
    pub reload_every: Duration,
}

/// The listener's current configuration, swapped whole by the reloader.
pub struct ServerTls {
    current: RwLock<Option<Arc<ServerConfig>>>,
    /// Whether client certificates are required (a client CA is configured).
    pub client_auth: bool,
}

impl ServerTls {
    pub fn new(client_auth: bool) -> Self {
        Self { current: RwLock::new(None), client_auth }
    }

    /// The configuration for a new handshake; `None` until a certificate was loaded.
    pub fn config(&self) -> Option<Arc<ServerConfig>> {
        self.current.read().expect("tls config lock").clone()
    }

    fn set(&self, config: Arc<ServerConfig>) {
        *self.current.write().expect("tls config lock") = Some(config);
    }
}
