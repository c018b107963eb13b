//! A replica that does not hold the ACME Lease orders nothing: it serves each version
//! of the certificate's Secret that the holder writes, until the Lease comes to it.
//! The versions arrive as a stream passed in (kube-runtime style: production gives
//! the Secret's watch, tests a fixed list).

use std::fmt::Display;

use crate::shutdown::Shutdown;
use futures_util::{Stream, StreamExt};

use super::lease::Leadership;
use super::state_dir::Stored;

/// How following ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Followed {
    /// This replica holds the Lease now.
    Leading,
    /// Shutdown, or the election ended.
    Stopped,
}

/// Hands every stored version to `adopt` until this replica leads or shutdown. A
/// watch error is logged (the watcher retries with backoff); a stream that ends
/// leaves this replica waiting for the Lease alone.
pub async fn follow<S, E>(
    name: &str,
    leader: &mut Leadership,
    versions: S,
    shutdown: &Shutdown,
    mut adopt: impl FnMut(Stored),
) -> Followed
where
    S: Stream<Item = Result<Option<Stored>, E>> + Unpin,
    E: Display,
{
    let mut versions = versions.fuse();
    loop {
        if *leader.borrow_and_update() {
            return Followed::Leading;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Followed::Stopped,
            changed = leader.changed() => {
                if changed.is_err() {
                    return Followed::Stopped;
                }
            }
            Some(version) = versions.next() => match version {
                Ok(Some(stored)) => adopt(stored),
                // The Secret exists without a certificate pair: nothing to serve yet.
                Ok(None) => {}
                Err(e) => tracing::warn!(certificate = %name, error = %e, "watching the stored certificate failed; retrying"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::watch;

    use super::*;
    use crate::pki::KeyBytes;

    fn stored(tag: &str) -> Stored {
        Stored { chain_pem: tag.as_bytes().to_vec(), key_pem: KeyBytes::new(b"k".to_vec()), ca_pem: Vec::new() }
    }

    fn list(
        items: Vec<Result<Option<Stored>, &'static str>>,
    ) -> impl Stream<Item = Result<Option<Stored>, &'static str>> + Unpin {
        futures_util::stream::iter(items)
    }

    #[tokio::test(start_paused = true)]
    async fn acme_follower_serves_each_version_until_it_leads() {
        let (tx, mut rx) = watch::channel(false);
        let shutdown = Shutdown::new();
        let mut seen = Vec::new();
        let versions = list(vec![Ok(Some(stored("one"))), Ok(None), Err("watch broke"), Ok(Some(stored("two")))])
            .chain(futures_util::stream::pending());
        let lead = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            tx.send_replace(true);
        };
        let (followed, ()) =
            tokio::join!(follow("web", &mut rx, Box::pin(versions), &shutdown, |s| seen.push(s.chain_pem)), lead);
        assert_eq!(followed, Followed::Leading);
        assert_eq!(seen, [b"one".to_vec(), b"two".to_vec()]);
    }

    #[tokio::test(start_paused = true)]
    async fn acme_follower_returns_at_once_when_leading_and_stops_on_shutdown() {
        let (_tx, mut rx) = watch::channel(true);
        let shutdown = Shutdown::new();
        let mut adopted = 0;
        let followed = follow("web", &mut rx, list(vec![Ok(Some(stored("x")))]), &shutdown, |_| adopted += 1).await;
        assert_eq!((followed, adopted), (Followed::Leading, 0), "a holder serves nothing from the Secret");

        // A stream that ends leaves the follower waiting for the Lease or shutdown.
        let (tx, mut rx) = watch::channel(false);
        let stop = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            shutdown.trigger();
        };
        let (followed, ()) = tokio::join!(follow("web", &mut rx, list(vec![]), &shutdown, |_| {}), stop);
        assert_eq!(followed, Followed::Stopped);
        drop(tx);

        // The election ended (its sender dropped): stop too.
        let (tx, mut rx) = watch::channel(false);
        drop(tx);
        let running = Shutdown::new();
        assert_eq!(follow("web", &mut rx, list(vec![]), &running, |_| {}).await, Followed::Stopped);
    }
}
