//! End to end for OCSP staples that certwire fetches itself (`[ocsp]`, issue 15): a
//! real `openssl ocsp` responder run by the test, named in the leaf's AIA, answers
//! certwire; a real Envoy staples what certwire serves and `openssl s_client -status`
//! sees it in a real handshake. The responder's responses are valid for one minute
//! (`-nmin 1`), so a refresh (halfway, ~30 s) and a stale response (60 s) happen within
//! the test. Shown: stapled, refreshed before nextUpdate (a new thisUpdate), responder
//! down (kept until stale, then dropped: no response sent), responder back; a revoked
//! certificate reported (status, metric, log, a Kubernetes Event for a Secret) and
//! withheld per `on_revoked`; and
//! `must-staple` with Envoy's `ocsp_staple_policy: MUST_STAPLE` accepting what certwire
//! serves.
//!
//! Nothing asserts on durations: waits poll with generous timeouts.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::bootstrap::{SdsBootstrap, SdsTarget};
use common::certwire::Certwire;
use common::envoy::Envoy;
use common::openssl::{self, s_client_status};
use common::util::{self, WAIT};
use serde_json::Value;

const SNI: &str = "ocsp.test";
const NAME: &str = "stapled";
const SERIAL: &str = "1001";
/// Long enough for a one-minute response to go stale and a retry to fail.
const LONG: Duration = Duration::from_secs(150);

/// A test CA (RSA, so the RSA signature path is the one exercised) and a leaf for
/// [`SNI`] with serial [`SERIAL`] whose AIA names `http://127.0.0.1:PORT` as its OCSP
/// responder. The secret directory `ROOT/NAME` holds the leaf and the CA as its chain.
struct Pki {
    dir: tempfile::TempDir,
    root: PathBuf,
    port: u16,
}

impl Pki {
    fn new() -> Pki {
        let dir = util::tempdir();
        let port = util::free_port();
        let d = dir.path();
        openssl::run(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "30",
                "-subj",
                "/CN=e2e stapling CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        openssl::run(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "leaf.key",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=ocsp.test",
            ],
        );
        std::fs::write(
            d.join("ext.cnf"),
            format!(
                "subjectAltName=DNS:{SNI}\nauthorityInfoAccess=OCSP;URI:http://127.0.0.1:{port}\n\
                 basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        openssl::run(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &format!("0x{SERIAL}"),
                "-days",
                "10",
                "-out",
                "leaf.crt",
                "-extfile",
                "ext.cnf",
            ],
        );
        let root = d.join("secrets");
        let secret = root.join(NAME);
        std::fs::create_dir_all(&secret).unwrap();
        let chain =
            std::fs::read_to_string(d.join("leaf.crt")).unwrap() + &std::fs::read_to_string(d.join("ca.crt")).unwrap();
        std::fs::write(secret.join("tls.crt"), chain).unwrap();
        std::fs::copy(d.join("leaf.key"), secret.join("tls.key")).unwrap();
        Pki { dir, root, port }
    }

    /// The responder's index: the leaf valid, or revoked (key compromise).
    fn index(&self, revoked: bool) {
        let line = if revoked {
            format!("R\t361231235959Z\t261201000000Z,keyCompromise\t{SERIAL}\tunknown\t/CN={SNI}\n")
        } else {
            format!("V\t361231235959Z\t\t{SERIAL}\tunknown\t/CN={SNI}\n")
        };
        std::fs::write(self.dir.path().join("index.txt"), line).unwrap();
    }

    /// `openssl ocsp` answering on the leaf's AIA port, signing as the CA, each
    /// response valid for one minute.
    async fn responder(&self, revoked: bool) -> tokio::process::Child {
        self.index(revoked);
        let port = self.port.to_string();
        let log_path = self.dir.path().join(format!("responder-{port}-{revoked}.log"));
        let log = std::fs::File::create(&log_path).expect("create the responder log");
        let child = tokio::process::Command::new("openssl")
            .args([
                "ocsp",
                "-index",
                "index.txt",
                "-port",
                &port,
                "-rsigner",
                "ca.crt",
                "-rkey",
                "ca.key",
                "-CA",
                "ca.crt",
                "-nmin",
                "1",
                "-ignore_err",
            ])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("run openssl ocsp");
        // Not a probe connection: OpenSSL 3.0's responder hangs for good on a client
        // that connects and closes without a request. It says when it listens.
        let log_path = &log_path;
        util::wait_for("the OCSP responder listening", WAIT, || async move {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            log.contains("waiting for OCSP client connections").then_some(())
        })
        .await;
        child
    }

    fn config(&self, ocsp: &str) -> PathBuf {
        let path = self.dir.path().join("certwire.toml");
        std::fs::write(&path, format!("{ocsp}\n")).unwrap();
        path
    }
}

