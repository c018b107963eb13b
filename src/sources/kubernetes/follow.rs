//! The loop every Kubernetes watch runs: fed the events of a kube-runtime watcher
//! (list, relist, apply, delete, errors), it hands each object to a [`Follower`],
//! withdraws what vanished across a relist, and reports readiness in /readyz.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::{Stream, StreamExt as _};
use kube::runtime::watcher::{self, Event};

use crate::health::Health;
use crate::shutdown::Shutdown;

/// What a watch does with the objects of one kind.
pub trait Follower<K> {
    /// Reports an object's (new) content; returns its key (`ns/name`).
    fn apply(&mut self, object: &K) -> String;
    /// The object was deleted.
    fn delete(&mut self, object: &K);
    /// Keys of the objects currently followed.
    fn keys(&self) -> Vec<String>;
    /// The object `key` is gone (not seen in a relist).
    fn withdraw(&mut self, key: &str);
    /// The first list is complete.
    fn listed(&mut self) {}
}

/// Follows `events` until `shutdown` or their end. `component` is not ready in /readyz
/// until the first list is complete, with the last error as its reason.
pub async fn run<K, F, S>(follower: &mut F, events: S, shutdown: Shutdown, health: Arc<Health>, component: &str)
where
    F: Follower<K>,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send,
{
    let mut stream = std::pin::pin!(events);
    // Keys listed since the last (re)list started; the rest are gone at InitDone.
    let mut listed: Option<HashSet<String>> = None;
    let mut ready = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = stream.next() => match event {
                Some(e) => e,
                None => return,
            },
        };
        match event {
            Ok(Event::Init) => listed = Some(HashSet::new()),
            Ok(Event::InitApply(object)) => {
                let key = follower.apply(&object);
                if let Some(l) = listed.as_mut() {
                    l.insert(key);
                }
            }
            Ok(Event::InitDone) => {
                // A relist after a dropped watch or 410 Gone: only objects that really
                // vanished are withdrawn; the rest were re-applied, which pushes nothing
                // when unchanged.
                if let Some(l) = listed.take() {
                    for key in follower.keys().into_iter().filter(|k| !l.contains(k)) {
                        follower.withdraw(&key);
                    }
                }
                if !ready {
                    ready = true;
                    health.ready(component);
                    follower.listed();
                }
            }
            Ok(Event::Apply(object)) => {
                follower.apply(&object);
            }
            Ok(Event::Delete(object)) => follower.delete(&object),
            Err(err) => {
                tracing::warn!(scope = %component, error = %err, "kubernetes watch error; retrying with backoff");
                if !ready {
                    health.not_ready(component, format!("API server: {err}"));
                }
            }
        }
    }
}
