//! Configuration errors: one line that names the key and the source of the
//! bad value, and the helpers that show values in messages without ever
//! showing the token.

use super::layers::describe;
use super::toml_file::unknown_key;
use super::validate::num_to_i128;
use figment::Figment;
use figment::error::{Actual, Kind};
use figment::value::{Num, Value};
use secrecy::{ExposeSecret, SecretString};
use std::fmt;

/// One line naming the key and the source of the bad value; never the token.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Makes the final one-line message: prefix, every known token candidate
/// scrubbed, control characters (newlines!) escaped.
pub(super) fn error_line(msg: &str, secrets: &[SecretString]) -> ConfigError {
    let mut msg = msg.to_owned();
    for secret in secrets {
        let secret = secret.expose_secret();
        if secret.len() >= 4 {
            msg = msg.replace(secret, "<redacted>");
        }
    }
    let mut line = String::from("config error: ");
    for c in msg.chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    ConfigError(line)
}

/// Turns a figment extraction error into one line; never echoes a token.
pub(super) fn figment_error(e: figment::Error, figment: &Figment) -> String {
    let key = e.path.join(".");
    if let Kind::UnknownField(name, _) = &e.kind {
        return unknown_key(name, &describe(figment.find_metadata(name), name));
    }
    let source = describe(e.metadata.as_ref().or(figment.find_metadata(&key)), &key);
    let secret = key == "token" || key.is_empty();
    match &e.kind {
        Kind::InvalidType(actual, expected) if secret => {
            format!(
                "token (from {source}): expected {expected}, found {}",
                kind_of(actual)
            )
        }
        Kind::InvalidType(actual, expected) => {
            format!(
                "{key} = {} (from {source}): expected {expected}",
                show_actual(actual)
            )
        }
        _ if secret => format!("{key} (from {source}): invalid value"),
        other => format!("{key} (from {source}): {other}"),
    }
}

/// The kind of a value, without the value.
fn kind_of(actual: &Actual) -> &'static str {
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Seq => "an array",
        Actual::Map => "a table",
        _ => "another type",
    }
}

/// A value for an error message: a TOML string, shortened when long.
pub(super) fn short_str(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…\"", &toml_str(&s[..i]).trim_end_matches('"')),
        None => toml_str(s),
    }
}

fn show_actual(actual: &Actual) -> String {
    match actual {
        Actual::Bool(b) => b.to_string(),
        Actual::Unsigned(n) => n.to_string(),
        Actual::Signed(n) => n.to_string(),
        Actual::Float(f) => f.to_string(),
        Actual::Char(c) => toml_str(&c.to_string()),
        Actual::Str(s) => short_str(s),
        Actual::Seq => "[…]".to_owned(),
        Actual::Map => "{…}".to_owned(),
        other => kind_of(other).to_owned(),
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
