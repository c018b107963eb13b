//! The command line as a user runs it: `certwire check`, `certwire status` (against a
//! running certwire with a real Envoy connected) and SIGTERM draining.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::bootstrap::{SdsBootstrap, SdsTarget};
use common::certwire::{Certwire, certwire_bin};
use common::envoy::Envoy;
use common::files::SecretDir;
use common::pki::{Ca, LeafSpec};
use common::tls::{handshake, wait_served_serial};
use common::util::{self, WAIT};

/// Runs `certwire ARGS`; returns (success, stdout + stderr).
fn certwire(args: &[&str]) -> (bool, String) {
    let out = Command::new(certwire_bin()).args(args).stdin(Stdio::null()).output().expect("run certwire");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn check_reports_a_good_secret_directory() {
    let dir = util::tempdir();
    let ca = Ca::new("check CA");
    let leaf = ca.server("web.example.com");
    SecretDir::create_tls(dir.path(), "web", &leaf, Some(ca.cert_pem()));
    let (ok, out) = certwire(&["check", dir.path().join("web").to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("OK   web (tls_certificate)"), "{out}");
    assert!(out.contains("web.example.com"), "SANs shown: {out}");
    assert!(out.contains("key matches the leaf"), "{out}");
    assert!(out.contains(&leaf.serial_hex), "serial shown: {out}");
    assert!(out.contains("OK   web-cacert (validation_context)"), "{out}");
    assert!(!out.contains("PRIVATE KEY"), "no key material: {out}");
    // The root of several secret directories, as --files takes it.
    SecretDir::create_tls(dir.path(), "api", &ca.server("api.example.com"), None);
    let (ok, out) = certwire(&["check", dir.path().to_str().unwrap()]);
    assert!(ok && out.contains("OK   api (tls_certificate)") && out.contains("OK   web (tls_certificate)"), "{out}");
}

#[test]
fn check_fails_on_a_mismatched_key_and_on_an_expired_certificate() {
    let dir = util::tempdir();
    let ca = Ca::new("check CA");
    let (a, b) = (ca.server("a.example.com"), ca.server("b.example.com"));
    let cert = dir.path().join("a.crt");
    let other_key = dir.path().join("b.key");
    std::fs::write(&cert, &a.cert_pem).unwrap();
    std::fs::write(&other_key, &b.key_pem).unwrap();
    let (ok, out) = certwire(&["check", cert.to_str().unwrap(), other_key.to_str().unwrap()]);
    assert!(!ok, "a mismatched key must fail: {out}");
    assert!(out.contains("FAIL") && out.contains("key_mismatch"), "{out}");
    assert!(!out.contains("PRIVATE KEY"), "no key material: {out}");

    let expired = ca.issue(&LeafSpec::server("old.example.com").expired());
    let (c, k) = (dir.path().join("old.crt"), dir.path().join("old.key"));
    std::fs::write(&c, &expired.cert_pem).unwrap();
    std::fs::write(&k, &expired.key_pem).unwrap();
    let (ok, out) = certwire(&["check", c.to_str().unwrap(), k.to_str().unwrap()]);
    assert!(!ok && out.contains("expired"), "{out}");
    let (ok, out) = certwire(&["check", "--allow-expired", c.to_str().unwrap(), k.to_str().unwrap()]);
    assert!(ok, "--allow-expired accepts it: {out}");

    let (ok, out) = certwire(&["check", dir.path().join("missing").to_str().unwrap()]);
    assert!(!ok && out.contains("missing"), "a missing path is named: {out}");
}

/// certwire on the dev CA with one Envoy asking for `localhost`.
async fn dev_stack(extra: &[&str]) -> (Certwire, Envoy, SocketAddr) {
    let mut args = vec!["--listen".to_string(), "127.0.0.1:0".into(), "--drain-timeout".into(), "3s".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let certwire = Certwire::serve(args).await;
    let bootstrap = SdsBootstrap::new("localhost", SdsTarget::Tcp(certwire.sds_addr()), 0).node("cli-envoy", "edge");
    let envoy = Envoy::start(&bootstrap.to_yaml()).await;
    let tls = envoy.listener_addr("localhost");
    util::wait_for("Envoy serving the dev certificate", WAIT, || async move {
        handshake(tls, "localhost", None).await.ok()
    })
    .await;
    (certwire, envoy, tls)
}

#[tokio::test]
async fn status_shows_secrets_and_what_each_proxy_acked() {
    let (certwire, _envoy, _tls) = dev_stack(&[]).await;
    let admin = certwire.admin_addr().to_string();
    let out = util::wait_for("certwire status shows the acked current version", WAIT, || {
        let admin = admin.clone();
        async move {
            let (ok, out) = certwire_status(&["status", "--admin", &admin]).await;
            (ok && out.contains("cli-envoy") && out.contains("(current)")).then_some(out)
        }
    })
    .await;
    assert!(out.contains("localhost") && out.contains("tls_certificate") && out.contains("dev"), "{out}");

    let (ok, out) = certwire_status(&["status", "--admin", &admin, "--watch", "localhost"]).await;
    assert!(ok && out.contains("1/1 streams acked"), "the rollout watch ends once every stream acked: {out}");
}

async fn certwire_status(args: &[&str]) -> (bool, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        certwire(&args)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn sigterm_drains_and_envoy_keeps_serving() {
    // On a single worker thread: sources, admin and streams then share it.
    let (mut certwire, _envoy, tls) = dev_stack(&["--workers", "1"]).await;
    let serving = handshake(tls, "localhost", None).await.expect("served before SIGTERM");
    let status = certwire.terminate(Duration::from_secs(20)).await.expect("certwire exits after SIGTERM");
    assert!(status.success(), "a drained shutdown exits 0, got {status}");
    let log = std::fs::read_to_string(certwire.log_path()).unwrap();
    assert!(log.contains("SIGTERM received") && log.contains("stopped"), "{log}");
    assert!(log.contains("workers=1"), "--workers sizes the runtime: {log}");
    // Envoy keeps the last secret it had.
    wait_served_serial(tls, "localhost", &serving.serial_hex, WAIT).await;
}

#[test]
fn zero_workers_is_refused_with_the_reason() {
    let (ok, out) = certwire(&["serve", "--workers", "0"]);
    assert!(!ok && out.contains("--workers") && out.contains("zero"), "{out}");
}
