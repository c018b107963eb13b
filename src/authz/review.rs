//! Istio's rule, as istiod applies it: a proxy may read the Secrets of its own namespace
//! if a SubjectAccessReview says its service account may `list` (or `get`) `secrets`
//! there. Answers are cached per service account (grants ~5 min, denials ~1 min) and
//! re-asked when they expire while a stream still uses them; a changed answer reaches
//! every stream through the grant's watch, so a revoked grant stops pushes within its
//! TTL and nothing is decided per push.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::shutdown::Shutdown;
use dashmap::DashMap;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Decision, Reason};

/// Asks the API server. A trait so that the cache is tested without one.
pub trait Reviewer: Send + Sync + 'static {
    /// `Ok(None)`: allowed; `Ok(Some(why))`: denied; `Err`: no answer.
    fn review(&self, namespace: &str, service_account: &str) -> ReviewFuture;
}

pub type ReviewFuture = Pin<Box<dyn Future<Output = Result<Option<String>, String>> + Send>>;

#[derive(Debug, Clone)]
pub struct Ttls {
    pub allow: Duration,
    pub deny: Duration,
}

/// The service accounts' grants, shared by every stream.
pub struct Reviews {
    reviewer: Arc<dyn Reviewer>,
    ttls: Ttls,
    grants: DashMap<(String, String), Arc<Grant>>,
}

struct Grant {
    tx: watch::Sender<Decision>,
    /// When to ask again; `None` while a review is under way.
    next: Mutex<Option<Instant>>,
}

impl Reviews {
    pub fn new(reviewer: Arc<dyn Reviewer>, ttls: Ttls) -> Arc<Self> {
        Arc::new(Self { reviewer, ttls, grants: DashMap::new() })
    }

    /// The grant of `ns/sa`: its current decision, and every change to it. The first
    /// caller starts the review; until it answers the decision is `Pending`.
    pub fn grant(self: &Arc<Self>, namespace: &str, service_account: &str) -> watch::Receiver<Decision> {
        let key = (namespace.to_owned(), service_account.to_owned());
        let mut fresh = false;
        let grant = self
            .grants
            .entry(key.clone())
            .or_insert_with(|| {
                fresh = true;
                Arc::new(Grant { tx: watch::channel(Decision::Pending).0, next: Mutex::new(None) })
            })
            .clone();
        let rx = grant.tx.subscribe();
        if fresh {
            tokio::spawn(self.clone().ask(key, grant));
        }
        rx
    }

    /// Reviews once and publishes the answer. A failed review keeps an earlier answer
    /// (an API server restart must not withdraw every certificate) and denies when
    /// there is none; either way it is asked again after the denial TTL.
    async fn ask(self: Arc<Self>, key: (String, String), grant: Arc<Grant>) {
        let answer = self.reviewer.review(&key.0, &key.1).await;
        let (decision, ttl) = match answer {
            Ok(None) => (Decision::Allow, self.ttls.allow),
            Ok(Some(why)) => {
                (Decision::Deny(Reason::new("review", format!("SubjectAccessReview denied: {why}"))), self.ttls.deny)
            }
            Err(e) => {
                tracing::warn!(namespace = %key.0, service_account = %key.1, error = %e, "SubjectAccessReview failed");
                let kept = !matches!(*grant.tx.borrow(), Decision::Pending);
                if kept {
                    *grant.next.lock().expect("grant lock") = Some(Instant::now() + self.ttls.deny);
                    return;
                }
                (
                    Decision::Deny(Reason::new("review_error", format!("SubjectAccessReview failed: {e}"))),
                    self.ttls.deny,
                )
            }
        };
        grant.tx.send_if_modified(|current| {
            if *current == decision {
                return false;
            }
            tracing::info!(namespace = %key.0, service_account = %key.1, decision = ?decision, "grant changed");
            *current = decision;
            true
        });
        *grant.next.lock().expect("grant lock") = Some(Instant::now() + ttl);
    }

    /// One pass of the refresher: grants no stream holds are dropped, expired ones
    /// asked again. Returns how many reviews it started.
    pub fn refresh(self: &Arc<Self>) -> usize {
        let now = Instant::now();
        // Kept while a stream holds it or its answer is fresh: a proxy that reconnects
        // within the TTL is not reviewed again.
        self.grants
            .retain(|_, g| g.tx.receiver_count() > 0 || g.next.lock().expect("grant lock").is_none_or(|at| at > now));
        let due: Vec<_> = self
            .grants
            .iter()
            .filter(|e| {
                let mut next = e.value().next.lock().expect("grant lock");
                match *next {
                    Some(at) if at <= now => {
                        *next = None;
                        true
                    }
                    _ => false,
                }
            })
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        let started = due.len();
        for (key, grant) in due {
            tokio::spawn(self.clone().ask(key, grant));
        }
        started
    }

    /// Runs the refresher until shutdown, a tenth of the shorter TTL apart (at least
    /// 100 ms), so an answer is asked again at most 10 % after it expired.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let tick = (self.ttls.allow.min(self.ttls.deny) / 10).max(Duration::from_millis(100));
        let mut every = tokio::time::interval(tick);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => { self.refresh(); }
            }
        }
    }

    pub fn cached(&self) -> usize {
        self.grants.len()
    }
}

