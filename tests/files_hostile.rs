//! The file source under hostile and broken files, through the real binary: a FIFO
//! named `tls.crt` with one worker, links to `/dev/zero` and out of the root, a device
//! node, a 50 MB certificate, a file that cannot be read, a secret directory deleted.
//! Each is refused with a reason in `/status/secrets` and in
//! `certwire_updates_rejected_total`, the last good version stays served, memory stays
//! bounded and nothing else stops.

mod common;

use common::attack::rss_kib;

use std::net::SocketAddr;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use common::certwire::Certwire;
use common::files::SecretDir;
use common::pki::Ca;
use common::util::{self, WAIT};

/// How much certwire's resident memory may grow while it refuses the huge and endless
/// files below. Refusing them reads none of their bytes; before the cap, the 50 MB
/// certificate cost ~130 MiB and `/dev/zero` grew without end.
const RSS_GROWTH_LIMIT_KIB: u64 = 16 * 1024;

/// `certwire serve --files ROOT --listen 127.0.0.1:0 ARGS` and the SDS address it bound.
async fn serve(root: &Path, args: &[&str]) -> (Certwire, SocketAddr) {
    let mut all = vec!["--files".to_owned(), root.display().to_string(), "--listen".into(), "127.0.0.1:0".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    let certwire = Certwire::serve(all).await;
    let sds = certwire.sds_addr();
    (certwire, sds)
}

fn run(program: &str, args: &[&str]) {
    let status = std::process::Command::new(program).args(args).status().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(status.success(), "{program} {args:?}: {status}");
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// Replaces `dir/file` (the kubelet's symlink or a plain file) with what `make` creates
/// at the path it is given, by rename, as an atomic writer would.
fn replace(dir: &Path, file: &str, make: impl FnOnce(&Path)) {
    let tmp = dir.join(format!(".{file}.new"));
    make(&tmp);
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

async fn served_version(certwire: &Certwire, name: &str) -> Option<String> {
    certwire.secret_status(name).await?["version"].as_str().map(str::to_owned)
}

/// `/healthz` answers before the sources' first load is in: wait for it.
async fn wait_served(certwire: &Certwire, name: &str) -> String {
    util::wait_for(&format!("{name} served"), WAIT, || served_version(certwire, name)).await
}

/// Waits until `/status/secrets` shows a `last_error` for `name` containing every one of
/// `words`, and returns it.
async fn wait_last_error(certwire: &Certwire, name: &str, words: &[&str]) -> String {
    util::wait_for(&format!("{name}: last_error with {words:?}"), WAIT, || async {
        let error = certwire.secret_status(name).await?["last_error"].as_str()?.to_owned();
        words.iter().all(|w| error.contains(w)).then_some(error)
    })
    .await
}

async fn rejected(certwire: &Certwire, reason: &str) -> f64 {
    certwire.metric_sum("certwire_updates_rejected_total", &[("reason", reason)]).await
}

/// The HTTP/2 connection preface and an empty SETTINGS frame; true if the server answers
/// with a frame within `limit`: the SDS listener is being served.
async fn sds_answers(sds: SocketAddr, limit: Duration) -> bool {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(sds).await?;
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await?;
        let mut header = [0u8; 9];
        stream.read_exact(&mut header).await?;
        Ok::<_, std::io::Error>(header[3] == 0x4)
    };
    matches!(tokio::time::timeout(limit, exchange).await, Ok(Ok(true)))
}

async fn healthz_answers(certwire: &Certwire, limit: Duration) -> bool {
    let get = common::http::get(certwire.admin_addr(), "/healthz");
    matches!(tokio::time::timeout(limit, get).await, Ok(Ok(response)) if response.status == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_named_tls_crt_stops_neither_healthz_nor_sds_with_one_worker() {
    let root = util::tempdir();
    let ca = Ca::new("fifo CA");
    SecretDir::create_tls(root.path(), "web", &ca.server("web.example.com"), None);
    let (certwire, sds) = serve(root.path(), &["--workers", "1"]).await;
    wait_served(&certwire, "web").await;

    let fifo_dir = root.path().join("fifo");
    std::fs::create_dir(&fifo_dir).unwrap();
    run("mkfifo", &[path_arg(&fifo_dir.join("tls.crt"))]);
    std::fs::write(fifo_dir.join("tls.key"), ca.server("fifo.example.com").key_pem).unwrap();
    // Time for the watch to see it; before the fix, the one worker is now stuck in open(2).
    tokio::time::sleep(Duration::from_millis(500)).await;

    for _ in 0..5 {
        assert!(healthz_answers(&certwire, Duration::from_secs(3)).await, "/healthz did not answer");
        assert!(sds_answers(sds, Duration::from_secs(3)).await, "the SDS listener did not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let error = wait_last_error(&certwire, "fifo", &["tls.crt", "FIFO"]).await;
    assert!(!error.contains("PRIVATE KEY"), "{error}");
    assert!(rejected(&certwire, "not_a_file").await >= 1.0);
    // The source goes on: a directory created after the FIFO is served.
    SecretDir::create_tls(root.path(), "after", &ca.server("after.example.com"), None);
    wait_served(&certwire, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_huge_and_device_files_are_refused_with_bounded_memory() {
    let root = util::tempdir();
    let ca = Ca::new("size CA");
    let names = ["zero", "big", "device"];
    let dirs: Vec<SecretDir> = names
        .iter()
        .map(|n| SecretDir::create_tls(root.path(), n, &ca.server(&format!("{n}.example.com")), None))
        .collect();
    let (certwire, _) = serve(root.path(), &[]).await;
    let mut versions = Vec::new();
    for name in names {
        versions.push(wait_served(&certwire, name).await);
    }
    let pid = certwire.pid().expect("certwire is running");
    let baseline = rss_kib(pid);

    replace(dirs[0].path(), "tls.crt", |tmp| symlink("/dev/zero", tmp).unwrap());
    let big = "A".repeat(50 << 20);
    replace(dirs[1].path(), "tls.crt", |tmp| std::fs::write(tmp, &big).unwrap());
    drop(big);
    // mknod needs CAP_MKNOD (root, as on the test machines); skipped without it.
    let device = std::process::Command::new("mknod")
        .args([path_arg(&dirs[2].path().join(".tls.crt.new")), "c", "1", "5"])
        .status()
        .is_ok_and(|s| s.success());
    if device {
        replace(dirs[2].path(), "tls.crt", |_| {});
    } else {
        eprintln!("mknod not permitted here: the device-node case is skipped");
    }

    let mut expected = vec![("zero", vec!["tls.crt", "/dev/zero", "outside"]), ("big", vec!["tls.crt", "too large"])];
    if device {
        expected.push(("device", vec!["tls.crt", "character device"]));
    }
    let peak = std::cell::Cell::new(baseline);
    let check_rss = || {
        peak.set(peak.get().max(rss_kib(pid)));
        assert!(
            peak.get() - baseline < RSS_GROWTH_LIMIT_KIB,
            "certwire's RSS grew from {baseline} to {} KiB while refusing hostile files",
            peak.get()
        );
    };
    for (name, words) in &expected {
        util::wait_for(&format!("{name}: last_error with {words:?} (RSS bounded meanwhile)"), WAIT, || async {
            check_rss();
            let error = certwire.secret_status(name).await?["last_error"].as_str()?.to_owned();
            words.iter().all(|w| error.contains(w)).then_some(())
        })
        .await;
    }
    assert!(rejected(&certwire, "outside_root").await >= 1.0);
    assert!(rejected(&certwire, "too_large").await >= 1.0);
    if device {
        assert!(rejected(&certwire, "not_a_file").await >= 1.0);
    }
    for (name, version) in names.iter().zip(&versions) {
        assert_eq!(served_version(&certwire, name).await.as_ref(), Some(version), "{name}: last good version kept");
    }
    check_rss();
    eprintln!("RSS: {baseline} KiB at start, {} KiB at most while refusing", peak.get());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_out_of_the_root_and_unreadable_files_show_in_status_and_metrics() {
    let (root, outside) = (util::tempdir(), util::tempdir());
    let ca = Ca::new("links CA");
    let stray = ca.server("outside.example.com");
    std::fs::write(outside.path().join("tls.crt"), &stray.cert_pem).unwrap();
    std::fs::write(outside.path().join("tls.key"), &stray.key_pem).unwrap();
    let escape = root.path().join("escape");
    std::fs::create_dir(&escape).unwrap();
    symlink(outside.path().join("tls.crt"), escape.join("tls.crt")).unwrap();
    symlink(outside.path().join("tls.key"), escape.join("tls.key")).unwrap();
    let looped = SecretDir::create_tls(root.path(), "looped", &ca.server("looped.example.com"), None);
    let (certwire, _) = serve(root.path(), &[]).await;
    let version = wait_served(&certwire, "looped").await;

    let error = wait_last_error(&certwire, "escape", &["tls.crt", "outside"]).await;
    assert!(error.contains(&outside.path().join("tls.crt").display().to_string()), "names the target: {error}");
    assert_eq!(served_version(&certwire, "escape").await, None, "never served");
    assert_eq!(rejected(&certwire, "outside_root").await, 1.0);

    // A link to itself cannot be opened (ELOOP): an error like any other.
    replace(looped.path(), "tls.crt", |tmp| symlink("tls.crt", tmp).unwrap());
    wait_last_error(&certwire, "looped", &["tls.crt"]).await;
    assert_eq!(rejected(&certwire, "read_error").await, 1.0);
    assert_eq!(served_version(&certwire, "looped").await, Some(version), "last good version kept");
    let log = std::fs::read_to_string(certwire.log_path()).unwrap();
    assert!(log.lines().any(|l| l.contains("ERROR") && l.contains("looped") && l.contains("read_error")), "{log}");
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_secret_directory_logs_no_warning() {
    let root = util::tempdir();
    let ca = Ca::new("delete CA");
    let gone = SecretDir::create_tls(root.path(), "gone", &ca.server("gone.example.com"), Some(ca.cert_pem()));
    let (certwire, _) = serve(root.path(), &[]).await;
    wait_served(&certwire, "gone").await;
    let path: PathBuf = gone.path().to_owned();

    std::fs::remove_dir_all(&path).unwrap();
    util::wait_for("gone withdrawn", WAIT, || async {
        certwire.secret_status("gone").await.is_some_and(|s| s["deleted"] == true).then_some(())
    })
    .await;
    // The watch's own bookkeeping reports after the removal; give it time to.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let log = std::fs::read_to_string(certwire.log_path()).unwrap();
    let noise: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ") || l.contains("notify")).collect();
    assert!(noise.is_empty(), "deleting a secret directory logged:\n{}", noise.join("\n"));
    assert!(log.contains("secret removed"), "{log}");
}
