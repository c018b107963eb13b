//! The follower under tokio's paused clock, two replicas on one state directory, and how
//! authorization treats ticket names.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use prost::Message as _;

use super::*;
use crate::store::Store;

const T0: u64 = 1_800_000_000_000;

fn ticket(root: &std::path::Path) -> Ticket {
    Ticket {
        name: "gw-tickets".into(),
        schedule: Schedule { rotate_every: Duration::from_secs(100), keep: 1, propagation: Duration::from_secs(10) },
        state: StateAt::Dir(root.to_path_buf()),
        reread_every: Duration::from_secs(2),
    }
}

fn root_of(ticket: &Ticket) -> std::path::PathBuf {
    match &ticket.state {
        StateAt::Dir(path) => path.clone(),
        other => panic!("not a directory: {other}"),
    }
}

struct Replica {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

impl Replica {
    fn new() -> Self {
        Self { store: Arc::new(Store::new()), metrics: Arc::new(Metrics::new()) }
    }

    fn follower(&self, ticket: Ticket) -> Follower {
        let intake =
            Intake::new(self.store.clone(), self.metrics.clone(), "tickets", crate::policy::AllowExpired::Never);
        let backend = Backend::Dir(DirState::new(root_of(&ticket), &ticket.name));
        Follower::new(ticket, backend, intake, self.metrics.clone(), Clock::anchored(T0))
    }

    /// The keys as served to Envoy, in order.
    fn keys(&self) -> Vec<Vec<u8>> {
        let served = self.store.get("gw-tickets").expect("served");
        let secret = Secret::decode(&served.resource[..]).unwrap();
        let Some(secret::Type::SessionTicketKeys(keys)) = secret.r#type else { panic!("not ticket keys") };
        keys.keys
            .into_iter()
            .map(|k| match k.specifier {
                Some(Specifier::InlineBytes(b)) => b,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn rotations(&self) -> u64 {
        self.metrics.ticket_key_rotations.get_or_create(&SecretLabel { secret: "gw-tickets".into() }).get()
    }

    fn errors(&self) -> u64 {
        self.metrics.ticket_state_errors.get_or_create(&SecretLabel { secret: "gw-tickets".into() }).get()
    }
}

async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never: {what}");
}

#[tokio::test(start_paused = true)]
async fn two_replicas_serve_the_same_keys_through_every_step() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("state");
    let (a, b) = (Replica::new(), Replica::new());
    let shutdown = Shutdown::new();
    let mut fa = a.follower(ticket(&root));
    let next = fa.step().await.unwrap();
    assert_eq!(next, T0 + 90_000, "staging is due propagation before the rotation");
    let mut fb = b.follower(ticket(&root));
    fb.step().await.unwrap();
    let first = a.keys();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].len(), 80);
    assert_eq!(b.keys(), first, "the second replica serves the first one's key");
    tokio::spawn(fa.run(next, shutdown.clone()));
    tokio::spawn(fb.run(next, shutdown.clone()));

    // Staged: the next key is served by both, last (decrypt-only).
    tokio::time::sleep(Duration::from_secs(91)).await;
    until("staged on both", || a.keys().len() == 2 && b.keys().len() == 2).await;
    let staged = a.keys();
    assert_eq!(staged[0], first[0], "the active key still encrypts");
    assert_eq!(b.keys(), staged);

    // Promoted: the staged key encrypts, the old one decrypts.
    tokio::time::sleep(Duration::from_secs(10)).await;
    until("promoted on both", || a.keys()[0] == staged[1] && b.keys()[0] == staged[1]).await;
    assert_eq!(a.keys(), vec![staged[1].clone(), first[0].clone()]);
    assert_eq!(b.keys(), a.keys());
    assert_eq!(a.rotations() + b.rotations(), 1, "one replica wrote the rotation");

