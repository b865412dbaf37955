//! Layered configuration (`../shared/spec/config.md`): defaults < TOML file
//! < `NIXFLEET_*` environment < systemd credentials < command-line flags.
//!
//! Every layer is a figment [`Provider`] with its own metadata name, so the
//! source of any value (file path, environment variable, credential file or
//! flag) can be named in errors and in [`Config::render`]. Figment merges the
//! layers and deserialises them into a loose `Raw` struct; the typed,
//! validated [`Config`] is built from that by hand so every failure becomes
//! one line that names the key and where its value came from — and never
//! contains the token.

use figment::error::{Actual, Kind};
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Num, Value};
use figment::{Figment, Metadata, Profile, Provider};
use secrecy::{ExposeSecret, SecretString};
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Exit code for every configuration error (EX_CONFIG from sysexits.h).
pub const EXIT_CONFIG: u8 = 78;

/// Every configuration key (the file may hold only these).
pub const KEYS: &[&str] = &[
    "url",
    "token",
    "token_file",
    "repo_dir",
    "repo_url",
    "branch",
    "interval",
    "ssh_key",
    "hostname",
    "log_level",
    "metrics",
    "stasysmo_dir",
    "ping_interval",
    "ping_timeout",
    "backoff_max",
    "stop_grace",
    "state_dir",
    "ca_file",
];

/// Upper bound for `interval`, `ping_interval`, `ping_timeout`, `backoff_max`.
pub const MAX_PERIOD_SECS: u64 = 86_400;
/// Upper bound for `stop_grace`.
pub const MAX_STOP_GRACE_SECS: u64 = 3_600;
/// Token files and credentials larger than this are refused.
const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;
/// Config files larger than this are refused.
const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    fn parse(s: &str) -> Option<MetricsMode> {
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
    /// Cap on one command's log: the disk backlog of output the dashboard
    /// has not read yet; past it lines are counted and dropped.
    pub log_max_bytes: u64,
    /// Budget for all command logs together (older logs are removed).
    pub logs_max_bytes: u64,
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

/// One line naming the key and the source of the bad value; never the token.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

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

/// The environment variables the loader reads.
fn env_var_names() -> Vec<String> {
    let mut names: Vec<String> = KEYS.iter().map(|k| env_name(k)).collect();
    names.extend(
        [
            "NIXFLEET_CONFIG",
            "CREDENTIALS_DIRECTORY",
            "STATE_DIRECTORY",
        ]
        .map(String::from),
    );
    names
}

fn env_name(key: &str) -> String {
    format!("NIXFLEET_{}", key.to_ascii_uppercase())
}

fn flag_name(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

// ---------------------------------------------------------------------------
// Layers (figment providers)

/// The layers, lowest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum LayerKind {
    Defaults,
    System,
    File,
    Env,
    Credentials,
    Flags,
}

impl LayerKind {
    const ALL: [LayerKind; 6] = [
        LayerKind::Defaults,
        LayerKind::System,
        LayerKind::File,
        LayerKind::Env,
        LayerKind::Credentials,
        LayerKind::Flags,
    ];

    /// The figment metadata name of the layer.
    fn name(self) -> &'static str {
        match self {
            LayerKind::Defaults => "built-in defaults",
            LayerKind::System => "system defaults",
            LayerKind::File => "config file",
            LayerKind::Env => "environment variables",
            LayerKind::Credentials => "systemd credentials",
            LayerKind::Flags => "command-line flags",
        }
    }

    fn from_metadata(meta: &Metadata) -> Option<LayerKind> {
        LayerKind::ALL.into_iter().find(|k| k.name() == meta.name)
    }
}

/// One configuration layer: a flat dictionary of keys from one source.
struct Layer {
    kind: LayerKind,
    /// Config file path, or the credentials directory.
    path: Option<PathBuf>,
    dict: Dict,
}

impl Layer {
    fn new(kind: LayerKind) -> Layer {
        Layer {
            kind,
            path: None,
            dict: Dict::new(),
        }
    }

    fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.dict.insert(key.to_owned(), value.into());
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        let meta = Metadata::named(self.kind.name());
        let meta = match &self.path {
            Some(path) => meta.source(path.as_path()),
            None => meta,
        };
        match self.kind {
            LayerKind::Env => {
                meta.interpolater(|_: &Profile, keys: &[&str]| env_name(&keys.join(".")))
            }
            LayerKind::Flags => {
                meta.interpolater(|_: &Profile, keys: &[&str]| flag_name(&keys.join(".")))
            }
            _ => meta,
        }
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// Names the source of `key` as supplied by the layer with metadata `meta`.
fn describe(meta: Option<&Metadata>, key: &str) -> String {
    let Some(meta) = meta else {
        return "unknown source".to_owned();
    };
    let path = meta
        .source
        .as_ref()
        .and_then(|s| s.file_path())
        .map(Path::to_path_buf);
    match LayerKind::from_metadata(meta) {
        Some(LayerKind::Defaults) => "built-in default".to_owned(),
        Some(LayerKind::System) => match key {
            "hostname" => "system hostname".to_owned(),
            "state_dir" => "$STATE_DIRECTORY".to_owned(),
            _ => "system default".to_owned(),
        },
        Some(LayerKind::File) => match path {
            Some(p) => p.display().to_string(),
            None => "config file".to_owned(),
        },
        Some(LayerKind::Env) => format!("environment variable {}", env_name(key)),
        Some(LayerKind::Credentials) => match path {
            Some(dir) => format!("systemd credential {}", dir.join(key).display()),
            None => format!("systemd credential {key}"),
        },
        Some(LayerKind::Flags) => format!("flag {}", flag_name(key)),
        None => meta.name.to_string(),
    }
}

// ---------------------------------------------------------------------------
// Loading

/// Everything figment extracts; validated into [`Config`] afterwards.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    url: Option<String>,
    token: Option<SecretString>,
    token_file: Option<String>,
    repo_dir: Option<String>,
    repo_url: Option<String>,
    branch: Option<String>,
    interval: Option<Value>,
    ssh_key: Option<String>,
    hostname: Option<String>,
    log_level: Option<String>,
    metrics: Option<String>,
    stasysmo_dir: Option<String>,
    ping_interval: Option<Value>,
    ping_timeout: Option<Value>,
    backoff_max: Option<Value>,
    stop_grace: Option<Value>,
    state_dir: Option<String>,
    ca_file: Option<String>,
}

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn load_inner(
    cli: &Cli,
    env: Env<'_>,
    system_hostname: Option<String>,
) -> Result<Config, ConfigError> {
    let mut secrets = Vec::new();
    build(cli, env, system_hostname, &mut secrets).map_err(|msg| error_line(&msg, &secrets))
}

