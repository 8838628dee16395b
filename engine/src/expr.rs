//! CEL expressions, compiled once and evaluated over JSON variables.
//!
//! The environment is CEL's standard library plus the `math` and `strings`
//! extensions (`math.round`, `'x'.lowerAscii()`, ...).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use apache_avro::types::Value as AvroValue;
use cel::common::types::{
    CelBool, CelBytes, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString,
};
use cel::common::value::Val;

use cel::{Context, Env, Program};
use serde_json::Value as Json;

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| {
    let mut env = Env::stdlib();
    env.add_extension(cel::extensions::math)
        .expect("the math extension declares no conflicting names");
    env.add_extension(cel::extensions::strings)
        .expect("the strings extension declares no conflicting names");
    Arc::new(env)
});

/// Why an expression did not give a value; each names the expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    /// CEL could not parse or check it.
    #[error("`{expr}` does not compile: {message}")]
    Compile {
        /// The expression.
        expr: String,
        /// CEL's error.
        message: String,
    },
    /// Evaluating it failed (a type error, a division by zero).
    #[error("`{expr}` failed: {message}")]
    Failed {
        /// The expression.
        expr: String,
        /// CEL's error.
        message: String,
    },
    /// It reads a field the input does not have, where a value is required.
    #[error("`{expr}` failed: it reads a field the input does not have")]
    MissingField {
        /// The expression.
        expr: String,
    },
    /// A guard gave something else than true or false.
    #[error("`{expr}` gave {got}, expected true or false")]
    NotBoolean {
        /// The expression.
        expr: String,
        /// What it gave.
        got: String,
    },
}

/// A compiled expression with its source, for error messages.
pub struct Expr {
    source: String,
    program: Program,
    /// The value of an expression that reads no variable (`'EUR'`, `1`), computed
    /// once at compile time.
    constant: Option<Json>,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

impl Expr {
    /// Compiles `source`; the error is CEL's parse error.
    pub fn compile(source: &str) -> Result<Expr, ExprError> {
        let program = ENV.compile(source).map_err(|e| ExprError::Compile {
            expr: source.to_owned(),
            message: e.to_string(),
        })?;
        let mut expr = Expr {
            source: source.to_owned(),
            program,
            constant: None,
        };
        let references = expr.program.references();
        if references.variables().is_empty() {
            expr.constant = expr.eval_in(&Scope::default()).ok().flatten();
        }
        Ok(expr)
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The fields of `variable` the expression reads, when it only ever reads
    /// `variable.<field>`; `None` when it uses the variable in another way (whole,
    /// indexed, in a macro), so all of it must be bound.
    pub fn fields_read(&self, variable: &str) -> Option<Vec<String>> {
        let bytes = self.source.as_bytes();
        let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        let mut fields = Vec::new();
        let mut start = 0;
        while let Some(found) = self.source[start..].find(variable) {
            let at = start + found;
            let end = at + variable.len();
            start = end;
            let whole_word = (at == 0 || !is_ident(bytes[at - 1]) && bytes[at - 1] != b'.')
                && (end == bytes.len() || !is_ident(bytes[end]));
            if !whole_word || self.inside_string(at) {
                continue;
            }
            if bytes.get(end) != Some(&b'.') {
                return None;
            }
            let field: String = self.source[end + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if field.is_empty() {
                return None;
            }
            fields.push(field);
        }
        Some(fields)
    }

    /// Whether byte `at` of the source lies inside a string literal.
    fn inside_string(&self, at: usize) -> bool {
        let mut quote: Option<u8> = None;
        let mut escaped = false;
        for &b in &self.source.as_bytes()[..at] {
            match quote {
                Some(q) if !escaped && b == q => quote = None,
                Some(_) => escaped = !escaped && b == b'\\',
                None if b == b'\'' || b == b'"' => quote = Some(b),
                None => {}
            }
        }
        quote.is_some()
    }

    /// `(variable, field)` when the whole expression is `variable.field`, the most
    /// common shape, which callers can read without the interpreter.
    pub fn field_access(&self) -> Option<(&str, &str)> {
        let (variable, field) = self.source.trim().split_once('.')?;
        let is_ident = |s: &str| {
            s.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        (is_ident(variable) && is_ident(field)).then_some((variable, field))
    }

    /// The value of an expression that reads no variable, if it has one.
    pub fn constant(&self) -> Option<&Json> {
        self.constant.as_ref()
    }

    /// Whether the expression reads the variable `name`.
    pub fn reads(&self, name: &str) -> bool {
        self.program.references().has_variable(name)
    }

    /// Evaluates against variables bound once in `scope` (cheaper than
    /// binding them per expression when several expressions read the same input).
    pub fn eval_in(&self, scope: &Scope) -> Result<Option<Json>, ExprError> {
        if let Some(constant) = &self.constant {
            return Ok(Some(constant.clone()));
        }
        let failed = |message: String| ExprError::Failed {
            expr: self.source.clone(),
            message,
        };
        let result = match self.program.execute(&scope.context) {
            Ok(result) => result,
            Err(cel::ExecutionError::NoSuchKey(_)) => return Ok(None),
            Err(e) => return Err(failed(e.to_string())),
        };
        result
            .json()
            .map(Some)
            .map_err(|e| failed(format!("it gave a value that is not JSON: {e}")))
    }

    /// [`Expr::eval_in`] for a value that must be there.
    pub fn value_in(&self, scope: &Scope) -> Result<Json, ExprError> {
        self.eval_in(scope)?.ok_or_else(|| ExprError::MissingField {
            expr: self.source.clone(),
        })
    }

    /// [`Expr::eval_in`] for a guard: true or false.
    pub fn test_in(&self, scope: &Scope) -> Result<bool, ExprError> {
        match self.value_in(scope)? {
            Json::Bool(b) => Ok(b),
            other => Err(ExprError::NotBoolean {
                expr: self.source.clone(),
                got: other.to_string(),
            }),
        }
    }
}

/// Variables bound once for several evaluations. Values bound from an Avro
/// value borrow its strings for `'v` rather than copying them.
pub struct Scope<'v> {
    context: Context<'v, 'v>,
}

impl Default for Scope<'_> {
    fn default() -> Self {
        Scope {
            context: Context::with_env(ENV.clone()),
        }
    }
}

impl<'v> Scope<'v> {
    /// Binds `name` to a JSON value.
    pub fn bind_json(&mut self, name: &str, value: &Json) {
        self.context.add_variable_from_value(name, to_cel(value));
    }

