//! StreamSecrets (state of the world). Each request carries the full list of wanted
//! names; a response carries the secrets that changed.

use std::collections::HashSet;

use bytes::Bytes;
use tonic::Status;

use super::codec::Outgoing;
use super::fetch::sotw_version;
use super::requests::{SotwNode, SotwRequest};
use super::session::{Change, Session};
use super::stream::Protocol;

pub struct Sotw;

impl Protocol for Sotw {
    type Request = SotwRequest;
    type Node = SotwNode;
    const NAME: &'static str = "sotw";

    fn on_request(session: &mut Session, req: SotwRequest) -> Result<(), Status> {
        session.receive(&req.type_url, &req.response_nonce, req.error_detail.as_ref())?;
        let names = &req.resource_names;
        let max = session.limits().max_names_per_request;
        if names.len() > max {
            session.hit("max_names_per_request");
            return Err(Status::resource_exhausted(format!(
                "{} names in one request; at most {max} ([limits] max_names_per_request)",
                names.len()
            )));
        }
        // An ACK repeats the names already watched: the common case, worth no string.
        // The same set: as many distinct names as are watched, each of them watched.
        let watched = |n: &Bytes| std::str::from_utf8(n).is_ok_and(|n| session.watches(n));
        if names.len() == session.watched() && names.iter().all(watched) && distinct(names) {
            return Ok(());
        }
        // The list is the full desired set: add new names, drop the ones no longer asked for.
        let names = req.names()?;
        let wanted: HashSet<&str> = names.iter().copied().collect();
        let dropped: Vec<_> = session.subscribed().filter(|n| !wanted.contains(&n[..])).cloned().collect();
        for name in dropped {
            session.unsubscribe(&name);
        }
        for name in names {
            session.subscribe(name)?;
        }
        Ok(())
    }

    fn response(session: &mut Session, change: Change) -> Option<Outgoing> {
        // SotW cannot announce the removal of a named secret; Envoy keeps what it has
        // (or gets the placeholder the store publishes under `on_delete = "withdraw"`).
        let Change::Send(served) = change else { return None };
        let resources = smallvec::smallvec![served];
        let nonce = session.record_sent(&resources);
        let version_info = sotw_version(&resources);
        Some(Outgoing::Sotw { version_info, nonce, resources })
    }
}

/// Whether no name appears twice: pairwise for the few names of a usual request, with a
/// set beyond.
fn distinct(names: &[Bytes]) -> bool {
    if names.len() <= 8 {
        return names.iter().enumerate().all(|(i, a)| names[..i].iter().all(|b| a != b));
    }
    let mut seen = HashSet::with_capacity(names.len());
    names.iter().all(|n| seen.insert(&n[..]))
}