/// Makes the final one-line message: prefix, every known token candidate
/// scrubbed, control characters (newlines!) escaped.
fn error_line(msg: &str, secrets: &[SecretString]) -> ConfigError {
    let mut msg = msg.to_owned();
    for secret in secrets {
        let secret = secret.expose_secret();
        if secret.len() >= 4 {
            msg = msg.replace(secret, "<redacted>");
        }
    }
    let mut line = String::from("config error: ");
    for c in msg.chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    ConfigError(line)
}

/// The result of reading a token from a file: the trimmed token, or what is
/// wrong with the file (no content).
type TokenRead = Result<SecretString, String>;

fn build(
    cli: &Cli,
    env: Env<'_>,
    system_hostname: Option<String>,
    secrets: &mut Vec<SecretString>,
) -> Result<Config, String> {
    let mut warnings = Vec::new();

    // Layer 1: built-in defaults.
    let mut defaults = Layer::new(LayerKind::Defaults);
    defaults.set("branch", "main");
    defaults.set("interval", 30u64);
    defaults.set("log_level", "info");
    defaults.set("metrics", "auto");
    defaults.set("stasysmo_dir", "/dev/shm/stasysmo");
    defaults.set("ping_interval", 15u64);
    defaults.set("ping_timeout", 45u64);
    defaults.set("backoff_max", 60u64);
    defaults.set("stop_grace", 10u64);
    defaults.set("state_dir", "/var/lib/nixfleet");

    // Still defaults, but from the system.
    let mut system = Layer::new(LayerKind::System);
    if let Some(name) = system_hostname {
        system.set("hostname", name);
    }
    if let Some(dirs) = env("STATE_DIRECTORY") {
        // systemd passes a colon-separated list with StateDirectory=a b.
        if let Some(first) = dirs.split(':').find(|d| !d.is_empty()) {
            system.set("state_dir", first);
        }
    }

    // Layer 2: the TOML file.
    let file = config_file_layer(cli, env)?;

    // Layer 3: NIXFLEET_<KEY> for the known keys only.
    let mut env_layer = Layer::new(LayerKind::Env);
    for key in KEYS {
        if let Some(value) = env(&env_name(key)) {
            env_layer.set(key, value);
        }
    }

    // Layer 4: systemd credentials.
    let mut creds = Layer::new(LayerKind::Credentials);
    let mut cred_token: Option<(PathBuf, TokenRead)> = None;
    if let Some(dir) = env("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if !dir.is_dir() {
            warnings.push(format!(
                "CREDENTIALS_DIRECTORY {} is not a directory; no credentials loaded",
                dir.display()
            ));
        }
        let token_path = dir.join("token");
        if fs::symlink_metadata(&token_path).is_ok() {
            let read = read_token_file(&token_path);
            // The layer only records that the credential sets the token
            // (the value stays in `cred_token`): a read error matters only
            // if no later layer overrides it.
            creds.set("token", "");
            if let Ok(token) = &read {
                secrets.push(token.clone());
            }
            cred_token = Some((token_path, read));
        }
        let ssh_key = dir.join("ssh_key");
        if fs::symlink_metadata(&ssh_key).is_ok() {
            creds.set("ssh_key", path_string(&ssh_key, "CREDENTIALS_DIRECTORY")?);
        }
        creds.path = Some(dir);
    }

    // Layer 5: command-line flags.
    let flags = flag_layer(cli)?;

    let mut figment = Figment::new().merge(defaults).merge(system);
    for layer in [file, Some(env_layer), Some(creds), Some(flags)]
        .into_iter()
        .flatten()
    {
        // token and token_file in one layer: ambiguous. (Across layers the
        // later one wins, see resolve_token.)
        if layer.dict.contains_key("token") && layer.dict.contains_key("token_file") {
            let meta = layer.metadata();
            let both = match layer.kind {
                LayerKind::File => format!("both are set in {}", describe(Some(&meta), "token")),
                _ => format!(
                    "both are set: {} and {}",
                    describe(Some(&meta), "token"),
                    describe(Some(&meta), "token_file")
                ),
            };
            return Err(format!("set only one of token and token_file ({both})"));
        }
        figment = figment.merge(layer);
    }

    let raw: Raw = figment.extract().map_err(|e| figment_error(e, &figment))?;
    if let Some(token) = &raw.token {
        secrets.push(token.clone());
    }

    let origin = |key: &str| describe(figment.find_metadata(key), key);
    let layer_of = |key: &str| {
        figment
            .find_metadata(key)
            .and_then(LayerKind::from_metadata)
    };
    let mut origins: BTreeMap<&'static str, String> = BTreeMap::new();
    for key in KEYS {
        if figment.contains(key) {
            origins.insert(key, origin(key));
        }
    }

    // The token is resolved (files read) first so that its value can be
    // scrubbed from any later message; its errors are reported after url's.
    let token = resolve_token(&raw, &origin, &layer_of, cred_token, secrets, &mut warnings);

    // url
    let url = match raw.url {
        None => {
            return Err(
                "url is required (set url in the config file, NIXFLEET_URL or --url)".to_owned(),
            );
        }
        Some(url) => {
            check_url(&url).map_err(|p| {
                format!(
                    "url = {} (from {}): {p}",
                    short_str(&redact_url(&url)),
                    origin("url")
                )
            })?;
            url
        }
    };
    let (token, token_source) = token?;
    // (Tokens shorter than 4 characters would match by accident.)
    if token.expose_secret().len() >= 4 && url.contains(token.expose_secret()) {
        return Err(format!(
            "url (from {}) contains the token: the token is sent in the Authorization header \
             and must never appear in the URL",
            origin("url")
        ));
    }

    // Plain string keys.
    let bad = |key: &str, value: &str, problem: &str| {
        format!(
            "{key} = {} (from {}): {problem}",
            short_str(value),
            origin(key)
        )
    };

    let repo_dir = match raw.repo_dir {
        None => {
            return Err("repo_dir is required (set repo_dir in the config file, \
                        NIXFLEET_REPO_DIR or --repo-dir)"
                .to_owned());
        }
        Some(dir) => {
            check_path(&dir).map_err(|p| bad("repo_dir", &dir, &p))?;
            if dir.starts_with('-') {
                return Err(bad(
                    "repo_dir",
                    &dir,
                    "must not start with '-' (git would take it for an option; write ./-…)",
                ));
            }
            PathBuf::from(dir)
        }
    };

    let repo_url = match raw.repo_url {
        None => None,
        Some(u) => {
            check_repo_url(&u).map_err(|p| bad("repo_url", &u, &p))?;
            Some(u)
        }
    };

    let branch = raw.branch.unwrap_or_default();
    check_branch(&branch).map_err(|p| bad("branch", &branch, &p))?;

    let hostname = match raw.hostname {
        None => {
            return Err("hostname is required: the system hostname is unavailable \
                        (set hostname in the config file, NIXFLEET_HOSTNAME or --hostname)"
                .to_owned());
        }
        Some(h) => {
            check_hostname(&h).map_err(|p| bad("hostname", &h, &p))?;
            h
        }
    };

    let log_level = raw.log_level.unwrap_or_default();
    check_log_level(&log_level).map_err(|p| bad("log_level", &log_level, &p))?;

    let metrics_text = raw.metrics.unwrap_or_default();
    let metrics = MetricsMode::parse(&metrics_text).ok_or_else(|| {
        bad(
            "metrics",
            &metrics_text,
            "expected one of auto, stasysmo, proc, none",
        )
    })?;

    let stasysmo_dir = raw.stasysmo_dir.unwrap_or_default();
    check_path(&stasysmo_dir).map_err(|p| bad("stasysmo_dir", &stasysmo_dir, &p))?;

    let state_dir = raw.state_dir.unwrap_or_default();
    check_path(&state_dir).map_err(|p| bad("state_dir", &state_dir, &p))?;

    let ssh_key = match raw.ssh_key {
        None => None,
        Some(key) => {
            check_path(&key).map_err(|p| bad("ssh_key", &key, &p))?;
            let path = PathBuf::from(key);
            match fs::metadata(&path) {
                Err(e) => warnings.push(format!(
                    "ssh_key {} (from {}) cannot be read: {e}",
                    path.display(),
                    origin("ssh_key")
                )),
                Ok(m) if m.permissions().mode() & 0o077 != 0 => warnings.push(format!(
                    "ssh_key {} is accessible by group or others (mode {:04o}); ssh refuses \
                     such keys: chmod 600 it",
                    path.display(),
                    m.permissions().mode() & 0o7777
                )),
                Ok(_) => {}
            }
            Some(path)
        }
    };

    let ca_file = match raw.ca_file {
        None => None,
        Some(ca) => {
            check_path(&ca).map_err(|p| bad("ca_file", &ca, &p))?;
            check_readable_file(Path::new(&ca)).map_err(|p| bad("ca_file", &ca, &p))?;
            Some(PathBuf::from(ca))
        }
    };

    // Durations.
    let duration = |key: &str, value: Option<Value>, min: u64, max: u64| {
        let value = value.unwrap_or_else(|| Value::from(0u64));
        parse_duration(&value, min, max)
            .map_err(|p| format!("{key} = {} (from {}): {p}", show_value(&value), origin(key)))
    };
    let interval = duration("interval", raw.interval, 1, MAX_PERIOD_SECS)?;
    let ping_interval = duration("ping_interval", raw.ping_interval, 1, MAX_PERIOD_SECS)?;
    let ping_timeout = duration("ping_timeout", raw.ping_timeout, 1, MAX_PERIOD_SECS)?;
    let backoff_max = duration("backoff_max", raw.backoff_max, 1, MAX_PERIOD_SECS)?;
    let stop_grace = duration("stop_grace", raw.stop_grace, 0, MAX_STOP_GRACE_SECS)?;
    if ping_timeout <= ping_interval {
        return Err(format!(
            "ping_timeout = {} (from {}) must be greater than ping_interval = {} (from {}): \
             the connection is declared dead after ping_timeout seconds without any frame, \
             so it must outlast the time between two pings",
            ping_timeout.as_secs(),
            origin("ping_timeout"),
            ping_interval.as_secs(),
            origin("ping_interval"),
        ));
    }

    Ok(Config {
        url,
        token,
        repo_dir,
        repo_url,
        branch,
        interval,
        ssh_key,
        hostname,
        log_level,
        metrics,
        stasysmo_dir: PathBuf::from(stasysmo_dir),
        ping_interval,
        ping_timeout,
        backoff_max,
        stop_grace,
        state_dir: PathBuf::from(state_dir),
        ca_file,
        log_max_bytes: crate::command_log::DEFAULT_LOG_MAX_BYTES,
        logs_max_bytes: crate::command_log::DEFAULT_LOGS_MAX_BYTES,
        token_source,
        warnings,
        origins,
    })
}

