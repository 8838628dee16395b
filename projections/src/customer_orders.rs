//! `customer_orders`: per customer (keyed by `customerId`), the orders placed, how
//! many, their lifetime value in cents and the last order time:
//! `{customer_id, order_ids, order_count, lifetime_value_cents, last_order_at}`.
//!
//! Orders are keyed by order id on the topic, so one customer's orders are spread
//! over partitions: each partition keeps a partial, and reads merge them (sums,
//! maximum, and the order ids sorted).

use std::borrow::Cow;

use engine::projection::{Entity, Event, FoldError, OptionsError, Projection};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

const PLACED: &str = "shop.orders.OrderPlaced";

/// `customer_orders` takes no options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {}

/// Builds the projection from its options.
pub fn build(options: &Json) -> Result<Box<dyn Projection>, OptionsError> {
    let _: Options = serde_json::from_value(options.clone())?;
    Ok(Box::new(CustomerOrders))
}

/// The customer orders projection.
pub struct CustomerOrders;

/// One customer's orders (a partial, or the merged whole).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orders {
    /// The customer.
    pub customer_id: String,
    /// Their orders, sorted.
    pub order_ids: Vec<String>,
    /// How many.
    pub order_count: u64,
    /// Sum of the orders' totals, in cents.
    pub lifetime_value_cents: i64,
    /// `placedAt` of the latest order (ms since the epoch).
    pub last_order_at: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Placed {
    order_id: String,
    customer_id: String,
    total_cents: i64,
    placed_at: i64,
}

impl Entity for CustomerOrders {
    type State = Orders;

    fn key<'e>(&self, event: &Event<'e>) -> Result<Option<Cow<'e, str>>, FoldError> {
        if event.name != PLACED {
            return Ok(None);
        }
        Ok(Some(Cow::Borrowed(crate::fields::string_field(
            event,
            "customerId",
        )?)))
    }

    fn fold(&self, state: &mut Option<Orders>, event: &Event<'_>) -> Result<(), FoldError> {
        let placed: Placed = event.parse()?;
        let (count, value) = state
            .as_ref()
            .map_or((0, 0), |o| (o.order_count, o.lifetime_value_cents));
        let overflow = || FoldError(format!("the totals of customer {} overflow", placed.customer_id));
        let order_count = count.checked_add(1).ok_or_else(overflow)?;
        let lifetime_value_cents = value.checked_add(placed.total_cents).ok_or_else(overflow)?;
        let orders = state.get_or_insert_with(|| Orders {
            customer_id: placed.customer_id.clone(),
            order_ids: Vec::new(),
            order_count: 0,
            lifetime_value_cents: 0,
            last_order_at: i64::MIN,
        });
        if let Err(position) = orders.order_ids.binary_search(&placed.order_id) {
            orders.order_ids.insert(position, placed.order_id);
        }
        orders.order_count = order_count;
        orders.lifetime_value_cents = lifetime_value_cents;
        orders.last_order_at = orders.last_order_at.max(placed.placed_at);
        Ok(())
    }

    fn merge(&self, key: &str, partials: Vec<Orders>) -> Result<Option<Json>, FoldError> {
        let mut parts = partials.into_iter();
        let Some(mut merged) = parts.next() else {
            return Ok(None);
        };
        let overflow = || FoldError(format!("the totals of customer {key} overflow when merged"));
        for part in parts {
            merged.order_ids.extend(part.order_ids);
            merged.order_count = merged
                .order_count
                .checked_add(part.order_count)
                .ok_or_else(overflow)?;
            merged.lifetime_value_cents = merged
                .lifetime_value_cents
                .checked_add(part.lifetime_value_cents)
                .ok_or_else(overflow)?;
            merged.last_order_at = merged.last_order_at.max(part.last_order_at);
        }
        merged.order_ids.sort();
        merged.order_ids.dedup();
        serde_json::to_value(merged)
            .map(Some)
            .map_err(|e| FoldError(e.to_string()))
    }
}
