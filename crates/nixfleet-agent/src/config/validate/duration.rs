//! Duration keys (`interval`, `ping_interval`, `ping_timeout`,
//! `backoff_max`, `stop_grace`): whole seconds, as a number or a string.

use super::Validator;
use crate::config::values::{num_to_i128, show_value};
use figment::value::{Num, Value};
use std::time::Duration;

impl Validator<'_> {
    /// A duration key with a default, in `min..=max` seconds.
    pub(crate) fn duration(
        &self,
        key: &str,
        value: Option<Value>,
        min: u64,
        max: u64,
    ) -> Result<Duration, String> {
        let value = value.unwrap_or_else(|| Value::from(0u64));
        parse_duration(&value, min, max).map_err(|p| {
            format!(
                "{key} = {} (from {}): {p}",
                show_value(&value),
                self.origin(key)
            )
        })
    }
}

/// A duration: an integer number of seconds, or a string such as `"90s"`,
/// `"2m"`, `"1h 30m"` or `"45"`; whole seconds in `min..=max`.
pub fn parse_duration(value: &Value, min: u64, max: u64) -> Result<Duration, String> {
    let expected = format!("expected whole seconds ≥ {min} like 30 or \"2m\"");
    let seconds: i128 = match value {
        Value::Num(_, Num::F32(_) | Num::F64(_)) => {
            return Err(format!("not a whole number of seconds; {expected}"));
        }
        Value::Num(_, n) => num_to_i128(*n).ok_or_else(|| too_large(max))?,
        Value::String(_, s) => {
            let s = s.trim();
            if let Ok(n) = s.parse::<i128>() {
                n
            } else if s.parse::<f64>().is_ok() {
                return Err(format!("not a whole number of seconds; {expected}"));
            } else {
                let d = humantime::parse_duration(s).map_err(|_| expected.clone())?;
                if d.subsec_nanos() != 0 {
                    return Err(format!("not a whole number of seconds; {expected}"));
                }
                i128::from(d.as_secs())
            }
        }
        _ => return Err(expected),
    };
    if seconds < 0 {
        return Err(format!("must not be negative; {expected}"));
    }
    if seconds < i128::from(min) {
        return Err(format!("must be at least {min} second; {expected}"));
    }
    if seconds > i128::from(max) {
        return Err(too_large(max));
    }
    Ok(Duration::from_secs(seconds as u64))
}

fn too_large(max: u64) -> String {
    let human = match max {
        86_400 => " (1 day)".to_owned(),
        3_600 => " (1 hour)".to_owned(),
        _ => String::new(),
    };
    format!("must be at most {max} seconds{human}")
}