    // A restarted replica (fresh store) reads the same keys and writes nothing.
    let c = Replica::new();
    let state_file = std::fs::read(root.join(dir::KEYS_FILE)).unwrap();
    c.follower(ticket(&root)).step().await.unwrap();
    assert_eq!(c.keys(), a.keys());
    assert_eq!(std::fs::read(root.join(dir::KEYS_FILE)).unwrap(), state_file, "a restart rotates nothing");
    assert_eq!(c.rotations(), 0);

    // Another rotation: with keep = 1 the first key is gone.
    tokio::time::sleep(Duration::from_secs(101)).await;
    until("second rotation", || a.keys().len() == 2 && a.keys()[1] == staged[1]).await;
    assert!(!a.keys().contains(&first[0]));
    until("b follows", || b.keys() == a.keys()).await;
    assert_eq!(a.rotations() + b.rotations(), 2);
    shutdown.trigger();
}

#[tokio::test(start_paused = true)]
async fn a_corrupt_state_is_reported_once_and_the_last_good_keys_stay() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("state");
    let a = Replica::new();
    let mut f = a.follower(ticket(&root));
    f.step().await.unwrap();
    let good = a.keys();

    // Someone truncates the keys file in the payload directory.
    let payload = root.join(std::fs::read_link(root.join("..data")).unwrap());
    let keys_path = payload.join(dir::KEYS_FILE);
    std::fs::remove_file(&keys_path).unwrap();
    std::fs::write(&keys_path, [1u8; 50]).unwrap();
    let err = f.step().await.unwrap_err();
    assert!(err.to_string().contains(&keys_path.display().to_string()), "{err}");
    f.step().await.unwrap_err();
    assert_eq!(a.errors(), 1, "counted once while it stays broken");
    assert_eq!(a.keys(), good, "the last good keys stay served");
    let status = a.store.status().into_iter().find(|s| s.name == "gw-tickets").unwrap();
    let last_error = status.last_error.unwrap();
    assert!(last_error.contains("50 bytes") && last_error.contains("ticket state"), "{last_error}");
    assert_eq!(std::fs::read(&keys_path).unwrap(), [1u8; 50], "not overwritten");

    // A file over the size bound is not read whole, and the limit is counted.
    std::fs::remove_file(&keys_path).unwrap();
    std::fs::write(&keys_path, vec![0u8; (dir::MAX_KEYS + 1) * KEY_LEN]).unwrap();
    assert_eq!(f.step().await.unwrap_err().reason(), "too_large");
    assert_eq!(a.metrics.limits_hit.get_or_create(&LimitLabel { limit: "ticket_state_bytes" }).get(), 1);
    assert_eq!(a.errors(), 2);
    assert_eq!(a.keys(), good);

    // Repaired by moving the directory away: new keys, the error cleared.
    std::fs::rename(&root, tmp.path().join("broken")).unwrap();
    f.step().await.unwrap();
    assert_ne!(a.keys(), good);
    let status = a.store.status().into_iter().find(|s| s.name == "gw-tickets").unwrap();
    assert!(status.last_error.is_none(), "{:?}", status.last_error);
}

/// A state that cannot be read when certwire starts (here: a keys file certwire did not
/// write) is reported and retried, and does not fail the start: on a shared volume it
/// would keep every restarting replica down, with every other secret it serves.
#[tokio::test(start_paused = true)]
async fn an_unreadable_state_at_start_is_reported_and_retried_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("state");
    std::fs::create_dir(&root).unwrap();
    let foreign = root.join(dir::KEYS_FILE);
    std::fs::write(&foreign, [9u8; 80]).unwrap();
    let a = Replica::new();
    let intake = Intake::new(a.store.clone(), a.metrics.clone(), "tickets", crate::policy::AllowExpired::Never);
    let shutdown = Shutdown::new();
    start(vec![ticket(&root)], intake, a.metrics.clone(), None, shutdown.clone()).await.expect("starts anyway");

    assert!(a.store.get("gw-tickets").is_none(), "nothing served from a foreign state");
    let status = a.store.status().into_iter().find(|s| s.name == "gw-tickets").expect("in status");
    let last_error = status.last_error.expect("last_error");
    assert!(last_error.contains(&foreign.display().to_string()) && last_error.contains("not written by certwire"));
    assert_eq!(a.errors(), 1);
    assert_eq!(std::fs::read(&foreign).unwrap(), [9u8; 80], "not overwritten");

    // Moved away: the next re-read makes the keys.
    std::fs::remove_file(&foreign).unwrap();
    until("served after the repair", || a.store.get("gw-tickets").is_some()).await;
    assert_eq!(a.keys().len(), 1);
    assert_eq!(a.errors(), 1, "reported once");
    shutdown.trigger();
}

