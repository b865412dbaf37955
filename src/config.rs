//! Layered configuration (`../shared/spec/config.md`): defaults < TOML file
//! < `NIXFLEET_*` environment < systemd credentials < command-line flags.
//!
//! INTERFACE CONTRACT (other modules rely on these names; the loader behind
//! them is being written separately).

use secrecy::SecretString;
use std::path::PathBuf;
use std::time::Duration;

/// Exit code for every configuration error (EX_CONFIG from sysexits.h).
pub const EXIT_CONFIG: u8 = 78;

/// Command-line interface of `nixfleet-agent`.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(name = "nixfleet-agent", version, about = "NixFleet agent")]
pub struct Cli {
    /// TOML configuration file (else $NIXFLEET_CONFIG, else none).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Validate, print the effective configuration (token redacted), exit.
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsMode {
    Auto,
    Stasysmo,
    Proc,
    None,
}

/// The validated, effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub url: String,
    pub token: SecretString,
    pub repo_dir: PathBuf,
    pub repo_url: Option<String>,
    pub branch: String,
    pub interval: Duration,
    pub ssh_key: Option<PathBuf>,
    pub hostname: String,
    pub log_level: String,
    pub metrics: MetricsMode,
    pub stasysmo_dir: PathBuf,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub backoff_max: Duration,
    pub stop_grace: Duration,
    pub state_dir: PathBuf,
    pub ca_file: Option<PathBuf>,
}

/// One line naming the key and the source of the bad value; never the token.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Loads the configuration from every layer, using the process environment.
pub fn load(_cli: &Cli) -> Result<Config, ConfigError> {
    Err(ConfigError("configuration loader not written yet".into()))
}

impl Config {
    /// The effective configuration as TOML-like text, token `<redacted>`.
    pub fn render(&self) -> String {
        String::new()
    }
}
