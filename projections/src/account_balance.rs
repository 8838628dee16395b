//! `account_balance`: one entity per bank account, keyed by `accountId`, over the
//! `accounts` topic: `{account_id, owner, balance_cents, deposits, withdrawals}`
//! (`deposits` and `withdrawals` count the movements). Movements of an account that
//! was never opened are ignored; a negative amount is refused (`fold_failed`).

use engine::projection::{Entity, Event, FoldError, Projection};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::fields::string_field;

const OPENED: &str = "bank.accounts.AccountOpened";
const DEPOSITED: &str = "bank.accounts.MoneyDeposited";
const WITHDRAWN: &str = "bank.accounts.MoneyWithdrawn";

/// `account_balance` takes no options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {}

/// Builds the projection from its options.
pub fn build(options: &Json) -> Result<Box<dyn Projection>, String> {
    let _: Options = serde_json::from_value(options.clone()).map_err(|e| e.to_string())?;
    Ok(Box::new(AccountBalance))
}

/// The account balance projection.
pub struct AccountBalance;

/// The state of one account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    /// The account.
    pub account_id: String,
    /// Its owner.
    pub owner: String,
    /// Deposits minus withdrawals, in cents.
    pub balance_cents: i64,
    /// Number of deposits.
    pub deposits: u64,
    /// Number of withdrawals.
    pub withdrawals: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Opened {
    account_id: String,
    owner: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Movement {
    amount_cents: i64,
}

impl Entity for AccountBalance {
    fn key(&self, event: &Event<'_>) -> Result<Option<String>, FoldError> {
        match event.name {
            OPENED | DEPOSITED | WITHDRAWN => Ok(Some(string_field(event, "accountId")?.to_owned())),
            _ => Ok(None),
        }
    }

    fn fold(&self, state: &mut Option<Json>, event: &Event<'_>) -> Result<(), FoldError> {
        let next = if event.name == OPENED {
            let opened: Opened = event.parse()?;
            Balance {
                account_id: opened.account_id,
                owner: opened.owner,
                balance_cents: 0,
                deposits: 0,
                withdrawals: 0,
            }
        } else {
            let Some(current) = state.as_ref() else {
                return Ok(());
            };
            let mut balance: Balance = Balance::deserialize(current)
                .map_err(|e| FoldError(format!("stored balance is unreadable: {e}")))?;
            let movement: Movement = event.parse()?;
            if movement.amount_cents < 0 {
                return Err(FoldError(format!("{} with a negative amount", event.name)));
            }
            if event.name == DEPOSITED {
                balance.balance_cents += movement.amount_cents;
                balance.deposits += 1;
            } else {
                balance.balance_cents -= movement.amount_cents;
                balance.withdrawals += 1;
            }
            balance
        };
        *state = Some(serde_json::to_value(next).map_err(|e| FoldError(e.to_string()))?);
        Ok(())
    }

    /// Accounts are keyed like the topic: one partition holds each.
    fn merge(&self, _key: &str, partials: Vec<Json>) -> Option<Json> {
        partials.into_iter().next()
    }
}
