use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = certwire::cli::Cli::parse();
    match certwire::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("certwire: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