    /// Binds `name` to the given fields of a JSON object (all of it when `fields`
    /// is `None`).
    pub fn bind_json_fields(&mut self, name: &str, value: &Json, fields: Option<&[String]>) {
        match (value, fields) {
            (Json::Object(object), Some(fields)) => {
                let map: HashMap<String, cel::Value> = fields
                    .iter()
                    .filter_map(|f| Some((f.clone(), to_cel(object.get(f)?))))
                    .collect();
                self.context.add_variable_from_value(name, cel::Value::from(map));
            }
            _ => self.bind_json(name, value),
        }
    }

    /// Binds `name` to the given fields of an Avro record (all of them when
    /// `fields` is `None`), converted directly.
    pub fn bind_avro_fields(&mut self, name: &str, value: &'v AvroValue, fields: Option<&[String]>) {
        match (value, fields) {
            (AvroValue::Record(record), Some(fields)) => {
                let map: HashMap<CelMapKey<'v>, Box<dyn Val + 'v>> = record
                    .iter()
                    .filter(|(k, _)| fields.iter().any(|f| f == k))
                    .map(|(k, v)| (CelMapKey::from(k.as_str()), avro_to_val(v)))
                    .collect();
                self.context
                    .add_variable_as_val(name, Box::new(CelMap::from(map)));
            }
            _ => self.bind_avro(name, value),
        }
    }

