//! The validated, effective configuration the rest of the agent reads.

use super::token::TokenSource;
use secrecy::SecretString;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// Where system metrics for the heartbeat come from (`metrics`).
pub enum MetricsMode {
    Auto,
    Stasysmo,
    Proc,
    None,
}

impl MetricsMode {
    /// The config spelling (`auto`, `stasysmo`, `proc`, `none`).
    pub fn as_str(self) -> &'static str {
        match self {
            MetricsMode::Auto => "auto",
            MetricsMode::Stasysmo => "stasysmo",
            MetricsMode::Proc => "proc",
            MetricsMode::None => "none",
        }
    }

    pub(super) fn parse(s: &str) -> Option<MetricsMode> {
        match s {
            "auto" => Some(MetricsMode::Auto),
            "stasysmo" => Some(MetricsMode::Stasysmo),
            "proc" => Some(MetricsMode::Proc),
            "none" => Some(MetricsMode::None),
            _ => None,
        }
    }
}

impl fmt::Display for MetricsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// Cap on one command's log, which is also the backlog of output the
    /// dashboard has not read yet: past it, lines are counted and dropped.
    pub log_max_bytes: u64,
    /// Budget for all command logs together (older logs are removed).
    pub logs_max_bytes: u64,
    /// Allows `ws://` to a host other than loopback (the token then
    /// crosses the network in clear text).
    pub allow_insecure_url: bool,
    /// v3 dashboards: the host's colour (`#rrggbb`).
    pub theme_color: Option<String>,
    /// v3 dashboards: `home`, `work` or `cloud`.
    pub location: Option<String>,
    /// v3 dashboards: `server`, `desktop`, `laptop` or `gaming`.
    pub device_type: Option<String>,
    /// Whether the dashboard's `reboot` command may reboot the host.
    pub allow_reboot: bool,
    /// Where the token came from (never the token itself).
    pub token_source: TokenSource,
    /// Non-fatal findings (e.g. a token file readable by others) for the
    /// caller to log. Never contain the token.
    pub warnings: Vec<String>,
    /// For every key that has a value: the source that supplied it, e.g.
    /// `/etc/nixfleet.toml`, `environment variable NIXFLEET_URL`,
    /// `systemd credential /run/credentials/x/ssh_key`, `flag --interval`,
    /// `built-in default`.
    pub origins: BTreeMap<&'static str, String>,
}
