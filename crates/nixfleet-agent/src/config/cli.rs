//! The command-line interface. (The flags become the highest layer in
//! `sources::flags`.)

use std::path::PathBuf;

/// Command-line interface of `nixfleet-agent`.
///
/// There is deliberately no `--token` flag: argv is world-readable.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(name = "nixfleet-agent", version, about = "NixFleet agent", long_about = None)]
pub struct Cli {
    /// What to do instead of running the agent.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML configuration file (else $NIXFLEET_CONFIG, else none).
    #[arg(long, value_name = "PATH", global = true)]
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
    #[arg(long, value_name = "PATH", global = true)]
    pub state_dir: Option<PathBuf>,
    /// Extra PEM CA file for wss://.
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
}

/// The subcommands; without one, the agent runs.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Print what the running agent is doing (from its state file), exit
    /// 0 when connected, 3 when not, 4 when there is no state.
    Status {
        /// One JSON object instead of lines for people.
        #[arg(long)]
        json: bool,
    },
}
