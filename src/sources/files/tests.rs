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
    let files: Vec<(&str, &[u8])> = files.iter().map(|(name, content)| (*name, content.as_bytes())).collect();
    kubelet_write_bytes(dir, &files);
}

/// [`kubelet_write`] of binary files (an OCSP staple is DER).
fn kubelet_write_bytes(dir: &Path, files: &[(&str, &[u8])]) {
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
    shutdown: Shutdown,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

impl Harness {
    async fn start(root: tempfile::TempDir, options: Options) -> Self {
        let store = Arc::new(Store::new());
        let metrics = Arc::new(Metrics::new());
        let intake = Intake::new(store.clone(), metrics.clone(), "files:test", crate::policy::AllowExpired::Never);
        let shutdown = Shutdown::new();
        start_with(root.path().to_owned(), intake, shutdown.clone(), options).await.unwrap();
        Self { store, metrics, root, shutdown }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn key_mismatches(&self) -> u64 {
        self.rejected("key_mismatch")
    }

    /// `certwire_updates_rejected_total{source="files:test", reason}`.
    fn rejected(&self, reason: &'static str) -> u64 {
        let label = RejectLabel { source: "files:test".into(), reason };
        self.metrics.updates_rejected.get_or_create(&label).get()
    }

    /// Waits until `reason` has been counted `count` times.
    async fn wait_rejected(&self, reason: &'static str, count: u64) {
        let deadline = Instant::now() + PATIENCE;
        while self.rejected(reason) < count {
            assert!(Instant::now() < deadline, "{reason} counted {} times, not {count}", self.rejected(reason));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(self.rejected(reason), count, "{reason} counted once per refused version");
    }

    /// What `/status/secrets` shows as `last_error` for `name`.
    fn last_error(&self, name: &str) -> Option<String> {
        self.store.status().into_iter().find(|s| s.name == name)?.last_error
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
    // Settling outlasts the test, so the mismatch must never reach the intake.
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

// ---- Hostile and broken files (issue 12, "File source") --------------------------

/// One byte over the default cap on a secret file.
const OVER_DEFAULT_CAP: usize = (1 << 20) + 1;

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status().expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Runs the future `test` makes on a runtime with a single thread, as certwire runs with
/// `--workers 1`, and fails if it has not finished within `limit`. A blocking call on
/// that thread stops everything, the test's own timeouts included, so the limit is
/// watched from outside. On a timeout the FIFOs in `fifos` get a writer, which lets a
/// reader stuck in open(2) go on, and the test fails.
fn on_one_worker<F, Fut>(limit: Duration, fifos: &[PathBuf], test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(test())));
        let _ = done.send(result);
    });
    match finished.recv_timeout(limit) {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => {
            for fifo in fifos {
                use std::os::unix::fs::OpenOptionsExt as _;
                let _ = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(fifo);
            }
            panic!("the runtime's only thread was blocked for {limit:?}");
        }
    }
}

#[test]
fn a_fifo_named_tls_crt_is_refused_without_blocking_the_runtime() {
    let root = tempdir();
    let (at_start, later) = (root.path().join("fifo-start"), root.path().join("fifo-later"));
    std::fs::create_dir(&at_start).unwrap();
    mkfifo(&at_start.join("tls.crt"));
    std::fs::write(at_start.join("tls.key"), pair("fifo.test").key).unwrap();
    let fifos = [at_start.join("tls.crt"), later.join("tls.crt")];
    on_one_worker(PATIENCE, &fifos, move || async move {
        let h = Harness::start(root, Options::default()).await;
        std::fs::create_dir(&later).unwrap();
        mkfifo(&later.join("tls.crt"));
        std::fs::write(later.join("tls.key"), pair("fifo.test").key).unwrap();

        // A directory created after the FIFO is served: the source did not stop at it.
        h.barrier().await;
        h.wait_rejected("not_a_file", 2).await;
        for name in ["fifo-start", "fifo-later"] {
            assert!(h.store.get(name).is_none());
            let error = h.last_error(name).unwrap_or_else(|| panic!("{name} has no last_error"));
            assert!(error.contains("tls.crt") && error.contains("FIFO"), "{name}: {error}");
        }
    });
}

#[tokio::test]
async fn oversized_files_are_refused_and_the_last_good_version_kept() {
    let root = tempdir();
    let web = pair("big.test");
    let ca = ca_pem();
    let [crt, key] = pair_files(&web);
    kubelet_write(&root.path().join("big"), &[crt, key, ("ca.crt", &ca)]);
    let h = Harness::start(root, Options::default()).await;
    let (mut pair_rx, mut ca_rx) = (h.store.subscribe("big"), h.store.subscribe("big-cacert"));
    pair_rx.borrow_and_update();
    ca_rx.borrow_and_update();
    let big = "A".repeat(OVER_DEFAULT_CAP);

    kubelet_write(&h.dir("big"), &[("tls.crt", &big), key, ("ca.crt", &big)]);
    h.wait_rejected("too_large", 2).await;
    let (pair_error, ca_error) = (h.last_error("big").unwrap(), h.last_error("big-cacert").unwrap());
    assert!(pair_error.contains("tls.crt") && pair_error.contains("1048576"), "{pair_error}");
    assert!(ca_error.contains("ca.crt") && ca_error.contains("1048576"), "{ca_error}");

    kubelet_write(&h.dir("big"), &[crt, ("tls.key", &big), ("ca.crt", &ca), ("ca.crl", &big)]);
    h.wait_rejected("too_large", 4).await;
    assert!(h.last_error("big").unwrap().contains("tls.key"));
    assert!(h.last_error("big-cacert").unwrap().contains("ca.crl"));
    assert!(!pair_rx.has_changed().unwrap() && !ca_rx.has_changed().unwrap(), "last good versions kept");
    assert_eq!(fingerprint(&h.store.get("big")).as_deref(), Some(web.fingerprint.as_str()));

    kubelet_write(&h.dir("big"), &[crt, key]);
    h.barrier().await;
    assert_eq!(h.last_error("big"), None, "a good read clears the error");
}

#[tokio::test]
async fn links_out_of_the_root_are_refused_and_links_inside_followed() {
    let (root, outside) = (tempdir(), tempdir());
    let stray = pair("outside.test");
    std::fs::write(outside.path().join("tls.crt"), &stray.cert).unwrap();
    std::fs::write(outside.path().join("tls.key"), &stray.key).unwrap();
    let escape = root.path().join("escape");
    std::fs::create_dir(&escape).unwrap();
    symlink(outside.path().join("tls.crt"), escape.join("tls.crt")).unwrap();
    symlink(outside.path().join("tls.key"), escape.join("tls.key")).unwrap();
    let dotdot = root.path().join("dotdot");
    std::fs::create_dir(&dotdot).unwrap();
    let outside_name = outside.path().file_name().unwrap().to_str().unwrap();
    for file in ["tls.crt", "tls.key"] {
        symlink(format!("../../{outside_name}/{file}"), dotdot.join(file)).unwrap();
    }
    symlink(outside.path(), root.path().join("linked-dir")).unwrap();
    // Links that stay inside: absolute and relative, and a secret directory that is a link.
    let shared = pair("shared.test");
    kubelet_write(&root.path().join(".shared"), &pair_files(&shared));
    let absolute = root.path().join("absolute");
    std::fs::create_dir(&absolute).unwrap();
    for file in ["tls.crt", "tls.key"] {
        symlink(root.path().join(".shared").join(file), absolute.join(file)).unwrap();
    }
    symlink(".shared", root.path().join("inside-dir")).unwrap();

    let h = Harness::start(root, Options::default()).await;

    for name in ["escape", "dotdot", "linked-dir"] {
        assert!(h.store.get(name).is_none(), "{name} served from outside the root");
        let error = h.last_error(name).unwrap_or_else(|| panic!("{name} has no last_error"));
        assert!(error.contains("tls.crt") && error.contains("outside"), "{name}: {error}");
    }
    assert_eq!(h.rejected("outside_root"), 3);
    for name in ["absolute", "inside-dir"] {
        assert_eq!(fingerprint(&h.store.get(name)).as_deref(), Some(shared.fingerprint.as_str()), "{name}");
    }
}

#[tokio::test]
async fn an_unreadable_file_is_a_rejection_in_status_and_metrics() {
    let root = tempdir();
    let good = pair("loop.test");
    let dir = root.path().join("loop");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), &good.cert).unwrap();
    std::fs::write(dir.join("tls.key"), &good.key).unwrap();
    let h = Harness::start(root, Options { rescan: Duration::from_millis(50), ..Options::default() }).await;

    // A link to itself: opening it fails with ELOOP.
    std::fs::remove_file(dir.join("tls.crt")).unwrap();
    symlink("tls.crt", dir.join("tls.crt")).unwrap();

    h.wait_rejected("read_error", 1).await;
    let error = h.last_error("loop").expect("read error in status");
    assert!(error.contains("tls.crt"), "{error}");
    assert_eq!(fingerprint(&h.store.get("loop")).as_deref(), Some(good.fingerprint.as_str()), "last good kept");
    // The periodic rescan reads it again and again; the same failure counts once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.rejected("read_error"), 1);

    std::fs::remove_file(dir.join("tls.crt")).unwrap();
    std::fs::write(dir.join("tls.crt"), &good.cert).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while h.last_error("loop").is_some() {
        assert!(Instant::now() < deadline, "the repaired file did not clear last_error");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_file_deleted_and_written_again_is_not_withdrawn_in_between() {
    let root = tempdir();
    let p = pair("flap.test");
    let dir = root.path().join("flap");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), &p.cert).unwrap();
    std::fs::write(dir.join("tls.key"), &p.key).unwrap();
    let h = Harness::start(root, Options::default()).await;
    let mut rx = h.store.subscribe("flap");
    rx.borrow_and_update();

    // What an editor that renames the old file away before writing the new one does.
    std::fs::rename(dir.join("tls.crt"), dir.join("tls.crt~")).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(dir.join("tls.crt"), &p.cert).unwrap();
    tokio::time::sleep(Options::default().settle * 2).await;

    assert!(!rx.has_changed().unwrap(), "a file missing for less than the settle time is not withdrawn");
    // Gone for good: withdrawn once the settle time has passed.
    std::fs::remove_file(dir.join("tls.crt")).unwrap();
    wait_for(&mut rx, "flap withdrawn", |c| c.is_none()).await;
}

