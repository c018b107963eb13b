//! The load generator's Envoy-sized node and lean requests (bench/loadgen/node.rs):
//! benchmarks are built in CI but not run, so their one piece that must stay faithful to
//! Envoy is tested here.

#[path = "../bench/loadgen/node.rs"]
mod node;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use node::{DeltaRequest, ENVOY_EXTENSIONS, SotwRequest, envoy_like};
use prost::Message;
#[test]
fn as_big_as_envoys_node() {
    let node = envoy_like("loadgen-proxy-0");
    // Envoy 1.40.0's own: 61,094 bytes.
    assert!((60_000..62_000).contains(&node.len()), "{} bytes", node.len());
    let node = Node::decode(node).unwrap();
    assert_eq!((node.id.as_str(), node.cluster.as_str()), ("loadgen-proxy-0", "loadgen"));
    assert_eq!(node.extensions.len(), ENVOY_EXTENSIONS);
}

#[test]
fn lean_requests_are_the_envoy_messages() {
    let node = envoy_like("p");
    let sotw = SotwRequest {
        version_info: "v".into(),
        node: node.clone(),
        resource_names: vec!["a".into()],
        type_url: "t".into(),
        response_nonce: "1".into(),
    };
    let full = DiscoveryRequest::decode(sotw.encode_to_vec().as_slice()).unwrap();
    assert_eq!(full.node.unwrap().id, "p");
    assert_eq!((full.version_info, full.resource_names, full.type_url), ("v".into(), vec!["a".into()], "t".into()));
    assert_eq!(full.response_nonce, "1");
    let delta = DeltaRequest {
        node,
        type_url: "t".into(),
        resource_names_subscribe: vec!["a".into()],
        response_nonce: "2".into(),
    };
    let full = DeltaDiscoveryRequest::decode(delta.encode_to_vec().as_slice()).unwrap();
    assert_eq!(full.node.unwrap().id, "p");
    assert_eq!(
        (full.type_url, full.resource_names_subscribe, full.response_nonce),
        ("t".into(), vec!["a".into()], "2".into())
    );
}
