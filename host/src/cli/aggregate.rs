//! `meridian aggregate ...`: an aggregate's home region, and moving it.

use super::client::{Target, client, print_json, send};

/// `meridian aggregate ...`
#[derive(Debug, clap::Subcommand)]
pub enum AggregateCommand {
    /// Move an aggregate's home to another region. Runs in its current home (any host
    /// of any region forwards it there), then waits for the target to confirm it holds
    /// every event, at most half the home's forward timeout (5 s by default): past that
    /// it returns anyway, saying the target is still receiving events (commands sent
    /// there wait for them).
    MoveHome {
        /// Aggregate type.
        aggregate_type: String,
        /// Aggregate id.
        aggregate_id: String,
        /// The region that becomes its home.
        region: String,
        /// Take the aggregate over although its home region is lost: send this to a
        /// host of the target region. Events the lost region committed but had not
        /// relayed yet are not part of the history any more (see the README).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Show where an aggregate is homed, as the region of `--url` sees it.
    Home {
        /// Aggregate type.
        aggregate_type: String,
        /// Aggregate id.
        aggregate_id: String,
        #[command(flatten)]
        target: Target,
    },
}

/// Runs `meridian aggregate ...`.
pub async fn execute(command: AggregateCommand) -> anyhow::Result<()> {
    match command {
        AggregateCommand::MoveHome {
            aggregate_type,
            aggregate_id,
            region,
            force,
            target,
        } => {
            let url = target.endpoint(&[
                "v1",
                "aggregates",
                &aggregate_type,
                &aggregate_id,
                "move-home",
            ])?;
            let body = serde_json::json!({ "region": region, "force": force });
            let (_, moved) = send(client(&target).post(url).json(&body), &target.url).await?;
            if target.json {
                print_json(&moved);
            } else {
                out!(
                    "{aggregate_type}/{aggregate_id}: home moved from {} to {} at version {}{}",
                    moved["from"].as_str().unwrap_or("?"),
                    moved["to"].as_str().unwrap_or("?"),
                    moved["version"],
                    if moved["target_has_all_events"] == serde_json::Value::Bool(true) {
                        "; the new home has every event"
                    } else {
                        "; the new home is still receiving events (commands wait for them)"
                    }
                );
            }
        }
        AggregateCommand::Home {
            aggregate_type,
            aggregate_id,
            target,
        } => {
            let url =
                target.endpoint(&["v1", "aggregates", &aggregate_type, &aggregate_id, "home"])?;
            let (_, home) = send(client(&target).get(url), &target.url).await?;
            if target.json {
                print_json(&home);
            } else {
                match home["home_region"].as_str() {
                    Some(h) => out!(
                        "{aggregate_type}/{aggregate_id}: homed in {h} (region {} holds version {})",
                        home["region"].as_str().unwrap_or("?"),
                        home["version"]
                    ),
                    None => out!(
                        "{aggregate_type}/{aggregate_id}: region {} holds no events of it",
                        home["region"].as_str().unwrap_or("?")
                    ),
                }
            }
        }
    }
    Ok(())
}
