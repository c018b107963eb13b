//! Shared harness for the end-to-end tests and the benchmarks: real processes
//! (certwire, Envoy), a throwaway PKI, kubelet-style secret directories and a TLS
//! probe. Plain functions and types, no test framework: a bench includes it with
//! `#[path = "../tests/common/mod.rs"] mod common;`.
//!
//! Every wait polls with a generous timeout and panics with what it waited for;
//! the process wrappers print their log tails when dropped during a panic, so a
//! failed test shows certwire's and Envoy's side of the story.

// Each test crate uses a different part of the harness.
#![allow(dead_code)]

pub mod acme;
pub mod attack;
pub mod bootstrap;
pub mod certwire;
pub mod envoy;
pub mod files;
pub mod fleet;
pub mod http;
pub mod kubeapi;
pub mod openssl;
pub mod pki;
pub mod tls;
pub mod util;
