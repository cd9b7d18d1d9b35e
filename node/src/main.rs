//! The `nnmesh` binary: parse arguments, run the command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = nnmesh_node::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.log_filter())),
        )
        .with_writer(std::io::stderr)
        .init();
    match nnmesh_node::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
