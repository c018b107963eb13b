//! The requests of SDS streams, decoded lean. Envoy sends its whole node (dozens of
//! extensions, metadata, client features) with every ACK; the generated types would
//! decode all of it into strings, per stream, per rotation. Here the node stays raw
//! bytes, decoded once per stream, and the fields only compared stay borrowed bytes.
//! Field numbers are those of envoy.service.discovery.v3 (checked against the generated
//! types in the tests below); unknown fields are skipped by prost as usual.

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;

/// `DiscoveryRequest`, as StreamSecrets reads it.
#[derive(Clone, PartialEq, Message)]
pub struct SotwRequest {
    /// A `Node` message, undecoded.
    #[prost(bytes = "bytes", tag = "2")]
    pub node: Bytes,
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

/// `DeltaDiscoveryRequest`, as DeltaSecrets reads it. `initial_resource_versions` is
/// not read: a new stream always gets the current content.
#[derive(Clone, PartialEq, Message)]
pub struct DeltaRequest {
    #[prost(bytes = "bytes", tag = "1")]
    pub node: Bytes,
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

/// The node of a request, if it carries one that decodes.
pub fn node(raw: &Bytes) -> Option<Node> {
    if raw.is_empty() {
        return None;
    }
    Node::decode(raw.clone()).ok()
}

/// A nonce as this server writes them (decimal, never 0); anything else is not ours.
pub fn nonce(raw: &[u8]) -> Option<u64> {
    std::str::from_utf8(raw).ok()?.parse().ok().filter(|n| *n != 0)
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};

    use super::*;

    fn full_node() -> Node {
        Node { id: "envoy-1".into(), cluster: "edge".into(), user_agent_name: "envoy".into(), ..Default::default() }
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
        assert_eq!(node(&lean.node), full.node);
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
        assert_eq!(node(&lean.node), full.node);
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
