//! Projections defined entirely in config, with CEL expressions:
//!
//! ```toml
//! [[projections]]
//! name = "customer_stats"
//! topics = ["orders"]
//! [projections.declarative]
//! key = "event.customerId"        # null or missing: the event is ignored
//! [[projections.declarative.on]]
//! event = "shop.orders.OrderPlaced" # full name, or "*" for every event
//! when = "event.totalCents > 0"     # optional guard
//! set = { last_order = "event.orderId" }
//! add = { revenue_cents = "event.totalCents" }
//! min = { first_order_at = "event.placedAt" }
//! max = { last_order_at = "event.placedAt" }
//! count = ["orders"]
//! append = { recent = { value = "event.orderId", max_len = 5 } }
//! remove = { recent = "event.orderId" }
//! delete = "event.reason == 'fraud'"  # drop the whole key
//! ```
//!
//! Expressions see `event` (the payload in its current version), `meta` (`topic`,
//! `partition`, `offset`, `timestamp`, `key`, `event`) and `state` (the key's
//! partial state in this source partition before the event). Everything compiles at
//! start-up; a failing evaluation is a `fold_failed` poison event.
//!
//! Each partition keeps a partial per key, and reads merge them by each field's
//! operation: `add` and `count` sum, `min`/`max` take the min/max, `set` takes the
//! value written by the event with the latest timestamp (then partition, then
//! offset), `append` merges by event time and keeps the last `max_len`.

use std::collections::HashMap;

use serde_json::{json, Value as Json};

mod compile;
mod values;

pub use compile::DeclarativeConfig;

use crate::expr::{Expr, Scope};
use crate::projection::{
    as_json, into_json, update_json, Event, FoldError, PartitionState, Projection, State,
};
use values::{add_numbers, compare, stamp_of, within_precision};

/// How a field is written, hence merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldOp {
    Set,
    Add,
    Min,
    Max,
    Count,
    Append { max_len: usize },
}

#[derive(Debug)]
struct Rule {
    event: String,
    when: Option<Expr>,
    writes: Vec<(String, FieldOp, Expr)>,
    count: Vec<String>,
    remove: Vec<(String, Expr)>,
    delete: Option<Expr>,
}

/// A compiled declarative projection.
#[derive(Debug)]
pub struct Declarative {
    key: Expr,
    rules: Vec<Rule>,
    fields: HashMap<String, FieldOp>,
    uses_state: bool,
    uses_meta: bool,
    /// The event fields the expressions read, when that is all they read of it;
    /// only those are converted for CEL.
    event_fields: Option<Vec<String>>,
    /// For `add` fields summing decimal event fields: the largest precision those
    /// declare, which the sum must fit.
    decimal_precision: HashMap<String, u64>,
}

/// A partial state: `{"v": {field: value}, "at": {field: [ts, partition, offset]},
/// "lists": {field: [[ts, partition, offset, element], ...]}}`.
fn empty_partial() -> Json {
    json!({"v": {}, "at": {}, "lists": {}})
}

/// The plain view of a partial (or merged) state: fields and list elements.
fn view(partial: &Json) -> Json {
    let mut out = partial
        .get("v")
        .and_then(Json::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(lists) = partial.get("lists").and_then(Json::as_object) {
        for (field, entries) in lists {
            let elements = entries
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| e.get(3).cloned().unwrap_or(Json::Null))
                        .collect()
                })
                .unwrap_or_default();
            out.insert(field.clone(), Json::Array(elements));
        }
    }
    Json::Object(out)
}

/// What expressions of one event read: plain `event.field` reads and constants go
/// straight to the Avro record; anything else builds the CEL scope, once.
struct Inputs<'p, 'e> {
    projection: &'p Declarative,
    event: &'e Event<'e>,
    scope: Option<Scope<'e>>,
    state_view: Option<Json>,
}