/// Reads `--config` / `$NIXFLEET_CONFIG` into the file layer.
fn config_file_layer(cli: &Cli, env: Env<'_>) -> Result<Option<Layer>, String> {
    let (path, given_by) = match (&cli.config, env("NIXFLEET_CONFIG")) {
        (Some(path), _) => (path.clone(), "flag --config"),
        (None, Some(path)) => (PathBuf::from(path), "environment variable NIXFLEET_CONFIG"),
        (None, None) => return Ok(None),
    };
    if path.as_os_str().is_empty() {
        return Err(format!("config file path is empty (given by {given_by})"));
    }
    let shown = path.display();
    let cannot = |problem: String| {
        format!("cannot read config file {shown} (given by {given_by}): {problem}")
    };
    let meta = fs::metadata(&path).map_err(|e| cannot(e.to_string()))?;
    if meta.is_dir() {
        return Err(cannot("it is a directory".to_owned()));
    }
    let bytes = read_capped(&path, MAX_CONFIG_FILE_BYTES).map_err(cannot)?;
    let text = String::from_utf8(bytes).map_err(|_| cannot("not valid UTF-8".to_owned()))?;
    let dict: Dict = Toml::from_str(&text).map_err(|e| {
        // Only the parser's message and position: its default rendering
        // quotes the offending line, which may hold the token.
        let position = match e.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!(" (line {line}, column {column})")
            }
            None => String::new(),
        };
        let message = e
            .message()
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("; ");
        format!("config file {shown} is not valid TOML: {message}{position}")
    })?;
    if let Some(key) = dict.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(unknown_key(key, &shown.to_string()));
    }
    let mut layer = Layer::new(LayerKind::File);
    layer.dict = dict;
    layer.path = Some(path);
    Ok(Some(layer))
}

fn unknown_key(key: &str, file: &str) -> String {
    let hint = match suggest_key(key) {
        Some(known) => format!(" (did you mean {known}?)"),
        None => format!(" (known keys: {})", KEYS.join(", ")),
    };
    format!("unknown key {} in {file}{hint}", toml_str(key))
}

