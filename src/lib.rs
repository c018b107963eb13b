//! certwire: an Envoy SDS v3 control plane.
//!
//! Data flows one way: `sources` -> `pki` checks (in `ingest`) -> `store` -> `xds`
//! streams -> Envoy. `admin` reads the store and the streams.

// The one exception, `memory`, says why.
#![deny(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod cli;
pub mod config;
pub mod health;
pub mod ingest;
pub mod kube_client;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod shutdown;
pub mod sources;
/// OCSP staples fetched by certwire.
pub mod stapling;
pub mod store;
pub mod tls;
pub mod unix_time;
pub mod version;
pub mod xds;

/// certwire's own status API, generated from proto/.
pub mod api {
    tonic::include_proto!("certwire.v1");
}
