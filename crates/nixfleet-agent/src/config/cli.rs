//! The command-line interface, and the flags as the highest layer.

use super::files::path_string;
use super::keys::flag_name;
use super::layers::{Layer, LayerKind};
use std::path::PathBuf;

/// Command-line interface of `nixfleet-agent`.
///
/// There is deliberately no `--token` flag: argv is world-readable.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(name = "nixfleet-agent", version, about = "NixFleet agent", long_about = None)]
pub struct Cli {
    /// TOML configuration file (else $NIXFLEET_CONFIG, else none).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Validate, print the effective configuration (token redacted), exit.
    #[arg(long)]
    pub check_config: bool,
    /// Dashboard WebSocket URL (ws:// or wss://).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// File holding the agent token (trimmed).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Identity at the dashboard and flake attribute (default: system hostname).
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Local configuration repository.
    #[arg(long, value_name = "PATH")]
    pub repo_dir: Option<PathBuf>,
    /// Git URL of the configuration repository (isolated mode).
    #[arg(long, value_name = "URL")]
    pub repo_url: Option<String>,
    /// Branch to follow (default: main).
    #[arg(long, value_name = "BRANCH")]
    pub branch: Option<String>,
    /// Heartbeat interval: seconds, or a duration like "2m" (default: 30).
    #[arg(long, value_name = "DURATION")]
    pub interval: Option<String>,
    /// SSH private key for git.
    #[arg(long, value_name = "PATH")]
    pub ssh_key: Option<PathBuf>,
    /// debug, info, warn, error, trace, off, or a filter like "info,nixfleet_agent=debug".
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Metrics source: auto, stasysmo, proc or none.
    #[arg(long, value_name = "MODE")]
    pub metrics: Option<String>,
    /// Directory for command logs and other state.
    #[arg(long, value_name = "PATH")]
    pub state_dir: Option<PathBuf>,
    /// Extra PEM CA file for wss://.
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
}

/// The flag layer (the highest): every flag that was given.
pub(super) fn flag_layer(cli: &Cli) -> Result<Layer, String> {
    let mut flags = Layer::new(LayerKind::Flags);
    let strings = [
        ("url", &cli.url),
        ("hostname", &cli.hostname),
        ("repo_url", &cli.repo_url),
        ("branch", &cli.branch),
        ("interval", &cli.interval),
        ("log_level", &cli.log_level),
        ("metrics", &cli.metrics),
    ];
    for (key, value) in strings {
        if let Some(value) = value {
            flags.set(key, value.as_str());
        }
    }
    let paths = [
        ("token_file", &cli.token_file),
        ("repo_dir", &cli.repo_dir),
        ("ssh_key", &cli.ssh_key),
        ("state_dir", &cli.state_dir),
        ("ca_file", &cli.ca_file),
    ];
    for (key, value) in paths {
        if let Some(path) = value {
            flags.set(key, path_string(path, &format!("flag {}", flag_name(key)))?);
        }
    }
    Ok(flags)
}