/// The known key closest to a misspelt one, if any is close.
fn suggest_key(key: &str) -> Option<&'static str> {
    let normal = key.to_ascii_lowercase().replace('-', "_");
    KEYS.iter()
        .map(|k| (edit_distance(&normal, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

fn flag_layer(cli: &Cli) -> Result<Layer, String> {
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

fn path_string(path: &Path, what: &str) -> Result<String, String> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("path {} (from {what}) is not valid UTF-8", path.display()))
}

/// Turns a figment extraction error into one line; never echoes a token.
fn figment_error(e: figment::Error, figment: &Figment) -> String {
    let key = e.path.join(".");
    if let Kind::UnknownField(name, _) = &e.kind {
        return unknown_key(name, &describe(figment.find_metadata(name), name));
    }
    let source = describe(e.metadata.as_ref().or(figment.find_metadata(&key)), &key);
    let secret = key == "token" || key.is_empty();
    match &e.kind {
        Kind::InvalidType(actual, expected) if secret => {
            format!(
                "token (from {source}): expected {expected}, found {}",
                kind_of(actual)
            )
        }
        Kind::InvalidType(actual, expected) => {
            format!(
                "{key} = {} (from {source}): expected {expected}",
                show_actual(actual)
            )
        }
        _ if secret => format!("{key} (from {source}): invalid value"),
        other => format!("{key} (from {source}): {other}"),
    }
}

/// The kind of a value, without the value.
fn kind_of(actual: &Actual) -> &'static str {
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Seq => "an array",
        Actual::Map => "a table",
        _ => "another type",
    }
}

/// A value for an error message: a TOML string, shortened when long.
fn short_str(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…\"", &toml_str(&s[..i]).trim_end_matches('"')),
        None => toml_str(s),
    }
}

fn show_actual(actual: &Actual) -> String {
    match actual {
        Actual::Bool(b) => b.to_string(),
        Actual::Unsigned(n) => n.to_string(),
        Actual::Signed(n) => n.to_string(),
        Actual::Float(f) => f.to_string(),
        Actual::Char(c) => toml_str(&c.to_string()),
        Actual::Str(s) => short_str(s),
        Actual::Seq => "[…]".to_owned(),
        Actual::Map => "{…}".to_owned(),
        other => kind_of(other).to_owned(),
    }
}

fn show_value(value: &Value) -> String {
    match value {
        Value::String(_, s) => short_str(s),
        Value::Char(_, c) => toml_str(&c.to_string()),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => match *n {
            Num::F32(f) => f.to_string(),
            Num::F64(f) => f.to_string(),
            n => num_to_i128(n).map_or_else(|| "a huge number".to_owned(), |i| i.to_string()),
        },
        Value::Empty(..) => "nothing".to_owned(),
        Value::Dict(..) => "{…}".to_owned(),
        Value::Array(..) => "[…]".to_owned(),
    }
}

/// A TOML basic string: quoted, with `"`, `\\` and control characters
/// escaped.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------
// Token

fn resolve_token(
    raw: &Raw,
    origin: &dyn Fn(&str) -> String,
    layer_of: &dyn Fn(&str) -> Option<LayerKind>,
    cred_token: Option<(PathBuf, TokenRead)>,
    secrets: &mut Vec<SecretString>,
    warnings: &mut Vec<String>,
) -> Result<(SecretString, TokenSource), String> {
    let use_file = match (&raw.token, &raw.token_file) {
        (None, None) => {
            return Err(
                "token is required (set token or token_file in the config file, \
                        NIXFLEET_TOKEN or NIXFLEET_TOKEN_FILE, the systemd credential \"token\", \
                        or --token-file)"
                    .to_owned(),
            );
        }
        (Some(_), None) => false,
        (None, Some(_)) => true,
        // Both merged from different layers (same-layer was refused
        // earlier): the later layer wins.
        (Some(_), Some(_)) => layer_of("token_file") > layer_of("token"),
    };

    if use_file {
        let path = raw.token_file.clone().unwrap_or_default();
        let bad = |problem: &str| {
            format!(
                "token_file = {} (from {}): {problem}",
                short_str(&path),
                origin("token_file")
            )
        };
        check_path(&path).map_err(|p| bad(&p))?;
        let token = read_token_file(Path::new(&path)).map_err(|p| bad(&p))?;
        secrets.push(token.clone());
        warn_loose_permissions(Path::new(&path), "token_file", warnings);
        let source = TokenSource::File {
            path: PathBuf::from(&path),
            origin: origin("token_file"),
        };
        return Ok((token, source));
    }

    if layer_of("token") == Some(LayerKind::Credentials) {
        let Some((path, read)) = cred_token else {
            return Err("token credential vanished".to_owned());
        };
        let token =
            read.map_err(|p| format!("token (from systemd credential {}): {p}", path.display()))?;
        warn_loose_permissions(&path, "token credential", warnings);
        return Ok((token, TokenSource::Credential { path }));
    }

    let source = origin("token");
    // Trimmed like a token file, for `NIXFLEET_TOKEN="$(cat file)"` and kin.
    let token = raw.token.as_ref().map_or("", |t| t.expose_secret().trim());
    check_token(token).map_err(|p| format!("token (from {source}): {p}"))?;
    if layer_of("token") == Some(LayerKind::File)
        && let Some(file) = source_file(&source)
    {
        warn_loose_permissions(&file, "config file holding the token", warnings);
    }
    Ok((
        SecretString::from(token.to_owned()),
        TokenSource::Inline { origin: source },
    ))
}

fn source_file(origin: &str) -> Option<PathBuf> {
    let path = PathBuf::from(origin);
    path.is_file().then_some(path)
}

/// Checks a token (already trimmed where it came from a file).
fn check_token(token: &str) -> Result<(), String> {
    if token.trim().is_empty() {
        return Err("is empty".to_owned());
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(
            "contains whitespace or control characters (it is sent in an HTTP \
                    header and must be a single word)"
                .to_owned(),
        );
    }
    Ok(())
}

/// Reads and trims a token file; the error never contains the content.
fn read_token_file(path: &Path) -> TokenRead {
    check_readable_file(path)?;
    let bytes = read_capped(path, MAX_TOKEN_FILE_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| "is not valid UTF-8".to_owned())?;
    let token = text.trim();
    if token.is_empty() {
        return Err("the file is empty".to_owned());
    }
    check_token(token)?;
    Ok(SecretString::from(token.to_owned()))
}

/// The file exists, is a regular file (after symlinks) and can be opened.
fn check_readable_file(path: &Path) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?;
    if meta.is_dir() {
        return Err("is a directory, not a file".to_owned());
    }
    if !meta.is_file() {
        return Err("is not a regular file".to_owned());
    }
    fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    Ok(())
}

fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("is larger than {max} bytes"));
    }
    Ok(bytes)
}

fn warn_loose_permissions(path: &Path, what: &str, warnings: &mut Vec<String>) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            warnings.push(format!(
                "{what} {} is accessible by group or others (mode {:04o}); chmod 600 it",
                path.display(),
                mode & 0o7777
            ));
        }
    }
}