/// The reviewer that asks a Kubernetes API server.
pub struct KubeReviewer {
    pub client: kube::Client,
    /// `list` as istiod; `get` is accepted for clusters whose Roles grant only that.
    pub verb: String,
}

impl Reviewer for KubeReviewer {
    fn review(&self, namespace: &str, service_account: &str) -> ReviewFuture {
        use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
        let user = format!("system:serviceaccount:{namespace}:{service_account}");
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{namespace}"),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_owned()),
                    verb: Some(self.verb.clone()),
                    resource: Some("secrets".into()),
                    version: Some("v1".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: kube::Api<SubjectAccessReview> = kube::Api::all(self.client.clone());
        Box::pin(async move {
            let answer =
                api.create(&Default::default(), &review).await.map_err(|e| format!("{e}"))?.status.unwrap_or_default();
            if answer.allowed {
                Ok(None)
            } else {
                let why = answer.reason.filter(|r| !r.is_empty()).or(answer.evaluation_error);
                Ok(Some(why.unwrap_or_else(|| "no RBAC rule allows it".into())))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Answers from a table the test changes; counts questions.
    #[derive(Default)]
    struct Fake {
        allowed: Mutex<HashMap<String, Result<bool, String>>>,
        asked: AtomicUsize,
    }

    impl Reviewer for Arc<Fake> {
        fn review(&self, namespace: &str, service_account: &str) -> ReviewFuture {
            self.asked.fetch_add(1, Ordering::SeqCst);
            let answer = self.allowed.lock().unwrap().get(&format!("{namespace}/{service_account}")).cloned();
            Box::pin(async move {
                match answer {
                    Some(Ok(true)) => Ok(None),
                    Some(Err(e)) => Err(e),
                    _ => Ok(Some("not bound".into())),
                }
            })
        }
    }

    fn setup() -> (Arc<Fake>, Arc<Reviews>) {
        let fake = Arc::new(Fake::default());
        let ttls = Ttls { allow: Duration::from_secs(300), deny: Duration::from_secs(60) };
        (fake.clone(), Reviews::new(Arc::new(fake), ttls))
    }

    async fn settle(rx: &mut watch::Receiver<Decision>) -> Decision {
        rx.wait_for(|d| *d != Decision::Pending).await.unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn one_review_per_service_account_shared_by_streams() {
        let (fake, reviews) = setup();
        fake.allowed.lock().unwrap().insert("gw/ingress".into(), Ok(true));
        let mut a = reviews.grant("gw", "ingress");
        let mut b = reviews.grant("gw", "ingress");
        assert_eq!(settle(&mut a).await, Decision::Allow);
        assert_eq!(settle(&mut b).await, Decision::Allow);
        let mut other = reviews.grant("gw", "other");
        assert!(matches!(settle(&mut other).await, Decision::Deny(r) if r.code == "review"));
        assert_eq!(fake.asked.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoked_grant_is_seen_after_the_allow_ttl_and_a_new_one_after_the_deny_ttl() {
        let (fake, reviews) = setup();
        fake.allowed.lock().unwrap().insert("gw/ingress".into(), Ok(true));
        let mut rx = reviews.grant("gw", "ingress");
        assert_eq!(settle(&mut rx).await, Decision::Allow);
        fake.allowed.lock().unwrap().insert("gw/ingress".into(), Ok(false));
        tokio::time::advance(Duration::from_secs(299)).await;
        assert_eq!(reviews.refresh(), 0, "not expired yet");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(reviews.refresh(), 1);
        rx.changed().await.unwrap();
        assert!(matches!(&*rx.borrow(), Decision::Deny(_)));
        fake.allowed.lock().unwrap().insert("gw/ingress".into(), Ok(true));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(reviews.refresh(), 1, "denials are asked again sooner");
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), Decision::Allow);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_deny_at_first_and_keep_an_earlier_answer_later() {
        let (fake, reviews) = setup();
        fake.allowed.lock().unwrap().insert("gw/a".into(), Err("connection refused".into()));
        let mut rx = reviews.grant("gw", "a");
        assert!(matches!(settle(&mut rx).await, Decision::Deny(r) if r.code == "review_error"));

        fake.allowed.lock().unwrap().insert("gw/b".into(), Ok(true));
        let mut rx = reviews.grant("gw", "b");
        assert_eq!(settle(&mut rx).await, Decision::Allow);
        fake.allowed.lock().unwrap().insert("gw/b".into(), Err("timeout".into()));
        tokio::time::advance(Duration::from_secs(301)).await;
        reviews.refresh();
        tokio::task::yield_now().await;
        assert_eq!(*rx.borrow(), Decision::Allow, "an API outage does not withdraw grants");
        assert!(!rx.has_changed().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn grants_nobody_holds_are_dropped() {
        let (fake, reviews) = setup();
        fake.allowed.lock().unwrap().insert("gw/a".into(), Ok(true));
        let mut rx = reviews.grant("gw", "a");
        settle(&mut rx).await;
        assert_eq!(reviews.cached(), 1);
        drop(rx);
        tokio::time::advance(Duration::from_secs(301)).await;
        assert_eq!(reviews.refresh(), 0, "no review for a grant nobody holds");
        assert_eq!(reviews.cached(), 0);
    }
}
