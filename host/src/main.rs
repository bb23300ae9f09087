//! The `meridian` binary: a thin shell over the library's command line.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = meridian::cli::Cli::parse();
    meridian::cli::init_tracing();
    if let Err(error) = meridian::cli::run(cli).await {
        // One line a person can act on: the error and its causes, no backtrace.
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