// ---------------------------------------------------------------------------
// Validation helpers. Each returns the problem (no key, no source).

/// `url`: `ws://` or `wss://`, a host, a valid port, no userinfo, no fragment.
pub fn check_url(url: &str) -> Result<(), String> {
    const EXAMPLE: &str = "like \"wss://dashboard.example.org/ws\"";
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("not a valid URL ({e}); expected a ws:// or wss:// URL {EXAMPLE}"))?;
    match uri.scheme_str() {
        Some("ws" | "wss") => {}
        Some(other) => {
            return Err(format!(
                "unsupported scheme \"{other}\"; expected ws:// or wss:// {EXAMPLE}"
            ));
        }
        None => return Err(format!("expected a ws:// or wss:// URL {EXAMPLE}")),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("has no host; expected {EXAMPLE}"))?
        .as_str();
    if authority.contains('@') {
        return Err(
            "must not contain credentials (user:password@): the token is sent in \
                    the Authorization header; set token or token_file instead"
                .to_owned(),
        );
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("has no host; expected {EXAMPLE}"));
    }
    // Port: http::Uri accepts "host:" and "host:abc" and "host:99999".
    let after_host = match authority.rfind(']') {
        Some(i) => &authority[i + 1..],
        None => authority.find(':').map_or("", |i| &authority[i..]),
    };
    if let Some(port) = after_host.strip_prefix(':') {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(format!("has an invalid port \"{port}\"")),
        }
    } else if !after_host.is_empty() {
        return Err("has an invalid host".to_owned());
    }
    if url.contains('#') {
        return Err("must not contain a fragment (#…)".to_owned());
    }
    Ok(())
}

/// A URL for messages: userinfo and query removed (either may hold secrets).
fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(q) = out.find('?') {
        out.truncate(q);
        out.push_str("?<redacted>");
    }
    let start = out.find("://").map_or(0, |i| i + 3);
    let end = out[start..].find('/').map_or(out.len(), |i| start + i);
    if let Some(at) = out[start..end].rfind('@') {
        out.replace_range(start..start + at, "<redacted>");
    }
    out
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

/// `branch`: a name git accepts as a branch, that cannot pass for an option.
pub fn check_branch(branch: &str) -> Result<(), String> {
    if branch.is_empty() {
        return Err("is empty".to_owned());
    }
    if branch.starts_with('-') {
        return Err("must not start with '-'".to_owned());
    }
    if branch.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters".to_owned());
    }
    if branch.contains("..") {
        return Err("must not contain \"..\"".to_owned());
    }
    let invalid = branch
        .chars()
        .any(|c| matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
        || branch.contains("@{")
        || branch == "@"
        || branch.contains("//")
        || branch.starts_with('/')
        || branch.ends_with('/')
        || branch.ends_with('.')
        || branch
            .split('/')
            .any(|c| c.starts_with('.') || c.ends_with(".lock"));
    if invalid {
        return Err("is not a valid git branch name".to_owned());
    }
    Ok(())
}

/// `repo_url`: non-empty, cannot pass for an option.
pub fn check_repo_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err("is empty (leave repo_url unset for a repository you manage)".to_owned());
    }
    if url.starts_with('-') {
        return Err("must not start with '-'".to_owned());
    }
    if url.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    Ok(())
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

fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("is empty".to_owned());
    }
    if path.contains('\0') {
        return Err("contains a NUL byte".to_owned());
    }
    Ok(())
}

/// A duration: an integer number of seconds, or a string such as `"90s"`,
/// `"2m"`, `"1h 30m"` or `"45"`; whole seconds in `min..=max`.
pub fn parse_duration(value: &Value, min: u64, max: u64) -> Result<Duration, String> {
    let expected = format!("expected whole seconds ≥ {min} like 30 or \"2m\"");
    let seconds: i128 = match value {
        Value::Num(_, Num::F32(_) | Num::F64(_)) => {
            return Err(format!("not a whole number of seconds; {expected}"));
        }
        Value::Num(_, n) => num_to_i128(*n).ok_or_else(|| too_large(max))?,
        Value::String(_, s) => {
            let s = s.trim();
            if let Ok(n) = s.parse::<i128>() {
                n
            } else if s.parse::<f64>().is_ok() {
                return Err(format!("not a whole number of seconds; {expected}"));
            } else {
                let d = humantime::parse_duration(s).map_err(|_| expected.clone())?;
                if d.subsec_nanos() != 0 {
                    return Err(format!("not a whole number of seconds; {expected}"));
                }
                i128::from(d.as_secs())
            }
        }
        _ => return Err(expected),
    };
    if seconds < 0 {
        return Err(format!("must not be negative; {expected}"));
    }
    if seconds < i128::from(min) {
        return Err(format!("must be at least {min} second; {expected}"));
    }
    if seconds > i128::from(max) {
        return Err(too_large(max));
    }
    Ok(Duration::from_secs(seconds as u64))
}

/// Any integer `Num` as `i128` (figment's own `to_i128` is signed-only).
fn num_to_i128(n: Num) -> Option<i128> {
    n.to_i128()
        .or_else(|| n.to_u128().and_then(|u| i128::try_from(u).ok()))
}

fn too_large(max: u64) -> String {
    let human = match max {
        86_400 => " (1 day)".to_owned(),
        3_600 => " (1 hour)".to_owned(),
        _ => String::new(),
    };
    format!("must be at most {max} seconds{human}")
}

// ---------------------------------------------------------------------------
// Rendering

impl Config {
    /// The effective configuration as TOML text, one `key = value` per line
    /// with a `# from …` comment naming the source; the token is shown as
    /// `"<redacted>"`. Warnings follow as `# warning: …` comment lines.
    pub fn render(&self) -> String {
        let path = |p: &Path| toml_str(&p.to_string_lossy());
        let secs = |d: Duration| d.as_secs().to_string();
        let lines: Vec<(&str, Option<String>)> = vec![
            ("url", Some(toml_str(&self.url))),
            ("token", Some(toml_str("<redacted>"))),
            ("repo_dir", Some(path(&self.repo_dir))),
            ("repo_url", self.repo_url.as_deref().map(toml_str)),
            ("branch", Some(toml_str(&self.branch))),
            ("interval", Some(secs(self.interval))),
            ("ssh_key", self.ssh_key.as_deref().map(path)),
            ("hostname", Some(toml_str(&self.hostname))),
            ("log_level", Some(toml_str(&self.log_level))),
            ("metrics", Some(toml_str(self.metrics.as_str()))),
            ("stasysmo_dir", Some(path(&self.stasysmo_dir))),
            ("ping_interval", Some(secs(self.ping_interval))),
            ("ping_timeout", Some(secs(self.ping_timeout))),
            ("backoff_max", Some(secs(self.backoff_max))),
            ("stop_grace", Some(secs(self.stop_grace))),
            ("state_dir", Some(path(&self.state_dir))),
            ("ca_file", self.ca_file.as_deref().map(path)),
        ];
        let mut out = String::new();
        for (key, value) in lines {
            let Some(value) = value else { continue };
            let origin = if key == "token" {
                Some(self.token_source.to_string())
            } else {
                self.origins.get(key).cloned()
            };
            out.push_str(&format!("{key} = {value}"));
            if let Some(origin) = origin {
                out.push_str("  # from ");
                out.push_str(&one_line(&origin));
            }
            out.push('\n');
        }
        for warning in &self.warnings {
            out.push_str("# warning: ");
            out.push_str(&one_line(warning));
            out.push('\n');
        }
        out
    }

