//! The two lowest layers: the built-in defaults, and the defaults that come
//! from the system this agent runs on.

use crate::config::keys::Env;
use crate::config::layer::{Layer, LayerKind};

/// The built-in defaults (the lowest layer). Keys without a default here
/// are optional, required (url, token, repo_dir) or come from the system
/// (hostname, and state_dir from `$STATE_DIRECTORY`).
pub(crate) fn default_layer() -> Layer {
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
    // One command's log holds the backlog a dashboard outage may build up
    // before lines are dropped; all logs together get twice that.
    defaults.set("log_max_bytes", 1024u64 * 1024 * 1024);
    defaults.set("logs_max_bytes", 2u64 * 1024 * 1024 * 1024);
    defaults.set("allow_insecure_url", false);
    defaults.set("allow_reboot", false);
    // Safe deployments: an unconfirmed switch rolls back after 5 minutes.
    defaults.set("confirm_timeout", 300u64);
    defaults.set("rollback_on_failed_tests", false);
    defaults
}

/// Defaults that come from the system: the hostname, and the state
/// directory systemd created (`StateDirectory=`).
pub(crate) fn system_layer(system_hostname: Option<String>, env: Env<'_>) -> Layer {
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
    system
}