fn stapled_good(output: &str) -> bool {
    output.contains("OCSP Response Status: successful")
        && output.contains("Cert Status: good")
        && output.contains(&format!("Serial Number: {SERIAL}"))
}

fn this_update(output: &str) -> Option<String> {
    output.lines().find_map(|l| l.trim().strip_prefix("This Update: ").map(str::to_owned))
}

/// Polls handshakes until one staples a good status whose thisUpdate is not `not`.
async fn wait_stapled(addr: SocketAddr, not: Option<&str>, timeout: Duration) -> String {
    let what = format!("a handshake stapling a good status of serial {SERIAL} with thisUpdate other than {not:?}");
    util::wait_for(&what, timeout, move || async move {
        let output = s_client_status(addr, SNI).await;
        (stapled_good(&output) && this_update(&output).as_deref() != not).then_some(output)
    })
    .await
}

async fn ocsp_status(certwire: &Certwire) -> Value {
    certwire.secret_status(NAME).await.map(|s| s["ocsp"].clone()).unwrap_or(Value::Null)
}

/// Waits until the secret's OCSP status satisfies `check`; returns it.
async fn wait_ocsp(certwire: &Certwire, what: &str, timeout: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let check = &check;
    util::wait_for(what, timeout, move || async move {
        let status = ocsp_status(certwire).await;
        check(&status).then_some(status)
    })
    .await
}

async fn envoy(sds: SocketAddr, must_staple: bool) -> (Envoy, SocketAddr) {
    let mut yaml = SdsBootstrap::new(NAME, SdsTarget::Tcp(sds), 0).initial_fetch_timeout(Duration::ZERO).to_yaml();
    if must_staple {
        // Envoy's DownstreamTlsContext field, next to common_tls_context.
        let line = yaml.lines().find(|l| l.trim_start() == "common_tls_context:").expect("a TLS context").to_owned();
        let indent = &line[..line.len() - line.trim_start().len()];
        yaml = yaml.replacen(&line, &format!("{indent}ocsp_staple_policy: MUST_STAPLE\n{line}"), 1);
    }
    let envoy = Envoy::start(&yaml).await;
    let addr = envoy.listener_addr(NAME);
    (envoy, addr)
}

async fn certwire(pki: &Pki, ocsp: &str) -> Certwire {
    let config = pki.config(ocsp);
    Certwire::serve([
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--files",
        pki.root.to_str().unwrap(),
    ])
    .await
}

const FETCH: &str = r#"
[ocsp]
mode = "fetch"
refresh_min = "5s"
retry_min = "1s"
retry_max = "4s"
timeout = "5s"
"#;

