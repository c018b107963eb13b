//! gRPC on HTTP/2 (the `h2` crate), the part of it SDS needs, and everything a peer can
//! make certwire hold before a protocol sees a message. The protocols (SotW, Delta,
//! Fetch) see only [`Call`], [`Unary`] and [`Incoming`]; no h2 type leaves this module.
//!
//! What it implements:
//! - gRPC over HTTP/2 (grpc/doc/PROTOCOL-HTTP2.md): `POST`, `content-type:
//!   application/grpc[+proto]` (405 / 415 otherwise); length-prefixed messages, possibly
//!   split over DATA frames or several per frame ([`inbound`]); `grpc-status` and
//!   percent-encoded `grpc-message` in trailers, or trailers-only for an error before any
//!   message; `grpc-encoding` other than `identity` refused with UNIMPLEMENTED and
//!   `grpc-accept-encoding: identity`; the compressed flag without an encoding is
//!   INTERNAL; `grpc-timeout` ends the call with DEADLINE_EXCEEDED.
//! - Limits ([`limits::Limits`], `[limits]` in the config): connections in total and
//!   per IP, streams per connection, request size, flow-control windows whose capacity
//!   is returned only as whole messages are consumed, a process-wide budget of
//!   unfinished request bytes, the TLS and HTTP/2 handshake times, idle connections.
//! - Listeners ([`listen`]): TCP (plaintext or TLS with client certificates) and Unix
//!   sockets, each connection's peer identity proven by the transport.
//! - Not implemented: compression, HTTP/1 (gRPC-Web), server reflection, health service.

mod call;
pub mod conn;
pub mod grpc;
pub mod inbound;
pub mod limits;
pub mod listen;
pub mod parts;

pub use call::{Call, CallFuture, Incoming, Unary};
