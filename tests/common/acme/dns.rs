//! knot as the authoritative DNS server of the test zone on 127.0.0.1:53, updatable
//! over RFC 2136 with a TSIG key made for this run: the interface certwire's dns-01
//! solver (and cert-manager's rfc2136 solver) speaks.
//!
//! Port 53 and not a free port: acme2certifier's `dns_server_list` takes bare
//! addresses and always asks port 53.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, LazyLock};

use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedMutexGuard;

use super::super::util::{self, WAIT};
use super::process::{LoggedChild, tied_command};
use super::tool;

/// The test zone. Every name in it resolves to 127.0.0.1 (`*` A record).
pub const ZONE: &str = "certwire.test";

/// The zone's name server, with an A record to 127.0.0.1, so a client that checks
/// the authoritative servers (NS, then their address) finds this knot.
pub const NS: &str = "ns1.certwire.test";

/// The TSIG key allowed to update [`ZONE`].
#[derive(Debug, Clone)]
pub struct Tsig {
    pub name: String,
    /// As knot, nsupdate and cert-manager spell it: `hmac-sha256`.
    pub algorithm: String,
    /// Base64, as in knot.conf and `nsupdate -y`.
    pub secret: String,
}

impl Tsig {
    /// `ALG:NAME:SECRET`, the form `nsupdate -y` takes.
    pub fn nsupdate_arg(&self) -> String {
        format!("{}:{}:{}", self.algorithm, self.name, self.secret)
    }
}

/// Port 53 is machine-wide. Across test binaries nextest's `acme` group keeps
/// these tests apart; within one binary under plain `cargo test` (threads) this
/// lock does, so a second knot waits instead of failing to bind.
static PORT_53: LazyLock<Arc<tokio::sync::Mutex<()>>> = LazyLock::new(Default::default);

pub struct Knot {
    // Dropped in this order: knotd is killed before the port is handed on.
    process: LoggedChild,
    dir: PathBuf,
    tsig: Tsig,
    _port_53: OwnedMutexGuard<()>,
}

impl Knot {
    /// Starts knotd in the foreground with its config, zone and journal under
    /// `dir/knot`, and waits until it answers the zone's SOA. One at a time per
    /// process: a second `start` waits until the first `Knot` is dropped.
    pub async fn start(dir: &Path) -> Knot {
        let port_53 = PORT_53.clone().lock_owned().await;
        let dir = dir.join("knot");
        std::fs::create_dir_all(&dir).expect("create knot dir");
        assert_port_53_free();
        let tsig = generate_tsig("certwire-test");
        std::fs::write(dir.join(format!("{ZONE}.zone")), zone_file()).expect("write zone file");
        let config = dir.join("knot.conf");
        std::fs::write(&config, knot_conf(&dir, &tsig)).expect("write knot.conf");

        let mut command = tied_command(&tool("knotd"));
        command.arg("-c").arg(&config);
        let process = LoggedChild::spawn("knotd", command, &dir.join("knotd.log"));
        let mut knot = Knot { process, dir, tsig, _port_53: port_53 };
        knot.wait_ready().await;
        knot
    }

    async fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            self.process.assert_running();
            if !self.query(ZONE, "SOA").await.is_empty() {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "knotd did not answer SOA {ZONE} within {WAIT:?}");
            tokio::time::sleep(util::POLL).await;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 53))
    }

    pub fn zone(&self) -> &str {
        ZONE
    }

    pub fn tsig(&self) -> &Tsig {
        &self.tsig
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The answer section of `dig NAME TYPE` asked of this knot, one record a line
    /// (`+short`); empty for NXDOMAIN, NODATA or no answer at all.
    pub async fn query(&self, name: &str, rtype: &str) -> Vec<String> {
        let output = tokio::process::Command::new(tool("dig"))
            .args(["@127.0.0.1", "-p", "53", "+short", "+norecurse", "+time=1", "+tries=1", name, rtype])
            .output()
            .await
            .expect("run dig");
        // dig prints a ";; ..." comment instead of records when it got no answer.
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with(';'))
            .map(str::to_owned)
            .collect()
    }

    /// The TXT strings at `name`, quotes removed (a record split into several
    /// character-strings is joined, as ACME validators do).
    pub async fn txt(&self, name: &str) -> Vec<String> {
        self.query(name, "TXT").await.iter().map(|line| unquote_txt(line)).collect()
    }

    /// Waits until the TXT strings at `name` satisfy `check`, returning them.
    pub async fn wait_txt(&self, what: &str, name: &str, check: impl Fn(&[String]) -> bool) -> Vec<String> {
        let check = &check;
        util::wait_for(what, WAIT, move || async move {
            let records = self.txt(name).await;
            check(&records).then_some(records)
        })
        .await
    }

    /// Sends `update` lines to the zone, signed with the zone's TSIG key: see
    /// [`nsupdate`].
    pub async fn nsupdate(&self, updates: &[&str]) -> Result<(), String> {
        nsupdate(Some(&self.tsig), updates).await
    }
}

