//! The `meridian` command line: one file per command, each with an `execute` function.

/// `println!` for what a command prints for its reader. Piped into `head`, the reader
/// goes away once it has what it wanted: the command then ends quietly with status 0,
/// as other command-line tools do, where `println!` would panic (status 101).
macro_rules! out {
    () => {
        $crate::cli::write_out(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

mod aggregate;
mod client;
mod dev;
mod host;
mod migrate;
mod simulate;

use clap::{Parser, Subcommand};

/// Meridian: run aggregates as sandboxed WASM components, store their events in
/// PostgreSQL, and relay them across regions.
#[derive(Debug, Parser)]
#[command(name = "meridian", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Commands,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run a host: serve the HTTP API and execute commands.
    Host(host::HostArgs),
    /// Run the whole platform on this machine (two regions: PostgreSQL, NATS, hosts, the example plugin) until Ctrl-C.
    Dev(dev::DevArgs),
    /// Apply database migrations and exit.
    Migrate(migrate::MigrateArgs),
    /// Upload and list plugins.
    #[command(subcommand)]
    Plugin(client::PluginCommand),
    /// Send a command to an aggregate, e.g. `meridian command bank-account acc-1 '{"type":"Open","owner":"alice"}'`.
    Command(client::CommandArgs),
    /// Page through the region's events.
    Events(client::EventsArgs),
    /// An aggregate's home region: `meridian aggregate home|move-home ...`.
    #[command(subcommand)]
    Aggregate(aggregate::AggregateCommand),
    /// Inspect the regional cluster, e.g. `meridian cluster status`.
    #[command(subcommand)]
    Cluster(client::ClusterCommand),
    /// Run the deterministic cluster simulator over many seeds (or replay one).
    Simulate(simulate::SimulateArgs),
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Commands::Host(args) => host::execute(args).await,
        Commands::Dev(args) => dev::execute(args).await,
        Commands::Migrate(args) => migrate::execute(args).await,
        Commands::Plugin(command) => client::plugin(command).await,
        Commands::Command(args) => client::command(args).await,
        Commands::Events(args) => client::events(args).await,
        Commands::Cluster(command) => client::cluster(command).await,
        Commands::Aggregate(command) => aggregate::execute(command).await,
        Commands::Simulate(args) => simulate::execute(args).await,
    }
}

/// Sets up logging: `RUST_LOG` style filter from `MERIDIAN_LOG` (default `info`),
/// JSON lines when `MERIDIAN_LOG_FORMAT=json`.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MERIDIAN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("MERIDIAN_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// What [`out!`] writes with: one line to stdout; a closed pipe ends the process with
/// status 0, any other failure with 1.
pub(crate) fn write_out(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(error) = writeln!(std::io::stdout().lock(), "{line}") {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {error}");
        std::process::exit(1);
    }
}
