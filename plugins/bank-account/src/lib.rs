//! A bank account aggregate: the example Meridian plugin.
//!
//! Build the component (from the workspace root) and try it on a running Meridian:
//!
//! ```text
//! rustup target add wasm32-wasip2
//! cargo build --release --target wasm32-wasip2 -p bank-account
//! meridian plugin upload bank-account target/wasm32-wasip2/release/bank_account.wasm
//! curl -X POST http://127.0.0.1:8080/v1/aggregates/bank-account/acc-1 \
//!     -H 'content-type: application/json' \
//!     -d '{"command":{"type":"Open","owner":"alice"}}'
//! ```
//!
//! Test it natively with `cargo test -p bank-account`.
//!
//! Commands: `{"type":"Open","owner":"alice"}`, `{"type":"Deposit","amount":10}`,
//! `{"type":"Withdraw","amount":5}`. Events: `Opened`, `Deposited`, `Withdrawn`.
//! State: `{"owner":"alice","balance":5,"open":true}`.

use meridian_guest::{Aggregate, Rejection};
use serde::{Deserialize, Serialize};

/// The bank account aggregate, type `bank-account`.
pub struct BankAccount;

/// An account's state, stored as `{"owner":"alice","balance":5,"open":true}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Who opened the account; empty until it is opened.
    pub owner: String,
    /// The balance in the smallest currency unit; never negative.
    pub balance: i64,
    /// Whether the account has been opened.
    pub open: bool,
}

/// What a caller can ask of an account, as JSON tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Command {
    /// Opens the account for `owner`: `{"type":"Open","owner":"alice"}`.
    Open {
        /// The account holder; must not be blank.
        owner: String,
    },
    /// Credits the account: `{"type":"Deposit","amount":10}`.
    Deposit {
        /// A positive amount.
        amount: i64,
    },
    /// Debits the account: `{"type":"Withdraw","amount":5}`.
    Withdraw {
        /// A positive amount, at most the balance.
        amount: i64,
    },
}

/// What happened to an account; the variant name is the stored event type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The account was opened for `owner`.
    Opened {
        /// The account holder.
        owner: String,
    },
    /// `amount` was credited.
    Deposited {
        /// The amount credited, positive.
        amount: i64,
    },
    /// `amount` was debited.
    Withdrawn {
        /// The amount debited, positive.
        amount: i64,
    },
}

impl Aggregate for BankAccount {
    const TYPE: &'static str = "bank-account";
    type State = State;
    type Command = Command;
    type Event = Event;

    fn handle(state: &State, command: Command) -> Result<Vec<Event>, Rejection> {
        match command {
            Command::Open { owner } => {
                if state.open {
                    return Err("account is already open".into());
                }
                if owner.trim().is_empty() {
                    return Err("owner must not be empty".into());
                }
                Ok(vec![Event::Opened { owner }])
            }
            Command::Deposit { amount } => {
                ensure_open(state)?;
                ensure_positive(amount)?;
                // Checked here so that `apply`, which cannot refuse, never overflows.
                if state.balance.checked_add(amount).is_none() {
                    return Err(Rejection::new(format!(
                        "balance would overflow: balance {}, deposit {amount}",
                        state.balance
                    )));
                }
                Ok(vec![Event::Deposited { amount }])
            }
            Command::Withdraw { amount } => {
                ensure_open(state)?;
                ensure_positive(amount)?;
                if amount > state.balance {
                    return Err(Rejection::new(format!(
                        "insufficient funds: balance {}, withdrawal {amount}",
                        state.balance
                    )));
                }
                Ok(vec![Event::Withdrawn { amount }])
            }
        }
    }

    fn apply(mut state: State, event: Event) -> State {
        match event {
            Event::Opened { owner } => {
                state.owner = owner;
                state.open = true;
            }
            // Saturating rather than panicking: `handle` rules overflow out, and a trap
            // while replaying history would make the account unloadable.
            Event::Deposited { amount } => state.balance = state.balance.saturating_add(amount),
            Event::Withdrawn { amount } => state.balance = state.balance.saturating_sub(amount),
        }
        state
    }
}

fn ensure_open(state: &State) -> Result<(), Rejection> {
    if state.open {
        Ok(())
    } else {
        Err("account is not open".into())
    }
}

fn ensure_positive(amount: i64) -> Result<(), Rejection> {
    if amount > 0 {
        Ok(())
    } else {
        Err(Rejection::new(format!(
            "amount must be positive, got {amount}"
        )))
    }
}

