//! `account_balance`: one entity per bank account, keyed by `accountId`, over the
//! `accounts` topic: `{account_id, owner, balance_cents, deposits, withdrawals}`
//! (`deposits` and `withdrawals` count the movements). Movements of an account that
//! was never opened are ignored; a negative amount, or one that would take the
//! balance past the range of an `i64`, is refused (`fold_failed`).

use std::borrow::Cow;

use engine::projection::{Entity, Event, FoldError, OptionsError, Projection};
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
pub fn build(options: &Json) -> Result<Box<dyn Projection>, OptionsError> {
    let _: Options = serde_json::from_value(options.clone())?;
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
    type State = Balance;

    fn key<'e>(&self, event: &Event<'e>) -> Result<Option<Cow<'e, str>>, FoldError> {
        match event.name {
            OPENED | DEPOSITED | WITHDRAWN => Ok(Some(Cow::Borrowed(string_field(event, "accountId")?))),
            _ => Ok(None),
        }
    }

    fn fold(&self, state: &mut Option<Balance>, event: &Event<'_>) -> Result<(), FoldError> {
        if event.name == OPENED {
            let opened: Opened = event.parse()?;
            *state = Some(Balance {
                account_id: opened.account_id,
                owner: opened.owner,
                balance_cents: 0,
                deposits: 0,
                withdrawals: 0,
            });
            return Ok(());
        }
        let Some(balance) = state.as_mut() else {
            return Ok(());
        };
        let movement: Movement = event.parse()?;
        if movement.amount_cents < 0 {
            return Err(FoldError(format!("{} with a negative amount", event.name)));
        }
        let before = balance.balance_cents;
        let overflow = || {
            FoldError(format!(
                "{} of {} cents overflows the balance of {} ({before} cents)",
                event.name, movement.amount_cents, balance.account_id
            ))
        };
        // Both checked before either changes, so a failure leaves the balance.
        if event.name == DEPOSITED {
            let cents = before.checked_add(movement.amount_cents).ok_or_else(overflow)?;
            let count = balance.deposits.checked_add(1).ok_or_else(overflow)?;
            (balance.balance_cents, balance.deposits) = (cents, count);
        } else {
            let cents = before.checked_sub(movement.amount_cents).ok_or_else(overflow)?;
            let count = balance.withdrawals.checked_add(1).ok_or_else(overflow)?;
            (balance.balance_cents, balance.withdrawals) = (cents, count);
        }
        Ok(())
    }

    /// Accounts are keyed like the topic: one partition holds each.
    fn merge(&self, _key: &str, partials: Vec<Balance>) -> Result<Option<Json>, FoldError> {
        partials
            .into_iter()
            .next()
            .map(|b| serde_json::to_value(b).map_err(|e| FoldError(e.to_string())))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use apache_avro::types::Value;
    use engine::projection::EventMeta;

    use super::*;

    fn fold(state: &mut Option<Balance>, name: &str, fields: &[(&str, Value)]) -> Result<(), FoldError> {
        let meta = EventMeta {
            topic: "accounts".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key: None,
        };
        let payload = Value::Record(fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect());
        let event = Event {
            name,
            payload: &payload,
            meta: &meta,
        };
        AccountBalance.fold(state, &event)
    }

    fn movement(cents: i64) -> [(&'static str, Value); 3] {
        [
            ("accountId", Value::String("a1".into())),
            ("amountCents", Value::Long(cents)),
            ("at", Value::TimestampMillis(1)),
        ]
    }

    #[test]
    fn a_deposit_or_withdrawal_past_the_i64_range_fails_and_leaves_the_balance() {
        let mut state = None;
        let opened = [
            ("accountId", Value::String("a1".into())),
            ("owner", Value::String("ann".into())),
            ("openedAt", Value::TimestampMillis(1)),
        ];
        fold(&mut state, OPENED, &opened).unwrap();
        fold(&mut state, DEPOSITED, &movement(i64::MAX - 5)).unwrap();
        let before = state.clone();
        let error = fold(&mut state, DEPOSITED, &movement(6)).unwrap_err();
        assert!(error.0.contains("overflows the balance of a1"), "{error}");
        assert_eq!(state, before, "the balance is unchanged");

        let mut state = None;
        fold(&mut state, OPENED, &opened).unwrap();
        fold(&mut state, WITHDRAWN, &movement(i64::MAX)).unwrap();
        fold(&mut state, WITHDRAWN, &movement(1)).unwrap();
        let before = state.clone();
        assert!(fold(&mut state, WITHDRAWN, &movement(1)).is_err());
        assert_eq!(state, before);
        assert_eq!(before.unwrap().balance_cents, i64::MIN);
    }
}
