//! SDS responses, written field by field around the secret bytes the store encoded
//! once: a push to ten thousand streams encodes nothing again, and hands each stream a
//! handle on the secret, not a copy. (Requests are decoded with prost where they are read.)

use std::sync::{Arc, LazyLock};

use bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use super::transport::grpc::{Frame, FrameBuilder};
use crate::pki::{SECRET_TYPE_URL, SharedKeyBytes};
use crate::store::Served;
use crate::version::Version;

/// A response, as references to shared secrets plus the few per-stream fields.
#[derive(Debug)]
pub enum Outgoing {
    /// `DiscoveryResponse` (StreamSecrets, FetchSecrets).
    /// A nonce of 0 is not written (FetchSecrets has none).
    Sotw { version_info: Version, nonce: u64, resources: Resources },
    /// `DeltaDiscoveryResponse`.
    Delta { nonce: u64, resources: Resources, removed: Vec<String> },
}

/// The secrets of one response: one for a push (held inline, no allocation per proxy),
/// several for a FetchSecrets naming several.
pub type Resources = smallvec::SmallVec<[Arc<Served>; 1]>;

/// Field 4 of both responses, `type_url`: the same for every response, so it goes out
/// as a static part, last.
static TYPE_URL_FIELD: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut field = Vec::new();
    bytes_field(4, SECRET_TYPE_URL.as_bytes(), &mut field);
    field
});

impl Outgoing {
    /// The response as one gRPC message, ready for DATA frames.
    pub fn frame(&self) -> Frame {
        let shared = self.resources().iter().map(|r| r.resource.len()).sum::<usize>() + TYPE_URL_FIELD.len();
        let mut frame = FrameBuilder::new(self.encoded_len(), shared, self.resources().len() + 1);
        self.encode(&mut frame);
        frame.finish()
    }

    fn resources(&self) -> &[Arc<Served>] {
        match self {
            Outgoing::Sotw { resources, .. } | Outgoing::Delta { resources, .. } => resources,
        }
    }

    /// Writes the protobuf encoding of the response. Field numbers are those of
    /// envoy.service.discovery.v3 (checked against prost in the tests below). Fields
    /// are not in number order, which protobuf parsers accept by definition: the small
    /// ones come first and each secret's bytes last in its message, so that a response
    /// with one secret is one buffer, the shared secret and the static type URL.
    fn encode(&self, out: &mut FrameBuilder) {
        match self {
            Outgoing::Sotw { version_info, nonce, resources } => {
                bytes_field(1, version_info.text().as_bytes(), out.buf());
                nonce_field(*nonce, out.buf());
                for r in resources {
                    any(2, &r.resource, out);
                }
            }
            Outgoing::Delta { nonce, resources, removed } => {
                let buf = out.buf();
                nonce_field(*nonce, buf);
                for name in removed {
                    string(6, name, buf);
                }
                for r in resources {
                    // Resource { name = 3, version = 1, resource (Any) = 2 }
                    let buf = out.buf();
                    encode_key(2, WireType::LengthDelimited, buf);
                    encode_varint(delta_resource_len(r) as u64, buf);
                    string(3, &r.name, buf);
                    bytes_field(1, r.version.text().as_bytes(), buf);
                    any(2, &r.resource, out);
                }
            }
        }
        out.put_static(&TYPE_URL_FIELD);
    }

    /// The length [`Outgoing::encode`] writes.
    fn encoded_len(&self) -> usize {
        let tail = string_len(4, SECRET_TYPE_URL) + nonce_len(self.nonce());
        match self {
            Outgoing::Sotw { resources, .. } => {
                version_len(1) + resources.iter().map(|r| any_len(2, r.resource.len())).sum::<usize>() + tail
            }
            Outgoing::Delta { resources, removed, .. } => {
                let resources: usize = resources.iter().map(|r| nested_len(2, delta_resource_len(r))).sum();
                resources + tail + removed.iter().map(|n| string_len(6, n)).sum::<usize>()
            }
        }
    }

    fn nonce(&self) -> u64 {
        match self {
            Outgoing::Sotw { nonce, .. } | Outgoing::Delta { nonce, .. } => *nonce,
        }
    }
}

fn delta_resource_len(r: &Served) -> usize {
    version_len(1) + any_len(2, r.resource.len()) + string_len(3, &r.name)
}

/// Field `tag` holding `Any { type_url = 1, value = 2 }` around an encoded `Secret`.
fn any(tag: u32, secret: &SharedKeyBytes, out: &mut FrameBuilder) {
    let buf = out.buf();
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(any_body_len(secret.len()) as u64, buf);
    bytes_field(1, SECRET_TYPE_URL.as_bytes(), buf);
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(secret.len() as u64, buf);
    out.put_shared(secret.handle());
}

fn any_body_len(secret: usize) -> usize {
    bytes_len(1, SECRET_TYPE_URL.as_bytes()) + key_len(2) + encoded_len_varint(secret as u64) + secret
}

fn any_len(tag: u32, secret: usize) -> usize {
    nested_len(tag, any_body_len(secret))
}

fn nested_len(tag: u32, body: usize) -> usize {
    key_len(tag) + encoded_len_varint(body as u64) + body
}

