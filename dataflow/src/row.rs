//! Rows of SQL dataflows: values, decoding a JSON record by its schema,
//! writing rows as JSON, and evaluating plan expressions.
//!
//! Evaluation follows ksqlDB: `NULL` propagates through operators and
//! functions, a comparison with `NULL` is `NULL` and a filter keeps a row
//! only when its condition is `TRUE`; integer arithmetic wraps (Java's
//! `long`), a division by zero is `NULL`, and a cast that cannot convert
//! is `NULL`. The planner checks types, so an operator meeting a value of
//! the wrong type (only possible through untyped nested JSON) is `NULL` too.

use std::cmp::Ordering;
use std::fmt;

use runnel_client::plan::{BinaryOp, Column, Expr, Function, Literal, SqlType, UnaryOp};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One value of a row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Boolean(bool),
    Int(i64),
    Double(f64),
    String(String),
    /// Nested JSON, as its text.
    Json(String),
}

impl Value {
    pub fn from_literal(literal: &Literal) -> Value {
        match literal {
            Literal::Null => Value::Null,
            Literal::Boolean(b) => Value::Boolean(*b),
            Literal::Int(i) => Value::Int(*i),
            Literal::Double(d) => Value::Double(*d),
            Literal::String(s) => Value::String(s.clone()),
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Double(d) => Some(*d),
            _ => None,
        }
    }

    /// SQL comparison: `None` when either side is `NULL` or they do not compare.
    pub fn compare(&self, other: &Value) -> Option<Ordering> {
        match (self, other) {
            (Value::Int(a), Value::Int(b)) => Some(a.cmp(b)),
            (Value::Boolean(a), Value::Boolean(b)) => Some(a.cmp(b)),
            (Value::String(a), Value::String(b)) | (Value::Json(a), Value::Json(b)) => Some(a.cmp(b)),
            (a, b) => a.as_f64()?.partial_cmp(&b.as_f64()?),
        }
    }

    /// The value as text (`CAST(x AS STRING)`, `CONCAT`).
    pub fn to_text(&self) -> Option<String> {
        match self {
            Value::Null => None,
            Value::Boolean(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            Value::Double(d) => Some(d.to_string()),
            Value::String(s) | Value::Json(s) => Some(s.clone()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_text() {
            Some(text) => f.write_str(&text),
            None => f.write_str("NULL"),
        }
    }
}

/// A value as plain JSON.
pub struct JsonValue<'a>(pub &'a Value);

impl Serialize for JsonValue<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => serializer.serialize_unit(),
            Value::Boolean(b) => serializer.serialize_bool(*b),
            Value::Int(i) => serializer.serialize_i64(*i),
            Value::Double(d) if d.is_finite() => serializer.serialize_f64(*d),
            Value::Double(_) => serializer.serialize_unit(),
            Value::String(s) => serializer.serialize_str(s),
            Value::Json(text) => match serde_json::from_str::<&serde_json::value::RawValue>(text) {
                Ok(raw) => raw.serialize(serializer),
                Err(_) => serializer.serialize_str(text),
            },
        }
    }
}

/// Named values as one JSON object, `extra` (window bounds) last.
pub struct JsonRow<'a> {
    pub columns: &'a [Column],
    pub values: &'a [Value],
    pub picked: Option<&'a [usize]>,
    pub extra: &'a [(&'a str, i64)],
}

impl Serialize for JsonRow<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        let mut entry = |i: usize| match (self.columns.get(i), self.values.get(i)) {
            (Some(column), Some(value)) => map.serialize_entry(&column.name, &JsonValue(value)),
            _ => Ok(()),
        };
        match self.picked {
            Some(picked) => picked.iter().try_for_each(|&i| entry(i))?,
            None => (0..self.columns.len()).try_for_each(&mut entry)?,
        }
        for (name, value) in self.extra {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// Decodes a JSON object into a row of `columns` (matched by name, ignoring
/// case, as ksqlDB does); missing fields are `NULL`, unknown ones ignored.
pub fn decode_row(columns: &[Column], json: &[u8], row: &mut Vec<Value>) -> Result<(), String> {
    row.clear();
    row.resize(columns.len(), Value::Null);
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    RowSeed { columns, row }
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end())
        .map_err(|e| format!("value does not match the declared schema: {e}"))
}

