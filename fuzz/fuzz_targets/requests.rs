//! The lean request decoders (`SotwRequest`, `DeltaRequest`, `SotwNode`, `DeltaNode`)
//! on a message as reassembly gives it: the body cut into frames anyhow, read in place.
//! Decoding in pieces must give what decoding the body in one slice gives, a decoded
//! request must survive a round trip, and nothing may panic.

#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use certwire::metrics::Metrics;
use certwire::xds::limits::{Budget, Limits};
use certwire::xds::transport::inbound::requests::{DeltaNode, DeltaRequest, NodeOf, SotwNode, SotwRequest, nonce};
use certwire::xds::transport::inbound::{Message, Reassembly, decode};
use libfuzzer_sys::fuzz_target;

/// Both ways agree; the decoded value, if any.
fn check<M: prost::Message + Default + PartialEq>(message: &Message, body: &[u8]) -> Option<M> {
    let pieces = decode::<M>(message.clone());
    let whole = M::decode(body);
    match (pieces, whole) {
        (Ok(a), Ok(b)) => {
            assert!(a == b, "decoded differently in pieces");
            let again = M::decode(a.encode_to_vec().as_slice()).expect("a round trip decodes");
            assert!(again == a, "a round trip changes the request");
            Some(a)
        }
        (Err(_), Err(_)) => None,
        (a, b) => panic!("in pieces: {:?}, whole: {:?}", a.is_ok(), b.is_ok()),
    }
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many frames; then the frame lengths, one byte each; then the body.
    let Some((&n, rest)) = data.split_first() else { return };
    let n = (n as usize % 8).min(rest.len());
    let (cuts, body) = rest.split_at(n);
    let mut stream = vec![0];
    stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
    stream.extend_from_slice(body);

    static METRICS: OnceLock<Metrics> = OnceLock::new();
    let budget = Arc::new(Budget::new(&Limits::default(), METRICS.get_or_init(Metrics::new)));
    let mut frames = Reassembly::new(budget);
    let mut message = None;
    let mut at = 0;
    for cut in cuts.iter().map(|c| *c as usize).chain([usize::MAX]) {
        let len = cut.min(stream.len() - at);
        let frame = Bytes::copy_from_slice(&stream[at..at + len]);
        at += len;
        if let Some(m) = frames.frame(frame).expect("within limits") {
            message = Some(m);
        }
        if let Some(m) = frames.take_message().expect("a good prefix") {
            message = Some(m);
        }
    }
    let message = message.expect("the message is whole");

    if let Some(req) = check::<SotwRequest>(&message, body) {
        let _ = req.names();
        let _ = nonce(&req.response_nonce);
    }
    if let Some(req) = check::<DeltaRequest>(&message, body) {
        let _ = nonce(&req.response_nonce);
    }
    if let Some(node) = check::<SotwNode>(&message, body) {
        let _ = node.node();
    }
    if let Some(node) = check::<DeltaNode>(&message, body) {
        let _ = node.node();
    }
});
