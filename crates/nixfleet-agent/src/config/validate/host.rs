//! Keys about this host as the dashboard sees it: `hostname` (also the
//! flake attribute), `metrics` and `stasysmo_dir`, and how v3 dashboards
//! show it: `theme_color`, `location`, `device_type`. (`interval`, the
//! heartbeat period, is a duration: see `build::validate`.)

use super::{Validator, check_path};
use crate::config::effective::MetricsMode;
use std::path::PathBuf;

impl Validator<'_> {
    /// `hostname` (from the system unless set).
    pub(crate) fn hostname(&self, name: Option<String>) -> Result<String, String> {
        let Some(name) = name else {
            return Err("hostname is required: the system hostname is unavailable \
                        (set hostname in the config file, NIXFLEET_HOSTNAME or --hostname)"
                .to_owned());
        };
        check_hostname(&name).map_err(|p| self.bad("hostname", &name, &p))?;
        Ok(name)
    }

    /// `metrics` (has a default).
    pub(crate) fn metrics(&self, mode: Option<String>) -> Result<MetricsMode, String> {
        let text = mode.unwrap_or_default();
        MetricsMode::parse(&text).ok_or_else(|| {
            self.bad(
                "metrics",
                &text,
                "expected one of auto, stasysmo, proc, none",
            )
        })
    }

    /// `theme_color` (optional): `#rrggbb`.
    pub(crate) fn theme_color(&self, color: Option<String>) -> Result<Option<String>, String> {
        let Some(color) = color else { return Ok(None) };
        check_theme_color(&color).map_err(|p| self.bad("theme_color", &color, &p))?;
        Ok(Some(color))
    }

    /// `source_commit` (optional): what the host reports as the commit it
    /// runs (the flake's module writes the flake's revision here).
    pub(crate) fn source_commit(&self, commit: Option<String>) -> Result<Option<String>, String> {
        let Some(commit) = commit else {
            return Ok(None);
        };
        check_source_commit(&commit).map_err(|p| self.bad("source_commit", &commit, &p))?;
        Ok(Some(commit))
    }

    /// `report_agent_version` (optional): the version sent as
    /// `agent_version`, so a v3 dashboard counts the agent as current.
    pub(crate) fn report_agent_version(
        &self,
        version: Option<String>,
    ) -> Result<Option<String>, String> {
        let Some(version) = version else {
            return Ok(None);
        };
        check_version(&version).map_err(|p| self.bad("report_agent_version", &version, &p))?;
        Ok(Some(version))
    }

    /// An optional key whose value is one of `allowed`.
    pub(crate) fn one_of(
        &self,
        key: &str,
        value: Option<String>,
        allowed: &[&str],
    ) -> Result<Option<String>, String> {
        let Some(value) = value else { return Ok(None) };
        if allowed.contains(&value.as_str()) {
            Ok(Some(value))
        } else {
            Err(self.bad(
                key,
                &value,
                &format!("expected one of {}", allowed.join(", ")),
            ))
        }
    }

    /// A directory key with a default (`stasysmo_dir`, `state_dir`).
    /// `metrics_textfile` (optional): an absolute path ending in `.prom`,
    /// the only files node_exporter's textfile collector reads.
    pub(crate) fn metrics_textfile(&self, file: Option<String>) -> Result<Option<PathBuf>, String> {
        let Some(file) = file else { return Ok(None) };
        check_path(&file).map_err(|p| self.bad("metrics_textfile", &file, &p))?;
        if !file.starts_with('/') {
            return Err(self.bad("metrics_textfile", &file, "must be an absolute path"));
        }
        if !file.ends_with(".prom") || file.ends_with("/.prom") {
            let problem = "must end in .prom (node_exporter's textfile collector reads only those)";
            return Err(self.bad("metrics_textfile", &file, problem));
        }
        Ok(Some(PathBuf::from(file)))
    }

    pub(crate) fn dir(&self, key: &str, dir: Option<String>) -> Result<PathBuf, String> {
        let dir = dir.unwrap_or_default();
        check_path(&dir).map_err(|p| self.bad(key, &dir, &p))?;
        Ok(PathBuf::from(dir))
    }
}

/// `hostname`: 1–253 of `[A-Za-z0-9._-]`, not starting with `-` or `.`.
pub fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_owned());
    }
    if name.len() > 253 {
        return Err("is longer than 253 characters".to_owned());
    }
    if name.starts_with('-') || name.starts_with('.') {
        return Err("must not start with '-' or '.'".to_owned());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(
            "may contain only letters, digits, '-', '_' and '.' (it names the flake attribute)"
                .to_owned(),
        );
    }
    Ok(())
}

/// The `location` values v3 dashboards know.
pub(crate) const LOCATIONS: &[&str] = &["home", "work", "cloud"];
/// The `device_type` values v3 dashboards know.
pub(crate) const DEVICE_TYPES: &[&str] = &["server", "desktop", "laptop", "gaming"];

/// Longer than any git revision (`self.dirtyRev` of a SHA-256 repository
/// is 64 hex digits and `-dirty`).
const MAX_SOURCE_COMMIT_LEN: usize = 80;

/// `source_commit`: a revision as Nix and git print it: hex digits, and
/// `-dirty` for a flake's dirty tree. It goes into every `register`, so
/// anything else (empty, control characters, a long text) is refused.
pub fn check_source_commit(commit: &str) -> Result<(), String> {
    let hex = commit.strip_suffix("-dirty").unwrap_or(commit);
    if hex.is_empty() || commit.len() > MAX_SOURCE_COMMIT_LEN {
        return Err(format!(
            "expected a git revision (1 to {MAX_SOURCE_COMMIT_LEN} characters)"
        ));
    }
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err("expected a git revision: hex digits, optionally ending in -dirty".to_owned());
    }
    Ok(())
}

/// Longer than any version a dashboard prints.
const MAX_VERSION_LEN: usize = 64;

/// `report_agent_version`: a version as dashboards print them (`3.1.5`,
/// `3.2.0-rc1+abc`): it goes into every `register` and onto the
/// dashboard's page, so anything else is refused.
pub fn check_version(version: &str) -> Result<(), String> {
    let ok = !version.is_empty()
        && version.len() <= MAX_VERSION_LEN
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected a version such as 3.1.5 (1 to {MAX_VERSION_LEN} letters, digits, '.', '-', '+', '_')"
        ))
    }
}

/// `theme_color`: `#` and six hex digits.
pub fn check_theme_color(color: &str) -> Result<(), String> {
    let ok = color.len() == 7
        && color.starts_with('#')
        && color[1..].chars().all(|c| c.is_ascii_hexdigit());
    if ok {
        Ok(())
    } else {
        Err("expected a colour like \"#7aa2f7\" (# and six hex digits)".to_owned())
    }
}
