//! The loose values figment hands over, as messages show them: quoted,
//! shortened when long, and read as integers. Nothing here knows where a
//! value came from; callers add the key and the source.

use figment::value::{Num, Value};

/// A TOML basic string: quoted, with `"`, `\\` and control characters
/// escaped.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A value for an error message: a TOML string, shortened when long.
pub(super) fn short_str(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…\"", &toml_str(&s[..i]).trim_end_matches('"')),
        None => toml_str(s),
    }
}

pub(super) fn show_value(value: &Value) -> String {
    match value {
        Value::String(_, s) => short_str(s),
        Value::Char(_, c) => toml_str(&c.to_string()),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => match *n {
            Num::F32(f) => f.to_string(),
            Num::F64(f) => f.to_string(),
            n => num_to_i128(n).map_or_else(|| "a huge number".to_owned(), |i| i.to_string()),
        },
        Value::Empty(..) => "nothing".to_owned(),
        Value::Dict(..) => "{…}".to_owned(),
        Value::Array(..) => "[…]".to_owned(),
    }
}

/// Any integer `Num` as `i128` (figment's own `to_i128` is signed-only).
pub(super) fn num_to_i128(n: Num) -> Option<i128> {
    n.to_i128()
        .or_else(|| n.to_u128().and_then(|u| i128::try_from(u).ok()))
}
