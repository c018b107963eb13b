//! Request reassembly: a byte stream (well-formed messages, then anything) cut into
//! DATA frames anyhow, fed to `Reassembly` as `Inbound` feeds it. It must give exactly
//! the messages a plain sequential parse of the stream finds, fail where that parse
//! fails (a bad prefix) or where the budget is full, keep the budget equal to what it
//! holds, and count window capacity for whole messages only.

#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use bytes::{Buf, Bytes};
use certwire::metrics::Metrics;
use certwire::xds::limits::{Budget, Limits};
use certwire::xds::transport::inbound::Reassembly;
use libfuzzer_sys::fuzz_target;
use tonic::Code;

const PREFIX: usize = 5;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Message bodies, each `bytes` repeated `1 + repeat` times (big messages from small
    /// inputs: frames of 8 KiB and more are held, not copied).
    messages: Vec<(Vec<u8>, u8)>,
    /// Raw bytes after the messages: a partial message, a bad prefix, anything.
    tail: Vec<u8>,
    /// Frame lengths, in order; the rest of the stream is one last frame.
    frames: Vec<u16>,
    /// `[limits] max_request_bytes`: the default, or this.
    max_request: Option<u32>,
    /// `[limits] max_buffered_request_bytes`: plenty, or this (frames refused).
    budget: Option<u32>,
}

#[derive(Debug, PartialEq)]
enum End {
    /// The stream stops inside a message (or between two): this much is left.
    Partial(usize),
    /// A prefix this server refuses, with this code.
    Refused(Code),
}

/// The messages of `stream`, parsed in one piece, and how it ends.
fn reference(stream: &[u8], max_request: usize) -> (Vec<&[u8]>, End) {
    let mut messages = Vec::new();
    let mut at = 0;
    loop {
        let rest = &stream[at..];
        if rest.len() < PREFIX {
            return (messages, End::Partial(rest.len()));
        }
        if rest[0] != 0 {
            return (messages, End::Refused(Code::Internal));
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if len > max_request {
            return (messages, End::Refused(Code::ResourceExhausted));
        }
        if rest.len() < PREFIX + len {
            return (messages, End::Partial(rest.len()));
        }
        messages.push(&rest[PREFIX..PREFIX + len]);
        at += PREFIX + len;
    }
}

fn bytes_of(message: &certwire::xds::transport::inbound::Message) -> Vec<u8> {
    // Read chunk by chunk, as prost does, and as one copy: the same bytes.
    let mut walk = message.clone();
    let mut out = Vec::with_capacity(walk.remaining());
    while walk.has_remaining() {
        let chunk = walk.chunk();
        assert!(!chunk.is_empty(), "an empty chunk before the end");
        out.extend_from_slice(chunk);
        let n = chunk.len();
        walk.advance(n);
    }
    let mut copy = message.clone();
    assert_eq!(copy.copy_to_bytes(copy.remaining()), out);
    out
}

fuzz_target!(|input: Input| {
    let mut stream = Vec::new();
    for (bytes, repeat) in &input.messages {
        let body = bytes.repeat(1 + *repeat as usize);
        stream.push(0);
        stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
        stream.extend_from_slice(&body);
    }
    stream.extend_from_slice(&input.tail);

    let max_request = input.max_request.map_or(1 << 20, |m| m as usize);
    let limits = Limits {
        max_request_bytes: max_request,
        max_buffered_request_bytes: input.budget.map_or(usize::MAX / 2, |b| b as usize),
        ..Default::default()
    };
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    let budget = Arc::new(Budget::new(&limits, METRICS.get_or_init(Metrics::new)));
    let (expected, end) = reference(&stream, max_request);

    let mut frames = Vec::new();
    let mut at = 0;
    for len in &input.frames {
        let len = (*len as usize).min(stream.len() - at);
        frames.push(Bytes::copy_from_slice(&stream[at..at + len]));
        at += len;
    }
    frames.push(Bytes::copy_from_slice(&stream[at..]));

    let mut frames_in = Reassembly::new(budget.clone());
    let mut got = Vec::new();
    let mut released = 0;
    let mut error = None;
    'frames: for frame in frames {
        let (before, len) = (frames_in.buffered(), frame.len());
        match frames_in.frame(frame) {
            Ok(Some(message)) => got.push(message),
            Ok(None) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(before + len > limits.max_buffered_request_bytes, "refused within the budget");
                error = Some((status, true));
                break;
            }
        }
        released += frames_in.take_release();
        assert_eq!(budget.used(), frames_in.buffered());
        loop {
            match frames_in.take_message() {
                Ok(Some(message)) => got.push(message),
                Ok(None) => break,
                Err(status) => {
                    error = Some((status, false));
                    break 'frames;
                }
            }
            released += frames_in.take_release();
            assert_eq!(budget.used(), frames_in.buffered());
        }
    }
    released += frames_in.take_release();
    assert_eq!(budget.used(), frames_in.buffered());

    assert!(got.len() <= expected.len(), "more messages than framed");
    for (message, want) in got.iter().zip(&expected) {
        assert_eq!(bytes_of(message), *want);
    }
    let taken: usize = got.iter().map(|m| PREFIX + m.remaining()).sum();
    // A frame that starts with a whole message, nothing queued, the rest over the
    // budget: the message was taken off (its window given back) and the refusal wins.
    let dropped = match &error {
        Some((_, true)) if released > taken => PREFIX + expected.get(got.len()).map_or(usize::MAX, |m| m.len()),
        _ => 0,
    };
    assert_eq!(released, taken + dropped, "window given back for whole messages taken, and only those");
    match (&error, &end) {
        (None, End::Partial(left)) => {
            assert_eq!(got.len(), expected.len(), "a whole message not given");
            assert_eq!(frames_in.buffered(), *left);
        }
        (None, End::Refused(code)) => panic!("a prefix refused by the reference ({code:?}) was accepted"),
        // The budget may run out anywhere (checked where it did).
        (Some((_, true)), _) => {}
        (Some((status, false)), End::Refused(code)) => {
            assert_eq!(status.code(), *code, "{status:?}");
            assert_eq!(got.len(), expected.len(), "refused before a whole message");
        }
        (Some((status, false)), End::Partial(_)) => panic!("refused a stream the reference accepts: {status:?}"),
    }
    drop(frames_in);
    assert_eq!(budget.used(), 0, "the budget is given back");
});
