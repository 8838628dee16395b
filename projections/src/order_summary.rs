//! `order_summary`: one entity per order, keyed by `orderId`.
//!
//! State: `{order_id, customer_id, status, total_cents, currency, tracking_id,
//! version}`, where `version` counts the order's events folded so far (the
//! aggregate's stream version). Events of an order that was never placed are
//! ignored; an order placed with a negative total is refused (`fold_failed`).

use std::borrow::Cow;

use engine::projection::{Entity, Event, FoldError, OptionsError, Projection};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::fields::string_field;

const PLACED: &str = "shop.orders.OrderPlaced";
const CHARGED: &str = "shop.orders.PaymentCharged";
const SHIPPED: &str = "shop.orders.OrderShipped";
const DELIVERED: &str = "shop.orders.OrderDelivered";
const CANCELLED: &str = "shop.orders.OrderCancelled";

/// `order_summary` takes no options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {}

/// Builds the projection from its options.
pub fn build(options: &Json) -> Result<Box<dyn Projection>, OptionsError> {
    let _: Options = serde_json::from_value(options.clone())?;
    Ok(Box::new(OrderSummary))
}

/// The order summary projection.
pub struct OrderSummary;

/// An order's lifecycle position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `OrderPlaced`
    Placed,
    /// `PaymentCharged`
    Paid,
    /// `OrderShipped`
    Shipped,
    /// `OrderDelivered`
    Delivered,
    /// `OrderCancelled`
    Cancelled,
}

/// The state of one order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The order.
    pub order_id: String,
    /// Who placed it.
    pub customer_id: String,
    /// Where it is.
    pub status: Status,
    /// Order total in minor units.
    pub total_cents: i64,
    /// ISO currency code.
    pub currency: String,
    /// Carrier tracking id, once shipped.
    pub tracking_id: Option<String>,
    /// Events of this order folded so far.
    pub version: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OrderPlaced {
    order_id: String,
    customer_id: String,
    total_cents: i64,
    currency: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OrderShipped {
    tracking_id: String,
}

/// The version after `version` (a count of events, which cannot realistically
/// overflow; checked all the same, like all arithmetic on input).
fn next_version(version: u64) -> Result<u64, FoldError> {
    version
        .checked_add(1)
        .ok_or_else(|| FoldError("the order's event count overflows".to_owned()))
}

impl Entity for OrderSummary {
    type State = Summary;

    fn key<'e>(&self, event: &Event<'e>) -> Result<Option<Cow<'e, str>>, FoldError> {
        match event.name {
            PLACED | CHARGED | SHIPPED | DELIVERED | CANCELLED => {
                Ok(Some(Cow::Borrowed(string_field(event, "orderId")?)))
            }
            _ => Ok(None),
        }
    }

    fn fold(&self, state: &mut Option<Summary>, event: &Event<'_>) -> Result<(), FoldError> {
        // Everything that can fail comes before the first change.
        match (event.name, state.as_mut()) {
            (PLACED, current) => {
                let placed: OrderPlaced = event.parse()?;
                if placed.total_cents < 0 {
                    return Err(FoldError(format!(
                        "order {} placed with a negative total ({} cents)",
                        placed.order_id, placed.total_cents
                    )));
                }
                let version = next_version(current.as_ref().map_or(0, |c| c.version))?;
                let tracking_id = current.and_then(|c| c.tracking_id.take());
                *state = Some(Summary {
                    order_id: placed.order_id,
                    customer_id: placed.customer_id,
                    status: Status::Placed,
                    total_cents: placed.total_cents,
                    currency: placed.currency,
                    tracking_id,
                    version,
                });
            }
            // Not placed yet: nothing to summarise.
            (_, None) => {}
            (SHIPPED, Some(current)) => {
                let shipped: OrderShipped = event.parse()?;
                current.version = next_version(current.version)?;
                current.status = Status::Shipped;
                current.tracking_id = Some(shipped.tracking_id);
            }
            (name, Some(current)) => {
                let status = match name {
                    CHARGED => Status::Paid,
                    DELIVERED => Status::Delivered,
                    CANCELLED => Status::Cancelled,
                    _ => return Ok(()),
                };
                current.version = next_version(current.version)?;
                current.status = status;
            }
        }
        Ok(())
    }

    /// Orders are keyed like the topic, so one partition holds them; should a key
    /// ever appear in several, the one with the most events wins.
    fn merge(&self, _key: &str, partials: Vec<Summary>) -> Result<Option<Json>, FoldError> {
        partials
            .into_iter()
            .max_by_key(|p| p.version)
            .map(|p| serde_json::to_value(p).map_err(|e| FoldError(e.to_string())))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value;
    use engine::projection::EventMeta;
    use serde_json::json;

    fn meta() -> EventMeta {
        EventMeta {
            topic: "orders".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key: None,
        }
    }

    fn record(fields: &[(&str, Value)]) -> Value {
        Value::Record(fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
    }

    fn placed() -> Value {
        record(&[
            ("orderId", Value::String("o1".into())),
            ("customerId", Value::String("c1".into())),
            ("items", Value::Array(vec![])),
            ("totalCents", Value::Long(1250)),
            ("currency", Value::String("EUR".into())),
            ("placedAt", Value::TimestampMillis(5)),
        ])
    }

    fn fold(state: &mut Option<Summary>, name: &str, payload: &Value) {
        let meta = meta();
        let event = Event {
            name,
            payload,
            meta: &meta,
        };
        assert_eq!(OrderSummary.key(&event).unwrap().as_deref(), Some("o1"));
        OrderSummary.fold(state, &event).unwrap();
    }

    #[test]
    fn follows_the_order_lifecycle_and_counts_events() {
        let mut state = None;
        fold(&mut state, PLACED, &placed());
        fold(
            &mut state,
            CHARGED,
            &record(&[
                ("orderId", Value::String("o1".into())),
                ("amountCents", Value::Long(1250)),
                ("card", Value::String("visa".into())),
            ]),
        );
        fold(
            &mut state,
            SHIPPED,
            &record(&[
                ("orderId", Value::String("o1".into())),
                ("trackingId", Value::String("T9".into())),
                ("shippedAt", Value::TimestampMillis(7)),
            ]),
        );
        assert_eq!(
            serde_json::to_value(state.unwrap()).unwrap(),
            json!({"order_id": "o1", "customer_id": "c1", "status": "shipped", "total_cents": 1250,
                   "currency": "EUR", "tracking_id": "T9", "version": 3})
        );
    }

    #[test]
    fn events_before_the_order_is_placed_are_ignored() {
        let mut state = None;
        fold(
            &mut state,
            DELIVERED,
            &record(&[
                ("orderId", Value::String("o1".into())),
                ("deliveredAt", Value::TimestampMillis(1)),
            ]),
        );
        assert_eq!(state, None);
    }

    #[test]
    fn a_malformed_event_fails_without_touching_state() {
        let mut state = None;
        fold(&mut state, PLACED, &placed());
        let before = state.clone();
        let bad = record(&[
            ("orderId", Value::String("o1".into())),
            ("trackingId", Value::Long(3)),
        ]);
        let meta = meta();
        let event = Event {
            name: SHIPPED,
            payload: &bad,
            meta: &meta,
        };
        assert!(OrderSummary.fold(&mut state, &event).is_err());
        assert_eq!(state, before);
    }
}
