//! The watch loop fed with fixed watcher events under a paused clock: what the store
//! serves, what it pushes (a change of version wakes a subscriber), and readiness.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::shutdown::Shutdown;
use futures_util::stream;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use kube::runtime::watcher::Event;

use super::Watch;
use crate::health::Health;
use crate::ingest::Intake;
use crate::metrics::Metrics;
use crate::store::Store;

const NS: &str = "edge";

fn tls_secret(name: &str, host: &str) -> Secret {
    let ck = rcgen::generate_simple_self_signed(vec![host.to_owned()]).unwrap();
    let data = BTreeMap::from([
        ("tls.crt".to_owned(), ByteString(ck.cert.pem().into_bytes())),
        ("tls.key".to_owned(), ByteString(ck.signing_key.serialize_pem().into_bytes())),
    ]);
    Secret {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(NS.into()), ..Default::default() },
        data: Some(data),
        type_: Some("kubernetes.io/tls".into()),
        ..Default::default()
    }
}

/// A store and one source registered in it; each watch started here reports to that
/// source, as the watches of one `start` do.
struct Fixture {
    store: Arc<Store>,
    health: Arc<Health>,
    intake: Intake,
}

impl Fixture {
    fn new() -> Self {
        let store = Arc::new(Store::new());
        let intake =
            Intake::new(store.clone(), Arc::new(Metrics::new()), "kubernetes", crate::policy::AllowExpired::Never);
        Self { store, health: Arc::new(Health::default()), intake }
    }

    fn watch(&self) -> Watch {
        Watch::new(self.intake.clone(), NS.into(), self.health.clone(), "kubernetes:edge".into())
    }

    /// Runs a watch over `events` to their end.
    async fn feed(&self, events: Vec<Event<Secret>>) {
        self.watch().run(stream::iter(events.into_iter().map(Ok)), Shutdown::new()).await;
    }

    fn version(&self, name: &str) -> Option<String> {
        self.store.get(name).map(|served| served.version.to_string())
    }
}

fn list(secrets: &[&Secret]) -> Vec<Event<Secret>> {
    let mut events = vec![Event::Init];
    events.extend(secrets.iter().map(|s| Event::InitApply((*s).clone())));
    events.push(Event::InitDone);
    events
}

#[tokio::test(start_paused = true)]
async fn not_ready_until_the_first_list_is_complete() {
    let f = Fixture::new();
    let web = tls_secret("web", "web.test");
    f.feed(vec![Event::Init, Event::InitApply(web.clone())]).await;
    let reasons = f.health.check().unwrap_err();
    assert!(reasons[0].contains("waiting for the first list"), "{reasons:?}");
    assert!(f.version("kubernetes://edge/web").is_some(), "what was listed is served meanwhile");
    f.feed(list(&[&web])).await;
    assert!(f.health.check().is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_relist_of_the_same_secrets_pushes_nothing() {
    let f = Fixture::new();
    let (web, api) = (tls_secret("web", "web.test"), tls_secret("api", "api.test"));
    let mut events = list(&[&web, &api]);
    // A dropped watch or a 410 Gone: kube-runtime lists again.
    events.extend(list(&[&web, &api]));
    let watch = f.watch();
    let mut web_rx = f.store.subscribe("web");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(watch.run(tokio_stream::wrappers::UnboundedReceiverStream::new(rx), Shutdown::new()));
    let mut events = events.into_iter();
    for event in events.by_ref().take(4) {
        tx.send(Ok(event)).unwrap();
    }
    web_rx.wait_for(Option::is_some).await.unwrap();
    web_rx.borrow_and_update();
    for event in events {
        tx.send(Ok(event)).unwrap();
    }
    drop(tx);
    task.await.unwrap();
    assert!(!web_rx.has_changed().unwrap(), "the relist changed nothing, so nothing is pushed");
    assert!(f.version("api").is_some() && f.version("kubernetes://edge/api").is_some());
}

#[tokio::test(start_paused = true)]
async fn a_secret_missing_from_a_relist_is_withdrawn_the_others_stay() {
    let f = Fixture::new();
    let (web, api) = (tls_secret("web", "web.test"), tls_secret("api", "api.test"));
    let mut events = list(&[&web, &api]);
    // Deleted while the watch was down: the relist is the only news of it.
    events.extend(list(&[&web]));
    f.feed(events).await;
    for name in ["kubernetes://edge/api", "kubernetes://api", "api"] {
        assert!(f.version(name).is_none(), "{name} withdrawn");
    }
    assert!(f.version("web").is_some());
}

#[tokio::test(start_paused = true)]
async fn a_change_or_a_delete_is_applied_at_once_and_errors_change_nothing() {
    let f = Fixture::new();
    let web = tls_secret("web", "web.test");
    let rotated = tls_secret("web", "web.test");
    let mut events = list(&[&web]);
    f.feed(events.clone()).await;
    let first = f.version("web").unwrap();
    events.push(Event::Apply(rotated));
    f.feed(events.clone()).await;
    let second = f.version("web").unwrap();
    assert_ne!(first, second);

    let watch = f.watch();
    let failing = stream::iter(
        events
            .into_iter()
            .map(Ok)
            .chain([Err(kube::runtime::watcher::Error::NoResourceVersion), Ok(Event::Delete(web))]),
    );
    watch.run(failing, Shutdown::new()).await;
    assert!(f.version("web").is_none(), "deleted");
}

/// The INFO lines of "secret ..." events logged while `f` runs (this thread only).
async fn info_lines<F: Future<Output = ()>>(f: F) -> Vec<String> {
    use tracing_subscriber::layer::SubscriberExt as _;

    #[derive(Clone, Default)]
    struct Lines(Arc<std::sync::Mutex<Vec<String>>>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Lines {
        fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            let mut message = Message(String::new());
            event.record(&mut message);
            if *event.metadata().level() == tracing::Level::INFO && message.0.starts_with("secret ") {
                self.0.lock().unwrap().push(message.0);
            }
        }
    }
    let lines = Lines::default();
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(lines.clone()));
    f.await;
    lines.0.lock().unwrap().clone()
}

#[tokio::test(start_paused = true)]
async fn the_first_list_logs_a_summary_and_a_change_one_line_whatever_its_aliases() {
    let f = Fixture::new();
    let secrets: Vec<Secret> = (0..20).map(|i| tls_secret(&format!("s{i}"), "s.test")).collect();
    let mut events = list(&secrets.iter().collect::<Vec<_>>());
    let loaded = info_lines(f.feed(events.clone())).await;
    assert_eq!(loaded, Vec::<String>::new(), "20 Secrets in the default namespace (60 names) listed quietly");
    assert!(f.version("s7").is_some());

    events.push(Event::Apply(tls_secret("s7", "s.test")));
    let changed = info_lines(f.feed(events)).await;
    assert_eq!(changed, ["secret updated"], "one line for kubernetes://edge/s7, kubernetes://s7 and s7");
}

fn ca_pem(cn: &str) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
}

