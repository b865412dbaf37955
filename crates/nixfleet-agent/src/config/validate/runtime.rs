//! Keys about the agent process itself: `log_level`, `log_max_bytes`,
//! `logs_max_bytes`, and what it may do to the host: `allow_reboot`.
//! (`rollback_on_failed_tests` is a plain yes/no: `Validator::boolean`.)
//! (`state_dir` and `stop_grace` are a directory and a duration: see
//! `build::validate`.)

use super::Validator;
use crate::config::values::{num_to_i128, show_value};
use figment::value::{Num, Value};

/// Smallest command log cap: room for a few long lines.
pub const MIN_LOG_BYTES: u64 = 64 * 1024;

impl Validator<'_> {
    /// A byte count with a default: a whole number of bytes, or a string
    /// like "500M" or "2G" (binary units), at least [`MIN_LOG_BYTES`].
    pub(crate) fn byte_size(&self, key: &str, value: Option<Value>) -> Result<u64, String> {
        let value = value.unwrap_or_else(|| Value::from(0u64));
        parse_byte_size(&value).map_err(|p| {
            format!(
                "{key} = {} (from {}): {p}",
                show_value(&value),
                self.origin(key)
            )
        })
    }

    /// `allow_reboot` (has a default): a boolean, or in the environment
    /// `true`/`false`.
    pub(crate) fn allow_reboot(&self, value: Option<Value>) -> Result<bool, String> {
        match value {
            None => Ok(false),
            Some(Value::Bool(_, b)) => Ok(b),
            Some(Value::String(_, s)) => match s.trim() {
                "true" => Ok(true),
                "false" => Ok(false),
                other => Err(self.bad("allow_reboot", other, "expected true or false")),
            },
            Some(_) => Err(format!(
                "allow_reboot (from {}): expected true or false",
                self.origin("allow_reboot")
            )),
        }
    }

    /// `log_level` (has a default).
    pub(crate) fn log_level(&self, filter: Option<String>) -> Result<String, String> {
        let filter = filter.unwrap_or_default();
        check_log_level(&filter).map_err(|p| self.bad("log_level", &filter, &p))?;
        Ok(filter)
    }
}

/// `log_level`: a level, or a filter of `level` / `target=level` directives.
pub fn check_log_level(filter: &str) -> Result<(), String> {
    const EXPECTED: &str = "expected trace, debug, info, warn, error or off, or a filter \
                            like \"info,nixfleet_agent=debug\"";
    let is_level = |s: &str| {
        ["trace", "debug", "info", "warn", "error", "off"]
            .iter()
            .any(|l| l.eq_ignore_ascii_case(s))
    };
    if filter.trim().is_empty() {
        return Err(format!("is empty; {EXPECTED}"));
    }
    // The logging module parses it as `Targets`; it must accept it...
    if filter
        .parse::<tracing_subscriber::filter::Targets>()
        .is_err()
    {
        return Err(EXPECTED.to_owned());
    }
    // ...but `Targets` takes any bare word ("verbose") as a target name,
    // which is almost certainly a typo here.
    for directive in filter.split(',').map(str::trim) {
        let ok = match directive.split_once('=') {
            Some((target, level)) => {
                !target.is_empty()
                    && target
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
                    && is_level(level.trim())
            }
            None => is_level(directive),
        };
        if !ok {
            return Err(format!("bad directive \"{directive}\"; {EXPECTED}"));
        }
    }
    Ok(())
}

/// `log_max_bytes`, `logs_max_bytes`.
pub fn parse_byte_size(value: &Value) -> Result<u64, String> {
    const EXPECTED: &str =
        "expected a number of bytes like 1073741824 or \"1G\" (K, M, G: binary units)";
    let bytes: Option<u64> = match value {
        Value::Num(_, Num::F32(_) | Num::F64(_)) => None,
        Value::Num(_, n) => num_to_i128(*n).and_then(|n| u64::try_from(n).ok()),
        Value::String(_, s) => {
            let s = s.trim();
            let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
                Some((i, _)) => s.split_at(i),
                None => (s, ""),
            };
            let shift = match unit.trim() {
                "" => Some(0),
                "K" | "k" | "KiB" => Some(10),
                "M" | "MiB" => Some(20),
                "G" | "GiB" => Some(30),
                _ => None,
            };
            match (digits.parse::<u64>().ok(), shift) {
                (Some(n), Some(shift)) => n.checked_mul(1 << shift),
                _ => None,
            }
        }
        _ => None,
    };
    let bytes = bytes.ok_or_else(|| EXPECTED.to_owned())?;
    if bytes < MIN_LOG_BYTES {
        return Err(format!(
            "must be at least {MIN_LOG_BYTES} bytes; {EXPECTED}"
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_take_numbers_and_binary_units() {
        let ok = |v: Value| parse_byte_size(&v).unwrap();
        assert_eq!(ok(Value::from(100_000u64)), 100_000);
        assert_eq!(ok(Value::from("512K")), 512 * 1024);
        assert_eq!(ok(Value::from("1G")), 1 << 30);
        assert_eq!(ok(Value::from("3 MiB")), 3 << 20);
        for bad in [
            Value::from("1T"),
            Value::from("x"),
            Value::from(-1i64),
            Value::from(1.5f64),
            Value::from(10u64),
        ] {
            assert!(parse_byte_size(&bad).is_err(), "{bad:?}");
        }
    }
}