/// Sends `update` lines (`update add NAME TTL TXT "v"`, `update delete NAME TXT`)
/// for [`ZONE`] to 127.0.0.1:53 with `nsupdate`, signed with `tsig` if given (a
/// wrong or missing key shows the ACL is real); the error is nsupdate's output
/// (e.g. `update failed: NOTAUTH`).
pub async fn nsupdate(tsig: Option<&Tsig>, updates: &[&str]) -> Result<(), String> {
    let mut script = format!("server 127.0.0.1 53\nzone {ZONE}.\n");
    for line in updates {
        script.push_str(line);
        script.push('\n');
    }
    script.push_str("send\n");
    let mut command = tokio::process::Command::new(tool("nsupdate"));
    if let Some(tsig) = tsig {
        command.arg("-y").arg(tsig.nsupdate_arg());
    }
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn nsupdate");
    let mut stdin = child.stdin.take().expect("nsupdate stdin");
    stdin.write_all(script.as_bytes()).await.expect("write nsupdate script");
    drop(stdin);
    let output = child.wait_with_output().await.expect("wait for nsupdate");
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nsupdate {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// A fresh key from `keymgr -t`, knot's own generator (32 random bytes for
/// hmac-sha256). Its first line is `# ALG:NAME:SECRET`.
fn generate_tsig(name: &str) -> Tsig {
    let output = Command::new(tool("keymgr")).args(["-t", name, "hmac-sha256"]).output().expect("run keymgr -t");
    assert!(output.status.success(), "keymgr -t failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    let first = text.lines().next().and_then(|l| l.strip_prefix("# ")).expect("keymgr prints # ALG:NAME:SECRET");
    let mut parts = first.splitn(3, ':');
    let (Some(algorithm), Some(key_name), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("unexpected keymgr output: {text}");
    };
    Tsig { name: key_name.into(), algorithm: algorithm.into(), secret: secret.into() }
}

/// TTL 1 everywhere: a record the solver removed is gone for every later query.
fn zone_file() -> String {
    format!(
        r#"$ORIGIN {ZONE}.
$TTL 1
@    SOA {NS}. hostmaster.{ZONE}. 1 60 60 3600 1
@    NS  {NS}.
ns1  A   127.0.0.1
*    A   127.0.0.1
"#
    )
}

/// Everything under `dir`, so leftover system state never meets it.
/// `zonefile-sync: -1` keeps updates in the journal only: the zone file stays as
/// written. No `user:`: knotd runs as root, which port 53 needs anyway.
fn knot_conf(dir: &Path, tsig: &Tsig) -> String {
    let dir = dir.display();
    let Tsig { name, algorithm, secret } = tsig;
    format!(
        r#"server:
    rundir: "{dir}"
    listen: 127.0.0.1@53
database:
    storage: "{dir}"
control:
    listen: "{dir}/knot.sock"
log:
  - target: stderr
    any: info
key:
  - id: {name}
    algorithm: {algorithm}
    secret: {secret}
acl:
  - id: tsig-update
    key: {name}
    action: update
zone:
  - domain: {ZONE}
    storage: "{dir}"
    file: "{ZONE}.zone"
    acl: tsig-update
    zonefile-sync: -1
    journal-content: changes
"#
    )
}

/// Fails fast and clearly when something (a knotd left by a killed test run, a
/// system resolver) holds port 53, instead of a knotd that dies on bind.
fn assert_port_53_free() {
    if let Err(err) = UdpSocket::bind("127.0.0.1:53") {
        panic!(
            "127.0.0.1:53 is taken ({err}): is a knotd from an earlier run still there? \
             (`ss -lunp 'sport = :53'` shows who holds it)"
        );
    }
}

/// `"a" "b"` -> `ab`, dig's presentation of one TXT record.
fn unquote_txt(line: &str) -> String {
    let mut out = String::new();
    let mut in_quotes = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => in_quotes = !in_quotes,
            '\\' if in_quotes => out.extend(chars.next()),
            c if in_quotes => out.push(c),
            _ => {}
        }
    }
    out
}
