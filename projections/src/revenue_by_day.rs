//! `revenue_by_day`: revenue in cents and order count per UTC day of `placedAt`,
//! corrected by cancellations: `{day, revenue_cents, orders}`.
//!
//! A cancellation names only the order, so the projection keeps its own entry per
//! order (`~order/<orderId>`: day and total). That entry lives in the same source
//! partition as the order's cancel event (both are keyed by order id on the
//! topic), so the fold finds it without looking elsewhere. Days get one partial per
//! partition; reads add them up. Order entries are bookkeeping and are not served.
//! A second `OrderPlaced` for an order already placed is ignored.

use engine::projection::{Event, FoldError, OptionsError, PartitionState, Projection, State};
use engine::state_codec;
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// What the projection keeps under a key: a day's partial, or an order's entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Row {
    Day(Day),
    Order(OrderEntry),
}

fn row(state: &State) -> Result<&Row, FoldError> {
    state
        .downcast_ref::<Row>()
        .ok_or_else(|| FoldError("the state is not a revenue_by_day row".to_owned()))
}

fn add_to_day(state: &mut dyn PartitionState, day: &str, cents: i64, orders: i64) -> Result<(), FoldError> {
    state.update(day, &mut |current| {
        let (revenue_before, orders_before) = match current.as_ref().map(row).transpose()? {
            Some(Row::Day(totals)) => (totals.revenue_cents, totals.orders),
            Some(Row::Order(_)) => {
                return Err(FoldError(format!("the state of day {day} is an order entry")))
            }
            None => (0, 0),
        };
        let overflow = || FoldError(format!("the revenue of {day} overflows an i64"));
        let totals = Day {
            day: day.to_owned(),
            revenue_cents: revenue_before.checked_add(cents).ok_or_else(overflow)?,
            orders: orders_before.checked_add(orders).ok_or_else(overflow)?,
        };
        *current = Some(Box::new(Row::Day(totals)));
        Ok(())
    })
}

fn set_entry(state: &mut dyn PartitionState, key: &str, entry: OrderEntry) -> Result<(), FoldError> {
    state.update(key, &mut |current| {
        *current = Some(Box::new(Row::Order(entry.clone())));
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
                add_to_day(state, &day, placed.total_cents, 1)?;
                let entry = OrderEntry {
                    day,
                    total_cents: placed.total_cents,
                    cancelled: false,
                };
                set_entry(state, &entry_key, entry)
            }
            CANCELLED => {
                let order_id = crate::fields::string_field(event, "orderId")?;
                let entry_key = format!("{ORDER_PREFIX}{order_id}");
                let mut entry = match state.get(&entry_key)?.map(row).transpose()? {
                    None => return Ok(()),
                    Some(Row::Order(entry)) => entry.clone(),
                    Some(Row::Day(_)) => {
                        return Err(FoldError(format!("the entry of order {order_id} is a day")))
                    }
                };
                if entry.cancelled {
                    return Ok(());
                }
                entry.cancelled = true;
                let refund = entry
                    .total_cents
                    .checked_neg()
                    .ok_or_else(|| FoldError(format!("the total of order {order_id} cannot be negated")))?;
                add_to_day(state, &entry.day, refund, -1)?;
                set_entry(state, &entry_key, entry)
            }
            _ => Ok(()),
        }
    }

    fn merge(&self, key: &str, partials: Vec<State>) -> Result<Option<Json>, FoldError> {
        if key.starts_with(ORDER_PREFIX) {
            return Ok(None);
        }
        let mut merged: Option<Day> = None;
        let overflow = || FoldError(format!("the revenue of {key} overflows when merged"));
        for partial in &partials {
            let Row::Day(part) = row(partial)? else {
                return Err(FoldError(format!("the state of day {key} is an order entry")));
            };
            merged = Some(match merged {
                None => part.clone(),
                Some(sum) => Day {
                    day: sum.day,
                    revenue_cents: sum
                        .revenue_cents
                        .checked_add(part.revenue_cents)
                        .ok_or_else(overflow)?,
                    orders: sum.orders.checked_add(part.orders).ok_or_else(overflow)?,
                },
            });
        }
        merged
            .map(|day| serde_json::to_value(day).map_err(|e| FoldError(e.to_string())))
            .transpose()
    }

    fn encode(&self, state: &State) -> Result<Vec<u8>, FoldError> {
        Ok(state_codec::encode(row(state)?)?)
    }

    fn decode(&self, bytes: &[u8]) -> Result<State, FoldError> {
        if !state_codec::is_json(bytes) {
            return Ok(state_codec::decode::<Row>(bytes).map(|r| Box::new(r) as State)?);
        }
        // Written before the binary codec: a day or an order entry, by its fields.
        let day = serde_json::from_slice::<Day>(bytes).map(Row::Day);
        let row = day
            .or_else(|_| serde_json::from_slice::<OrderEntry>(bytes).map(Row::Order))
            .map_err(|e| FoldError(format!("a stored revenue_by_day row is unreadable: {e}")))?;
        Ok(Box::new(row))
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
        let day = |r: i64, o: i64| -> State {
            Box::new(Row::Day(Day {
                day: "2023-11-14".into(),
                revenue_cents: r,
                orders: o,
            }))
        };
        assert_eq!(
            RevenueByDay.merge("2023-11-14", vec![day(100, 1), day(250, 2)]),
            Ok(Some(
                serde_json::json!({"day": "2023-11-14", "revenue_cents": 350, "orders": 3})
            ))
        );
        assert_eq!(RevenueByDay.merge("~order/o1", vec![day(1, 1)]), Ok(None));
        let error = RevenueByDay
            .merge("2023-11-14", vec![day(i64::MAX, 1), day(1, 1)])
            .unwrap_err();
        assert!(error.0.contains("overflows"), "{error}");
    }

    #[test]
    fn rows_round_trip_and_json_rows_of_older_stores_are_read() {
        let entry = OrderEntry {
            day: "2023-11-14".into(),
            total_cents: 5,
            cancelled: true,
        };
        let stored = RevenueByDay
            .encode(&(Box::new(Row::Order(entry.clone())) as State))
            .unwrap();
        let decoded = RevenueByDay.decode(&stored).unwrap();
        assert!(matches!(row(&decoded).unwrap(), Row::Order(e) if *e == entry));
        let old_entry = serde_json::to_vec(&entry).unwrap();
        assert!(
            matches!(row(&RevenueByDay.decode(&old_entry).unwrap()).unwrap(), Row::Order(e) if *e == entry)
        );
        let old_day = br#"{"day":"2023-11-14","revenue_cents":7,"orders":1}"#;
        assert!(
            matches!(row(&RevenueByDay.decode(old_day).unwrap()).unwrap(), Row::Day(d) if d.revenue_cents == 7)
        );
    }
}
