//! Sources turn the outside world into "secret NAME now has CONTENT" or "NAME is gone",
//! reported through an [`crate::ingest::Intake`]. A source knows nothing of xDS.

pub mod acme;
pub mod dev;
pub mod files;
pub mod kubernetes;
pub mod secret_keys;
pub mod tickets;
pub mod upstream;
