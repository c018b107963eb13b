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
        let max = session.limits().max_names_per_request;
        let asked = req.resource_names_subscribe.len() + req.resource_names_unsubscribe.len();
        if asked > max {
            session.hit("max_names_per_request");
            return Err(Status::resource_exhausted(format!(
                "{asked} names in one request; at most {max} ([limits] max_names_per_request)"
            )));
        }
        for name in &req.resource_names_unsubscribe {
            session.unsubscribe(name);
        }
        for name in &req.resource_names_subscribe {
            if session.watches(name) {
                // Subscribed again: the client may have dropped it; it gets it again.
                session.resubscribe(name);
            } else {
                session.subscribe(name)?;
            }
        }
        Ok(())
    }

    fn response(session: &mut Session, change: Change) -> Option<Outgoing> {
        Some(match change {
            // `on_delete = "withdraw"` is for SotW, which cannot say "removed"; Delta can.
            Change::Send(served) if served.withdrawn() => removal(session, served.name.clone()),
            Change::Send(served) => {
                let resources = smallvec::smallvec![served];
                let nonce = session.record_sent(&resources);
                Outgoing::Delta { nonce, resources, removed: Vec::new() }
            }
            Change::Gone(name) => removal(session, name),
        })
    }
}

fn removal(session: &mut Session, name: std::sync::Arc<str>) -> Outgoing {
    Outgoing::Delta {
        nonce: session.record_removed(&name),
        resources: Default::default(),
        removed: vec![name.to_string()],
    }
}
