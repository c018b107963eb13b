//! DeltaSecrets (incremental): explicit subscribe/unsubscribe, per-resource versions and
//! removals announced in `removed_resources`.

use tonic::Status;

use super::codec::Outgoing;
use super::requests::{DeltaNode, DeltaRequest};
use super::session::{Change, Session};
use super::stream::Protocol;

pub struct Delta;

impl Protocol for Delta {
    type Request = DeltaRequest;
    type Node = DeltaNode;
    const NAME: &'static str = "delta";

    fn on_request(session: &mut Session, req: DeltaRequest) -> Result<(), Status> {
        session.receive(&req.type_url, &req.response_nonce, req.error_detail.as_ref())?;
        // `initial_resource_versions` is deliberately ignored: a new stream always gets the
        // current content, so a proxy that claims a version we never served still converges.
        for name in &req.resource_names_unsubscribe {
            session.unsubscribe(name);
        }
        for name in &req.resource_names_subscribe {
            session.subscribe(name);
        }
        Ok(())
    }

    fn response(session: &mut Session, change: Change) -> Option<Outgoing> {
        Some(match change {
            Change::Send(served) => {
                let resources = smallvec::smallvec![served];
                let nonce = session.record_sent(&resources);
                Outgoing::Delta { nonce, resources, removed: Vec::new() }
            }
            Change::Gone(name) => Outgoing::Delta {
                nonce: session.next_nonce(),
                resources: Default::default(),
                removed: vec![name.to_string()],
            },
        })
    }
}
