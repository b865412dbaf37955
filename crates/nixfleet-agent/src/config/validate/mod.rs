//! Validation, key by key: a `Validator` method per key that turns the raw
//! merged value into the typed one, or into one message naming the key, the
//! value and its source. The methods live with their group of keys:
//! `dashboard`, `client_cert` (mTLS), `repository`, `host`, `runtime`,
//! `trust`, and `token` (which layer supplies it); `duration` holds the shared duration parser. A new key's check goes into the group it
//! belongs to (or a new group module here), called from `build::validate`.
//!
//! The `check_*` functions return only the problem (no key, no source).

mod client_cert;
mod dashboard;
mod duration;
mod host;
mod repository;
mod runtime;
mod token;
mod trust;

pub(crate) use host::{DEVICE_TYPES, LOCATIONS};

pub use dashboard::check_url;
#[cfg(test)]
pub(crate) use dashboard::redact_url;
pub use duration::parse_duration;
pub use host::check_hostname;
pub use repository::{check_branch, check_repo_url};
pub use runtime::check_log_level;
pub(crate) use token::{TokenSetting, check_token_not_in_url, resolve_token};

use super::layer::{LayerKind, describe};
use super::values::short_str;
use figment::Figment;

/// Looks up where each merged value came from, and collects warnings.
pub(crate) struct Validator<'a> {
    figment: &'a Figment,
    /// Non-fatal findings, for `Config::warnings`.
    pub(crate) warnings: Vec<String>,
}

impl<'a> Validator<'a> {
    pub(crate) fn new(figment: &'a Figment, warnings: Vec<String>) -> Validator<'a> {
        Validator { figment, warnings }
    }

    /// The source of `key`'s value, e.g. `flag --interval`.
    pub(crate) fn origin(&self, key: &str) -> String {
        describe(self.figment.find_metadata(key), key)
    }

    /// Whether any layer supplied `key`.
    pub(crate) fn has(&self, key: &str) -> bool {
        self.figment.contains(key)
    }

    /// The layer that supplied `key`'s value.
    pub(crate) fn layer_of(&self, key: &str) -> Option<LayerKind> {
        self.figment
            .find_metadata(key)
            .and_then(LayerKind::from_metadata)
    }

    /// The message for a bad string value: `key = "value" (from source): problem`.
    pub(crate) fn bad(&self, key: &str, value: &str, problem: &str) -> String {
        format!(
            "{key} = {} (from {}): {problem}",
            short_str(value),
            self.origin(key)
        )
    }
}

pub(crate) fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("is empty".to_owned());
    }
    if path.contains('\0') {
        return Err("contains a NUL byte".to_owned());
    }
    Ok(())
}
