//! SDS responses, written field by field around the secret bytes the store encoded
//! once: a push to ten thousand streams copies those bytes into each frame and encodes
//! nothing again. (Requests are decoded with prost where they are read.)

use std::sync::Arc;

use bytes::{BufMut, Bytes};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use super::grpc;
use crate::pki::SECRET_TYPE_URL;
use crate::store::Served;

/// Room for the fields around the secrets: version, type URL, nonce, and per Delta
/// resource its name and version. A response larger than the hint grows once.
const FIELDS: usize = 160;

/// A response, as references to shared secrets plus the few per-stream fields.
#[derive(Debug)]
pub enum Outgoing {
    /// `DiscoveryResponse` (StreamSecrets, FetchSecrets).
    /// A nonce of 0 is not written (FetchSecrets has none).
    Sotw { version_info: Arc<str>, nonce: u64, resources: Vec<Arc<Served>> },
    /// `DeltaDiscoveryResponse`.
    Delta { nonce: u64, resources: Vec<Arc<Served>>, removed: Vec<String> },
}

impl Outgoing {
    /// The response as one gRPC message, ready for a DATA frame.
    pub fn frame(&self) -> Bytes {
        let (resources, removed) = match self {
            Outgoing::Sotw { resources, .. } => (resources, 0),
            Outgoing::Delta { resources, removed, .. } => (resources, removed.iter().map(|n| n.len() + 4).sum()),
        };
        let hint: usize = resources.iter().map(|r| r.resource.len() + r.name.len() + FIELDS).sum::<usize>() + removed;
        grpc::frame(hint + FIELDS, |buf| self.encode(buf))
    }

    /// Writes the protobuf encoding of the response. Field numbers are those of
    /// envoy.service.discovery.v3 (checked against prost in the tests below).
    pub fn encode(&self, buf: &mut impl BufMut) {
        match self {
            Outgoing::Sotw { version_info, nonce, resources } => {
                string(1, version_info, buf);
                for r in resources {
                    any(2, r.resource.as_slice(), buf);
                }
                string(4, SECRET_TYPE_URL, buf);
                nonce_field(*nonce, buf);
            }
            Outgoing::Delta { nonce, resources, removed } => {
                for r in resources {
                    // Resource { version = 1, resource (Any) = 2, name = 3 }
                    let secret = r.resource.as_slice();
                    let len = string_len(1, &r.version) + any_len(2, secret) + string_len(3, &r.name);
                    encode_key(2, WireType::LengthDelimited, buf);
                    encode_varint(len as u64, buf);
                    string(1, &r.version, buf);
                    any(2, secret, buf);
                    string(3, &r.name, buf);
                }
                string(4, SECRET_TYPE_URL, buf);
                nonce_field(*nonce, buf);
                for name in removed {
                    string(6, name, buf);
                }
            }
        }
    }
}

/// Field 5 (`nonce`) of both responses, as decimal text, without allocating.
fn nonce_field(nonce: u64, buf: &mut impl BufMut) {
    if nonce == 0 {
        return;
    }
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = nonce;
    while n > 0 {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    bytes_field(5, &digits[at..], buf);
}

/// Field `tag` holding `Any { type_url = 1, value = 2 }` around an encoded `Secret`.
fn any(tag: u32, secret: &[u8], buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint((bytes_len(1, SECRET_TYPE_URL.as_bytes()) + bytes_len(2, secret)) as u64, buf);
    bytes_field(1, SECRET_TYPE_URL.as_bytes(), buf);
    bytes_field(2, secret, buf);
}

fn any_len(tag: u32, secret: &[u8]) -> usize {
    let inner = bytes_len(1, SECRET_TYPE_URL.as_bytes()) + bytes_len(2, secret);
    key_len(tag) + encoded_len_varint(inner as u64) + inner
}

fn string(tag: u32, value: &str, buf: &mut impl BufMut) {
    // proto3: empty strings are not written.
    if !value.is_empty() {
        bytes_field(tag, value.as_bytes(), buf);
    }
}

fn string_len(tag: u32, value: &str) -> usize {
    if value.is_empty() { 0 } else { bytes_len(tag, value.as_bytes()) }
}

fn bytes_field(tag: u32, value: &[u8], buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.put_slice(value);
}

fn bytes_len(tag: u32, value: &[u8]) -> usize {
    key_len(tag) + encoded_len_varint(value.len() as u64) + value.len()
}

#[cfg(test)]
mod tests {
    use std::time::{Instant, SystemTime};

    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse, Resource};
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;

    use super::*;
    use crate::pki::{KeyBytes, SecretKind, SecretMeta};

    fn served(name: &str, value: &[u8]) -> Arc<Served> {
        Arc::new(Served {
            name: name.into(),
            version: format!("v-{name}").into(),
            kind: SecretKind::GenericSecret,
            resource: KeyBytes::new(value.to_vec()),
            meta: SecretMeta::default(),
            source: Arc::from("test"),
            updated: SystemTime::now(),
            detected_at: Instant::now(),
            detected: SystemTime::now(),
        })
    }

    #[test]
    fn sotw_encoding_matches_prost() {
        let (a, b) = (served("a", b"secret-a"), served("b", &[7u8; 300]));
        let out = Outgoing::Sotw { version_info: "v1".into(), nonce: 42, resources: vec![a, b] };
        let mut buf = Vec::new();
        out.encode(&mut buf);
        let expected = DiscoveryResponse {
            version_info: "v1".into(),
            resources: vec![
                Any { type_url: SECRET_TYPE_URL.into(), value: b"secret-a".to_vec() },
                Any { type_url: SECRET_TYPE_URL.into(), value: vec![7u8; 300] },
            ],
            type_url: SECRET_TYPE_URL.into(),
            nonce: "42".into(),
            ..Default::default()
        };
        assert_eq!(DiscoveryResponse::decode(buf.as_slice()).unwrap(), expected);
        assert_eq!(buf, expected.encode_to_vec(), "byte-identical to prost");
    }

    #[test]
    fn delta_encoding_matches_prost() {
        let a = served("a", &[1u8; 200]);
        let out = Outgoing::Delta { nonce: 7, resources: vec![a], removed: vec!["gone".into()] };
        let mut buf = Vec::new();
        out.encode(&mut buf);
        let expected = DeltaDiscoveryResponse {
            resources: vec![Resource {
                name: "a".into(),
                version: "v-a".into(),
                resource: Some(Any { type_url: SECRET_TYPE_URL.into(), value: vec![1u8; 200] }),
                ..Default::default()
            }],
            type_url: SECRET_TYPE_URL.into(),
            removed_resources: vec!["gone".into()],
            nonce: "7".into(),
            ..Default::default()
        };
        assert_eq!(DeltaDiscoveryResponse::decode(buf.as_slice()).unwrap(), expected);
    }

    #[test]
    fn frame_is_the_encoding_behind_a_grpc_prefix() {
        let out = Outgoing::Sotw { version_info: "v1".into(), nonce: 9, resources: vec![served("a", &[3u8; 5000])] };
        let mut body = Vec::new();
        out.encode(&mut body);
        let frame = out.frame();
        assert_eq!(frame[0], 0, "uncompressed");
        assert_eq!(u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize, body.len());
        assert_eq!(&frame[5..], &body[..]);
    }
}
