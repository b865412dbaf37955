//! The validated, effective configuration the rest of the agent reads.

use rustls::sign::CertifiedKey;
use secrecy::SecretString;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    /// The certificate and key this host shows a dashboard that asks for
    /// one (`tls_client_cert`, `tls_client_key`), read and checked.
    pub tls_client: Option<ClientIdentity>,
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
    /// The commit to report as `source_commit` (the flake's module sets
    /// the flake's revision); `None`: the one recorded at build time.
    pub source_commit: Option<String>,
    /// git's SSH allowed-signers file: when set (or `gpg_keyring`), only
    /// commits signed by a listed key are checked out and built.
    pub allowed_signers_file: Option<PathBuf>,
    /// OpenPGP public keys (a file, or a directory of files) for the same
    /// rule with OpenPGP signatures.
    pub gpg_keyring: Option<PathBuf>,
    /// What to send as `register.agent_version` instead of this agent's
    /// version: v3 dashboards call any other version than their own
    /// outdated. `None`: the real version.
    pub report_agent_version: Option<String>,
    /// Where to write the Prometheus metrics for node_exporter's textfile
    /// collector (`observe`); `None`: no metrics file.
    pub metrics_textfile: Option<PathBuf>,
    /// How long a switch that changed the running system waits for the
    /// dashboard to confirm it (a register) before rolling back; zero: never.
    pub confirm_timeout: Duration,
    /// Whether the host's tests run after every activation, a failure
    /// rolling it back.
    pub rollback_on_failed_tests: bool,
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

impl Config {
    /// The keys signatures are checked against, when signed commits are
    /// required (`None`: any commit is deployed).
    pub fn signing_keys(&self) -> Option<crate::signature::SigningKeys> {
        crate::signature::SigningKeys::new(
            self.allowed_signers_file.clone(),
            self.gpg_keyring.clone(),
        )
    }
}

/// A client certificate chain and its private key, read at start-up and
/// kept as the signing key rustls uses (`config/validate/client_cert.rs`
/// says what that holds). `Debug` shows the paths only.
#[derive(Clone)]
pub struct ClientIdentity {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    certified: Arc<CertifiedKey>,
}

impl ClientIdentity {
    pub(crate) fn new(cert_path: PathBuf, key_path: PathBuf, certified: Arc<CertifiedKey>) -> Self {
        ClientIdentity {
            cert_path,
            key_path,
            certified,
        }
    }

    /// The chain and signing key for a TLS client configuration (shared,
    /// not copied).
    pub fn certified(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("certificates", &self.certified.cert.len())
            .finish_non_exhaustive()
    }
}

/// Where the effective token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `token` set inline; `origin` names the layer (config file path or
    /// environment variable).
    Inline { origin: String },
    /// Read from `token_file` at `path`; `origin` names where `token_file`
    /// was set (config file path, environment variable or flag).
    File { path: PathBuf, origin: String },
    /// Read from the systemd credential `$CREDENTIALS_DIRECTORY/token`.
    Credential { path: PathBuf },
}

impl TokenSource {
    /// The file the token was read from, if any (token_file or credential).
    pub fn path(&self) -> Option<&Path> {
        match self {
            TokenSource::Inline { .. } => None,
            TokenSource::File { path, .. } | TokenSource::Credential { path } => Some(path),
        }
    }
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Inline { origin } => f.write_str(origin),
            TokenSource::File { path, origin } => {
                write!(f, "token_file {} (set by {origin})", path.display())
            }
            TokenSource::Credential { path } => {
                write!(f, "systemd credential {}", path.display())
            }
        }
    }
}