#[tokio::test]
async fn a_root_that_cannot_be_listed_withdraws_nothing_and_says_why() {
    let outer = tempdir();
    let root = outer.path().join("certs");
    let (a, b, rotated) = (pair("a.test"), pair("b.test"), pair("a2.test"));
    let ca = ca_pem();
    kubelet_write(&root.join("a"), &[("tls.crt", &a.cert), ("tls.key", &a.key), ("ca.crt", &ca)]);
    kubelet_write(&root.join("b"), &pair_files(&b));
    let store = Arc::new(Store::new());
    let metrics = Arc::new(Metrics::new());
    let intake = Intake::new(store.clone(), metrics.clone(), "files:test", crate::policy::AllowExpired::Never);
    let shutdown = Shutdown::new();
    let _stop = shutdown.clone().trigger_on_drop();
    let options = Options { rescan: Duration::from_millis(50), ..Options::default() };
    start_with(root.clone(), intake, shutdown, options).await.unwrap();
    let rejected = || {
        let label = RejectLabel { source: "files:test".into(), reason: "root_unreadable" };
        metrics.updates_rejected.get_or_create(&label).get()
    };
    let last_error = |name: &str| store.status().into_iter().find(|s| s.name == name).and_then(|s| s.last_error);

    // The volume goes away (here: the root is moved; a chmod needs a user other than root).
    let moved = outer.path().join("moved");
    std::fs::rename(&root, &moved).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while rejected() == 0 {
        assert!(Instant::now() < deadline, "an unlistable root was not reported");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for name in ["a", "a-cacert", "b"] {
        let error = last_error(name).unwrap_or_else(|| panic!("{name}: no error in status"));
        assert!(error.contains("cannot list the files root"), "{name}: {error}");
        assert!(store.get(name).is_some(), "{name} withdrawn with an unreadable root");
    }
    // The periodic rescan keeps failing the same way: counted once for the whole root,
    // and nothing is withdrawn after the settle time either.
    tokio::time::sleep(Options::default().settle * 2).await;
    assert_eq!(rejected(), 1);
    assert_eq!(fingerprint(&store.get("a")).as_deref(), Some(a.fingerprint.as_str()));

    // Rotated while away, then back: read anew, errors cleared.
    kubelet_write(&moved.join("a"), &[("tls.crt", &rotated.cert), ("tls.key", &rotated.key), ("ca.crt", &ca)]);
    std::fs::rename(&moved, &root).unwrap();
    let mut rx = store.subscribe("a");
    wait_for(&mut rx, "the rotation made while the root was away", |c| {
        fingerprint(c).as_deref() == Some(rotated.fingerprint.as_str())
    })
    .await;
    let deadline = Instant::now() + PATIENCE;
    while ["a", "a-cacert", "b"].iter().any(|name| last_error(name).is_some()) {
        assert!(Instant::now() < deadline, "errors not cleared once the root lists again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(store.get("b").is_some());
}

// ---- OCSP staples (issue 14) ------------------------------------------------------

/// A DER OCSP response saying `cert_pem` (self-signed) is good, produced `age` hours ago.
fn staple(cert_pem: &str, age: i64) -> Vec<u8> {
    use crate::pki::ocsp_fixtures::{cert_id, good, hours, response};
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let single = good(cert_id(&der, &der, &ring::digest::SHA256));
    response(vec![x509_ocsp::SingleResponse { this_update: hours(-age), ..single }])
}

/// The staple a served resource carries.
fn served_staple(current: &Current) -> Option<Vec<u8>> {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret::Type};
    use prost::Message as _;
    let secret = Secret::decode(current.as_ref()?.resource.as_ref()).unwrap();
    let Some(Type::TlsCertificate(tls)) = secret.r#type else { panic!("not a TLS certificate") };
    match tls.ocsp_staple?.specifier {
        Some(Specifier::InlineBytes(bytes)) => Some(bytes),
        other => panic!("staple not inline: {other:?}"),
    }
}

/// Swaps `dir` to `p`'s pair with `staple` as `tls.ocsp-staple` (none: no such file).
fn write_stapled(dir: &Path, p: &Pair, staple: Option<&[u8]>) {
    let mut files: Vec<(&str, &[u8])> = vec![("tls.crt", p.cert.as_bytes()), ("tls.key", p.key.as_bytes())];
    files.extend(staple.map(|s| ("tls.ocsp-staple", s)));
    kubelet_write_bytes(dir, &files);
}

#[tokio::test]
async fn the_ocsp_staple_is_served_and_a_new_one_alone_is_pushed() {
    let root = tempdir();
    let web = pair("stapled.test");
    let (first, second) = (staple(&web.cert, 2), staple(&web.cert, 1));
    assert_ne!(first, second);
    write_stapled(&root.path().join("stapled"), &web, Some(&first));
    let h = Harness::start(root, Options { rescan: Duration::from_secs(3600), ..Options::default() }).await;
    let mut rx = h.store.subscribe("stapled");
    assert_eq!(served_staple(&rx.borrow_and_update()).as_deref(), Some(first.as_slice()), "served from the start");

    // The staple alone changes, as a refresher job rewrites it: a new version.
    write_stapled(&h.dir("stapled"), &web, Some(&second));
    wait_for(&mut rx, "the new staple", |c| served_staple(c).as_deref() == Some(second.as_slice())).await;
    assert_eq!(fingerprint(&h.store.get("stapled")).as_deref(), Some(web.fingerprint.as_str()));

    // Written in place, not swapped: the same.
    std::fs::remove_file(h.dir("stapled").join("tls.ocsp-staple")).unwrap();
    std::fs::write(h.dir("stapled").join("tls.ocsp-staple"), &first).unwrap();
    wait_for(&mut rx, "the staple written in place", |c| served_staple(c).as_deref() == Some(first.as_slice())).await;

    // Gone, or empty: served without one.
    write_stapled(&h.dir("stapled"), &web, None);
    wait_for(&mut rx, "no staple", |c| c.is_some() && served_staple(c).is_none()).await;
    write_stapled(&h.dir("stapled"), &web, Some(&second));
    wait_for(&mut rx, "the staple back", |c| served_staple(c).as_deref() == Some(second.as_slice())).await;
    write_stapled(&h.dir("stapled"), &web, Some(b""));
    wait_for(&mut rx, "an empty staple is none", |c| c.is_some() && served_staple(c).is_none()).await;
    assert_eq!(h.rejected("bad_ocsp_staple"), 0);
}

#[tokio::test]
async fn a_bad_staple_is_refused_and_the_last_good_version_kept() {
    let root = tempdir();
    let (web, other) = (pair("wrong.test"), pair("wrong.test"));
    let good = staple(&web.cert, 1);
    write_stapled(&root.path().join("wrong"), &web, Some(&good));
    let options = Options { settle: Duration::from_millis(50), max_file_bytes: 64 << 10, ..Options::default() };
    let h = Harness::start(root, options).await;
    let mut rx = h.store.subscribe("wrong");
    let version = rx.borrow_and_update().as_ref().unwrap().version;

    // A staple for another certificate: refused, said, the good version (and staple) kept.
    write_stapled(&h.dir("wrong"), &web, Some(&staple(&other.cert, 1)));
    h.wait_rejected("bad_ocsp_staple", 1).await;
    let error = h.last_error("wrong").unwrap();
    assert!(error.contains("OCSP staple") && error.contains("another certificate"), "{error}");
    // Not DER at all.
    write_stapled(&h.dir("wrong"), &web, Some(b"not an OCSP response"));
    h.wait_rejected("bad_ocsp_staple", 2).await;
    assert!(h.last_error("wrong").unwrap().contains("not a DER OCSP response"));
    // Larger than a secret file may be: not read.
    write_stapled(&h.dir("wrong"), &web, Some(&vec![0x30; (64 << 10) + 1]));
    h.wait_rejected("too_large", 1).await;
    assert!(h.last_error("wrong").unwrap().contains("tls.ocsp-staple"));
    assert!(!rx.has_changed().unwrap(), "nothing new served");
    assert_eq!(h.store.get("wrong").unwrap().version, version);
    assert_eq!(served_staple(&h.store.get("wrong")).as_deref(), Some(good.as_slice()));

    // Repaired: served again, the error clears.
    let fresh = staple(&web.cert, 0);
    write_stapled(&h.dir("wrong"), &web, Some(&fresh));
    wait_for(&mut rx, "the repaired staple", |c| served_staple(c).as_deref() == Some(fresh.as_slice())).await;
    assert_eq!(h.last_error("wrong"), None);
}

#[tokio::test]
async fn a_staple_from_the_future_is_served_once_its_this_update_has_come() {
    use crate::pki::ocsp_fixtures::{at, cert_id, good, response};
    use rustls_pki_types::pem::PemObject as _;
    let root = tempdir();
    let web = pair("soon-stapled.test");
    let der = rustls_pki_types::CertificateDer::from_pem_slice(web.cert.as_bytes()).unwrap();
    let single = good(cert_id(&der, &der, &ring::digest::SHA1_FOR_LEGACY_USE_ONLY));
    // Past the clock skew tolerated, by three seconds.
    let ahead = crate::pki::ocsp::CLOCK_SKEW_SECS as u64 + 3;
    let this_update = at(std::time::SystemTime::now() + Duration::from_secs(ahead));
    let early = response(vec![x509_ocsp::SingleResponse { this_update, ..single }]);
    write_stapled(&root.path().join("soon"), &web, Some(&early));
    let h = Harness::start(root, Options { rescan: Duration::from_millis(200), ..Options::default() }).await;
    let mut rx = h.store.subscribe("soon");
    assert!(rx.borrow_and_update().is_none(), "not valid yet, so not served");
    assert_eq!(h.rejected("bad_ocsp_staple"), 1);
    assert!(h.last_error("soon").unwrap().contains("in the future"));

    // The rescan checks it again, unchanged, as it does a certificate not yet valid.
    wait_for(&mut rx, "soon served once its thisUpdate has come", |c| {
        served_staple(c).as_deref() == Some(early.as_slice())
    })
    .await;
}

#[tokio::test]
async fn ticket_keys_and_generic_secrets_are_served_and_follow_their_files() {
    let root = tempdir();
    kubelet_write_bytes(&root.path().join("tickets"), &[("tls.session-ticket-keys", &[1u8; 160])]);
    kubelet_write_bytes(&root.path().join("hmac"), &[("secret", b"first")]);
    let h = Harness::start(root, Options::default()).await;

    let tickets = h.store.get("tickets").expect("ticket keys served");
    assert_eq!(tickets.kind, SecretKind::SessionTicketKeys);
    assert_eq!(h.store.get("hmac").expect("generic served").kind, SecretKind::GenericSecret);

    let mut rx = h.store.subscribe("hmac");
    let before = rx.borrow_and_update().as_ref().map(|s| s.version);
    kubelet_write_bytes(&h.dir("hmac"), &[("secret", b"second")]);
    wait_for(&mut rx, "the changed generic secret", |c| c.as_ref().map(|s| s.version) != before).await;

    // A key of 79 bytes: refused with its size, the two good keys stay served.
    let mut rx = h.store.subscribe("tickets");
    let good = rx.borrow_and_update().as_ref().map(|s| s.version);
    kubelet_write_bytes(&h.dir("tickets"), &[("tls.session-ticket-keys", &[2u8; 159])]);
    h.wait_rejected("bad_ticket_keys", 1).await;
    assert!(h.last_error("tickets").is_some_and(|e| e.contains("key 2 is 79 bytes")), "{:?}", h.last_error("tickets"));
    assert_eq!(rx.borrow().as_ref().map(|s| s.version), good);
}

#[tokio::test]
async fn a_directory_with_two_kinds_of_secret_is_refused_as_ambiguous() {
    let root = tempdir();
    let web = pair("web.test");
    let [crt, key] = pair_files(&web);
    kubelet_write(&root.path().join("web"), &[crt, key]);
    let h = Harness::start(root, Options::default()).await;
    assert!(h.store.get("web").is_some());

    kubelet_write(&h.dir("web"), &[crt, key, ("secret", "s")]);
    h.wait_rejected("ambiguous_keys", 1).await;
    let error = h.last_error("web").expect("last_error");
    assert!(error.contains(r#""tls.crt" and "secret""#) && error.contains("web"), "{error}");
    assert_eq!(h.store.get("web").expect("last good kept").kind, SecretKind::TlsCertificate);
}