fn config(name: &str) -> TicketsConfig {
    TicketsConfig {
        name: name.into(),
        rotate_every: None,
        keep: None,
        propagation: None,
        state: "/var/lib/certwire/tickets".into(),
        reread_every: None,
    }
}

#[test]
fn defaults_and_bounds() {
    use crate::authz::Mode;
    let t = &resolve(&[config("gw")], Mode::Open).unwrap()[0];
    assert_eq!(t.schedule, Schedule { rotate_every: DEFAULT_ROTATE_EVERY, keep: 2, propagation: DEFAULT_PROPAGATION });
    assert_eq!(t.reread_every, Duration::from_secs(30));
    let short = TicketsConfig { rotate_every: Some(Duration::from_secs(4)), ..config("gw") };
    let t = &resolve(&[short], Mode::Open).unwrap()[0];
    assert_eq!(t.schedule.propagation, Duration::from_secs(1), "a quarter of a short rotate_every");
    assert_eq!(t.reread_every, Duration::from_millis(250));

    let err = |c: TicketsConfig| resolve(&[c], Mode::Open).unwrap_err();
    assert!(err(TicketsConfig { rotate_every: Some(Duration::from_millis(500)), ..config("gw") }).contains("at least"));
    assert!(err(TicketsConfig { keep: Some(0), ..config("gw") }).contains("keep = 0"));
    assert!(err(TicketsConfig { keep: Some(17), ..config("gw") }).contains("keep = 17"));
    assert!(
        err(TicketsConfig {
            rotate_every: Some(Duration::from_secs(60)),
            propagation: Some(Duration::from_secs(60)),
            ..config("gw")
        })
        .contains("shorter than rotate_every")
    );
    assert!(err(TicketsConfig { state: "kubernetes://ns".into(), ..config("gw") }).contains("NAMESPACE/NAME"));
    assert!(err(TicketsConfig { state: "s3://bucket".into(), ..config("gw") }).contains("directory path"));
    let t = &resolve(&[TicketsConfig { state: "kubernetes://ns/s".into(), ..config("gw") }], Mode::Open).unwrap()[0];
    assert_eq!(t.state, StateAt::Secret { namespace: "ns".into(), name: "s".into() });
    let twice = resolve(&[config("a"), config("b")], Mode::Open).unwrap_err();
    assert!(twice.contains("already the state of \"a\""), "{twice}");
    let many: Vec<_> =
        (0..=MAX_NAMES).map(|i| TicketsConfig { state: format!("/s/{i}"), ..config(&format!("n{i}")) }).collect();
    assert!(resolve(&many, Mode::Open).unwrap_err().contains("at most 64"));
}

#[test]
fn kubernetes_mode_refuses_names_istios_rule_would_decide() {
    use crate::authz::Mode;
    for name in [
        "gw-tickets",
        "kubernetes://gw/tickets",
        "kubernetes://tickets",
        // Decided by the Gateway API rule (the proxy's service account), not by a rule.
        "kubernetes-gateway://gw/tickets",
        "kubernetes-gateway://gw/tickets-cacert",
    ] {
        let err = resolve(&[config(name)], Mode::Kubernetes).unwrap_err();
        assert!(err.contains("tickets://") && err.contains("[[authz.rules]]"), "{err}");
        assert!(!err.contains("tickets://gw/"), "the suggestion is a plain tickets://NAME: {err}");
        assert!(resolve(&[config(name)], Mode::Policy).is_ok());
    }
    assert!(resolve(&[config("tickets://gw")], Mode::Kubernetes).is_ok());
}

