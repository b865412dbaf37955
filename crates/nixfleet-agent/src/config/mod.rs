//! Layered configuration: built-in defaults < TOML file < `NIXFLEET_*`
//! environment < systemd credentials < command-line flags (the reference for
//! users is `docs/config.md`).
//!
//! Every layer is a figment provider with its own metadata name, so the
//! source of any value (file path, environment variable, credential file or
//! flag) can be named in errors and in [`Config::render`]. Figment merges the
//! layers and deserialises them into a loose `Raw` struct; the typed,
//! validated [`Config`] is built from that by hand so every failure becomes
//! one line that names the key and where its value came from — and never
//! contains the token.
//!
//! The parts, from the bottom up; each imports only parts listed before it
//! here:
//!
//! - Plain data, importing no other part: `keys` (the list of keys, their
//!   limits, and how a key is spelt as an environment variable and as a
//!   flag), `values` (showing a value in a message), `files` (reading files
//!   without trusting them), `cli` (the command-line interface) and
//!   `effective` (the typed [`Config`] the agent reads).
//! - `layer`: the layer type, the kinds of layer in order of precedence,
//!   and naming the source of a value.
//! - `sources`: one file per layer (built-in and system defaults, the TOML
//!   file, the environment, systemd credentials, flags) and reading a token
//!   file.
//! - `validate`: one method per key on `Validator`, grouped by what the
//!   keys are about (`dashboard`, `repository`, `host`, `runtime`,
//!   `token`), and durations; `errors`: the one-line error, and figment's
//!   errors in the same words.
//! - `build`: merges the layers, extracts `Raw` and validates it key by
//!   key, in a fixed order (the first problem is reported first, then every other bad
//!   value among the keys checked on their own, on the same line);
//!   `render`: `--check-config`'s TOML output with sources.
//!
//! # Adding a key
//!
//! 1. `keys.rs`: add the name to [`KEYS`] (its environment name
//!    `NIXFLEET_<KEY>` follows); if it has a default, set it in
//!    `default_layer` (`sources/defaults.rs`).
//! 2. `build.rs`: a field in `Raw` (`Option<String>`, or `Option<Value>` for
//!    durations and numbers) and, in `validate`, the key's check and its
//!    field in the `Config { … }` it returns.
//! 3. `validate/<group>.rs`: the key's check as a `Validator` method (errors
//!    via `Validator::bad`, so they name the key and its source).
//! 4. `effective.rs`: the typed field on [`Config`]; `render.rs`: its line.
//! 5. If it has a flag: a field on [`Cli`] (`cli.rs`) and a line in
//!    `flag_layer` (`sources/flags.rs`).
//! 6. Documentation: a row in the key table of `docs/config.md` (a test
//!    compares that table with [`KEYS`] and [`env_var_names`]).

mod build;
mod cli;
mod effective;
mod errors;
mod files;
mod keys;
mod layer;
mod render;
mod sources;
mod validate;
mod values;

#[cfg(test)]
mod tests;

pub use cli::{Cli, Command};
pub use effective::{ClientIdentity, Config, MetricsMode, TokenSource};
pub use errors::ConfigError;
pub use keys::{KEYS, MAX_PERIOD_SECS, MAX_STOP_GRACE_SECS, env_var_names};
pub use validate::{
    check_branch, check_hostname, check_log_level, check_repo_url, check_url, parse_duration,
};
pub use values::toml_str;

use errors::error_line;
use keys::Env;
use secrecy::SecretString;

/// Exit code for every configuration error (EX_CONFIG from sysexits.h).
pub const EXIT_CONFIG: u8 = 78;

/// Loads the configuration from every layer, using the process environment.
pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
    // A non-UTF-8 value in a variable we read is an error, not "unset".
    for name in env_var_names() {
        if let Err(std::env::VarError::NotUnicode(_)) = std::env::var(&name) {
            return Err(error_line(
                &format!("environment variable {name} is not valid UTF-8"),
                &[],
            ));
        }
    }
    load_with(cli, |name| std::env::var(name).ok())
}

/// As [`load`], with the environment given as a lookup function (for tests:
/// no need to mutate the process environment). The system hostname still
/// comes from `uname`.
pub fn load_with<F>(cli: &Cli, env: F) -> Result<Config, ConfigError>
where
    F: Fn(&str) -> Option<String>,
{
    let nodename = rustix::system::uname()
        .nodename()
        .to_str()
        .ok()
        .map(str::to_owned);
    load_inner(cli, &env, nodename)
}

/// Only `state_dir`, from the same layers as [`load`] (for `status`, which
/// needs no dashboard settings), and where its value came from.
pub fn load_state_dir(cli: &Cli) -> Result<(std::path::PathBuf, String), ConfigError> {
    let mut secrets: Vec<SecretString> = Vec::new();
    let env = |name: &str| std::env::var(name).ok();
    build::state_dir_only(cli, &env, &mut secrets).map_err(|msg| error_line(&msg, &secrets))
}

fn load_inner(
    cli: &Cli,
    env: Env<'_>,
    system_hostname: Option<String>,
) -> Result<Config, ConfigError> {
    // Every token candidate seen while loading, scrubbed from the error.
    let mut secrets: Vec<SecretString> = Vec::new();
    build::build(cli, env, system_hostname, &mut secrets).map_err(|msg| error_line(&msg, &secrets))
}

/// A configuration for unit tests: a dashboard on a closed port (9,
/// discard), and `repo_dir` and `state_dir` as given.
#[cfg(test)]
pub fn for_test(repo_dir: &std::path::Path, state_dir: &std::path::Path) -> Config {
    let env: std::collections::HashMap<&str, String> = [
        ("NIXFLEET_URL", "ws://127.0.0.1:9/ws".to_owned()),
        ("NIXFLEET_TOKEN", "test-token".to_owned()),
        ("NIXFLEET_REPO_DIR", repo_dir.display().to_string()),
        ("NIXFLEET_STATE_DIR", state_dir.display().to_string()),
        ("NIXFLEET_HOSTNAME", "h".to_owned()),
    ]
    .into();
    load_with(&Cli::default(), |name| env.get(name).cloned()).expect("a valid test configuration")
}