    /// Binds `name` to an Avro value, converted directly (records and maps become
    /// CEL maps, unions their branch, timestamps and enums their number and symbol).
    pub fn bind_avro(&mut self, name: &str, value: &'v AvroValue) {
        self.context.add_variable_as_val(name, avro_to_val(value));
    }
}

/// An Avro value as a CEL value, built straight into the interpreter's own
/// representation (binding a `cel::Value` converts it, deeply, once more) and
/// borrowing strings and map keys.
fn avro_to_val(value: &AvroValue) -> Box<dyn Val + '_> {
    match value {
        AvroValue::Null => Box::new(CelNull),
        AvroValue::Boolean(b) => Box::new(CelBool::from(*b)),
        AvroValue::Int(i) | AvroValue::Date(i) | AvroValue::TimeMillis(i) => {
            Box::new(CelInt::from(i64::from(*i)))
        }
        AvroValue::Long(i)
        | AvroValue::TimeMicros(i)
        | AvroValue::TimestampMillis(i)
        | AvroValue::TimestampMicros(i)
        | AvroValue::TimestampNanos(i)
        | AvroValue::LocalTimestampMillis(i)
        | AvroValue::LocalTimestampMicros(i)
        | AvroValue::LocalTimestampNanos(i) => Box::new(CelInt::from(*i)),
        AvroValue::Float(f) => Box::new(CelDouble::from(f64::from(*f))),
        AvroValue::Double(f) => Box::new(CelDouble::from(*f)),
        AvroValue::String(s) | AvroValue::Enum(_, s) => Box::new(CelString::from(s.as_str())),
        AvroValue::Uuid(u) => Box::new(CelString::from(u.to_string())),
        AvroValue::Bytes(b) | AvroValue::Fixed(_, b) => Box::new(CelBytes::from(b.clone())),
        AvroValue::Union(_, inner) => avro_to_val(inner),
        AvroValue::Array(items) => Box::new(CelList::from(items.iter().map(avro_to_val).collect::<Vec<_>>())),
        AvroValue::Map(fields) => Box::new(CelMap::from(
            fields
                .iter()
                .map(|(k, v)| (CelMapKey::from(k.as_str()), avro_to_val(v)))
                .collect::<HashMap<_, _>>(),
        )),
        AvroValue::Record(fields) => Box::new(CelMap::from(
            fields
                .iter()
                .map(|(k, v)| (CelMapKey::from(k.as_str()), avro_to_val(v)))
                .collect::<HashMap<_, _>>(),
        )),
        other => {
            let value = match crate::avro_json::to_json(other.clone()) {
                Ok(json) => to_cel(&json),
                Err(_) => cel::Value::Null,
            };
            Box::<dyn Val>::try_from(value).unwrap_or_else(|_| Box::new(CelNull))
        }
    }
}

/// JSON as CEL values. Integers are CEL `int` (signed) whenever they fit, so that
/// `event.totalCents + 1` works; only larger ones become `uint`.
fn to_cel(json: &Json) -> cel::Value {
    match json {
        Json::Null => cel::Value::Null,
        Json::Bool(b) => cel::Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => cel::Value::Int(i),
            (None, Some(u)) => cel::Value::UInt(u),
            _ => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => cel::Value::String(Arc::new(s.clone())),
        Json::Array(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Json::Object(fields) => {
            let map: HashMap<String, cel::Value> =
                fields.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            cel::Value::from(map)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope(variables: &[(&str, &Json)]) -> Scope<'static> {
        let mut scope = Scope::default();
        for (name, value) in variables {
            scope.bind_json(name, value);
        }
        scope
    }

    impl Expr {
        fn eval(&self, variables: &[(&str, &Json)]) -> Result<Json, ExprError> {
            self.value_in(&scope(variables))
        }

        fn test(&self, variables: &[(&str, &Json)]) -> Result<bool, ExprError> {
            self.test_in(&scope(variables))
        }
    }

    #[test]
    fn an_avro_record_binds_as_its_json_form_does() {
        let line = |sku: &str, qty: i32| {
            AvroValue::Record(vec![
                ("sku".into(), AvroValue::String(sku.into())),
                ("qty".into(), AvroValue::Int(qty)),
            ])
        };
        let record = AvroValue::Record(vec![
            ("id".into(), AvroValue::String("o-1".into())),
            ("total".into(), AvroValue::Double(12.345)),
            ("at".into(), AvroValue::TimestampMillis(1_700_000_000_000)),
            ("kind".into(), AvroValue::Enum(1, "RUSH".into())),
            (
                "note".into(),
                AvroValue::Union(1, Box::new(AvroValue::String("gift".into()))),
            ),
            ("none".into(), AvroValue::Union(0, Box::new(AvroValue::Null))),
            ("lines".into(), AvroValue::Array(vec![line("a", 2), line("b", 3)])),
            (
                "tags".into(),
                AvroValue::Map([("k".to_owned(), AvroValue::Long(7))].into_iter().collect()),
            ),
            ("flag".into(), AvroValue::Boolean(true)),
        ]);
        let json = crate::avro_json::to_json(record.clone()).unwrap();
        for source in [
            "int(math.round(event.total * 100.0))",
            "event.id + '/' + event.kind",
            "event.at + 1",
            "event.note",
            "event.none == null",
            "size(event.lines)",
            "event.lines.map(l, l.qty)",
            "event.lines[1].sku",
            "event.tags.k * 2",
            "event.flag && event.lines.exists(l, l.qty > 2)",
        ] {
            let expr = Expr::compile(source).unwrap();
            let mut whole = Scope::default();
            whole.bind_avro("event", &record);
            let mut fields = Scope::default();
            fields.bind_avro_fields("event", &record, expr.fields_read("event").as_deref());
            let expected = expr.eval(&[("event", &json)]);
            assert!(expected.is_ok(), "{source}: {expected:?}");
            assert_eq!(expr.value_in(&whole), expected, "{source}, whole record");
            assert_eq!(expr.value_in(&fields), expected, "{source}, fields read");
        }
    }

    #[test]
    fn evaluates_over_json() {
        let event = json!({"total": 12.345, "items": [1, 2, 3], "name": "Ab"});
        let cents = Expr::compile("int(math.round(event.total * 100.0))").unwrap();
        assert_eq!(cents.eval(&[("event", &event)]).unwrap(), json!(1235));
        let count = Expr::compile("size(event.items)").unwrap();
        assert_eq!(count.eval(&[("event", &event)]).unwrap(), json!(3));
        let lower = Expr::compile("event.name.lowerAscii()").unwrap();
        assert_eq!(lower.eval(&[("event", &event)]).unwrap(), json!("ab"));
        assert!(Expr::compile("event.items.size() > 2")
            .unwrap()
            .test(&[("event", &event)])
            .unwrap());
        let sum = Expr::compile("event.items[0] + 1").unwrap();
        assert_eq!(
            sum.eval(&[("event", &event)]).unwrap(),
            json!(2),
            "JSON integers are CEL ints"
        );
    }

    #[test]
    fn errors_say_what_failed() {
        assert!(Expr::compile("event.(")
            .unwrap_err()
            .to_string()
            .contains("does not compile"));
        let error = Expr::compile("event.missing + 1")
            .unwrap()
            .eval(&[("event", &json!({}))])
            .unwrap_err();
        assert_eq!(
            error,
            ExprError::MissingField {
                expr: "event.missing + 1".into()
            }
        );
        let fields = Expr::compile("event.a + size(event.items) + (event.b == 'event.x' ? 1 : 0)").unwrap();
        assert_eq!(fields.fields_read("event").unwrap(), ["a", "items", "b"]);
        assert_eq!(Expr::compile("size(event)").unwrap().fields_read("event"), None);
        assert_eq!(
            Expr::compile("state.event.x")
                .unwrap()
                .fields_read("event")
                .unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            Expr::compile(" event.orderId ").unwrap().field_access(),
            Some(("event", "orderId"))
        );
        assert_eq!(Expr::compile("event.a.b").unwrap().field_access(), None);
        assert_eq!(Expr::compile("event.a + 1").unwrap().field_access(), None);
        let missing = Expr::compile("event.missing + 1").unwrap();
        assert_eq!(missing.eval_in(&scope(&[("event", &json!({}))])).unwrap(), None);
        let not_bool = Expr::compile("1").unwrap().test(&[]).unwrap_err();
        assert!(matches!(not_bool, ExprError::NotBoolean { got, .. } if got == "1"));
    }
}
