//! `certwire check`: the same checks the server applies, offline, with a readable report.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::pki::{self, CertIdentity, CheckOptions, KeyBytes, Material, SecretMeta};

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// A secret directory (tls.crt, tls.key, ca.crt, ca.crl), a root of such directories,
    /// or a certificate chain PEM file followed by its KEY file
    #[arg(value_name = "DIR | CERT")]
    pub path: PathBuf,
    /// Private key PEM file, when PATH is a certificate file
    #[arg(value_name = "KEY")]
    pub key: Option<PathBuf>,
    /// Accept certificates outside their validity window
    #[arg(long)]
    pub allow_expired: bool,
}

pub fn run(args: &CheckArgs) -> ExitCode {
    let opts = CheckOptions { allow_expired: args.allow_expired, ..Default::default() };
    let items = match collect(args) {
        Ok(items) => items,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    if items.is_empty() {
        eprintln!("error: {} holds no secret (expected tls.crt + tls.key and/or ca.crt)", args.path.display());
        return ExitCode::FAILURE;
    }
    let mut failed = 0;
    for (name, material) in items {
        match pki::check(&name, &material, &opts) {
            Ok(checked) => print_ok(&name, checked.kind.as_str(), &checked.meta, &checked.identity),
            Err(err) => {
                failed += 1;
                println!("FAIL {name}\n  reason: {} ({err})\n", err.reason());
            }
        }
    }
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn collect(args: &CheckArgs) -> anyhow::Result<Vec<(String, Material)>> {
    if let Some(key) = &args.key {
        let cert_chain_pem = read(&args.path)?;
        let key_pem = KeyBytes::new(read(key)?);
        return Ok(vec![(
            args.path.display().to_string(),
            Material::Tls { cert_chain_pem, key_pem, ocsp_staple: None },
        )]);
    }
    let dir = &args.path;
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory; give a secret directory, or CERT and KEY files", dir.display());
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string());
    let own = read_dir(dir, &name)?;
    if !own.is_empty() {
        return Ok(own);
    }
    // A root of secret directories, as `--files` takes it.
    let mut all = Vec::new();
    let mut subdirs: Vec<_> =
        std::fs::read_dir(dir)?.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    subdirs.sort();
    for sub in subdirs {
        let name = sub.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        all.extend(read_dir(&sub, &name)?);
    }
    Ok(all)
}

/// The secrets one directory serves: `NAME` and `NAME-cacert`.
fn read_dir(dir: &Path, name: &str) -> anyhow::Result<Vec<(String, Material)>> {
    let (pair, ca) = crate::sources::files::read_secret_dir(dir);
    let mut out = Vec::new();
    if let Some(m) = pair? {
        out.push((name.to_owned(), m));
    }
    if let Some(m) = ca? {
        out.push((format!("{name}-cacert"), m));
    }
    Ok(out)
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))
}

fn print_ok(name: &str, kind: &str, meta: &SecretMeta, identity: &CertIdentity) {
    println!("OK   {name} ({kind})");
    if let Some(s) = &identity.subject {
        println!("  subject:     {s}");
    }
    if !identity.sans.is_empty() {
        println!("  SANs:        {}", identity.sans.join(", "));
    }
    if let Some(s) = &identity.serial {
        println!("  serial:      {s}");
    }
    println!(
        "  chain:       {} certificate(s){}",
        meta.certificates,
        if kind == "tls_certificate" { ", key matches the leaf" } else { "" }
    );
    if let Some(t) = meta.not_after_unix {
        let left = t - time::OffsetDateTime::now_utc().unix_timestamp();
        println!("  expires:     {} ({})", crate::unix_time::rfc3339(t), human_left(left));
    }
    if let Some(f) = &identity.fingerprint_sha256 {
        println!("  sha256:      {f}");
    }
    println!();
}

fn human_left(secs: i64) -> String {
    if secs < 0 {
        return "expired".into();
    }
    match secs {
        s if s >= 86400 => format!("in {} days", s / 86400),
        s if s >= 3600 => format!("in {} hours", s / 3600),
        s => format!("in {} minutes", s / 60),
    }
}
