//! `revenue_by_day`: revenue in cents and order count per UTC day of `placedAt`,
//! corrected by cancellations: `{day, revenue_cents, orders}`.
//!
//! A cancellation names only the order, so the projection keeps its own entry per
//! order (`~order/<orderId>`: day and total). That entry lives in the same source
//! partition as the order's cancel event (both are keyed by order id on the
//! topic), so the fold finds it without looking elsewhere. Days get one partial per
//! partition; reads add them up. Order entries are bookkeeping and are not served.
//! A second `OrderPlaced` for an order already placed is ignored.

use engine::projection::{Event, FoldError, OptionsError, PartitionState, Projection};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

const PLACED: &str = "shop.orders.OrderPlaced";
const CANCELLED: &str = "shop.orders.OrderCancelled";
const ORDER_PREFIX: &str = "~order/";

/// `revenue_by_day` takes no options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {}

/// Builds the projection from its options.
pub fn build(options: &Json) -> Result<Box<dyn Projection>, OptionsError> {
    let _: Options = serde_json::from_value(options.clone())?;
    Ok(Box::new(RevenueByDay))
}

/// The revenue-by-day projection.
pub struct RevenueByDay;

/// One day's revenue (a partial, or the merged whole).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Day {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    /// Totals of the day's orders that are not cancelled, in cents.
    pub revenue_cents: i64,
    /// Number of those orders.
    pub orders: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderEntry {
    day: String,
    total_cents: i64,
    cancelled: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Placed {
    order_id: String,
    total_cents: i64,
    placed_at: i64,
}

/// The UTC calendar day of a millisecond timestamp.
pub fn utc_day(millis: i64) -> Result<String, FoldError> {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .ok_or_else(|| FoldError(format!("placedAt {millis} is not a representable time")))
}

fn parse<T: serde::de::DeserializeOwned>(json: &Json) -> Result<T, FoldError> {
    T::deserialize(json).map_err(|e| FoldError(format!("stored state unreadable: {e}")))
}

fn to_json<T: Serialize>(value: &T) -> Result<Json, FoldError> {
    serde_json::to_value(value).map_err(|e| FoldError(e.to_string()))
}

fn add_to_day(state: &mut dyn PartitionState, day: &str, cents: i64, orders: i64) -> Result<(), FoldError> {
    state.update(day, &mut |current| {
        let mut totals = match current.as_ref() {
            Some(json) => parse::<Day>(json)?,
            None => Day {
                day: day.to_owned(),
                revenue_cents: 0,
                orders: 0,
            },
        };
        let overflow = || FoldError(format!("the revenue of {day} overflows an i64"));
        totals.revenue_cents = totals.revenue_cents.checked_add(cents).ok_or_else(overflow)?;
        totals.orders = totals.orders.checked_add(orders).ok_or_else(overflow)?;
        *current = Some(to_json(&totals)?);
        Ok(())
    })
}

impl Projection for RevenueByDay {
    fn apply(&self, event: &Event<'_>, state: &mut dyn PartitionState) -> Result<(), FoldError> {
        match event.name {
            PLACED => {
                let placed: Placed = event.parse()?;
                let day = utc_day(placed.placed_at)?;
                let entry_key = format!("{ORDER_PREFIX}{}", placed.order_id);
                if state.get(&entry_key)?.is_some() {
                    return Ok(());
                }
                let entry = to_json(&OrderEntry {
                    day: day.clone(),
                    total_cents: placed.total_cents,
                    cancelled: false,
                })?;
                add_to_day(state, &day, placed.total_cents, 1)?;
                state.update(&entry_key, &mut |current| {
                    *current = Some(entry.clone());
                    Ok(())
                })
            }
            CANCELLED => {
                let order_id = crate::fields::string_field(event, "orderId")?;
                let entry_key = format!("{ORDER_PREFIX}{order_id}");
                let Some(entry) = state.get(&entry_key)? else {
                    return Ok(());
                };
                let mut entry: OrderEntry = parse(&entry)?;
                if entry.cancelled {
                    return Ok(());
                }
                entry.cancelled = true;
                let updated = to_json(&entry)?;
                let refund = entry
                    .total_cents
                    .checked_neg()
                    .ok_or_else(|| FoldError(format!("the total of order {order_id} cannot be negated")))?;
                add_to_day(state, &entry.day, refund, -1)?;
                state.update(&entry_key, &mut |current| {
                    *current = Some(updated.clone());
                    Ok(())
                })
            }
            _ => Ok(()),
        }
    }

    fn merge(&self, key: &str, partials: Vec<Json>) -> Result<Option<Json>, FoldError> {
        if key.starts_with(ORDER_PREFIX) {
            return Ok(None);
        }
        let mut parts = partials.iter().map(parse::<Day>);
        let Some(merged) = parts.next() else {
            return Ok(None);
        };
        let mut merged = merged?;
        let overflow = || FoldError(format!("the revenue of {key} overflows when merged"));
        for part in parts {
            let part = part?;
            merged.revenue_cents = merged
                .revenue_cents
                .checked_add(part.revenue_cents)
                .ok_or_else(overflow)?;
            merged.orders = merged.orders.checked_add(part.orders).ok_or_else(overflow)?;
        }
        to_json(&merged).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_calendar_days() {
        assert_eq!(utc_day(0).unwrap(), "1970-01-01");
        assert_eq!(utc_day(1_700_000_000_000).unwrap(), "2023-11-14");
        assert_eq!(utc_day(-1).unwrap(), "1969-12-31");
    }

    #[test]
    fn merge_adds_partials_and_hides_order_entries() {
        let day = |r: i64, o: i64| serde_json::json!({"day": "2023-11-14", "revenue_cents": r, "orders": o});
        assert_eq!(
            RevenueByDay.merge("2023-11-14", vec![day(100, 1), day(250, 2)]),
            Ok(Some(day(350, 3)))
        );
        assert_eq!(
            RevenueByDay.merge("~order/o1", vec![serde_json::json!({})]),
            Ok(None)
        );
        let error = RevenueByDay
            .merge("2023-11-14", vec![day(i64::MAX, 1), day(1, 1)])
            .unwrap_err();
        assert!(error.0.contains("overflows"), "{error}");
    }
}
