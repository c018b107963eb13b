use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = certwire::cli::Cli::parse();
    match certwire::cli::run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("certwire: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
