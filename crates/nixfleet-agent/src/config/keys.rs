//! The configuration keys: their names and limits, and how each is spelt
//! as an environment variable and as a flag. A new key starts here (see the
//! checklist in the module `config`). Plain data: every other part of the
//! loader builds on this file, and it imports none of them.

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
    "tls_client_cert",
    "tls_client_key",
    "log_max_bytes",
    "logs_max_bytes",
    "allow_insecure_url",
    "theme_color",
    "location",
    "device_type",
    "allow_reboot",
    "source_commit",
    "allowed_signers_file",
    "gpg_keyring",
    "report_agent_version",
    "metrics_textfile",
    "confirm_timeout",
    "rollback_on_failed_tests",
];

/// Upper bound for `interval`, `ping_interval`, `ping_timeout`, `backoff_max`.
pub const MAX_PERIOD_SECS: u64 = 86_400;
/// Upper bound for `confirm_timeout` (a day: longer is no safety net).
pub const MAX_CONFIRM_TIMEOUT_SECS: u64 = 86_400;
/// Upper bound for `stop_grace`.
pub const MAX_STOP_GRACE_SECS: u64 = 3_600;
/// Token files and credentials larger than this are refused.
pub(super) const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;
/// Config files larger than this are refused.
pub(super) const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// The environment as the loader sees it: a lookup by variable name (for
/// tests, a map; in the agent, the process environment).
pub(super) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Every environment variable the loader reads: `NIXFLEET_<KEY>` for each
/// key, `NIXFLEET_CONFIG` (the file), and the two that systemd sets.
pub fn env_var_names() -> Vec<String> {
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

/// `url` → `NIXFLEET_URL`.
pub(super) fn env_name(key: &str) -> String {
    format!("NIXFLEET_{}", key.to_ascii_uppercase())
}

/// `repo_dir` → `--repo-dir`.
pub(super) fn flag_name(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}
