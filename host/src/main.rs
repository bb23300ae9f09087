//! The `meridian` binary: a thin shell over the library's command line.

use clap::Parser;

/// mimalloc rather than glibc's malloc: a request allocates and frees many small
/// buffers across threads, and under load glibc spent a fifth of the host's CPU on it
/// (consolidating and unlinking chunks); see BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
