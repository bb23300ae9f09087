//! Argument parsing shared by the benchmark binaries.

use std::path::PathBuf;
use std::time::Duration;

use crate::workload::is_valid_prefix;

/// Options of the benchmarks that drive bank-account load: where the results go, and
/// which accounts and random choices a run uses.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Run id put into account ids (`acc-<prefix>-<n>`); random by default, so reruns
    /// against the same database open fresh accounts.
    #[arg(long)]
    pub prefix: Option<String>,

    /// Seed for the random choice of accounts, commands and amounts.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl RunArgs {
    /// The run id: `--prefix` once checked, or a random one.
    ///
    /// # Errors
    ///
    /// `--prefix` holds something other than letters, digits, `-` and `_`.
    pub fn prefix(&self) -> Result<String, String> {
        match &self.prefix {
            Some(prefix) if is_valid_prefix(prefix) => Ok(prefix.clone()),
            Some(prefix) => Err(format!(
                "--prefix {prefix:?} may only contain letters, digits, - and _"
            )),
            None => Ok(uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()),
        }
    }
}

/// Parses a duration such as `10s`, `500ms`, `2m`, `1.5s` or a bare number of seconds.
///
/// Kept local rather than pulling in a crate for it: these are the only forms the
/// benchmark scripts use.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 10s, 500ms, 2m"))?;
    let seconds = match unit.trim() {
        "" | "s" | "sec" | "secs" => value,
        "ms" => value / 1_000.0,
        "m" | "min" | "mins" => value * 60.0,
        "h" => value * 3_600.0,
        other => return Err(format!("invalid duration unit {other:?} in {text:?}")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("invalid duration {text:?}"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
