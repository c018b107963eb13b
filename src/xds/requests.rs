//! The requests of SDS streams, decoded lean. Envoy sends its whole node (every
//! extension it was built with: 61 KB for Envoy 1.40) with every ACK; the generated
//! types would decode all of it into strings, per stream, per rotation. Here a request
//! leaves the node out (prost skips it without copying), the node is decoded on its
//! own, id and cluster only, until the stream knows its proxy, and the fields only
//! compared stay borrowed bytes. Field numbers are those of envoy.service.discovery.v3
//! (checked against the generated types in the tests below); unknown fields are
//! skipped by prost as usual.

use bytes::Bytes;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;

/// `Node`, as far as certwire reads it: who the proxy is.
#[derive(Clone, PartialEq, Message)]
pub struct NodeIdentity {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub cluster: String,
}

/// A request read for its node alone.
pub trait NodeOf: Message + Default + Send + 'static {
    fn node(self) -> Option<NodeIdentity>;
}

/// `DiscoveryRequest.node`.
#[derive(Clone, PartialEq, Message)]
pub struct SotwNode {
    #[prost(message, optional, tag = "2")]
    pub node: Option<NodeIdentity>,
}

impl NodeOf for SotwNode {
    fn node(self) -> Option<NodeIdentity> {
        self.node
    }
}

/// `DeltaDiscoveryRequest.node`.
#[derive(Clone, PartialEq, Message)]
pub struct DeltaNode {
    #[prost(message, optional, tag = "1")]
    pub node: Option<NodeIdentity>,
}

impl NodeOf for DeltaNode {
    fn node(self) -> Option<NodeIdentity> {
        self.node
    }
}

/// `DiscoveryRequest`, as StreamSecrets reads it (the node apart: [`SotwNode`]).
#[derive(Clone, PartialEq, Message)]
pub struct SotwRequest {
    /// Borrowed from the message: every ACK repeats them. See [`SotwRequest::names`].
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub resource_names: Vec<Bytes>,
    #[prost(bytes = "bytes", tag = "4")]
    pub type_url: Bytes,
    #[prost(bytes = "bytes", tag = "5")]
    pub response_nonce: Bytes,
    #[prost(message, optional, tag = "6")]
    pub error_detail: Option<RpcStatus>,
}

impl SotwRequest {
    /// The resource names as text; a name that is not UTF-8 is an error, as it is for
    /// the generated type.
    pub fn names(&self) -> Result<Vec<&str>, tonic::Status> {
        self.resource_names
            .iter()
            .map(|n| {
                std::str::from_utf8(n).map_err(|_| tonic::Status::invalid_argument("a resource name is not UTF-8"))
            })
            .collect()
    }
}

/// `DeltaDiscoveryRequest`, as DeltaSecrets reads it (the node apart: [`DeltaNode`]).
/// `initial_resource_versions` is not read: a new stream always gets the current content.
#[derive(Clone, PartialEq, Message)]
pub struct DeltaRequest {
    #[prost(bytes = "bytes", tag = "2")]
    pub type_url: Bytes,
    #[prost(string, repeated, tag = "3")]
    pub resource_names_subscribe: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub resource_names_unsubscribe: Vec<String>,
    #[prost(bytes = "bytes", tag = "6")]
    pub response_nonce: Bytes,
    #[prost(message, optional, tag = "7")]
    pub error_detail: Option<RpcStatus>,
}

/// A nonce as this server writes them (decimal, never 0); anything else is not ours.
pub fn nonce(raw: &[u8]) -> Option<u64> {
    std::str::from_utf8(raw).ok()?.parse().ok().filter(|n| *n != 0)
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::{Extension, Node};
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};

    use super::*;

    fn identity(node: &Node) -> Option<NodeIdentity> {
        Some(NodeIdentity { id: node.id.clone(), cluster: node.cluster.clone() })
    }

    fn full_node() -> Node {
        let extensions = vec![Extension { name: "envoy.filters.http.router".into(), ..Default::default() }; 3];
        Node {
            id: "envoy-1".into(),
            cluster: "edge".into(),
            user_agent_name: "envoy".into(),
            extensions,
            ..Default::default()
        }
    }

    fn error() -> RpcStatus {
        RpcStatus { code: 3, message: "bad certificate".into(), details: vec![] }
    }

    #[test]
    fn sotw_fields_match_the_generated_type() {
        let full = DiscoveryRequest {
            version_info: "v1".into(),
            node: Some(full_node()),
            resource_names: vec!["a".into(), "b".into()],
            type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret".into(),
            response_nonce: "17".into(),
            error_detail: Some(error()),
            ..Default::default()
        };
        let lean = SotwRequest::decode(full.encode_to_vec().as_slice()).unwrap();
        let node = SotwNode::decode(full.encode_to_vec().as_slice()).unwrap().node();
        assert_eq!(node, identity(full.node.as_ref().unwrap()));
        assert_eq!(lean.names().unwrap(), full.resource_names);
        assert_eq!(&lean.type_url[..], full.type_url.as_bytes());
        assert_eq!(nonce(&lean.response_nonce), Some(17));
        assert_eq!(lean.error_detail, full.error_detail);
    }

    #[test]
    fn delta_fields_match_the_generated_type() {
        let full = DeltaDiscoveryRequest {
            node: Some(full_node()),
            type_url: "t".into(),
            resource_names_subscribe: vec!["a".into()],
            resource_names_unsubscribe: vec!["b".into()],
            initial_resource_versions: [("a".to_owned(), "v0".to_owned())].into(),
            response_nonce: "9".into(),
            error_detail: Some(error()),
            ..Default::default()
        };
        let lean = DeltaRequest::decode(full.encode_to_vec().as_slice()).unwrap();
        let node = DeltaNode::decode(full.encode_to_vec().as_slice()).unwrap().node();
        assert_eq!(node, identity(full.node.as_ref().unwrap()));
        assert_eq!(&lean.type_url[..], b"t");
        assert_eq!(lean.resource_names_subscribe, full.resource_names_subscribe);
        assert_eq!(lean.resource_names_unsubscribe, full.resource_names_unsubscribe);
        assert_eq!(nonce(&lean.response_nonce), Some(9));
        assert_eq!(lean.error_detail, full.error_detail);
    }

    #[test]
    fn a_name_that_is_not_utf8_is_refused() {
        let mut raw = Vec::new();
        prost::encoding::bytes::encode(3, &vec![0xff, 0xfe], &mut raw);
        let lean = SotwRequest::decode(raw.as_slice()).unwrap();
        let err = lean.names().unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("UTF-8"), "{}", err.message());
    }

    #[test]
    fn nonces_that_are_not_ours_are_none() {
        assert_eq!(nonce(b""), None);
        assert_eq!(nonce(b"0"), None);
        assert_eq!(nonce(b"abc"), None);
        assert_eq!(nonce(b"42"), Some(42));
    }
}
