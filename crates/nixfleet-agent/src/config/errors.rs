//! Configuration errors: one line that names the key and the source of the
//! bad value, and figment's own errors worded the same way, never showing
//! the token.

use super::layer::describe;
use super::sources::toml_file::unknown_key;
use super::values::{short_str, toml_str};
use figment::Figment;
use figment::error::{Actual, Kind};
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

/// The value figment found, for a type error (the token never gets here).
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