impl<'e> Inputs<'_, 'e> {
    fn eval(&mut self, expr: &Expr) -> Result<Option<Json>, String> {
        if let Some(constant) = expr.constant() {
            return Ok(Some(constant.clone()));
        }
        if let (Some(("event", field)), apache_avro::types::Value::Record(fields)) =
            (expr.field_access(), self.event.payload)
        {
            return match fields.iter().find(|(name, _)| name == field) {
                Some((_, value)) => crate::avro_json::to_json(value.clone())
                    .map(Some)
                    .map_err(|e| format!("event.{field}: {e}")),
                None => Ok(None),
            };
        }
        expr.eval_in(self.scope()).map_err(|e| e.to_string())
    }

    fn scope(&mut self) -> &Scope<'e> {
        let (projection, event, state_view) = (self.projection, self.event, &self.state_view);
        self.scope.get_or_insert_with(|| {
            let mut scope = Scope::default();
            scope.bind_avro_fields("event", event.payload, projection.event_fields.as_deref());
            if projection.uses_meta {
                let meta = json!({
                    "topic": event.meta.topic.as_ref(),
                    "partition": event.meta.partition,
                    "offset": event.meta.offset,
                    "timestamp": event.meta.timestamp_ms,
                    "key": event.meta.key.as_deref(),
                    "event": event.name,
                });
                scope.bind_json("meta", &meta);
            }
            if let Some(view) = state_view {
                scope.bind_json("state", view);
            }
            scope
        })
    }

    /// Makes the key's partial state (before the event) visible as `state`.
    fn bind_state(&mut self, key: &str, state: &mut dyn PartitionState) -> Result<(), FoldError> {
        if self.projection.uses_state {
            let view = match state.get(key)? {
                Some(partial) => view(as_json(partial)?),
                None => Json::Null,
            };
            if let Some(scope) = self.scope.as_mut() {
                scope.bind_json("state", &view);
            }
            self.state_view = Some(view);
        }
        Ok(())
    }
}

fn truth(expr: &Expr, value: Json) -> Result<bool, String> {
    match value {
        Json::Bool(b) => Ok(b),
        other => Err(format!(
            "`{}` gave {other}, expected true or false",
            expr.source()
        )),
    }
}

