//! acme2certifier as the test CA: its openssl CA handler with a CA made by openssl,
//! SQLite, plain HTTP on 127.0.0.1:PORT, challenges resolved through knot.
//!
//! acme2certifier is configured by one file, `acme_srv.cfg` (ini), named by the
//! `ACME_SRV_CONFIGFILE` environment variable. The keys used here, checked against
//! acme2certifier 0.46.3's source:
//! - `[DEFAULT] dns_server_list: ["127.0.0.1"]` (JSON list, bare IPs, port 53):
//!   every challenge lookup, and the address http-01/tls-alpn-01 connect to;
//! - `[Account] contact_check_disable: True` (no MX lookups on the contact);
//! - `[CAhandler] handler_module: PATH.py` loads a handler by file path;
//!   `issuing_ca_key`, `issuing_ca_cert`, `issuing_ca_crl`, `cert_save_path`;
//!   `cert_validity_minutes` is ours (see ca_handler.py);
//! - `[DBhandler] dbfile: PATH` (the default handler is SQLite);
//! - `[EABhandler] eab_handler_module: acme2certifier.eabhandlers.file_handler`,
//!   `key_file: PATH` (CSV `eab_kid,eab_mac`): the section's presence makes EAB
//!   required (`eab_strict_mode` defaults to True);
//! - `[Renewalinfo]` (ARI, on by default): `renewalinfo_disable`,
//!   `renewalthreshold_pctg` (window start, % of lifetime, default 85),
//!   `retry_after_timeout` (seconds, the Retry-After of an ARI answer, default 86400).
//!
//! Behaviour an ACME client must cope with (seen with 0.46.3):
//! - a failed challenge becomes `invalid`, and so does its authorization, but
//!   neither carries an `error` object (the reason is only in the CA's log), and
//!   the order stays `pending` instead of turning `invalid`: a client that waits
//!   for the order to leave `pending` waits forever;
//! - validation runs inside the challenge POST, so the challenge is already
//!   `valid`/`invalid` in its answer;
//! - notBefore is the moment of issuance (no backdating).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::super::http;
use super::super::util::{self, WAIT};
use super::process::{LoggedChild, tied_command};
use super::{asset, tool, venv_python};

#[derive(Debug, Clone)]
pub struct AcmeCaOptions {
    /// Lifetime of issued certificates, in whole minutes (at least one).
    pub cert_lifetime: Duration,
    /// Require External Account Binding for new accounts.
    pub eab: bool,
    /// Offer ARI (`renewalInfo` in the directory).
    pub ari: bool,
    /// Where the ARI window starts, in percent of the lifetime (CA default 85).
    pub ari_window_start_percent: Option<u8>,
    /// Retry-After of ARI answers (CA default one day).
    pub ari_retry_after: Option<Duration>,
}

impl Default for AcmeCaOptions {
    fn default() -> Self {
        AcmeCaOptions {
            cert_lifetime: Duration::from_secs(90 * 24 * 3600),
            eab: false,
            ari: true,
            ari_window_start_percent: None,
            ari_retry_after: None,
        }
    }
}

/// An EAB credential the CA accepts, as ACME clients take it.
#[derive(Debug, Clone)]
pub struct Eab {
    pub kid: String,
    /// The HMAC key, base64url without padding (certbot's `--eab-hmac-key`).
    pub hmac_key: String,
}

pub struct AcmeCa {
    process: Option<LoggedChild>,
    dir: PathBuf,
    addr: SocketAddr,
    ca_cert_pem: String,
    eab: Option<Eab>,
}

impl AcmeCa {
    /// Makes a CA under `dir/acme-ca`, configures acme2certifier and serves it on a
    /// free port of 127.0.0.1, waiting until `GET /directory` answers.
    pub async fn start(dir: &Path, options: AcmeCaOptions) -> AcmeCa {
        let dir = dir.join("acme-ca");
        std::fs::create_dir_all(dir.join("certs")).expect("create CA dir");
        make_ca(&dir);
        let eab = options.eab.then(|| {
            let eab = Eab { kid: "certwire-test-kid".into(), hmac_key: random_base64url(32) };
            let csv = format!("eab_kid,eab_mac\n{},{}\n", eab.kid, eab.hmac_key);
            std::fs::write(dir.join("eab_keys.csv"), csv).expect("write EAB key file");
            eab
        });
        std::fs::write(dir.join("acme_srv.cfg"), acme_srv_cfg(&dir, &options)).expect("write acme_srv.cfg");
        let ca_cert_pem = std::fs::read_to_string(dir.join("ca.pem")).expect("read CA certificate");
        let addr = util::free_addr();
        let mut ca = AcmeCa { process: None, dir, addr, ca_cert_pem, eab };
        ca.restart().await;
        ca
    }