    /// The source of `key`'s effective value, e.g. `flag --interval`.
    pub fn origin(&self, key: &str) -> Option<&str> {
        if key == "token" {
            return None;
        }
        self.origins.get(key).map(String::as_str)
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const TOKEN: &str = "s3cr3t-TOKEN-value";

    fn num(n: i64) -> Value {
        Value::from(n)
    }

    fn text(s: &str) -> Value {
        Value::from(s)
    }

    fn dur(v: Value) -> Result<u64, String> {
        parse_duration(&v, 1, MAX_PERIOD_SECS).map(|d| d.as_secs())
    }

    #[test]
    fn durations_accept_seconds_and_humantime() {
        assert_eq!(dur(num(30)), Ok(30));
        assert_eq!(dur(text("30")), Ok(30));
        assert_eq!(dur(text(" 45 ")), Ok(45));
        assert_eq!(dur(text("90s")), Ok(90));
        assert_eq!(dur(text("2m")), Ok(120));
        assert_eq!(dur(text("1h 30m")), Ok(5400));
        assert_eq!(dur(text("1day")), Ok(86_400));
        assert_eq!(parse_duration(&num(0), 0, 10).map(|d| d.as_secs()), Ok(0));
    }

    #[test]
    fn durations_reject_bad_values() {
        for bad in [
            num(0),
            num(-5),
            num(86_401),
            num(i64::MAX),
            Value::from(1.5f64),
            Value::from(30.0f64),
            text("0s"),
            text("-5s"),
            text("-5"),
            text("1.5"),
            text("1500ms"),
            text("abc"),
            text(""),
            text("2 apples"),
            text("99999999999d"),
            text("99999999999999999999999999999999999999999999"),
            Value::from(true),
        ] {
            let shown = show_value(&bad);
            assert!(dur(bad).is_err(), "{shown} accepted");
        }
        assert!(parse_duration(&num(3601), 0, MAX_STOP_GRACE_SECS).is_err());
        assert!(
            dur(text("abc"))
                .unwrap_err()
                .contains("expected whole seconds ≥ 1 like 30 or \"2m\"")
        );
        assert!(dur(num(-5)).unwrap_err().contains("negative"));
        assert!(dur(num(100_000)).unwrap_err().contains("at most 86400"));
    }

    #[test]
    fn urls() {
        for good in [
            "ws://127.0.0.1:8080/ws",
            "wss://dashboard.example.org/ws",
            "wss://[::1]:8443/ws",
            "ws://host",
            "wss://host/ws?v=2",
        ] {
            assert_eq!(check_url(good), Ok(()), "{good}");
        }
        for bad in [
            "http://host/ws",
            "https://host/ws",
            "WSS://host/ws",
            "host:80",
            "/ws",
            "ws://",
            "ws:///ws",
            "wss://agent:pw@host/ws",
            "wss://@host/ws",
            "ws://host:99999/ws",
            "ws://host:0/ws",
            "ws://host:abc/ws",
            "ws://host:/ws",
            "ws://host/ws#frag",
            "ws://ho st/ws",
            "",
        ] {
            assert!(check_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn url_redaction_hides_userinfo_and_query() {
        assert_eq!(
            redact_url("wss://a:b@h/ws?t=x"),
            "wss://<redacted>@h/ws?<redacted>"
        );
        assert_eq!(redact_url("ws://h:1/p"), "ws://h:1/p");
    }

    #[test]
    fn hostnames() {
        for good in ["web-01", "a", "db_1.lan", "X9"] {
            assert_eq!(check_hostname(good), Ok(()), "{good}");
        }
        let long = "a".repeat(254);
        for bad in [
            "",
            "-web",
            ".web",
            "we b",
            "web/1",
            "wéb",
            "a\"b",
            long.as_str(),
        ] {
            assert!(check_hostname(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(check_hostname(&"a".repeat(253)), Ok(()));
    }

    #[test]
    fn branches() {
        for good in ["main", "release/25.11", "feature-x", "v1.2"] {
            assert_eq!(check_branch(good), Ok(()), "{good}");
        }
        for bad in [
            "", "-main", "a..b", "a b", "a\tb", "a\nb", "a~1", "a^", "a:b", "a?", "a*", "a[",
            "a\\b", "a@{1}", "@", "/a", "a/", "a//b", "a.", "a.lock", ".hidden", "a/.b",
        ] {
            assert!(check_branch(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn repo_urls() {
        assert_eq!(check_repo_url("git@github.com:org/fleet.git"), Ok(()));
        assert!(check_repo_url("").is_err());
        assert!(check_repo_url("-oProxyCommand=x").is_err());
        assert!(check_repo_url("a\nb").is_err());
    }

    #[test]
    fn log_levels() {
        for good in [
            "info",
            "DEBUG",
            "warn",
            "error",
            "trace",
            "off",
            "info,nixfleet_agent=debug",
            "warn,tokio_tungstenite::protocol=trace",
        ] {
            assert_eq!(check_log_level(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            " ",
            "verbose",
            "warning",
            "info,foo=bogus",
            "=",
            "foo=",
            "=info",
            "a b",
            "info,",
        ] {
            assert!(check_log_level(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(toml_str("\u{1}"), "\"\\u0001\"");
        let long = "x".repeat(300);
        assert_eq!(toml_str(&long).len(), 302);
        assert_eq!(short_str(&long), format!("\"{}…\"", "x".repeat(200)));
    }

    #[test]
    fn key_suggestions() {
        assert_eq!(suggest_key("repo-dir"), Some("repo_dir"));
        assert_eq!(suggest_key("tokne"), Some("token"));
        assert_eq!(suggest_key("intervall"), Some("interval"));
        assert_eq!(suggest_key("completely_different"), None);
    }

    #[test]
    fn error_lines_are_single_lines_without_secrets() {
        let e = error_line("bad\nthing s3cr3t here", &[SecretString::from("s3cr3t")]);
        assert_eq!(e.0, "config error: bad\\nthing <redacted> here");
    }

    // --- load_inner with an explicit environment --------------------------

    struct Fixture {
        dir: tempfile::TempDir,
        env: HashMap<String, String>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let mut env = HashMap::new();
            env.insert("NIXFLEET_URL".into(), "ws://127.0.0.1:9/ws".into());
            env.insert("NIXFLEET_REPO_DIR".into(), "/srv/fleet".into());
            Fixture { dir, env }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn write(&self, name: &str, content: &str, mode: u32) -> PathBuf {
            let path = self.path(name);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).unwrap();
            }
            fs::write(&path, content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            path
        }

        fn set(&mut self, key: &str, value: impl Into<String>) {
            self.env.insert(key.into(), value.into());
        }

        fn load(&self, cli: &Cli) -> Result<Config, ConfigError> {
            let env = |k: &str| self.env.get(k).cloned();
            load_inner(cli, &env, Some("testhost".into()))
        }

        fn error(&self, cli: &Cli) -> String {
            match self.load(cli) {
                Ok(_) => panic!("expected an error"),
                Err(e) => {
                    assert!(!e.0.contains('\n'));
                    assert!(!e.0.contains(TOKEN), "{}", e.0);
                    e.0
                }
            }
        }
    }

    #[test]
    fn defaults() {
        let mut f = Fixture::new();
        f.set("NIXFLEET_TOKEN", TOKEN);
        let c = f.load(&Cli::default()).unwrap();
        assert_eq!(c.url, "ws://127.0.0.1:9/ws");
        assert_eq!(c.token.expose_secret(), TOKEN);
        assert_eq!(c.branch, "main");
        assert_eq!(c.interval, Duration::from_secs(30));
        assert_eq!(c.ping_interval, Duration::from_secs(15));
        assert_eq!(c.ping_timeout, Duration::from_secs(45));
        assert_eq!(c.backoff_max, Duration::from_secs(60));
        assert_eq!(c.stop_grace, Duration::from_secs(10));
        assert_eq!(c.hostname, "testhost");
        assert_eq!(c.log_level, "info");
        assert_eq!(c.metrics, MetricsMode::Auto);
        assert_eq!(c.stasysmo_dir, PathBuf::from("/dev/shm/stasysmo"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/nixfleet"));
        assert_eq!(c.repo_url, None);
        assert_eq!(c.ssh_key, None);
        assert_eq!(c.ca_file, None);
        assert_eq!(
            c.token_source,
            TokenSource::Inline {
                origin: "environment variable NIXFLEET_TOKEN".into()
            }
        );
        assert_eq!(c.origin("hostname"), Some("system hostname"));
        assert_eq!(c.origin("branch"), Some("built-in default"));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn state_directory_first_entry() {
        let mut f = Fixture::new();
        f.set("NIXFLEET_TOKEN", TOKEN);
        f.set("STATE_DIRECTORY", "/var/lib/a:/var/lib/b");
        let c = f.load(&Cli::default()).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/a"));
        assert_eq!(c.origin("state_dir"), Some("$STATE_DIRECTORY"));
        f.set("NIXFLEET_STATE_DIR", "/srv/state");
        let c = f.load(&Cli::default()).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/srv/state"));
    }

    #[test]
    fn layer_precedence_for_interval() {
        let mut f = Fixture::new();
        f.set("NIXFLEET_TOKEN", TOKEN);
        let file = f.write("agent.toml", "interval = \"2m\"\n", 0o600);
        f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
        let c = f.load(&Cli::default()).unwrap();
        assert_eq!(c.interval, Duration::from_secs(120));
        assert_eq!(c.origin("interval"), Some(file.to_str().unwrap()));

        f.set("NIXFLEET_INTERVAL", "90s");
        let c = f.load(&Cli::default()).unwrap();
        assert_eq!(c.interval, Duration::from_secs(90));
        assert_eq!(
            c.origin("interval"),
            Some("environment variable NIXFLEET_INTERVAL")
        );

        let cli = Cli {
            interval: Some("7".into()),
            ..Cli::default()
        };
        let c = f.load(&cli).unwrap();
        assert_eq!(c.interval, Duration::from_secs(7));
        assert_eq!(c.origin("interval"), Some("flag --interval"));
    }

    #[test]
    fn token_precedence_by_value() {
        let mut f = Fixture::new();
        let tf_env = f.write("env-token", "from-env-file\n", 0o600);
        let tf_flag = f.write("flag-token", "  from-flag-file  \n", 0o600);
        let creds = f.path("creds");
        f.write("creds/token", "from-credential\n", 0o600);
        let file = f.write("agent.toml", "token = \"from-config-file\"\n", 0o600);
        f.set("NIXFLEET_CONFIG", file.to_str().unwrap());

        let token = |f: &Fixture, cli: &Cli| {
            let c = f.load(cli).unwrap();
            (c.token.expose_secret().to_owned(), c.token_source)
        };
        let cli = Cli::default();
        assert_eq!(token(&f, &cli).0, "from-config-file");

        // env token_file beats the file's inline token
        f.set("NIXFLEET_TOKEN_FILE", tf_env.to_str().unwrap());
        let (t, src) = token(&f, &cli);
        assert_eq!(t, "from-env-file");
        assert_eq!(
            src,
            TokenSource::File {
                path: tf_env.clone(),
                origin: "environment variable NIXFLEET_TOKEN_FILE".into()
            }
        );

        // the credential beats the environment
        f.set("CREDENTIALS_DIRECTORY", creds.to_str().unwrap());
        let (t, src) = token(&f, &cli);
        assert_eq!(t, "from-credential");
        assert_eq!(
            src,
            TokenSource::Credential {
                path: creds.join("token")
            }
        );

        // --token-file beats the credential, and is trimmed
        let cli = Cli {
            token_file: Some(tf_flag.clone()),
            ..Cli::default()
        };
        let (t, src) = token(&f, &cli);
        assert_eq!(t, "from-flag-file");
        assert_eq!(src.path(), Some(tf_flag.as_path()));
    }

    #[test]
    fn inline_env_token_beats_file_token_file() {
        let mut f = Fixture::new();
        let tf = f.write("tok", "from-token-file", 0o600);
        let file = f.write(
            "agent.toml",
            &format!("token_file = {}\n", toml_str(tf.to_str().unwrap())),
            0o600,
        );
        f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
        f.set("NIXFLEET_TOKEN", "from-env-inline");
        let c = f.load(&Cli::default()).unwrap();
        assert_eq!(c.token.expose_secret(), "from-env-inline");
    }

    #[test]
    fn token_and_token_file_in_one_layer() {
        let mut f = Fixture::new();
        let tf = f.write("tok", TOKEN, 0o600);
        f.set("NIXFLEET_TOKEN", TOKEN);
        f.set("NIXFLEET_TOKEN_FILE", tf.to_str().unwrap());
        let e = f.error(&Cli::default());
        assert!(e.contains("set only one of token and token_file"), "{e}");
        assert!(e.contains("NIXFLEET_TOKEN_FILE"), "{e}");
    }

    #[test]
    fn token_file_problems_name_key_and_source() {
        let mut f = Fixture::new();
        f.write("empty", "  \n", 0o600);
        fs::create_dir(f.path("adir")).unwrap();
        std::os::unix::fs::symlink(f.path("nowhere"), f.path("dangling")).unwrap();
        for (name, expect) in [
            ("empty", "empty"),
            ("missing", "No such file"),
            ("adir", "directory"),
            ("dangling", "No such file"),
        ] {
            let cli = Cli {
                token_file: Some(f.path(name)),
                ..Cli::default()
            };
            let e = f.error(&cli);
            assert!(e.contains("token_file = "), "{e}");
            assert!(e.contains("flag --token-file"), "{e}");
            assert!(e.contains(expect), "{e}");
        }
        f.set("NIXFLEET_TOKEN_FILE", f.path("empty").to_str().unwrap());
        let e = f.error(&Cli::default());
        assert!(
            e.contains("(from environment variable NIXFLEET_TOKEN_FILE)"),
            "{e}"
        );
    }

    #[test]
    fn loose_token_file_permissions_warn_without_content() {
        let mut f = Fixture::new();
        let tf = f.write("tok", TOKEN, 0o644);
        f.set("NIXFLEET_TOKEN_FILE", tf.to_str().unwrap());
        let c = f.load(&Cli::default()).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains(tf.to_str().unwrap()));
        assert!(c.warnings[0].contains("0644"));
        assert!(!c.warnings[0].contains(TOKEN));
        assert!(!c.render().contains(TOKEN));
    }

    #[test]
    fn world_readable_config_file_holding_the_token_warns() {
        let mut f = Fixture::new();
        let file = f.write("agent.toml", &format!("token = \"{TOKEN}\"\n"), 0o444);
        f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
        let c = f.load(&Cli::default()).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("config file holding the token"));
        assert!(c.warnings[0].contains(file.to_str().unwrap()));
        assert!(!c.warnings[0].contains(TOKEN));
    }

    #[test]
    fn credential_ssh_key_is_a_path() {
        let mut f = Fixture::new();
        f.set("NIXFLEET_TOKEN", TOKEN);
        f.write("creds/ssh_key", "KEY", 0o600);
        f.set("NIXFLEET_SSH_KEY", "/env/key");
        f.set("CREDENTIALS_DIRECTORY", f.path("creds").to_str().unwrap());
        let c = f.load(&Cli::default()).unwrap();
        assert_eq!(c.ssh_key, Some(f.path("creds/ssh_key")));
        let cli = Cli {
            ssh_key: Some("/flag/key".into()),
            ..Cli::default()
        };
        let c = f.load(&cli).unwrap();
        assert_eq!(c.ssh_key, Some(PathBuf::from("/flag/key")));
        assert_eq!(c.origin("ssh_key"), Some("flag --ssh-key"));
    }

    #[test]
    fn unrelated_nixfleet_variables_are_ignored() {
        let mut f = Fixture::new();
        f.set("NIXFLEET_TOKEN", TOKEN);
        f.set("NIXFLEET_TEST_HOOK", "whatever");
        f.set("NIXFLEET_FOO", "1");
        assert!(f.load(&Cli::default()).is_ok());
    }

    #[test]
    fn type_errors_never_echo_the_token() {
        let mut f = Fixture::new();
        let file = f.write("agent.toml", "token = 987654321\n", 0o600);
        f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
        let e = f.error(&Cli::default());
        assert!(e.contains("token (from "), "{e}");
        assert!(e.contains(file.to_str().unwrap()), "{e}");
        assert!(!e.contains("987654321"), "{e}");

        let file = f.write("agent2.toml", "url = 5\n", 0o600);
        f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
        f.env.remove("NIXFLEET_URL");
        f.set("NIXFLEET_TOKEN", TOKEN);
        let e = f.error(&Cli::default());
        assert!(e.contains("url = 5 (from "), "{e}");
        assert!(e.contains("expected a string"), "{e}");
    }

    #[test]
    fn url_holding_the_token_is_rejected_without_echo() {
        let mut f = Fixture::new();
        f.set("NIXFLEET_TOKEN", TOKEN);
        f.set("NIXFLEET_URL", format!("wss://host/ws?token={TOKEN}"));
        let e = f.error(&Cli::default());
        assert!(
            e.contains("url (from environment variable NIXFLEET_URL)"),
            "{e}"
        );
        f.set("NIXFLEET_URL", format!("http://host/ws?token={TOKEN}"));
        let e = f.error(&Cli::default());
        assert!(e.contains("unsupported scheme"), "{e}");
    }

    #[test]
    fn invalid_toml_does_not_quote_the_line() {
        let mut f = Fixture::new();
        let file = f.write(
            "agent.toml",
            "url = \"ws://h/ws\"\ntoken = \"s3cr3t-TOKEN-value\n",
            0o600,
        );
        f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
        let e = f.error(&Cli::default());
        assert!(e.contains("is not valid TOML"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn render_is_toml_with_sources() {
        let mut f = Fixture::new();
        f.set("NIXFLEET_TOKEN", TOKEN);
        let c = f.load(&Cli::default()).unwrap();
        let out = c.render();
        assert!(!out.contains(TOKEN));
        assert!(
            out.contains("token = \"<redacted>\"  # from environment variable NIXFLEET_TOKEN\n"),
            "{out}"
        );
        assert!(
            out.contains("interval = 30  # from built-in default\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "url = \"ws://127.0.0.1:9/ws\"  # from environment variable NIXFLEET_URL\n"
            ),
            "{out}"
        );
        // Everything but the token parses back as a config file.
        let back: String = out
            .lines()
            .filter(|l| !l.starts_with("token"))
            .map(|l| format!("{l}\n"))
            .collect();
        let dict: Dict = Toml::from_str(&back).unwrap();
        assert!(dict.keys().all(|k| KEYS.contains(&k.as_str())));
        assert_eq!(dict.len(), 13);
    }
}