/// What a rule decided for one event, before any change is made.
enum Change<'a> {
    Write(&'a str, FieldOp, Json),
    Count(&'a str),
    Remove(&'a str, Json),
    Delete,
}

/// The number and comparison results of an event's changes, computed against the
/// current partial before anything is written, so a failure changes nothing.
fn resolve_values(
    partial: Option<&Json>,
    changes: &mut [Change<'_>],
    precision: &HashMap<String, u64>,
) -> Result<(), String> {
    for index in 0..changes.len() {
        let (field, op) = match &changes[index] {
            Change::Count(field) => (*field, FieldOp::Count),
            Change::Write(field, op @ (FieldOp::Add | FieldOp::Min | FieldOp::Max), _) => (*field, *op),
            _ => continue,
        };
        // The field's value before this change: an earlier change of this event
        // (changes are few, so a backwards scan beats a map), else the stored one.
        let (earlier, later) = changes.split_at_mut(index);
        let mut old = partial.and_then(|p| p.get("v")).and_then(|v| v.get(field));
        for previous in earlier.iter().rev() {
            match previous {
                Change::Delete => {
                    old = None;
                    break;
                }
                Change::Write(f, FieldOp::Add | FieldOp::Min | FieldOp::Max | FieldOp::Count, value)
                    if *f == field =>
                {
                    old = Some(value);
                    break;
                }
                _ => {}
            }
        }
        let change = &mut later[0];
        let next = match (op, old, &*change) {
            (FieldOp::Count, old, _) => add_numbers(old.unwrap_or(&json!(0)), &json!(1))?,
            (FieldOp::Add, old, Change::Write(_, _, value)) => {
                let sum = add_numbers(old.unwrap_or(&json!(0)), value)?;
                within_precision(&sum, field, precision.get(field).copied())?;
                sum
            }
            (FieldOp::Min | FieldOp::Max, Some(old), Change::Write(_, _, value)) => match compare(old, value)
            {
                None => return Err(format!("cannot compare {value} with {old} for `{field}`")),
                Some(std::cmp::Ordering::Less) if op == FieldOp::Min => old.clone(),
                Some(std::cmp::Ordering::Greater) if op == FieldOp::Max => old.clone(),
                _ => value.clone(),
            },
            _ => continue,
        };
        *change = Change::Write(field, op, next);
    }
    Ok(())
}

/// Writes `partial[part][field] = value`, reusing the key when present.
fn set_field(partial: &mut Json, part: &str, field: &str, value: Json) {
    let Some(fields) = partial.get_mut(part).and_then(Json::as_object_mut) else {
        return;
    };
    match fields.get_mut(field) {
        Some(slot) => *slot = value,
        None => {
            fields.insert(field.to_owned(), value);
        }
    }
}

fn is_partial(json: &Json) -> bool {
    ["v", "at", "lists"]
        .iter()
        .all(|part| json.get(part).is_some_and(Json::is_object))
}

impl Projection for Declarative {
    fn apply(&self, event: &Event<'_>, state: &mut dyn PartitionState) -> Result<(), FoldError> {
        let failed = |e: String| FoldError(format!("{}: {e}", event.name));
        let mut inputs = Inputs {
            projection: self,
            event,
            scope: None,
            state_view: None,
        };
        let key = match inputs.eval(&self.key).map_err(failed)? {
            None | Some(Json::Null) => return Ok(()),
            Some(Json::String(key)) => key,
            Some(Json::Number(n)) => n.to_string(),
            Some(other) => {
                return Err(failed(format!(
                    "key `{}` gave {other}, not a string",
                    self.key.source()
                )))
            }
        };
        inputs.bind_state(&key, state)?;
        let value = |inputs: &mut Inputs<'_, '_>, expr: &Expr| {
            inputs.eval(expr).map_err(failed)?.ok_or_else(|| {
                failed(format!(
                    "`{}` failed: it reads a field the input does not have",
                    expr.source()
                ))
            })
        };
        let mut changes = Vec::new();
        for rule in self
            .rules
            .iter()
            .filter(|r| r.event == "*" || r.event == event.name)
        {
            if let Some(when) = &rule.when {
                if !truth(when, value(&mut inputs, when)?).map_err(failed)? {
                    continue;
                }
            }
            for (field, op, expr) in &rule.writes {
                changes.push(Change::Write(field, *op, value(&mut inputs, expr)?));
            }
            changes.extend(rule.count.iter().map(|f| Change::Count(f)));
            for (field, expr) in &rule.remove {
                changes.push(Change::Remove(field, value(&mut inputs, expr)?));
            }
            if let Some(delete) = &rule.delete {
                if truth(delete, value(&mut inputs, delete)?).map_err(failed)? {
                    changes.push(Change::Delete);
                }
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        let mut changes_cell = changes;
        let stamp = json!([
            event.meta.timestamp_ms.unwrap_or(0),
            event.meta.partition,
            event.meta.offset
        ]);
        update_json(state, &key, &mut |current| {
            if current.as_ref().is_some_and(|p| !is_partial(p)) {
                return Err(failed(format!(
                    "stored state of `{key}` is not a declarative partial"
                )));
            }
            let mut resolved = std::mem::take(&mut changes_cell);
            resolve_values(current.as_ref(), &mut resolved, &self.decimal_precision).map_err(failed)?;
            let partial = current.get_or_insert_with(empty_partial);
            let mut deleted = false;
            for change in resolved {
                deleted = matches!(change, Change::Delete);
                match change {
                    Change::Delete => *partial = empty_partial(),
                    Change::Write(field, FieldOp::Append { max_len }, element) => {
                        let lists = partial["lists"].as_object_mut().expect("checked to be a partial");
                        let list = lists.entry(field.to_owned()).or_insert_with(|| json!([]));
                        if let Some(entries) = list.as_array_mut() {
                            let mut entry = stamp.as_array().cloned().unwrap_or_default();
                            entry.push(element);
                            entries.push(Json::Array(entry));
                            if entries.len() > max_len {
                                entries.drain(..entries.len() - max_len);
                            }
                        }
                    }
                    Change::Remove(field, element) => {
                        if let Some(entries) = partial["lists"].get_mut(field).and_then(Json::as_array_mut) {
                            entries.retain(|e| e.get(3) != Some(&element));
                        }
                    }
                    Change::Write(field, op, value) => {
                        set_field(partial, "v", field, value);
                        if op == FieldOp::Set {
                            set_field(partial, "at", field, stamp.clone());
                        }
                    }
                    // Resolved into writes of the new totals above.
                    Change::Count(_) => {}
                }
            }
            if deleted {
                *current = None;
            }
            Ok(())
        })
    }

    fn merge(&self, key: &str, partials: Vec<State>) -> Result<Option<Json>, FoldError> {
        let partials = partials
            .into_iter()
            .map(into_json)
            .collect::<Result<Vec<_>, _>>()?;
        let mut merged = empty_partial();
        let mut set_at: HashMap<String, (i64, i64, i64)> = HashMap::new();
        for partial in &partials {
            let values = partial
                .get("v")
                .and_then(Json::as_object)
                .cloned()
                .unwrap_or_default();
            let stamps = partial
                .get("at")
                .and_then(Json::as_object)
                .cloned()
                .unwrap_or_default();
            for (field, value) in values {
                let op = self.fields.get(&field).copied().unwrap_or(FieldOp::Set);
                let target = merged["v"].as_object_mut().expect("built above");
                let next = match (op, target.get(&field)) {
                    (_, None) => value,
                    (FieldOp::Add | FieldOp::Count, Some(old)) => add_numbers(old, &value)
                        .and_then(|sum| {
                            within_precision(&sum, &field, self.decimal_precision.get(&field).copied())?;
                            Ok(sum)
                        })
                        .map_err(|e| FoldError(format!("merging `{field}` of `{key}`: {e}")))?,
                    (FieldOp::Min, Some(old)) if compare(old, &value) == Some(std::cmp::Ordering::Less) => {
                        old.clone()
                    }
                    (FieldOp::Max, Some(old))
                        if compare(old, &value) == Some(std::cmp::Ordering::Greater) =>
                    {
                        old.clone()
                    }
                    (FieldOp::Set, Some(old)) => {
                        let stamp =
                            stamps
                                .get(&field)
                                .map(stamp_of)
                                .unwrap_or((i64::MIN, i64::MIN, i64::MIN));
                        if set_at.get(&field).is_some_and(|best| *best > stamp) {
                            old.clone()
                        } else {
                            value
                        }
                    }
                    _ => value,
                };
                if op == FieldOp::Set {
                    let stamp = stamps
                        .get(&field)
                        .map(stamp_of)
                        .unwrap_or((i64::MIN, i64::MIN, i64::MIN));
                    let best = set_at.entry(field.clone()).or_insert(stamp);
                    *best = (*best).max(stamp);
                }
                target.insert(field, next);
            }
            if let Some(lists) = partial.get("lists").and_then(Json::as_object) {
                for (field, entries) in lists {
                    let target = merged["lists"].as_object_mut().expect("built above");
                    let list = target.entry(field.clone()).or_insert_with(|| json!([]));
                    if let (Some(list), Some(entries)) = (list.as_array_mut(), entries.as_array()) {
                        list.extend(entries.iter().cloned());
                    }
                }
            }
        }
        if let Some(lists) = merged["lists"].as_object_mut() {
            for (field, list) in lists.iter_mut() {
                if let Some(entries) = list.as_array_mut() {
                    entries.sort_by_key(stamp_of);
                    if let Some(FieldOp::Append { max_len }) = self.fields.get(field) {
                        if entries.len() > *max_len {
                            entries.drain(..entries.len() - max_len);
                        }
                    }
                }
            }
        }
        Ok(Some(view(&merged)))
    }
}

#[cfg(test)]
mod tests;
