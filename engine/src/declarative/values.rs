//! What the operations of a declarative projection do to values: sums, exact on
//! decimals; orderings; the stamps `set` and `append` merge by.

use bigdecimal::BigDecimal;
use serde_json::Value as Json;

use crate::logical;

/// `a + b`: integers checked, floats as floats, and decimals (the strings that
/// logical `decimal` values are, see [`crate::logical`]) exactly, keeping the
/// larger scale.
pub(super) fn add_numbers(a: &Json, b: &Json) -> Result<Json, String> {
    if a.is_string() || b.is_string() {
        return match (exact(a), exact(b)) {
            (Some(x), Some(y)) => Ok(Json::String(logical::decimal_text(&(x + y)))),
            _ => Err(format!(
                "cannot add {b} to {a} exactly: a decimal adds only to a decimal or an integer"
            )),
        };
    }
    match (a.as_i64(), b.as_i64()) {
        (Some(x), Some(y)) => x
            .checked_add(y)
            .map(Json::from)
            .ok_or_else(|| "integer overflow".to_owned()),
        _ => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => serde_json::Number::from_f64(x + y)
                .map(Json::Number)
                .ok_or_else(|| "not a finite number".to_owned()),
            _ => Err(format!("cannot add {b} to {a}")),
        },
    }
}

/// A decimal string or an integer as an exact decimal.
fn exact(json: &Json) -> Option<BigDecimal> {
    match json {
        Json::String(text) => logical::decimal_from_text(text),
        Json::Number(n) if n.is_i64() || n.is_u64() => logical::decimal_from_text(&n.to_string()),
        _ => None,
    }
}

/// Fails when `sum` of `field` has more digits than the decimals it adds declare.
pub(super) fn within_precision(sum: &Json, field: &str, precision: Option<u64>) -> Result<(), String> {
    let (Some(limit), Some(decimal)) = (precision, exact(sum)) else {
        return Ok(());
    };
    if logical::precision(&decimal) > limit {
        return Err(format!(
            "`{field}` would be {sum}, more digits than the precision {limit} its decimals declare"
        ));
    }
    Ok(())
}

/// Orders two values of a field: numbers and decimals by value, other strings
/// (ISO dates and times among them) as text.
pub(super) fn compare(a: &Json, b: &Json) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Json::String(x), Json::String(y)) => {
            match (logical::decimal_from_text(x), logical::decimal_from_text(y)) {
                (Some(x), Some(y)) => Some(x.cmp(&y)),
                _ => Some(x.cmp(y)),
            }
        }
        (Json::String(_), Json::Number(_)) | (Json::Number(_), Json::String(_)) => {
            Some(exact(a)?.cmp(&exact(b)?))
        }
        (Json::Number(x), Json::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => Some(x.cmp(&y)),
            _ => x.as_f64()?.partial_cmp(&y.as_f64()?),
        },
        (Json::Bool(x), Json::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

pub(super) fn stamp_of(value: &Json) -> (i64, i64, i64) {
    let n = |i: usize| value.get(i).and_then(Json::as_i64).unwrap_or(i64::MIN);
    (n(0), n(1), n(2))
}