fn nonce_len(nonce: u64) -> usize {
    if nonce == 0 {
        return 0;
    }
    let digits = nonce.ilog10() as usize + 1;
    key_len(5) + encoded_len_varint(digits as u64) + digits
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

/// A version field: its text has a fixed length, so it is not formatted to be measured.
fn version_len(tag: u32) -> usize {
    key_len(tag) + encoded_len_varint(Version::TEXT_LEN as u64) + Version::TEXT_LEN
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

    /// The message a response frames, without its gRPC prefix.
    fn body(out: &Outgoing) -> bytes::Bytes {
        use bytes::Buf;
        let mut frame = out.frame();
        let mut bytes = frame.copy_to_bytes(frame.remaining());
        assert_eq!(bytes[0], 0, "uncompressed");
        assert_eq!(u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize, bytes.len() - 5, "prefix length");
        bytes.advance(5);
        bytes
    }

    fn served(name: &str, value: &[u8]) -> Arc<Served> {
        Arc::new(Served {
            name: name.into(),
            version: Version::of(name.as_bytes()),
            kind: SecretKind::GenericSecret,
            resource: KeyBytes::new(value.to_vec()).into(),
            meta: SecretMeta::default(),
            source: Arc::from("test"),
            updated: SystemTime::now(),
            detected_at: Instant::now(),
            placeholder: None,
        })
    }

    #[test]
    fn sotw_encoding_matches_prost() {
        let (a, b) = (served("a", b"secret-a"), served("b", &[7u8; 300]));
        let v1 = Version::of(b"v1");
        let out = Outgoing::Sotw { version_info: v1, nonce: 42, resources: smallvec::smallvec![a, b] };
        let buf = body(&out);
        let expected = DiscoveryResponse {
            version_info: v1.to_string(),
            resources: vec![
                Any { type_url: SECRET_TYPE_URL.into(), value: b"secret-a".to_vec() },
                Any { type_url: SECRET_TYPE_URL.into(), value: vec![7u8; 300] },
            ],
            type_url: SECRET_TYPE_URL.into(),
            nonce: "42".into(),
            ..Default::default()
        };
        assert_eq!(DiscoveryResponse::decode(buf.clone()).unwrap(), expected);
        // The same fields, in another order (see `encode`).
        assert_eq!(buf.len(), expected.encoded_len());
        assert_eq!(out.encoded_len(), buf.len());
    }

    #[test]
    fn delta_encoding_matches_prost() {
        let a = served("a", &[1u8; 200]);
        let out = Outgoing::Delta { nonce: 7, resources: smallvec::smallvec![a], removed: vec!["gone".into()] };
        let buf = body(&out);
        let expected = DeltaDiscoveryResponse {
            resources: vec![Resource {
                name: "a".into(),
                version: Version::of(b"a").to_string(),
                resource: Some(Any { type_url: SECRET_TYPE_URL.into(), value: vec![1u8; 200] }),
                ..Default::default()
            }],
            type_url: SECRET_TYPE_URL.into(),
            removed_resources: vec!["gone".into()],
            nonce: "7".into(),
            ..Default::default()
        };
        assert_eq!(DeltaDiscoveryResponse::decode(buf.clone()).unwrap(), expected);
        assert_eq!(out.encoded_len(), buf.len());
    }

    #[test]
    fn frames_share_the_secrets() {
        let (a, b) = (served("a", &[3u8; 5000]), served("b", b"x"));
        let responses = [
            Outgoing::Sotw {
                version_info: Version::of(b"v1"),
                nonce: 9,
                resources: smallvec::smallvec![a.clone(), b.clone()],
            },
            Outgoing::Sotw { version_info: Version::of(b"v1"), nonce: 0, resources: smallvec::smallvec![] },
            Outgoing::Delta { nonce: 1234567, resources: smallvec::smallvec![a.clone(), b], removed: vec!["c".into()] },
        ];
        for out in responses {
            let frame = out.frame();
            let mut slices = [std::io::IoSlice::new(&[]); 16];
            let n = bytes::Buf::chunks_vectored(&frame, &mut slices);
            let shares = slices[..n].iter().any(|s| s.as_ptr() == a.resource.as_ptr());
            assert_eq!(shares, out.resources().iter().any(|r| r.name.as_ref() == "a"), "secret bytes are not copied");
            assert_eq!(body(&out).len(), out.encoded_len());
        }
    }

    /// The usual push: the small fields, the shared secret, the static type URL.
    #[test]
    fn a_response_with_one_secret_is_three_parts() {
        let a = served("a", &[3u8; 500]);
        for out in [
            Outgoing::Sotw { version_info: a.version, nonce: 3, resources: smallvec::smallvec![a.clone()] },
            Outgoing::Delta { nonce: 3, resources: smallvec::smallvec![a.clone()], removed: vec![] },
        ] {
            let frame = out.frame();
            let mut slices = [std::io::IoSlice::new(&[]); 8];
            assert_eq!(bytes::Buf::chunks_vectored(&frame, &mut slices), 3);
            assert_eq!(slices[1].as_ptr(), a.resource.as_ptr());
            assert_eq!(&*slices[2], TYPE_URL_FIELD.as_slice());
        }
    }
}