meridian_guest::export_aggregate!(BankAccount);

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_guest::codec;
    use meridian_guest::testing::AggregateTest;

    type Test = AggregateTest<BankAccount>;

    fn opened() -> Event {
        Event::Opened {
            owner: "alice".into(),
        }
    }

    #[test]
    fn describes_itself() {
        let description = codec::describe::<BankAccount>();
        assert_eq!(description.aggregate_type, "bank-account");
        assert_eq!(description.schema_version, 1);
    }

    #[test]
    fn opens_a_new_account() {
        let state = Test::new()
            .when(Command::Open {
                owner: "alice".into(),
            })
            .then_expect_events(vec![opened()]);
        assert_eq!(
            state,
            State {
                owner: "alice".into(),
                balance: 0,
                open: true
            }
        );
    }

    #[test]
    fn deposits_and_withdraws() {
        let state = Test::given(vec![opened(), Event::Deposited { amount: 10 }])
            .when(Command::Withdraw { amount: 5 })
            .then_expect_events(vec![Event::Withdrawn { amount: 5 }]);
        assert_eq!(state.balance, 5);

        Test::given(vec![opened()])
            .when(Command::Deposit { amount: 10 })
            .then_expect_events(vec![Event::Deposited { amount: 10 }]);
    }

    #[test]
    fn withdrawing_the_whole_balance_is_allowed() {
        let state = Test::given(vec![opened(), Event::Deposited { amount: 7 }])
            .when(Command::Withdraw { amount: 7 })
            .then_expect_events(vec![Event::Withdrawn { amount: 7 }]);
        assert_eq!(state.balance, 0);
    }

    #[test]
    fn refuses_to_open_twice() {
        Test::given(vec![opened()])
            .when(Command::Open {
                owner: "bob".into(),
            })
            .then_expect_rejection("account is already open");
    }

    #[test]
    fn refuses_a_blank_owner() {
        Test::new()
            .when(Command::Open { owner: "".into() })
            .then_expect_rejection("owner must not be empty");
        Test::new()
            .when(Command::Open { owner: "  ".into() })
            .then_expect_rejection("owner must not be empty");
    }

    #[test]
    fn refuses_money_before_open() {
        Test::new()
            .when(Command::Deposit { amount: 10 })
            .then_expect_rejection("account is not open");
        Test::new()
            .when(Command::Withdraw { amount: 10 })
            .then_expect_rejection("account is not open");
    }

    #[test]
    fn refuses_amounts_that_are_not_positive() {
        Test::given(vec![opened()])
            .when(Command::Deposit { amount: 0 })
            .then_expect_rejection("amount must be positive, got 0");
        Test::given(vec![opened()])
            .when(Command::Deposit { amount: -3 })
            .then_expect_rejection("amount must be positive, got -3");
        Test::given(vec![opened(), Event::Deposited { amount: 10 }])
            .when(Command::Withdraw { amount: 0 })
            .then_expect_rejection("amount must be positive, got 0");
    }

    #[test]
    fn refuses_to_overdraw() {
        Test::given(vec![opened(), Event::Deposited { amount: 5 }])
            .when(Command::Withdraw { amount: 10 })
            .then_expect_rejection("insufficient funds: balance 5, withdrawal 10");
    }

    #[test]
    fn refuses_to_overflow_the_balance() {
        Test::given(vec![opened(), Event::Deposited { amount: i64::MAX }])
            .when(Command::Deposit { amount: 1 })
            .then_expect_rejection("balance would overflow");
    }

    #[test]
    fn rejects_malformed_commands_with_serdes_reason() {
        Test::new()
            .when_json(r#"{"type":"Foo"}"#)
            .then_expect_rejection(
                "invalid command: unknown variant `Foo`, expected one of `Open`, `Deposit`, `Withdraw`",
            );
        Test::given(vec![opened()])
            .when_json(r#"{"type":"Deposit","amount":"ten"}"#)
            .then_expect_rejection("invalid command: invalid type: string \"ten\", expected i64");
        Test::new()
            .when_json(r#"{"type":"Open"}"#)
            .then_expect_rejection("invalid command: missing field `owner`");
        Test::new()
            .when_json("not json")
            .then_expect_rejection("invalid command: expected ident");
        Test::new()
            .when_json("")
            .then_expect_rejection("invalid command: EOF");
    }

    #[test]
    fn state_json_has_the_documented_shape() {
        let state = codec::apply::<BankAccount>(b"", "Opened", br#"{"owner":"alice"}"#).unwrap();
        let state = codec::apply::<BankAccount>(&state, "Deposited", br#"{"amount":5}"#).unwrap();
        assert_eq!(
            String::from_utf8(state).unwrap(),
            r#"{"owner":"alice","balance":5,"open":true}"#
        );
    }

    #[test]
    fn events_are_encoded_as_type_and_payload() {
        let events = codec::handle::<BankAccount>(
            br#"{"owner":"alice","balance":5,"open":true}"#,
            br#"{"type":"Withdraw","amount":5}"#,
        )
        .unwrap();
        assert_eq!(
            events,
            vec![("Withdrawn".to_owned(), br#"{"amount":5}"#.to_vec())]
        );
    }

    #[test]
    fn apply_refuses_unknown_events_and_bad_state() {
        let error = codec::apply::<BankAccount>(b"", "Closed", b"null").unwrap_err();
        assert!(error.contains("unknown variant `Closed`"), "{error}");
        let error = codec::apply::<BankAccount>(b"{", "Opened", br#"{"owner":"a"}"#).unwrap_err();
        assert!(error.starts_with("invalid state:"), "{error}");
    }
}
