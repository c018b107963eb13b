//! The `certwire` command line.

mod bootstrap;
mod certgen;
mod check;
mod ready_file;
mod serve;
mod status;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::ServeFlags;
use crate::logging::LogFormat;

#[derive(Debug, Parser)]
#[command(name = "certwire", version, about = "Envoy SDS control plane: serves TLS secrets and pushes rotations live")]
pub struct Cli {
    /// Log format (logs go to stderr; RUST_LOG filters, default info)
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start and matched once: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the SDS server (with no flags: the dev CA on 127.0.0.1:18000)
    Serve(ServeFlags),
    /// Validate a secret directory, or a certificate and key, offline
    Check(check::CheckArgs),
    /// Print a working Envoy bootstrap that takes its certificates from certwire
    Bootstrap(bootstrap::BootstrapArgs),
    /// Make a CA, certwire's server certificate and client certificates for proxies (mTLS)
    Certgen(certgen::CertgenArgs),
    /// Show secrets and which proxies have acked which version
    Status(status::StatusArgs),
}

/// Runs the command; the process exit code comes from the result.
pub fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Serve(flags) => {
            // Settings first: they size the runtime.
            let settings = crate::config::Settings::resolve(&flags, cli.log_format)?;
            serve_runtime(settings.workers)?.block_on(serve::run(settings))
        }
        Command::Check(args) => Ok(check::run(&args)),
        Command::Bootstrap(args) => bootstrap::run(&args),
        Command::Certgen(args) => certgen::run(&args),
        // One client call at a time: no thread per CPU for it.
        Command::Status(args) => runtime(tokio::runtime::Builder::new_current_thread())?.block_on(status::run(&args)),
    }
}

/// The server's runtime: `workers` threads, or one per CPU.
fn serve_runtime(workers: Option<std::num::NonZeroUsize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n.get());
    }
    runtime(builder)
}

fn runtime(mut builder: tokio::runtime::Builder) -> anyhow::Result<tokio::runtime::Runtime> {
    builder.enable_all().build().context("starting the async runtime")
}
