//! A reference ACME client that is not certwire (acme_client.py, on certbot's `acme`
//! library): it shows the CA and DNS fixtures work on their own, and gives later
//! tests a second opinion ("the CA issues this order to a known-good client").

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::asset;
use super::ca::{AcmeCa, Eab};
use super::dns::Knot;
use super::venv_python;

/// Why the CA refused.
#[derive(Debug, Clone)]
pub struct AcmeError {
    /// `urn:ietf:params:acme:error:...` from an ACME problem document, or
    /// `authorization-invalid` for a challenge the CA did not validate (acme2certifier
    /// sends no problem document for that: `detail` lists the challenge statuses).
    pub kind: String,
    pub detail: String,
}

/// What an order over dns-01 left behind.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then the CA.
    pub fullchain_pem: String,
    pub key_pem: String,
    pub fullchain_path: PathBuf,
    /// The `_acme-challenge` names that were set and then removed.
    pub txt_records: Vec<String>,
    /// The CA's ARI `suggestedWindow` (`start`, `end`, RFC 3339), if it offers ARI.
    pub renewal_window: Option<(String, String)>,
}

pub struct RefClient {
    directory: String,
    eab: Option<Eab>,
    out: PathBuf,
}

impl RefClient {
    /// A client for `ca` working in `out`, registering with the CA's EAB
    /// credential when it has one.
    pub fn new(ca: &AcmeCa, out: &Path) -> RefClient {
        std::fs::create_dir_all(out).expect("create client dir");
        RefClient { directory: ca.directory_url(), eab: ca.eab().cloned(), out: out.to_path_buf() }
    }

    /// Registers without External Account Binding, whatever the CA wants.
    pub fn without_eab(mut self) -> RefClient {
        self.eab = None;
        self
    }

    /// Registers a new account; returns its URL.
    pub async fn register(&self) -> Result<String, AcmeError> {
        let result = self.run(&["--register-only"]).await?;
        Ok(result["account"].as_str().expect("account URL").to_owned())
    }

    /// Registers and orders `domains` over dns-01, the TXT records set and removed
    /// in `knot` with its TSIG key.
    pub async fn order_dns01(&self, knot: &Knot, domains: &[&str]) -> Result<Issued, AcmeError> {
        let tsig = knot.tsig().nsupdate_arg();
        let mut args = vec!["--tsig", &tsig];
        args.extend(domains.iter().flat_map(|d| ["--domain", d]));
        let result = self.run(&args).await?;
        Ok(self.issued(&result))
    }

    /// Registers and orders `domains` over http-01, answered on 127.0.0.1:80 (the
    /// CA finds it through knot's wildcard record, so knot must be running).
    pub async fn order_http01(&self, domains: &[&str]) -> Result<Issued, AcmeError> {
        let mut args = vec!["--challenge", "http-01"];
        args.extend(domains.iter().flat_map(|d| ["--domain", d]));
        let result = self.run(&args).await?;
        Ok(self.issued(&result))
    }

    fn issued(&self, result: &Value) -> Issued {
        let fullchain_path = self.out.join("fullchain.pem");
        let window = &result["renewal_window"];
        Issued {
            fullchain_pem: std::fs::read_to_string(&fullchain_path).expect("read fullchain.pem"),
            key_pem: std::fs::read_to_string(self.out.join("key.pem")).expect("read key.pem"),
            fullchain_path,
            txt_records: result["txt_records"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            renewal_window: window["start"].as_str().zip(window["end"].as_str()).map(|(s, e)| (s.into(), e.into())),
        }
    }

    /// Orders `domains` over dns-01 without publishing the TXT records: the CA
    /// must fail the challenge.
    pub async fn order_dns01_unpublished(&self, domains: &[&str]) -> Result<(), AcmeError> {
        let args: Vec<&str> = domains.iter().flat_map(|d| ["--domain", d]).collect();
        self.run(&args).await.map(|_| ())
    }

    /// Runs the script; exit 3 is an ACME error from the CA, anything else but 0
    /// a broken fixture (panic with its output).
    async fn run(&self, args: &[&str]) -> Result<Value, AcmeError> {
        let mut command = tokio::process::Command::new(venv_python());
        command
            .arg(asset("acme_client.py"))
            .args(["--directory", &self.directory])
            .arg("--out")
            .arg(&self.out)
            .args(args)
            .env("NO_PROXY", "*")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        if let Some(eab) = &self.eab {
            // `=`: a base64url key may start with `-`, which argparse would take for an option.
            command.arg(format!("--eab-kid={}", eab.kid)).arg(format!("--eab-hmac={}", eab.hmac_key));
        }
        let _ = std::fs::remove_file(self.out.join("result.json"));
        let output = command.output().await.expect("run acme_client.py");
        let code = output.status.code();
        if code != Some(0) && code != Some(3) {
            panic!(
                "acme_client.py {args:?} failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let text = std::fs::read_to_string(self.out.join("result.json")).expect("read result.json");
        let result: Value = serde_json::from_str(&text).expect("result.json is JSON");
        match result.get("error") {
            Some(error) => Err(AcmeError {
                kind: error["type"].as_str().unwrap_or_default().to_owned(),
                detail: error["detail"].as_str().unwrap_or_default().to_owned(),
            }),
            None => Ok(result),
        }
    }
}
