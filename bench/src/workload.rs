//! What the load generator sends: the bank-account command mix and its setup.

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use uuid::Uuid;

/// The aggregate type every benchmarked service implements.
pub const BANK_ACCOUNT: &str = "bank-account";

/// Share of deposits in the mix, out of 10; the rest are withdrawals.
const DEPOSITS_PER_TEN: u32 = 7;

/// Amounts are drawn uniformly from this range.
const AMOUNTS: std::ops::RangeInclusive<u64> = 1..=100;

/// One command request: a path relative to a target's base URL and its JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Path starting with `/`, e.g. `/v1/aggregates/bank-account/acc-x-1`.
    pub path: String,
    /// The JSON body to POST.
    pub body: Value,
}

/// A source of requests for the measured phase. Implementations must be cheap: they run
/// on the load generator's hot path, on the same machine as the service under test.
pub trait Workload: Send + Sync + 'static {
    /// Draws the next request, using `rng` for every random choice so a run is
    /// reproducible from its seed.
    fn next_request(&self, rng: &mut StdRng) -> Request;
}

/// The path of an aggregate's command endpoint.
pub fn aggregate_path(aggregate_type: &str, aggregate_id: &str) -> String {
    format!("/v1/aggregates/{aggregate_type}/{aggregate_id}")
}

/// Wraps a command in the request envelope with a fresh command id.
///
/// The id comes from the OS generator rather than the seeded RNG: services deduplicate
/// by command id, so two runs with the same seed must still send distinct ids.
pub fn command_body(command: Value) -> Value {
    json!({ "command": command, "command_id": Uuid::new_v4() })
}

/// The id of the `n`th account of a run. The run prefix keeps reruns against the same
/// database from colliding with accounts an earlier run opened.
pub fn account_id(prefix: &str, n: usize) -> String {
    format!("acc-{prefix}-{n}")
}

/// Whether a run prefix can be put in a URL path and an aggregate id as is.
pub fn is_valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A command of the measured mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BankCommand {
    /// `{"type":"Deposit","amount":n}`
    Deposit {
        /// Amount, 1..=100.
        amount: u64,
    },
    /// `{"type":"Withdraw","amount":n}`
    Withdraw {
        /// Amount, 1..=100.
        amount: u64,
    },
}

impl BankCommand {
    /// Draws a command: 70% deposits, 30% withdrawals, amounts uniform in 1..=100.
    pub fn pick<R: Rng + ?Sized>(rng: &mut R) -> Self {
        let amount = rng.random_range(AMOUNTS);
        if rng.random_ratio(DEPOSITS_PER_TEN, 10) {
            BankCommand::Deposit { amount }
        } else {
            BankCommand::Withdraw { amount }
        }
    }

    /// The command as the service's JSON.
    pub fn to_json(self) -> Value {
        match self {
            BankCommand::Deposit { amount } => json!({ "type": "Deposit", "amount": amount }),
            BankCommand::Withdraw { amount } => json!({ "type": "Withdraw", "amount": amount }),
        }
    }
}

/// The request that opens an account.
pub fn open_account_request(account_id: &str, owner: &str) -> Request {
    Request {
        path: aggregate_path(BANK_ACCOUNT, account_id),
        body: command_body(json!({ "type": "Open", "owner": owner })),
    }
}

/// The requests that open accounts `0..accounts` of a run.
pub fn open_account_requests(prefix: &str, accounts: usize) -> Vec<Request> {
    (0..accounts)
        .map(|n| open_account_request(&account_id(prefix, n), &format!("owner-{n}")))
        .collect()
}

/// Deposits and withdrawals against accounts chosen uniformly at random.
#[derive(Debug, Clone)]
pub struct BankAccountMix {
    // Paths are built once: formatting them per request is wasted load-generator CPU.
    paths: Vec<String>,
}

impl BankAccountMix {
    /// A mix over accounts `0..accounts` of the run `prefix`.
    ///
    /// # Panics
    /// If `accounts` is zero.
    pub fn new(prefix: &str, accounts: usize) -> Self {
        assert!(accounts > 0, "the mix needs at least one account");
        let paths = (0..accounts)
            .map(|n| aggregate_path(BANK_ACCOUNT, &account_id(prefix, n)))
            .collect();
        Self { paths }
    }
}

impl Workload for BankAccountMix {
    fn next_request(&self, rng: &mut StdRng) -> Request {
        let path = self.paths[rng.random_range(0..self.paths.len())].clone();
        Request {
            path,
            body: command_body(BankCommand::pick(rng).to_json()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::HashSet;

    #[test]
    fn mix_is_seventy_thirty_with_amounts_in_range() {
        let mut rng = StdRng::seed_from_u64(7);
        let n = 100_000;
        let mut deposits = 0;
        let mut amounts = HashSet::new();
        for _ in 0..n {
            let amount = match BankCommand::pick(&mut rng) {
                BankCommand::Deposit { amount } => {
                    deposits += 1;
                    amount
                }
                BankCommand::Withdraw { amount } => amount,
            };
            assert!((1..=100).contains(&amount), "amount {amount}");
            amounts.insert(amount);
        }
        let share = deposits as f64 / n as f64;
        assert!((share - 0.7).abs() < 0.01, "deposit share {share}");
        assert_eq!(amounts.len(), 100, "every amount 1..=100 is drawn");
    }

    #[test]
    fn mix_is_reproducible_from_the_seed() {
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..50)
                .map(|_| BankCommand::pick(&mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn command_json_matches_the_api() {
        assert_eq!(
            BankCommand::Deposit { amount: 10 }.to_json(),
            json!({"type": "Deposit", "amount": 10})
        );
        assert_eq!(
            BankCommand::Withdraw { amount: 5 }.to_json(),
            json!({"type": "Withdraw", "amount": 5})
        );
    }

    #[test]
    fn requests_have_the_envelope_and_fresh_command_ids() {
        let mix = BankAccountMix::new("run1", 3);
        let mut rng = StdRng::seed_from_u64(3);
        let mut ids = HashSet::new();
        for _ in 0..100 {
            let req = mix.next_request(&mut rng);
            assert!(
                [0, 1, 2]
                    .iter()
                    .any(|n| req.path == format!("/v1/aggregates/bank-account/acc-run1-{n}")),
                "path {}",
                req.path
            );
            let id = req.body["command_id"].as_str().unwrap();
            let id = Uuid::parse_str(id).unwrap();
            assert_eq!(id.get_version_num(), 4);
            assert!(ids.insert(id), "command ids are unique");
            let ty = req.body["command"]["type"].as_str().unwrap();
            assert!(ty == "Deposit" || ty == "Withdraw");
        }
    }

    #[test]
    fn open_requests_cover_every_account() {
        let reqs = open_account_requests("r", 3);
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[2].path, "/v1/aggregates/bank-account/acc-r-2");
        assert_eq!(
            reqs[2].body["command"],
            json!({"type": "Open", "owner": "owner-2"})
        );
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(is_valid_prefix("a1b2-c_3"));
        assert!(!is_valid_prefix(""));
        assert!(!is_valid_prefix("a/b"));
        assert!(!is_valid_prefix("a b"));
    }
}
