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
    let pool = store::connect(&store::DatabaseConfig {
        url: args.database_url.clone(),
        max_connections: 2,
    })
    .await
    .with_context(|| {
        format!(
            "cannot connect to PostgreSQL at {}",
            redact(&args.database_url)
        )
    })?;
    store::migrate(&pool).await.context("applying migrations")?;
    eprintln!("migrations applied");
    Ok(())
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