struct RowSeed<'a> {
    columns: &'a [Column],
    row: &'a mut Vec<Value>,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let found = self.columns.iter().position(|c| c.name.eq_ignore_ascii_case(&key));
            match found {
                Some(i) => {
                    let ty = self.columns[i].ty;
                    self.row[i] = map
                        .next_value_seed(FieldSeed(ty))
                        .map_err(|e| serde::de::Error::custom(format!("column {}: {e}", self.columns[i].name)))?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// One field, read as its column's type.
struct FieldSeed(SqlType);

impl<'de> DeserializeSeed<'de> for FieldSeed {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        if self.0 == SqlType::Json {
            let raw = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
            return Ok(match raw.get() {
                "null" => Value::Null,
                text => Value::Json(text.to_string()),
            });
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} value", self.0)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Value, E> {
        match self.0 {
            SqlType::Boolean => Ok(Value::Boolean(b)),
            SqlType::String => Ok(Value::String(b.to_string())),
            _ => Err(E::custom(format!("expected {}, found a boolean", self.0))),
        }
    }

    fn visit_i64<E: serde::de::Error>(self, i: i64) -> Result<Value, E> {
        match self.0 {
            SqlType::Int | SqlType::BigInt => Ok(Value::Int(i)),
            SqlType::Double => Ok(Value::Double(i as f64)),
            SqlType::String => Ok(Value::String(i.to_string())),
            _ => Err(E::custom(format!("expected {}, found a number", self.0))),
        }
    }

    fn visit_u64<E: serde::de::Error>(self, u: u64) -> Result<Value, E> {
        match i64::try_from(u) {
            Ok(i) => self.visit_i64(i),
            Err(_) if self.0 == SqlType::Double => Ok(Value::Double(u as f64)),
            Err(_) => Err(E::custom(format!("{u} is out of range for {}", self.0))),
        }
    }

    fn visit_f64<E: serde::de::Error>(self, d: f64) -> Result<Value, E> {
        match self.0 {
            SqlType::Double => Ok(Value::Double(d)),
            SqlType::String => Ok(Value::String(d.to_string())),
            _ => Err(E::custom(format!("expected {}, found {d}", self.0))),
        }
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Value, E> {
        match self.0 {
            SqlType::String => Ok(Value::String(s.to_string())),
            _ => Err(E::custom(format!("expected {}, found a string", self.0))),
        }
    }
}

/// Evaluates `expr` over `row`.
pub fn eval(expr: &Expr, row: &[Value]) -> Value {
    match expr {
        Expr::Column(i) => row.get(*i).cloned().unwrap_or(Value::Null),
        Expr::Literal(literal) => Value::from_literal(literal),
        Expr::Unary(op, e) => unary(*op, eval(e, row)),
        Expr::Binary(op, a, b) => binary(*op, a, b, row),
        Expr::IsNull { expr, negated } => Value::Boolean(eval(expr, row).is_null() != *negated),
        Expr::Like { expr, pattern, negated } => match eval(expr, row) {
            Value::String(s) => Value::Boolean(like(s.as_bytes(), pattern.as_bytes()) != *negated),
            _ => Value::Null,
        },
        Expr::Case { branches, otherwise } => {
            for (condition, value) in branches {
                if matches!(eval(condition, row), Value::Boolean(true)) {
                    return eval(value, row);
                }
            }
            otherwise.as_ref().map_or(Value::Null, |e| eval(e, row))
        }
        Expr::Cast(e, ty) => cast(eval(e, row), *ty),
        Expr::Call(function, args) => call(*function, args, row),
        Expr::Field(e, name) => field(eval(e, row), name),
    }
}

/// Whether `condition` holds for `row` (a `NULL` condition does not).
pub fn holds(condition: &Expr, row: &[Value]) -> bool {
    matches!(eval(condition, row), Value::Boolean(true))
}

fn unary(op: UnaryOp, value: Value) -> Value {
    match (op, value) {
        (UnaryOp::Not, Value::Boolean(b)) => Value::Boolean(!b),
        (UnaryOp::Negate, Value::Int(i)) => Value::Int(i.wrapping_neg()),
        (UnaryOp::Negate, Value::Double(d)) => Value::Double(-d),
        _ => Value::Null,
    }
}

fn binary(op: BinaryOp, a: &Expr, b: &Expr, row: &[Value]) -> Value {
    match op {
        BinaryOp::And => match eval(a, row) {
            Value::Boolean(false) => Value::Boolean(false),
            left => match (left, eval(b, row)) {
                (_, Value::Boolean(false)) => Value::Boolean(false),
                (Value::Boolean(true), Value::Boolean(true)) => Value::Boolean(true),
                _ => Value::Null,
            },
        },
        BinaryOp::Or => match eval(a, row) {
            Value::Boolean(true) => Value::Boolean(true),
            left => match (left, eval(b, row)) {
                (_, Value::Boolean(true)) => Value::Boolean(true),
                (Value::Boolean(false), Value::Boolean(false)) => Value::Boolean(false),
                _ => Value::Null,
            },
        },
        _ => apply(op, &eval(a, row), &eval(b, row)),
    }
}

fn apply(op: BinaryOp, a: &Value, b: &Value) -> Value {
    if a.is_null() || b.is_null() {
        return Value::Null;
    }
    let compared = |test: fn(Ordering) -> bool| a.compare(b).map_or(Value::Null, |o| Value::Boolean(test(o)));
    match op {
        BinaryOp::Equal => compared(|o| o == Ordering::Equal),
        BinaryOp::NotEqual => compared(|o| o != Ordering::Equal),
        BinaryOp::Less => compared(|o| o == Ordering::Less),
        BinaryOp::LessOrEqual => compared(|o| o != Ordering::Greater),
        BinaryOp::Greater => compared(|o| o == Ordering::Greater),
        BinaryOp::GreaterOrEqual => compared(|o| o != Ordering::Less),
        BinaryOp::Concat => match (a.to_text(), b.to_text()) {
            (Some(x), Some(y)) => Value::String(x + &y),
            _ => Value::Null,
        },
        _ => arithmetic(op, a, b),
    }
}

fn arithmetic(op: BinaryOp, a: &Value, b: &Value) -> Value {
    if let (Value::Int(x), Value::Int(y)) = (a, b) {
        let (x, y) = (*x, *y);
        return match op {
            BinaryOp::Add => Value::Int(x.wrapping_add(y)),
            BinaryOp::Subtract => Value::Int(x.wrapping_sub(y)),
            BinaryOp::Multiply => Value::Int(x.wrapping_mul(y)),
            BinaryOp::Divide if y != 0 => Value::Int(x.wrapping_div(y)),
            BinaryOp::Modulo if y != 0 => Value::Int(x.wrapping_rem(y)),
            _ => Value::Null,
        };
    }
    let (Some(x), Some(y)) = (a.as_f64(), b.as_f64()) else {
        return Value::Null;
    };
    match op {
        BinaryOp::Add => Value::Double(x + y),
        BinaryOp::Subtract => Value::Double(x - y),
        BinaryOp::Multiply => Value::Double(x * y),
        BinaryOp::Divide if y != 0.0 => Value::Double(x / y),
        BinaryOp::Modulo if y != 0.0 => Value::Double(x % y),
        _ => Value::Null,
    }
}

/// SQL `LIKE`: `%` any run, `_` any one character (byte-wise over UTF-8,
/// so `_` matches one byte of a multi-byte character).
fn like(text: &[u8], pattern: &[u8]) -> bool {
    // Iterative matching with one back-track point: linear in practice,
    // never exponential.
    let (mut t, mut p) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'%') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'_' || c == text[t] => {
                t += 1;
                p += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'%')
}

pub fn cast(value: Value, ty: SqlType) -> Value {
    match (value, ty) {
        (Value::Null, _) => Value::Null,
        (Value::Int(i), SqlType::Int) if i32::try_from(i).is_err() => Value::Null,
        (Value::Int(i), SqlType::Int | SqlType::BigInt) => Value::Int(i),
        (Value::Double(d), SqlType::Int | SqlType::BigInt) if d.is_finite() => Value::Int(d.trunc() as i64),
        (Value::String(s), SqlType::Int | SqlType::BigInt) => s.trim().parse().map_or(Value::Null, Value::Int),
        (Value::Boolean(b), SqlType::Int | SqlType::BigInt) => Value::Int(i64::from(b)),
        (v @ (Value::Int(_) | Value::Double(_)), SqlType::Double) => v.as_f64().map_or(Value::Null, Value::Double),
        (Value::String(s), SqlType::Double) => s.trim().parse().map_or(Value::Null, Value::Double),
        (Value::Boolean(b), SqlType::Boolean) => Value::Boolean(b),
        (Value::String(s), SqlType::Boolean) => match s.trim().to_ascii_lowercase().as_str() {
            "true" => Value::Boolean(true),
            "false" => Value::Boolean(false),
            _ => Value::Null,
        },
        (v, SqlType::String) => v.to_text().map_or(Value::Null, Value::String),
        (v @ Value::Json(_), SqlType::Json) => v,
        (v, SqlType::Json) => Value::Json(serde_json::to_string(&JsonValue(&v)).unwrap_or_default()),
        _ => Value::Null,
    }
}

fn call(function: Function, args: &[Expr], row: &[Value]) -> Value {
    let arg = |i: usize| args.get(i).map_or(Value::Null, |e| eval(e, row));
    match function {
        Function::Coalesce | Function::IfNull => args
            .iter()
            .map(|e| eval(e, row))
            .find(|v| !v.is_null())
            .unwrap_or(Value::Null),
        Function::Concat => {
            let mut text = String::new();
            for value in args.iter().map(|e| eval(e, row)) {
                text.push_str(&value.to_text().unwrap_or_default());
            }
            Value::String(text)
        }
        Function::Substring => substring(arg(0), arg(1), args.get(2).map(|e| eval(e, row))),
        _ => unary_function(function, arg(0), args.get(1).map(|e| eval(e, row))),
    }
}

fn unary_function(function: Function, value: Value, second: Option<Value>) -> Value {
    match (function, value) {
        (Function::Upper, Value::String(s)) => Value::String(s.to_uppercase()),
        (Function::Lower, Value::String(s)) => Value::String(s.to_lowercase()),
        (Function::Trim, Value::String(s)) => Value::String(s.trim().to_string()),
        (Function::Len, Value::String(s)) => Value::Int(s.chars().count() as i64),
        (Function::Abs, Value::Int(i)) => Value::Int(i.wrapping_abs()),
        (Function::Abs, Value::Double(d)) => Value::Double(d.abs()),
        (Function::Floor | Function::Ceil | Function::Round, Value::Int(i)) => Value::Int(i),
        (Function::Floor, Value::Double(d)) => Value::Double(d.floor()),
        (Function::Ceil, Value::Double(d)) => Value::Double(d.ceil()),
        (Function::Round, Value::Double(d)) => match second {
            Some(Value::Int(places)) => {
                let scale = 10f64.powi(places.clamp(-15, 15) as i32);
                Value::Double((d * scale).round() / scale)
            }
            _ => Value::Int(d.round() as i64),
        },
        _ => Value::Null,
    }
}

/// `SUBSTRING(s, from [, length])`, positions from 1 in characters.
fn substring(value: Value, from: Value, length: Option<Value>) -> Value {
    let (Value::String(s), Value::Int(from)) = (value, from) else {
        return Value::Null;
    };
    let skip = usize::try_from(from.max(1) - 1).unwrap_or(usize::MAX);
    let take = match length {
        None => usize::MAX,
        Some(Value::Int(n)) => usize::try_from(n.max(0)).unwrap_or(usize::MAX),
        Some(_) => return Value::Null,
    };
    Value::String(s.chars().skip(skip).take(take).collect())
}

/// `value->name` on nested JSON.
fn field(value: Value, name: &str) -> Value {
    let Value::Json(text) = value else {
        return Value::Null;
    };
    let Ok(serde_json::Value::Object(object)) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Value::Null;
    };
    let found = object
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, v)| v);
    match found {
        None | Some(serde_json::Value::Null) => Value::Null,
        Some(serde_json::Value::Bool(b)) => Value::Boolean(*b),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .map(Value::Int)
            .or_else(|| n.as_f64().map(Value::Double))
            .unwrap_or(Value::Null),
        Some(serde_json::Value::String(s)) => Value::String(s.clone()),
        Some(nested) => Value::Json(nested.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(spec: &[(&str, SqlType)]) -> Vec<Column> {
        spec.iter()
            .map(|(name, ty)| Column {
                name: name.to_string(),
                ty: *ty,
            })
            .collect()
    }

    #[test]
    fn a_record_decodes_by_name_ignoring_case_and_a_mismatch_names_the_column() {
        let schema = columns(&[("CARD", SqlType::String), ("N", SqlType::BigInt), ("X", SqlType::Json)]);
        let mut row = Vec::new();
        decode_row(
            &schema,
            br#"{"card":"c-1","other":[1,2],"n":7,"x":{"a":{"b":2}}}"#,
            &mut row,
        )
        .expect("decodes");
        assert_eq!(row[0], Value::String("c-1".into()));
        assert_eq!(row[1], Value::Int(7));
        let b = Expr::Field(Box::new(Expr::Field(Box::new(Expr::Column(2)), "a".into())), "B".into());
        assert_eq!(eval(&b, &row), Value::Int(2));
        decode_row(&schema, br#"{"card":"c-2"}"#, &mut row).expect("missing fields are null");
        assert_eq!(row[1], Value::Null);
        let err = decode_row(&schema, br#"{"n":"seven"}"#, &mut row).expect_err("a string is no BIGINT");
        assert!(err.contains("column N") && err.contains("BIGINT"), "{err}");
        assert!(decode_row(&schema, b"[1]", &mut row).is_err(), "not an object");
        assert!(decode_row(&schema, b"{} x", &mut row).is_err(), "trailing bytes");
    }

    #[test]
    fn nulls_propagate_and_logic_is_three_valued() {
        let row = vec![Value::Null, Value::Int(4), Value::String("abc".into())];
        let col = |i| Box::new(Expr::Column(i));
        let lit = |i| Box::new(Expr::Literal(Literal::Int(i)));
        assert_eq!(eval(&Expr::Binary(BinaryOp::Add, col(0), lit(1)), &row), Value::Null);
        assert_eq!(eval(&Expr::Binary(BinaryOp::Divide, col(1), lit(0)), &row), Value::Null);
        assert_eq!(
            eval(&Expr::Binary(BinaryOp::Multiply, col(1), lit(3)), &row),
            Value::Int(12)
        );
        let null_cmp = Expr::Binary(BinaryOp::Greater, col(0), lit(1));
        let true_cmp = Expr::Binary(BinaryOp::Greater, col(1), lit(1));
        let false_cmp = Expr::Binary(BinaryOp::Less, col(1), lit(1));
        let or = Expr::Binary(BinaryOp::Or, Box::new(null_cmp.clone()), Box::new(true_cmp));
        let and = Expr::Binary(BinaryOp::And, Box::new(null_cmp.clone()), Box::new(false_cmp));
        assert_eq!(eval(&or, &row), Value::Boolean(true));
        assert_eq!(eval(&and, &row), Value::Boolean(false));
        assert!(!holds(&null_cmp, &row), "a NULL condition does not hold");
        assert!(like(b"card-17", b"card-%"));
        assert!(like(b"abc", b"a_c") && !like(b"abc", b"a_") && like(b"", b"%"));
        assert!(like(b"aaab", b"%a%b") && !like(b"aaac", b"%a%b"));
        assert_eq!(cast(Value::String(" 12 ".into()), SqlType::BigInt), Value::Int(12));
        assert_eq!(cast(Value::String("x".into()), SqlType::BigInt), Value::Null);
        assert_eq!(cast(Value::Int(1 << 40), SqlType::Int), Value::Null);
    }
}
