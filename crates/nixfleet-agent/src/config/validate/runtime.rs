//! Keys about the agent process itself: `log_level`. (`state_dir` and
//! `stop_grace` are a directory and a duration: see `build::validate`.)

use super::Validator;

impl Validator<'_> {
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
