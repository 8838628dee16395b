//! Compiling a declarative definition: its config types, and the checks that
//! make every error name its key (`on[1].add.revenue`).

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::{Declarative, FieldOp, Rule};
use crate::expr::Expr;
use crate::schemas::SchemaSet;

/// `[projections.declarative]`
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeclarativeConfig {
    /// CEL expression giving the key; a null or missing value ignores the event.
    pub key: String,
    /// The rules, applied in order to each event they match.
    #[serde(default)]
    pub on: Vec<RuleConfig>,
}

/// One `[[projections.declarative.on]]` rule.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Full event type name, or `*`.
    pub event: String,
    /// Guard: the rule applies only when true.
    #[serde(default)]
    pub when: Option<String>,
    /// field = expression: overwrite.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// field = expression: add a number.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// field = expression: keep the smallest.
    #[serde(default)]
    pub min: BTreeMap<String, String>,
    /// field = expression: keep the largest.
    #[serde(default)]
    pub max: BTreeMap<String, String>,
    /// Fields that count the matching events.
    #[serde(default)]
    pub count: Vec<String>,
    /// field = { value, max_len }: append to a bounded list.
    #[serde(default)]
    pub append: BTreeMap<String, AppendConfig>,
    /// field = expression: remove every equal element from the list.
    #[serde(default)]
    pub remove: BTreeMap<String, String>,
    /// Delete the whole key when true.
    #[serde(default)]
    pub delete: Option<String>,
}

/// `append = { field = { value = "...", max_len = N } }`
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppendConfig {
    /// Expression of the element.
    pub value: String,
    /// The list keeps this many of the latest elements.
    pub max_len: usize,
}

/// A declarative definition that does not compile: where (`on[1].add.revenue`,
/// relative to the definition) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CompileError {
    /// The key of the definition that is wrong.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl CompileError {
    fn at(path: impl Into<String>, message: impl std::fmt::Display) -> CompileError {
        CompileError {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

impl Declarative {
    /// Compiles `config`; errors name the rule and the field (`on[1].add.revenue`).
    pub fn compile(config: &DeclarativeConfig) -> Result<Declarative, CompileError> {
        let key = Expr::compile(&config.key).map_err(|e| CompileError::at("key", e))?;
        let mut fields: HashMap<String, FieldOp> = HashMap::new();
        let mut rules = Vec::new();
        for (index, rule) in config.on.iter().enumerate() {
            let at = |what: &str| format!("on[{index}].{what}");
            let compile =
                |what: String, source: &str| Expr::compile(source).map_err(|e| CompileError::at(what, e));
            let mut writes = Vec::new();
            let groups: [(&str, FieldOp, &BTreeMap<String, String>); 4] = [
                ("set", FieldOp::Set, &rule.set),
                ("add", FieldOp::Add, &rule.add),
                ("min", FieldOp::Min, &rule.min),
                ("max", FieldOp::Max, &rule.max),
            ];
            for (name, op, group) in groups {
                for (field, source) in group {
                    writes.push((
                        field.clone(),
                        op,
                        compile(at(&format!("{name}.{field}")), source)?,
                    ));
                }
            }
            for (field, append) in &rule.append {
                if append.max_len == 0 {
                    return Err(CompileError::at(
                        at(&format!("append.{field}.max_len")),
                        "max_len must be at least 1",
                    ));
                }
                let op = FieldOp::Append {
                    max_len: append.max_len,
                };
                writes.push((
                    field.clone(),
                    op,
                    compile(at(&format!("append.{field}")), &append.value)?,
                ));
            }
            let declared = writes
                .iter()
                .map(|(field, op, _)| (field.clone(), *op))
                .chain(rule.count.iter().map(|field| (field.clone(), FieldOp::Count)));
            for (field, op) in declared {
                if field.is_empty() {
                    return Err(CompileError::at(at(""), "a field name cannot be empty"));
                }
                match fields.get(&field) {
                    Some(existing) if !same_merge(*existing, op) => {
                        return Err(CompileError::at(
                            at(&field),
                            format!(
                                "field `{field}` is written as {op:?} here and as {existing:?} elsewhere; \
                                 a field needs one operation so partial states merge"
                            ),
                        ))
                    }
                    _ => {
                        fields.insert(field, op);
                    }
                }
            }
            let mut remove = Vec::new();
            for (field, source) in &rule.remove {
                remove.push((field.clone(), compile(at(&format!("remove.{field}")), source)?));
            }
            let when = rule.when.as_deref().map(|s| compile(at("when"), s)).transpose()?;
            let delete = rule
                .delete
                .as_deref()
                .map(|s| compile(at("delete"), s))
                .transpose()?;
            rules.push(Rule {
                event: rule.event.clone(),
                when,
                writes,
                count: rule.count.clone(),
                remove,
                delete,
            });
        }
        for rule in &rules {
            for (field, _) in &rule.remove {
                if !matches!(fields.get(field), Some(FieldOp::Append { .. })) {
                    return Err(CompileError::at(
                        format!("remove.{field}"),
                        format!("`{field}` is not a list written by append"),
                    ));
                }
            }
        }
        let all: Vec<&Expr> = std::iter::once(&key)
            .chain(rules.iter().flat_map(|r| {
                r.when
                    .iter()
                    .chain(r.delete.iter())
                    .chain(r.writes.iter().map(|(_, _, e)| e))
                    .chain(r.remove.iter().map(|(_, e)| e))
            }))
            .collect();
        let uses_state = all.iter().any(|e| e.reads("state"));
        let uses_meta = all.iter().any(|e| e.reads("meta"));
        let event_fields = all.iter().try_fold(Vec::new(), |mut fields, e| {
            for field in e.fields_read("event")? {
                if !fields.contains(&field) {
                    fields.push(field);
                }
            }
            Some(fields)
        });
        Ok(Declarative {
            key,
            rules,
            fields,
            uses_state,
            uses_meta,
            event_fields,
            decimal_precision: HashMap::new(),
        })
    }

    /// Bounds each `add` of a plain decimal event field (`add = { total =
    /// "event.amount" }` over a `decimal(12,2)`) by the precision the schema
    /// declares: a sum that needs more digits is a `fold_failed` event, never a
    /// number no reader of that schema could hold.
    pub fn with_declared_decimals(mut self, schemas: &SchemaSet) -> Declarative {
        for rule in &self.rules {
            for (field, op, expr) in &rule.writes {
                let Some(("event", read)) = expr.field_access() else {
                    continue;
                };
                if *op != FieldOp::Add {
                    continue;
                }
                if let Some(precision) = schemas.decimal_precision(&rule.event, read) {
                    let limit = self.decimal_precision.entry(field.clone()).or_insert(0);
                    *limit = (*limit).max(precision as u64);
                }
            }
        }
        self
    }
}

fn same_merge(a: FieldOp, b: FieldOp) -> bool {
    matches!(
        (a, b),
        (FieldOp::Set, FieldOp::Set)
            | (FieldOp::Add | FieldOp::Count, FieldOp::Add | FieldOp::Count)
            | (FieldOp::Min, FieldOp::Min)
            | (FieldOp::Max, FieldOp::Max)
            | (FieldOp::Append { .. }, FieldOp::Append { .. })
    )
}