/// Stapled; refreshed before nextUpdate; the responder down: kept until stale, then
/// dropped (no response sent, the certificate still served); the responder back:
/// stapled again.
#[tokio::test]
async fn a_fetched_staple_is_stapled_refreshed_kept_through_an_outage_until_stale_then_dropped() {
    let pki = Pki::new();
    let mut responder = pki.responder(false).await;
    let certwire = certwire(&pki, FETCH).await;
    let (_envoy, addr) = envoy(certwire.sds_addr(), false).await;

    let first = wait_stapled(addr, None, WAIT).await;
    let first_update = this_update(&first).expect("a thisUpdate");
    let status = wait_ocsp(&certwire, "ocsp state good", WAIT, |s| s["state"] == "good").await;
    assert_eq!(status["mode"], "fetch");
    assert_eq!(status["responder"], format!("http://127.0.0.1:{}", pki.port));
    let first_next = status["next_update"].as_str().unwrap().to_owned();
    // `certwire status` (the gRPC status API) says it too.
    let table = common::certwire::run(&["status", "--admin", &certwire.admin_addr().to_string()]);
    assert!(table.lines().any(|l| l.starts_with(NAME) && l.contains("ocsp good until")), "{table}");

    // Refreshed halfway (~30 s into a one-minute response): a new thisUpdate, made
    // before the first response's nextUpdate.
    let refreshed = wait_stapled(addr, Some(&first_update), LONG).await;
    let status = wait_ocsp(&certwire, "a newer staple in status", WAIT, |s| {
        s["state"] == "good" && s["next_update"].as_str() != Some(&first_next)
    })
    .await;
    assert!(
        status["this_update"].as_str().unwrap() < first_next.as_str(),
        "refreshed before the first staple went stale: {status} vs nextUpdate {first_next}\n{refreshed}"
    );
    assert!(certwire.metric_sum("certwire_ocsp_fetches_total", &[("result", "good")]).await >= 2.0);

    // The responder goes away: the staple is kept while fresh...
    responder.kill().await.unwrap();
    let output = s_client_status(addr, SNI).await;
    assert!(stapled_good(&output), "kept right after the responder is gone:\n{output}");
    // ...the failures show in status...
    wait_ocsp(&certwire, "a fetch error in status", LONG, |s| s["last_error"].is_string()).await;
    // ...and once past nextUpdate it is dropped: the certificate is served bare.
    let status = wait_ocsp(&certwire, "ocsp state stale", LONG, |s| s["state"] == "stale").await;
    assert!(status["last_error"].as_str().unwrap().contains("127.0.0.1"), "{status}");
    let bare = util::wait_for("a handshake with no OCSP response", WAIT, || async {
        let output = s_client_status(addr, SNI).await;
        (output.contains("OCSP response: no response sent") && output.contains(&format!("CN = {SNI}")))
            .then_some(output)
    })
    .await;
    assert!(!bare.contains("Cert Status"), "{bare}");
    assert!(certwire.metric_sum("certwire_ocsp_fetches_total", &[("result", "error")]).await >= 1.0);
    let metrics = certwire.metrics().await;
    assert!(
        !metrics.contains(&format!("certwire_ocsp_next_update_timestamp_seconds{{secret=\"{NAME}\"}}")),
        "no staple, no staple expiry"
    );

    // Back: stapled again.
    let _responder = pki.responder(false).await;
    wait_stapled(addr, None, LONG).await;
    wait_ocsp(&certwire, "ocsp state good again", WAIT, |s| s["state"] == "good" && s["last_error"].is_null()).await;
}

/// The responder starts saying "revoked": reported loudly (status, metric, error log
/// naming the secret) and, with `on_revoked = "withhold"` and `on_invalid =
/// "serve-placeholder"`, the certificate is replaced by the placeholder.
#[tokio::test]
async fn a_revoked_certificate_is_reported_and_withheld() {
    let pki = Pki::new();
    let responder = pki.responder(false).await;
    let config = format!("on_invalid = \"serve-placeholder\"\n{FETCH}on_revoked = \"withhold\"\n");
    let certwire = certwire(&pki, &config).await;
    let (_envoy, addr) = envoy(certwire.sds_addr(), false).await;
    wait_stapled(addr, None, WAIT).await;

    drop(responder);
    let _revoking = pki.responder(true).await;
    let status = wait_ocsp(&certwire, "ocsp state revoked", LONG, |s| s["state"] == "revoked").await;
    assert_eq!(status["revocation_reason"], "KeyCompromise", "{status}");
    assert!(status["revoked_at"].as_str().unwrap().starts_with("2026-12-01"), "{status}");
    assert_eq!(certwire.metric_sum("certwire_ocsp_revoked_certificates", &[]).await, 1.0);
    assert!(certwire.metric_sum("certwire_ocsp_fetches_total", &[("result", "revoked")]).await >= 1.0);
    let secret = certwire.secret_status(NAME).await.unwrap();
    assert_eq!(secret["placeholder"], "invalid", "{secret}");
    assert!(secret["last_error"].as_str().unwrap().contains("REVOKED"), "{secret}");
    let table = common::certwire::run(&["status", "--admin", &certwire.admin_addr().to_string()]);
    let line = table.lines().find(|l| l.starts_with(NAME)).unwrap_or_default();
    assert!(line.contains("PLACEHOLDER (invalid)") && line.contains("OCSP REVOKED at 2026-12-01"), "{table}");
    let output = util::wait_for("a handshake with the placeholder", WAIT, || async {
        let output = s_client_status(addr, SNI).await;
        output.contains("certwire placeholder").then_some(output)
    })
    .await;
    assert!(!output.contains("Cert Status: revoked"), "the revoked staple is not served:\n{output}");
    let log = std::fs::read_to_string(certwire.log_path()).unwrap();
    assert!(
        log.lines().any(|l| l.contains("ERROR") && l.contains(NAME) && l.contains("REVOKED")),
        "an error line naming {NAME}:\n{}",
        util::log_tail(certwire.log_path(), 20)
    );
}