/// What the authorizer says of a `tickets://` name in `kubernetes` mode: not a Secret,
/// so denied unless a rule allows it, whatever the proxy's service account may read.
#[test]
fn a_ticket_name_is_denied_in_kubernetes_mode_unless_a_rule_allows_it() {
    use crate::authz::identity::{Identity, Workload};
    use crate::authz::policy::{Action, Rule};
    use crate::authz::review::{ReviewFuture, Reviewer, Reviews, Ttls};
    use crate::authz::{Authorizer, Mode, Verdict};

    struct AllowAll;
    impl Reviewer for AllowAll {
        fn review(&self, _: &str, _: &str) -> ReviewFuture {
            Box::pin(async { Ok(None) })
        }
    }
    let reviews =
        Reviews::new(Arc::new(AllowAll), Ttls { allow: Duration::from_secs(60), deny: Duration::from_secs(60) });
    let gateway = Identity::Spiffe {
        id: "spiffe://cluster.local/ns/gw/sa/ingress".into(),
        workload: Some(Workload { namespace: "gw".into(), service_account: "ingress".into() }),
    };
    let other = Identity::Spiffe {
        id: "spiffe://cluster.local/ns/gw/sa/app".into(),
        workload: Some(Workload { namespace: "gw".into(), service_account: "app".into() }),
    };
    let metrics = Arc::new(Metrics::new());
    let no_rules = Authorizer::new(Mode::Kubernetes, Vec::new(), "gw".into(), Some(reviews.clone()), metrics.clone());
    match no_rules.decide(&gateway, "tickets://gw") {
        Verdict::Deny(reason) => assert_eq!(reason.code, "not_kubernetes"),
        _ => panic!("a ticket name must not be decided by the SubjectAccessReview"),
    }
    let rule = Rule {
        identities: vec!["spiffe://cluster.local/ns/gw/sa/ingress".into()],
        secrets: vec!["tickets://gw".into()],
        action: Action::Allow,
    };
    let with_rule = Authorizer::new(Mode::Kubernetes, vec![rule.clone()], "gw".into(), Some(reviews), metrics.clone());
    assert!(matches!(with_rule.decide(&gateway, "tickets://gw"), Verdict::Allow));
    assert!(matches!(with_rule.decide(&other, "tickets://gw"), Verdict::Deny(_)), "only the identity the rule names");

    let policy = Authorizer::new(Mode::Policy, Vec::new(), String::new(), None, metrics.clone());
    assert!(matches!(policy.decide(&gateway, "gw-tickets"), Verdict::Deny(_)), "policy: default deny");
    let policy = Authorizer::new(Mode::Policy, vec![rule], String::new(), None, metrics);
    assert!(matches!(policy.decide(&gateway, "tickets://gw"), Verdict::Allow));
}

#[test]
fn the_config_file_takes_tickets_tables() {
    let text = r#"
[[tickets]]
name = "gateway-session-tickets"
rotate_every = "12h"
keep = 2
propagation = "10m"
state = "/var/lib/certwire/tickets"
"#;
    let file: crate::config::FileConfig = toml::from_str(text).unwrap();
    let tickets = resolve(&file.tickets.unwrap(), crate::authz::Mode::Policy).unwrap();
    assert_eq!(tickets[0].schedule.propagation, Duration::from_secs(600));
    assert_eq!(tickets[0].reread_every, Duration::from_secs(30));
    let unknown = toml::from_str::<crate::config::FileConfig>(&text.replace("keep", "kept")).unwrap_err();
    assert!(unknown.to_string().contains("kept"), "{unknown}");
}
