//! What the running agent keeps for `nixfleet-agent status` and the
//! metrics: one small JSON record, `state_dir/agent-status.json`, private
//! to the agent and replaced atomically (`state_file`).

use crate::protocol::UpdateStatus;
use crate::state_file;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The record's name in `state_dir`.
pub const STATE_FILE: &str = "agent-status.json";

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
}

pub fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Everything `status` prints, as the agent last wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub agent: AgentInfo,
    /// The dashboard's URL.
    pub url: String,
    pub interval_secs: u64,
    pub link: Link,
    /// The running command, `None` when idle.
    pub running: Option<RunningCommand>,
    /// The last result of each command kind that ran, by name.
    pub last_results: BTreeMap<String, CommandResult>,
    /// The last command that activated a system (switch, boot, rollback, …).
    pub last_switch: Option<CommandResult>,
    pub counters: Counters,
    /// The v3 status compartments as heartbeats carry them (absent from a
    /// record written by an agent without them).
    #[serde(default)]
    pub compartments: Option<UpdateStatus>,
    /// The booted and current systems differ in what only a boot loads:
    /// these boot entries (`kernel`, `initrd`, `kernel-modules`).
    #[serde(default)]
    pub needs_reboot: bool,
    #[serde(default)]
    pub reboot_entries: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub source_commit: Option<String>,
    pub binary: String,
    /// The agent's process, so that `status` can tell a record left by an
    /// agent that no longer runs.
    pub pid: u32,
    pub started: u64,
}

/// The link to the dashboard. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Link {
    /// Started, not connected yet.
    Starting {
        since: u64,
    },
    Connected {
        since: u64,
    },
    /// Down since `since`: the last error, its kind, the next attempt.
    Disconnected {
        since: u64,
        error: String,
        reason: String,
        next_retry: u64,
    },
    /// The agent stopped (written on its way out).
    Stopped {
        since: u64,
    },
}

impl Link {
    pub fn is_connected(&self) -> bool {
        matches!(self, Link::Connected { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningCommand {
    pub command: String,
    pub pid: Option<u32>,
    pub started: u64,
    pub log: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    pub command: String,
    pub finished: u64,
    pub ok: bool,
    pub exit_code: i32,
    pub message: String,
    pub duration_secs: f64,
}

/// Counted since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub connects: u64,
    /// By reason (`end.rs`'s labels).
    pub disconnects: BTreeMap<String, u64>,
    /// By command, then `ok` / `error`.
    pub commands: BTreeMap<String, BTreeMap<String, u64>>,
    /// Safe deployments rolled back, by result (`ok` / `failed`).
    #[serde(default)]
    pub rollbacks: BTreeMap<String, u64>,
}

impl Snapshot {
    /// Writes the record (0600, atomically) into `state_dir`.
    pub fn save(&self, state_dir: &Path) -> io::Result<()> {
        state_file::save_json(state_dir, STATE_FILE, self)
    }

    /// The record in `state_dir`: `Ok(None)` when there is none.
    pub fn load(state_dir: &Path) -> io::Result<Option<Snapshot>> {
        match std::fs::read(state_dir.join(STATE_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(io::Error::other),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// When the last heartbeat went out, derived rather than recorded (the
    /// record is not written per beat): the first beat goes at connect,
    /// then one every interval.
    pub fn last_heartbeat(&self, now: u64) -> Option<u64> {
        let Link::Connected { since } = self.link else {
            return None;
        };
        let every = self.interval_secs.max(1);
        Some(since + now.saturating_sub(since) / every * every)
    }
}
