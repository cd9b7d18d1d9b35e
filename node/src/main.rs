//! The `nnmesh` binary: parse arguments, run the command.
//!
//! [`cli`] turns flags into the libraries' plain configurations; `bench`
//! prints the benchmarks. `anyhow` lives here only: the libraries return
//! typed errors, to which the binary adds what a user should do.

mod bench;
mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.log_filter())),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