fn with_ca(mut secret: Secret, ca_pem: &str) -> Secret {
    secret.data.get_or_insert_default().insert("ca.crt".into(), ByteString(ca_pem.as_bytes().to_vec()));
    secret
}

/// A Secret holding only `ca.crt`.
fn ca_secret(name: &str, ca_pem: &str) -> Secret {
    let mut secret = tls_secret(name, "unused.test");
    secret.data = None;
    with_ca(secret, ca_pem)
}

/// The fingerprint of what the store serves as `name`.
fn fingerprint(f: &Fixture, name: &str) -> Option<String> {
    crate::pki::identity(&f.store.get(name)?.resource).fingerprint_sha256
}

fn fingerprint_of(ca_pem: &str) -> String {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &der))
}

#[tokio::test(start_paused = true)]
async fn a_separate_name_cacert_secret_wins_over_the_ca_of_name_and_gives_it_back() {
    let f = Fixture::new();
    let (own, separate, renewed) = (ca_pem("own"), ca_pem("separate"), ca_pem("renewed"));
    let web = with_ca(tls_secret("web", "web.test"), &own);
    let mut events = list(&[&web]);
    f.feed(events.clone()).await;
    let names = ["web-cacert", "kubernetes://web-cacert", "kubernetes://edge/web-cacert"];
    for name in names {
        assert_eq!(fingerprint(&f, name), Some(fingerprint_of(&own)), "{name}: web's own ca.crt");
    }

    // Istio's GetCaCert: the Secret web-cacert wins, under every alias.
    events.push(Event::Apply(ca_secret("web-cacert", &separate)));
    f.feed(events.clone()).await;
    for name in names {
        assert_eq!(fingerprint(&f, name), Some(fingerprint_of(&separate)), "{name}: the separate Secret");
    }
    assert!(f.version("web-cacert-cacert").is_some(), "as Istio: its own CA name too");
    assert!(f.version("web").is_some(), "web's pair is untouched");

    // web's CA changes meanwhile: web-cacert stays the separate one.
    events.push(Event::Apply(with_ca(tls_secret("web", "web.test"), &renewed)));
    f.feed(events.clone()).await;
    assert_eq!(fingerprint(&f, "web-cacert"), Some(fingerprint_of(&separate)));

    // The separate Secret goes: web's current CA is served again.
    events.push(Event::Delete(ca_secret("web-cacert", &separate)));
    f.feed(events.clone()).await;
    for name in names {
        assert_eq!(fingerprint(&f, name), Some(fingerprint_of(&renewed)), "{name}: web's ca.crt again");
    }
    assert!(f.version("web-cacert-cacert").is_none());

    // In the other order (the separate Secret listed first), it wins too.
    let g = Fixture::new();
    g.feed(list(&[&ca_secret("web-cacert", &separate), &web])).await;
    assert_eq!(fingerprint(&g, "web-cacert"), Some(fingerprint_of(&separate)));
    // And deleting web leaves the separate CA alone.
    let mut events = list(&[&ca_secret("web-cacert", &separate), &web]);
    events.push(Event::Delete(web.clone()));
    g.feed(events).await;
    assert_eq!(fingerprint(&g, "web-cacert"), Some(fingerprint_of(&separate)));
    assert!(g.version("web").is_none());
}
