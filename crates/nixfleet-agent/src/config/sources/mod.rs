//! The sources: each reads one place a value may come from and turns it
//! into a [`Layer`](super::layer::Layer), lowest precedence first:
//!
//! - `defaults`: the built-in defaults and the system's (hostname,
//!   `$STATE_DIRECTORY`);
//! - `toml_file`: the TOML file (`--config` / `$NIXFLEET_CONFIG`);
//! - `env`: the `NIXFLEET_*` variables;
//! - `credentials`: the systemd credentials `token` and `ssh_key`;
//! - `flags`: the command-line flags.
//!
//! `token_file` reads a file that holds the token (`token_file` or the
//! credential). Sources only read: whether a value is good is the business
//! of `validate`, which comes after them.

pub(super) mod credentials;
pub(super) mod defaults;
pub(super) mod env;
pub(super) mod flags;
pub(super) mod token_file;
pub(super) mod toml_file;
