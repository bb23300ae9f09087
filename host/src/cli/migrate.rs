//! `meridian migrate`: apply the schema and exit.

use anyhow::Context;

use crate::store;

/// Arguments of `meridian migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// PostgreSQL URL of the region's database.
    #[arg(long, env = "MERIDIAN_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// After restoring the region's database onto another PostgreSQL server (a dump, or
    /// logical replication): renumber the stored transaction ids the commit order is
    /// walked by, which came from the old server. Run once, with every host stopped.
    #[arg(long)]
    pub rekey_transaction_ids: bool,
}

/// Applies pending migrations.
pub async fn execute(args: MigrateArgs) -> anyhow::Result<()> {
    let pool = connect_and_migrate(&args.database_url, 2).await?;
    eprintln!("migrations applied");
    if args.rekey_transaction_ids {
        match store::rekey::rekey(&pool).await? {
            0 => eprintln!("transaction ids are this server's already: nothing to renumber"),
            n => eprintln!("renumbered the ids of the {n} transactions that wrote the events"),
        }
    }
    store::rekey::check(&pool).await?;
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

/// Hides the secret in a database or NATS URL (or a comma-separated list of NATS
/// servers) before it is printed: the password, and for NATS a user given alone,
/// which is a token.
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|server| match url::Url::parse(server.trim()) {
            Ok(mut parsed) if parsed.password().is_some() => {
                let _ = parsed.set_password(Some("***"));
                parsed.to_string()
            }
            Ok(mut parsed)
                if !parsed.username().is_empty()
                    && matches!(parsed.scheme(), "nats" | "tls" | "ws" | "wss") =>
            {
                let _ = parsed.set_username("***");
                parsed.to_string()
            }
            _ => server.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_passwords_and_nats_tokens_only() {
        assert_eq!(
            redact("postgres://app:s3cret@db.internal/events"),
            "postgres://app:***@db.internal/events"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/events"),
            "postgres://postgres@127.0.0.1/events"
        );
        assert_eq!(
            redact("nats://meridian:pa%2Fss@n1:4222,nats://t0ken@n2:4222"),
            "nats://meridian:***@n1:4222,nats://***@n2:4222"
        );
    }
}
