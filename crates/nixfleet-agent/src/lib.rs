//! NixFleet agent: keeps a NixOS host live on a NixFleet dashboard and runs
//! the dashboard's commands (`pull`, `switch`, `test`, `stop`, …).
//!
//! One module per concern; `main.rs` only wires them together.

pub mod activation;
pub mod agent;
pub mod child_env;
pub mod commands;
pub mod config;
pub mod connection;
pub mod file_cache;
pub mod file_facts;
pub mod file_watch;
pub mod footprint;
pub mod git_credentials;
pub mod hardening;
pub mod heartbeat;
pub mod host_facts;
pub mod logging;
pub mod metrics;
pub mod nix_log;
pub mod observe;
pub mod outbox;
pub mod private_key;
pub mod protocol;
pub mod reboot;
pub mod redact;
pub mod self_image;
pub mod shutdown;
pub mod signature;
pub mod state_file;
pub mod status;
pub mod systemd;
pub mod ticker;
pub mod tls;
pub mod watchdog;
