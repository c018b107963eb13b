//! What a simulated proxy says about itself, and the requests that carry it.
//!
//! Envoy 1.40 lists its 516 compiled-in extensions in its `Node`: about 61 KB, sent with
//! every SDS request, ACKs included, unless the bootstrap sets
//! `set_node_on_first_message_only` (observed with the real Envoy of the tests: four
//! DATA frames per ACK). A load generator with a bare node would hide what the server
//! pays to receive that, so the node here has the same size and shape: as many
//! extensions, of the same length, with made-up names.
//!
//! The node is encoded once per proxy and sent as bytes; the requests are lean prost
//! structs with the field numbers of `envoy.service.discovery.v3` (checked against the
//! generated types in tests/loadgen_node.rs), so the clients do not re-encode 516 extensions per ACK.

use std::sync::LazyLock;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{BuildVersion, Extension, Node, node};
use envoy_types::pb::envoy::r#type::v3::SemanticVersion;
use prost::Message;

/// Extensions in the node of Envoy 1.40.0 (the one the tests install).
pub const ENVOY_EXTENSIONS: usize = 516;

/// A node as big as Envoy 1.40's, for proxy `id`.
pub fn envoy_like(id: &str) -> Bytes {
    // Protobuf fields may come in any order and concatenated messages merge: the id is
    // written in front of the rest, which is encoded once.
    let id_field = Node { id: id.to_owned(), ..Default::default() }.encode_to_vec();
    let mut node = Vec::with_capacity(id_field.len() + REST.len());
    node.extend_from_slice(&id_field);
    node.extend_from_slice(&REST);
    node.into()
}

/// Everything of the node but its id.
static REST: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let extensions = (0..ENVOY_EXTENSIONS)
        .map(|i| Extension {
            name: format!("envoy.filters.http.synthetic_ext_{i:03}"),
            category: "envoy.filters.http".to_owned(),
            type_urls: vec![format!("envoy.extensions.filters.http.synthetic_ext_{i:03}.v3.Config")],
            ..Default::default()
        })
        .collect();
    let node = Node {
        cluster: "loadgen".to_owned(),
        user_agent_name: "envoy".to_owned(),
        user_agent_version_type: Some(node::UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
            version: Some(SemanticVersion { major_number: 1, minor_number: 40, patch: 0 }),
            metadata: None,
        })),
        extensions,
        ..Default::default()
    };
    node.encode_to_vec()
});

/// `DiscoveryRequest` with the node as encoded bytes (empty: not sent).
#[derive(Clone, PartialEq, Message)]
pub struct SotwRequest {
    #[prost(string, tag = "1")]
    pub version_info: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub node: Bytes,
    #[prost(string, repeated, tag = "3")]
    pub resource_names: Vec<String>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub response_nonce: String,
}

/// `DeltaDiscoveryRequest` with the node as encoded bytes (empty: not sent).
#[derive(Clone, PartialEq, Message)]
pub struct DeltaRequest {
    #[prost(bytes = "bytes", tag = "1")]
    pub node: Bytes,
    #[prost(string, tag = "2")]
    pub type_url: String,
    #[prost(string, repeated, tag = "3")]
    pub resource_names_subscribe: Vec<String>,
    #[prost(string, tag = "6")]
    pub response_nonce: String,
}