/// `must-staple` with Envoy's `ocsp_staple_policy: MUST_STAPLE`: nothing is served
/// while the responder is down (status says why), then the certificate with its staple,
/// which Envoy accepts (no NACK).
#[tokio::test]
async fn must_staple_serves_the_certificate_only_with_its_staple_and_envoy_must_staple_accepts_it() {
    let pki = Pki::new();
    let certwire = certwire(&pki, &FETCH.replace("\"fetch\"", "\"must-staple\"")).await;
    let (_envoy, addr) = envoy(certwire.sds_addr(), true).await;
    let secret = util::wait_for("status saying a staple is required", WAIT, || async {
        let s = certwire.secret_status(NAME).await?;
        s["last_error"].as_str().is_some_and(|e| e.contains("OCSP staple required")).then_some(s)
    })
    .await;
    assert!(secret["version"].is_null(), "nothing served without a staple: {secret}");
    assert_eq!(secret["ocsp"]["mode"], "must-staple");

    let _responder = pki.responder(false).await;
    wait_stapled(addr, None, LONG).await;
    assert_eq!(certwire.metric_sum("certwire_nacks_total", &[]).await, 0.0, "Envoy accepted the stapled secret");
}

/// A certificate from a Kubernetes Secret found revoked: besides status, metric and log,
/// a Warning Event `Revoked` on the Secret names the serial and the revocation.
#[tokio::test]
async fn a_revoked_certificate_from_a_kubernetes_secret_gets_an_event() {
    const NS: &str = "ingress";
    let pki = Pki::new();
    let api = common::kubeapi::KubeApi::start().await;
    let kubeconfig = api.kubeconfig(pki.dir.path());
    let file = |f: &str| pki.root.join(NAME).join(f).to_str().unwrap().to_owned();
    let (crt, key) = (format!("--cert={}", file("tls.crt")), format!("--key={}", file("tls.key")));
    common::kubeapi::kubectl_ok(&kubeconfig, &["create", "namespace", NS]).await;
    common::kubeapi::kubectl_ok(&kubeconfig, &["create", "secret", "tls", NAME, "-n", NS, &crt, &key]).await;
    let _revoking = pki.responder(true).await;
    let config = pki.config(FETCH);
    let certwire = Certwire::serve([
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--namespace",
        NS,
    ])
    .await;
    let name = format!("kubernetes://{NS}/{NAME}");
    let certwire = &certwire;
    let name = name.as_str();
    util::wait_for("ocsp state revoked", LONG, move || async move {
        (certwire.secret_status(name).await?["ocsp"]["state"] == "revoked").then_some(())
    })
    .await;
    let events = util::wait_for("a Warning Event Revoked on the Secret", WAIT, || async {
        let for_secret = format!("secret/{NAME}");
        let events = common::kubeapi::kubectl_ok(&kubeconfig, &["events", "-n", NS, "--for", &for_secret]).await;
        events.contains("Revoked").then_some(events)
    })
    .await;
    assert!(events.contains(&format!("serial {SERIAL}")) && events.contains("REVOKED"), "kubectl events:\n{events}");
}
