use super::*;
use std::os::unix::fs::symlink;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;

use crate::metrics::{Metrics, RejectLabel};
use crate::pki::SecretKind;
use crate::store::{Current, Store};

const PATIENCE: Duration = Duration::from_secs(10);

struct Pair {
    cert: String,
    key: String,
    fingerprint: String,
}

fn pair(host: &str) -> Pair {
    let ck = rcgen::generate_simple_self_signed(vec![host.to_owned()]).unwrap();
    Pair {
        cert: ck.cert.pem(),
        key: ck.signing_key.serialize_pem(),
        fingerprint: hex::encode(ring::digest::digest(&ring::digest::SHA256, ck.cert.der())),
    }
}

fn ca_pem() -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
}

/// Updates `dir` the way the kubelet updates a mounted Secret: files go into a new
/// timestamped directory, `..data` is swapped to it by rename, the visible names are
/// symlinks through `..data`, and the previous directory is deleted.
fn kubelet_write(dir: &Path, files: &[(&str, &str)]) {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    std::fs::create_dir_all(dir).unwrap();
    let stamp = format!("..2026_11_27_01_00_00.{}", SEQ.fetch_add(1, Ordering::Relaxed));
    std::fs::create_dir(dir.join(&stamp)).unwrap();
    for (name, content) in files {
        std::fs::write(dir.join(&stamp).join(name), content).unwrap();
    }
    let previous = std::fs::read_link(dir.join("..data")).ok();
    symlink(&stamp, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for (name, _) in files {
        if dir.join(name).symlink_metadata().is_err() {
            symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
    }
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.starts_with('.') && !files.iter().any(|(f, _)| *f == name) {
            std::fs::remove_file(dir.join(name)).unwrap();
        }
    }
    if let Some(previous) = previous {
        std::fs::remove_dir_all(dir.join(previous)).unwrap();
    }
}

fn pair_files(p: &Pair) -> [(&'static str, &str); 2] {
    [("tls.crt", p.cert.as_str()), ("tls.key", p.key.as_str())]
}

struct Harness {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    root: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Harness {
    async fn start(root: tempfile::TempDir, options: Options) -> Self {
        let store = Arc::new(Store::new());
        let metrics = Arc::new(Metrics::new());
        let sink = Sink::new(store.clone(), metrics.clone(), "files:test", false);
        let shutdown = CancellationToken::new();
        start_with(root.path().to_owned(), sink, shutdown.clone(), options).await.unwrap();
        Self { store, metrics, root, shutdown }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn key_mismatches(&self) -> u64 {
        let label = RejectLabel { source: "files:test".into(), reason: "key_mismatch" };
        self.metrics.updates_rejected.get_or_create(&label).get()
    }

    /// Events are handled in order, so once a directory created now is served,
    /// everything written before it has been handled.
    async fn barrier(&self) {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let name = format!("barrier-{}", SEQ.fetch_add(1, Ordering::Relaxed));
        let mut rx = self.store.subscribe(&name);
        kubelet_write(&self.dir(&name), &pair_files(&pair("barrier.test")));
        wait_for(&mut rx, &name, |c| c.is_some()).await;
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn fingerprint(current: &Current) -> Option<String> {
    pki::identity(&current.as_ref()?.resource).fingerprint_sha256
}

async fn wait_for(rx: &mut watch::Receiver<Current>, what: &str, ok: impl FnMut(&Current) -> bool) {
    tokio::time::timeout(PATIENCE, rx.wait_for(ok))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("store dropped");
}

#[tokio::test]
async fn initial_load_serves_pair_and_ca_bundle() {
    let root = tempdir();
    let web = pair("web.test");
    let ca = ca_pem();
    let [crt, key] = pair_files(&web);
    kubelet_write(&root.path().join("web"), &[crt, key, ("ca.crt", ca.as_str())]);
    kubelet_write(&root.path().join("bundle"), &[("ca.crt", ca.as_str())]);
    kubelet_write(&root.path().join(".hidden"), &pair_files(&pair("hidden.test")));

    let h = Harness::start(root, Options::default()).await;

    let served = h.store.get("web").expect("web served right after start");
    assert_eq!(served.kind, SecretKind::TlsCertificate);
    assert_eq!(fingerprint(&Some(served)).as_deref(), Some(web.fingerprint.as_str()));
    assert_eq!(h.store.get("web-cacert").expect("web-cacert served").kind, SecretKind::ValidationContext);
    assert!(h.store.get("bundle").is_none(), "a directory with only ca.crt serves no pair");
    assert!(h.store.get("bundle-cacert").is_some());
    assert!(h.store.get(".hidden").is_none() && h.store.get("hidden").is_none());
}

#[tokio::test]
async fn kubelet_data_swap_rotation_is_served() {
    let root = tempdir();
    let (old, new) = (pair("rotate.test"), pair("rotate.test"));
    kubelet_write(&root.path().join("rotate"), &pair_files(&old));
    let h = Harness::start(root, Options::default()).await;
    let mut rx = h.store.subscribe("rotate");
    assert_eq!(fingerprint(&rx.borrow_and_update()).as_deref(), Some(old.fingerprint.as_str()));

    kubelet_write(&h.dir("rotate"), &pair_files(&new));

    wait_for(&mut rx, "the rotated pair", |c| fingerprint(c).as_deref() == Some(new.fingerprint.as_str())).await;
}

#[tokio::test]
async fn cert_then_key_never_serves_mismatched_pair() {
    let root = tempdir();
    let (old, new) = (pair("inplace.test"), pair("inplace.test"));
    let dir = root.path().join("inplace");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), &old.cert).unwrap();
    std::fs::write(dir.join("tls.key"), &old.key).unwrap();
    // Settling outlasts the test, so the mismatch must never reach the sink.
    let h = Harness::start(root, Options { settle: Duration::from_secs(60), ..Options::default() }).await;
    let mut rx = h.store.subscribe("inplace");
    rx.borrow_and_update();

    std::fs::write(dir.join("tls.crt"), &new.cert).unwrap();
    h.barrier().await;
    assert_eq!(fingerprint(&h.store.get("inplace")).as_deref(), Some(old.fingerprint.as_str()), "old pair kept");
    assert!(!rx.has_changed().unwrap());

    std::fs::write(dir.join("tls.key"), &new.key).unwrap();
    wait_for(&mut rx, "the new pair", |c| fingerprint(c).as_deref() == Some(new.fingerprint.as_str())).await;
    assert_eq!(h.key_mismatches(), 0, "the half-written pair was not reported as a rejection");
}

#[tokio::test]
async fn lasting_mismatch_is_rejected_and_last_good_kept() {
    let root = tempdir();
    let (old, new) = (pair("stuck.test"), pair("stuck.test"));
    let dir = root.path().join("stuck");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), &old.cert).unwrap();
    std::fs::write(dir.join("tls.key"), &old.key).unwrap();
    let h = Harness::start(root, Options { settle: Duration::from_millis(50), ..Options::default() }).await;
    let mut rx = h.store.subscribe("stuck");
    rx.borrow_and_update();

    std::fs::write(dir.join("tls.crt"), &new.cert).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while h.key_mismatches() == 0 {
        assert!(Instant::now() < deadline, "mismatch never reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fingerprint(&h.store.get("stuck")).as_deref(), Some(old.fingerprint.as_str()), "last good kept");
    assert!(!rx.has_changed().unwrap());

    std::fs::write(dir.join("tls.key"), &new.key).unwrap();
    wait_for(&mut rx, "the repaired pair", |c| fingerprint(c).as_deref() == Some(new.fingerprint.as_str())).await;
}

#[tokio::test]
async fn removed_directory_removes_both_secrets() {
    let root = tempdir();
    let p = pair("gone.test");
    let ca = ca_pem();
    let [crt, key] = pair_files(&p);
    kubelet_write(&root.path().join("gone"), &[crt, key, ("ca.crt", ca.as_str())]);
    let h = Harness::start(root, Options::default()).await;
    let (mut pair_rx, mut ca_rx) = (h.store.subscribe("gone"), h.store.subscribe("gone-cacert"));
    assert!(pair_rx.borrow_and_update().is_some() && ca_rx.borrow_and_update().is_some());

    std::fs::remove_dir_all(h.dir("gone")).unwrap();

    wait_for(&mut pair_rx, "gone removed", |c| c.is_none()).await;
    wait_for(&mut ca_rx, "gone-cacert removed", |c| c.is_none()).await;
}

#[tokio::test]
async fn removed_files_remove_only_their_secret() {
    let root = tempdir();
    let p = pair("part.test");
    let ca = ca_pem();
    let [crt, key] = pair_files(&p);
    kubelet_write(&root.path().join("part"), &[crt, key, ("ca.crt", ca.as_str())]);
    let h = Harness::start(root, Options::default()).await;
    let (mut pair_rx, mut ca_rx) = (h.store.subscribe("part"), h.store.subscribe("part-cacert"));

    kubelet_write(&h.dir("part"), &[crt, key]);
    wait_for(&mut ca_rx, "part-cacert removed", |c| c.is_none()).await;
    assert!(pair_rx.borrow_and_update().is_some());

    kubelet_write(&h.dir("part"), &[("ca.crt", ca.as_str())]);
    wait_for(&mut pair_rx, "part removed", |c| c.is_none()).await;
    wait_for(&mut ca_rx, "part-cacert back", |c| c.is_some()).await;
}

#[tokio::test]
async fn new_directory_is_served() {
    let h = Harness::start(tempdir(), Options::default()).await;
    let (mut atomic_rx, mut plain_rx) = (h.store.subscribe("late"), h.store.subscribe("plain"));
    assert!(atomic_rx.borrow_and_update().is_none());

    kubelet_write(&h.dir("late"), &pair_files(&pair("late.test")));
    // Non-atomic: the directory first, then the files, one write at a time.
    let plain = pair("plain.test");
    std::fs::create_dir(h.dir("plain")).unwrap();
    std::fs::write(h.dir("plain").join("tls.crt"), &plain.cert).unwrap();
    std::fs::write(h.dir("plain").join("tls.key"), &plain.key).unwrap();

    wait_for(&mut atomic_rx, "late served", |c| c.is_some()).await;
    wait_for(&mut plain_rx, "plain served", |c| fingerprint(c).as_deref() == Some(plain.fingerprint.as_str())).await;
}

#[tokio::test]
async fn swap_in_directory_created_after_start_is_served() {
    // The rescan would find the swap too, but not within the test's patience.
    let h = Harness::start(tempdir(), Options { rescan: Duration::from_secs(3600), ..Options::default() }).await;
    let mut rx = h.store.subscribe("later");
    let (first, second) = (pair("later.test"), pair("later.test"));
    kubelet_write(&h.dir("later"), &pair_files(&first));
    wait_for(&mut rx, "first pair", |c| fingerprint(c).as_deref() == Some(first.fingerprint.as_str())).await;

    kubelet_write(&h.dir("later"), &pair_files(&second));

    wait_for(&mut rx, "the swapped pair", |c| fingerprint(c).as_deref() == Some(second.fingerprint.as_str())).await;
}

#[tokio::test]
async fn directory_replaced_under_the_same_name_is_still_watched() {
    let root = tempdir();
    kubelet_write(&root.path().join("again"), &pair_files(&pair("again.test")));
    let h = Harness::start(root, Options { rescan: Duration::from_secs(3600), ..Options::default() }).await;
    let mut rx = h.store.subscribe("again");
    rx.borrow_and_update();

    std::fs::remove_dir_all(h.dir("again")).unwrap();
    wait_for(&mut rx, "again removed", |c| c.is_none()).await;
    let (first, second) = (pair("again.test"), pair("again.test"));
    kubelet_write(&h.dir("again"), &pair_files(&first));
    wait_for(&mut rx, "again back", |c| fingerprint(c).as_deref() == Some(first.fingerprint.as_str())).await;
    kubelet_write(&h.dir("again"), &pair_files(&second));

    wait_for(&mut rx, "the swapped pair", |c| fingerprint(c).as_deref() == Some(second.fingerprint.as_str())).await;
}

#[tokio::test]
async fn identical_rewrite_pushes_nothing() {
    let root = tempdir();
    let same = pair("same.test");
    kubelet_write(&root.path().join("same"), &pair_files(&same));
    let h = Harness::start(root, Options::default()).await;
    let mut rx = h.store.subscribe("same");
    rx.borrow_and_update();

    kubelet_write(&h.dir("same"), &pair_files(&same));
    std::fs::write(h.dir("same").join("unrelated"), "x").unwrap();
    h.barrier().await;

    assert!(!rx.has_changed().unwrap(), "identical content must not wake subscribers");
}

#[tokio::test]
async fn periodic_rescan_serves_a_pair_once_it_becomes_valid() {
    let root = tempdir();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["soon.test".to_owned()]).unwrap();
    params.not_before = time::OffsetDateTime::now_utc() + time::Duration::seconds(4);
    let cert = params.self_signed(&key).unwrap().pem();
    kubelet_write(&root.path().join("soon"), &[("tls.crt", &cert), ("tls.key", &key.serialize_pem())]);
    let options = Options { rescan: Duration::from_millis(200), ..Options::default() };

    let h = Harness::start(root, options).await;
    let mut rx = h.store.subscribe("soon");
    assert!(rx.borrow_and_update().is_none(), "not valid yet, so not served");

    wait_for(&mut rx, "soon served once valid", |c| c.is_some()).await;
}

#[test]
fn read_secret_dir_reports_absent_and_unreadable_files() {
    let root = tempdir();
    let dir = root.path().join("odd");
    std::fs::create_dir(&dir).unwrap();
    let p = pair("odd.test");
    std::fs::write(dir.join("tls.crt"), &p.cert).unwrap();
    symlink("..data/tls.key", dir.join("tls.key")).unwrap();
    let (tls, ca) = read_secret_dir(&dir);
    assert!(matches!(tls, Ok(None)), "a dangling key link is an absent key");
    assert!(matches!(ca, Ok(None)));

    std::fs::create_dir(dir.join("ca.crt")).unwrap();
    let (_, ca) = read_secret_dir(&dir);
    let err = ca.expect_err("a directory is not a readable ca.crt").to_string();
    assert!(err.contains("ca.crt"), "error names the file: {err}");

    assert!(matches!(read_secret_dir(&root.path().join("missing")), (Ok(None), Ok(None))));
}
