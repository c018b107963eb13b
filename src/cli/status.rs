//! `certwire status`: secrets and what each proxy has acked, from the admin port's gRPC API.

use std::process::ExitCode;

use crate::api::status_client::StatusClient;
use crate::api::{ListProxiesRequest, ListSecretsRequest, WatchRolloutRequest};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// certwire's admin address
    #[arg(long, default_value = crate::config::DEFAULT_ADMIN)]
    pub admin: String,
    /// Follow the rollout of one secret until every subscribed stream has acked it
    #[arg(long, value_name = "SECRET")]
    pub watch: Option<String>,
}

pub async fn run(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let url = format!("http://{}", args.admin);
    let mut client = StatusClient::connect(url.clone())
        .await
        .map_err(|e| anyhow::anyhow!("connecting to certwire admin at {url}: {e}"))?;
    if let Some(name) = &args.watch {
        let mut stream = client
            .watch_rollout(WatchRolloutRequest { name: name.clone() })
            .await
            .map_err(|s| anyhow::anyhow!("certwire refused the rollout watch: {}", s.message()))?
            .into_inner();
        while let Some(p) = stream.message().await? {
            let version = if p.version.is_empty() { "-" } else { &p.version };
            println!(
                "{} version {}: {}/{} streams acked, {} nacked",
                p.name, version, p.streams_acked, p.streams_subscribed, p.streams_nacked
            );
            if !p.version.is_empty()
                && p.streams_subscribed > 0
                && p.streams_acked + p.streams_nacked == p.streams_subscribed
            {
                break;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let secrets = client.list_secrets(ListSecretsRequest {}).await?.into_inner().secrets;
    let proxies = client.list_proxies(ListProxiesRequest {}).await?.into_inner().proxies;
    println!("SECRETS");
    println!("{:<40} {:<18} {:<34} {:<20} SOURCE / ERROR", "NAME", "KIND", "VERSION", "EXPIRES");
    for s in &secrets {
        let expires = if s.not_after_unix == 0 { "-".to_owned() } else { crate::unix_time::rfc3339(s.not_after_unix) };
        let version = if s.deleted { "(deleted)".to_owned() } else { s.version.clone() };
        let mut tail = s.source.clone();
        if !s.shadowed_sources.is_empty() {
            tail.push_str(&format!(" (shadows {})", s.shadowed_sources.join(", ")));
        }
        if !s.placeholder.is_empty() {
            tail.push_str(&format!(" PLACEHOLDER ({})", s.placeholder));
        }
        if s.expired {
            tail.push_str(" EXPIRED");
        }
        if let Some(o) = &s.ocsp {
            tail.push_str(&match o.state.as_str() {
                "good" => format!(" ocsp good until {}", o.next_update),
                "revoked" => format!(" OCSP REVOKED at {}", o.revoked_at),
                state => format!(" ocsp {state}{}", if o.last_error.is_empty() { "" } else { " (see last_error)" }),
            });
        }
        if !s.last_error.is_empty() {
            tail.push_str(&format!(" REJECTED: {}", s.last_error));
        }
        println!("{:<40} {:<18} {:<34} {:<20} {}", s.name, s.kind, version, expires, tail);
    }
    println!("\nPROXIES");
    println!("{:<24} {:<12} {:<22} {:<6} {:<30} ACKED (current?)", "NODE", "CLUSTER", "ADDRESS", "PROTO", "SECRET");
    for p in &proxies {
        for n in &p.secrets {
            let current = secrets.iter().find(|s| s.name == n.name).map(|s| s.version.as_str());
            let mark = match (n.acked_version.as_str(), current) {
                ("", _) => "not acked".to_owned(),
                (a, Some(c)) if a == c => format!("{a} (current)"),
                (a, _) => format!("{a} (STALE)"),
            };
            let nack = if n.last_nack.is_empty() { String::new() } else { format!(" NACK: {}", n.last_nack) };
            println!(
                "{:<24} {:<12} {:<22} {:<6} {:<30} {}{}",
                p.node_id, p.cluster, p.address, p.protocol, n.name, mark, nack
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
