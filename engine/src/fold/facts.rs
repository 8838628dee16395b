//! What the loop reads from a message besides its events: its event id (for
//! projections that fold each id once) and its event time (for as-of
//! generations), each from where the projection's config says.

use apache_avro::types::Value as Avro;
use rdkafka::message::{BorrowedHeaders, Headers};
use serde_json::{json, Value as Json};

use crate::config::DedupConfig;
use crate::expr::{Expr, ExprError, Scope};
use crate::projection::EventMeta;
use crate::schemas::CurrentEvent;

/// Where a message's event id is.
enum IdSource {
    /// A Kafka header's value, as bytes.
    Header(String),
    /// A CEL expression over `event` and `meta`.
    Expr(Expr),
}

/// How to read a message's id and time.
pub(super) struct Facts {
    id: Option<IdSource>,
    event_time: Option<Expr>,
}

impl Facts {
    /// From a projection's `dedup` table and `event_time` expression (checked
    /// when the config was loaded).
    pub(super) fn new(dedup: Option<&DedupConfig>, event_time: Option<&str>) -> Result<Facts, ExprError> {
        let id = match dedup {
            Some(DedupConfig {
                header: Some(header), ..
            }) => Some(IdSource::Header(header.clone())),
            Some(DedupConfig { id: Some(id), .. }) => Some(IdSource::Expr(Expr::compile(id)?)),
            _ => None,
        };
        let event_time = event_time.map(Expr::compile).transpose()?;
        Ok(Facts { id, event_time })
    }

    /// The message's event id; `None` when it has none (header missing,
    /// expression null or missing). An expression computes it from the
    /// message's first event (an upcaster's split events share their source's id).
    pub(super) fn event_id(
        &self,
        headers: Option<&BorrowedHeaders>,
        events: &[CurrentEvent],
        meta: &EventMeta,
    ) -> Result<Option<Vec<u8>>, String> {
        match &self.id {
            None => Ok(None),
            Some(IdSource::Header(name)) => Ok(headers.and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value.map(<[u8]>::to_vec))
            })),
            Some(IdSource::Expr(expr)) => {
                let Some(event) = events.first() else {
                    return Ok(None);
                };
                match evaluate(expr, event, meta)? {
                    None | Some(Json::Null) => Ok(None),
                    Some(Json::String(text)) => Ok(Some(text.into_bytes())),
                    Some(other) => Ok(Some(other.to_string().into_bytes())),
                }
            }
        }
    }

    /// The message's event time in ms since the epoch: the `event_time`
    /// expression over its first event, else its record timestamp.
    pub(super) fn event_time(
        &self,
        events: &[CurrentEvent],
        meta: &EventMeta,
    ) -> Result<Option<i64>, String> {
        let Some(expr) = &self.event_time else {
            return Ok(meta.timestamp_ms);
        };
        let Some(event) = events.first() else {
            return Ok(meta.timestamp_ms);
        };
        if let (Some(("event", field)), Avro::Record(fields)) = (expr.field_access(), &event.payload) {
            if let Some((_, value)) = fields.iter().find(|(name, _)| name == field) {
                return avro_instant(value).map(Some).ok_or_else(|| {
                    format!(
                        "`{}` is not a timestamp, a number of milliseconds or RFC 3339 text",
                        expr.source()
                    )
                });
            }
        }
        match evaluate(expr, event, meta)? {
            Some(Json::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| format!("`{}` gave {n}, not whole milliseconds", expr.source())),
            Some(Json::String(text)) => crate::as_of::parse_instant(&text)
                .map(Some)
                .ok_or_else(|| format!("`{}` gave `{text}`, not RFC 3339 text", expr.source())),
            None | Some(Json::Null) => Err(format!("`{}` gave no value", expr.source())),
            Some(other) => Err(format!("`{}` gave {other}, not a time", expr.source())),
        }
    }
}

fn evaluate(expr: &Expr, event: &CurrentEvent, meta: &EventMeta) -> Result<Option<Json>, String> {
    let mut scope = Scope::default();
    scope.bind_avro("event", &event.payload);
    if expr.reads("meta") {
        scope.bind_json(
            "meta",
            &json!({
                "topic": meta.topic.as_ref(),
                "partition": meta.partition,
                "offset": meta.offset,
                "timestamp": meta.timestamp_ms,
                "key": meta.key.as_deref(),
                "event": event.name.as_ref(),
            }),
        );
    }
    expr.eval_in(&scope).map_err(|e| e.to_string())
}

/// An Avro value as an instant in ms since the epoch.
fn avro_instant(value: &Avro) -> Option<i64> {
    match value {
        Avro::TimestampMillis(ms) | Avro::LocalTimestampMillis(ms) | Avro::Long(ms) => Some(*ms),
        Avro::TimestampMicros(us) | Avro::LocalTimestampMicros(us) => Some(us.div_euclid(1_000)),
        Avro::TimestampNanos(ns) | Avro::LocalTimestampNanos(ns) => Some(ns.div_euclid(1_000_000)),
        Avro::Int(ms) => Some(i64::from(*ms)),
        Avro::String(text) => crate::as_of::parse_instant(text),
        Avro::Union(_, inner) => avro_instant(inner),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(timestamp_ms: Option<i64>) -> EventMeta {
        EventMeta {
            topic: "orders".into(),
            partition: 0,
            offset: 7,
            timestamp_ms,
            key: None,
        }
    }

    fn event(fields: Vec<(&str, Avro)>) -> CurrentEvent {
        CurrentEvent {
            name: "shop.orders.OrderPlaced".into(),
            payload: Avro::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()),
        }
    }

    #[test]
    fn ids_come_from_an_expression_and_null_means_none() {
        let dedup = DedupConfig {
            header: None,
            id: Some("event.eventId".into()),
            window: 10,
            max_age_seconds: None,
        };
        let facts = Facts::new(Some(&dedup), None).unwrap();
        let with = [event(vec![("eventId", Avro::String("e-1".into()))])];
        assert_eq!(
            facts.event_id(None, &with, &meta(None)).unwrap(),
            Some(b"e-1".to_vec())
        );
        let null = [event(vec![("eventId", Avro::Union(0, Box::new(Avro::Null)))])];
        assert_eq!(facts.event_id(None, &null, &meta(None)).unwrap(), None);
        let number = [event(vec![("eventId", Avro::Long(42))])];
        assert_eq!(
            facts.event_id(None, &number, &meta(None)).unwrap(),
            Some(b"42".to_vec())
        );
    }

    #[test]
    fn event_time_is_the_record_timestamp_or_the_named_field() {
        let record = Facts::new(None, None).unwrap();
        let placed = [event(vec![("placedAt", Avro::TimestampMicros(1_500_000))])];
        assert_eq!(record.event_time(&placed, &meta(Some(99))).unwrap(), Some(99));
        let field = Facts::new(None, Some("event.placedAt")).unwrap();
        assert_eq!(field.event_time(&placed, &meta(Some(99))).unwrap(), Some(1_500));
        let text = [event(vec![(
            "placedAt",
            Avro::String("1970-01-01T00:00:02.5Z".into()),
        )])];
        assert_eq!(field.event_time(&text, &meta(None)).unwrap(), Some(2_500));
        let bad = [event(vec![("placedAt", Avro::Boolean(true))])];
        assert!(field
            .event_time(&bad, &meta(None))
            .unwrap_err()
            .contains("event.placedAt"));
        let computed = Facts::new(None, Some("meta.offset * 1000")).unwrap();
        assert_eq!(computed.event_time(&placed, &meta(None)).unwrap(), Some(7_000));
    }
}