    /// `http://127.0.0.1:PORT/directory`.
    pub fn directory_url(&self) -> String {
        format!("http://{}/directory", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The root that every issued chain ends at.
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The credential to register with; `None` unless the CA requires EAB.
    pub fn eab(&self) -> Option<&Eab> {
        self.eab.as_ref()
    }

    /// Where the CA handler keeps a copy of every certificate it issued.
    pub fn issued_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("acme2certifier.log")
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Kills the server: connections to the directory are refused until
    /// [`AcmeCa::restart`]. Accounts and orders stay in the SQLite file.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts the server again on the same port with the same state (after
    /// [`AcmeCa::stop`]; a running server is stopped first).
    pub async fn restart(&mut self) {
        self.stop();
        let mut command = tied_command(&venv_python());
        command
            .arg(asset("a2c_server.py"))
            .arg(self.addr.port().to_string())
            .env("ACME_SRV_CONFIGFILE", self.dir.join("acme_srv.cfg"))
            // All traffic is on loopback; a proxy from the environment must not
            // catch the CA's own http-01 fetches.
            .env("NO_PROXY", "*")
            // ca_handler.py is loaded from the source tree: no __pycache__ there.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .current_dir(&self.dir);
        self.process = Some(LoggedChild::spawn("acme2certifier", command, &self.log_path()));
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let process = self.process.as_mut().expect("started");
            process.assert_running();
            if http::get(self.addr, "/directory").await.is_ok_and(|r| r.status == 200) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "acme2certifier did not serve /directory within {WAIT:?}");
            tokio::time::sleep(util::POLL).await;
        }
    }

    /// Prints the tail of acme2certifier's log (debug level: every request and
    /// every challenge lookup with what it found).
    pub fn dump_log(&self) {
        util::dump_log("acme2certifier", &self.log_path(), 80);
    }
}

/// EC P-256 CA key and self-signed certificate, and an empty CRL (the handler
/// wants one to exist for revocation). `openssl ca` needs its small database.
fn make_ca(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "3650",
            "-subj",
            "/CN=certwire test ACME CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    std::fs::write(dir.join("index.txt"), "").expect("write CA index");
    std::fs::write(dir.join("crlnumber"), "01\n").expect("write crlnumber");
    let cnf = "[ca]\ndefault_ca = ca_default\n[ca_default]\ndatabase = index.txt\n\
               crlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 30\n";
    std::fs::write(dir.join("openssl-ca.cnf"), cnf).expect("write openssl-ca.cnf");
    openssl(
        dir,
        &["ca", "-config", "openssl-ca.cnf", "-gencrl", "-keyfile", "ca.key", "-cert", "ca.pem", "-out", "ca.crl"],
    );
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let output = Command::new(tool("openssl")).args(args).current_dir(dir).output().expect("run openssl");
    assert!(output.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `n` random bytes from openssl, base64url without padding.
fn random_base64url(n: usize) -> String {
    let text = openssl(Path::new("."), &["rand", "-base64", &n.to_string()]);
    text.trim().trim_end_matches('=').replace('+', "-").replace('/', "_")
}

fn acme_srv_cfg(dir: &Path, options: &AcmeCaOptions) -> String {
    let minutes = options.cert_lifetime.as_secs() / 60;
    assert!(
        minutes >= 1 && options.cert_lifetime.as_secs().is_multiple_of(60),
        "cert_lifetime must be whole minutes, got {:?}",
        options.cert_lifetime
    );
    let dir_s = dir.display();
    let handler = asset("ca_handler.py");
    let handler = handler.display();
    // debug: every request and challenge lookup is logged, so a failed test shows
    // what the CA saw.
    let mut cfg = format!(
        r#"[DEFAULT]
debug: True
dns_server_list: ["127.0.0.1"]

[Nonce]
nonce_check_disable: False

[Account]
contact_check_disable: True

[CAhandler]
handler_module: {handler}
issuing_ca_key: {dir_s}/ca.key
issuing_ca_cert: {dir_s}/ca.pem
issuing_ca_crl: {dir_s}/ca.crl
cert_save_path: {dir_s}/certs
cert_validity_minutes: {minutes}

[DBhandler]
dbfile: {dir_s}/acme_srv.db

[Challenge]
challenge_validation_disable: False
"#
    );
    if options.eab {
        cfg.push_str(&format!(
            "\n[EABhandler]\neab_handler_module: acme2certifier.eabhandlers.file_handler\n\
             key_file: {dir_s}/eab_keys.csv\n"
        ));
    }
    cfg.push_str(&format!("\n[Renewalinfo]\nrenewalinfo_disable: {}\n", if options.ari { "False" } else { "True" }));
    if let Some(percent) = options.ari_window_start_percent {
        cfg.push_str(&format!("renewalthreshold_pctg: {percent}\n"));
    }
    if let Some(retry_after) = options.ari_retry_after {
        cfg.push_str(&format!("retry_after_timeout: {}\n", retry_after.as_secs().max(1)));
    }
    cfg
}
