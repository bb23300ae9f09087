//! `meridian migrate`: apply the schema and exit.

use anyhow::Context;

use crate::store;

/// Arguments of `meridian migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// PostgreSQL URL of the region's database.
    #[arg(long, env = "MERIDIAN_DATABASE_URL")]
    pub database_url: String,
}

/// Applies pending migrations.
pub async fn execute(args: MigrateArgs) -> anyhow::Result<()> {
    connect_and_migrate(&args.database_url, 2).await?;
    eprintln!("migrations applied");
    Ok(())
}

/// Connects to a region's database and applies pending migrations, with errors that
/// name the database (its password hidden).
pub async fn connect_and_migrate(url: &str, max_connections: u32) -> anyhow::Result<sqlx::PgPool> {
    let pool = store::connect(&store::DatabaseConfig {
        url: url.to_string(),
        max_connections,
    })
    .await
    .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(url)))?;
    store::migrate(&pool)
        .await
        .with_context(|| format!("applying migrations to {}", redact(url)))?;
    Ok(pool)
}

/// Hides a password in a database URL before it is printed.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}
