//! Keys about the agent process itself: `log_level`, and what it may do
//! to the host: `allow_reboot`. (`state_dir` and
//! `stop_grace` are a directory and a duration: see `build::validate`.)

use super::Validator;
use figment::value::Value;

impl Validator<'_> {
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
