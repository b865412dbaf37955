//! The activation record: a private file in `state_dir` (0600, replaced
//! atomically) that carries a switch's countdown across the agent's
//! restarts and deaths. The deadline is wall-clock time and the boot id is
//! kept, so that another process, or this one after a restart, decides the
//! same way.

use serde::{Deserialize, Serialize};
use std::path::Path;

pub const RECORD_FILE: &str = "activation.json";

/// Where an activation stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The command that may activate runs; the system before it is recorded.
    Recorded,
    /// It changed the running system: waiting for the dashboard until
    /// `deadline`.
    Armed,
    /// The deadline passed (or the tests failed): the rollback is due or
    /// runs. Found by a starting agent with no rollback to follow, it was
    /// cut short.
    RollingBack,
    /// The rollback ended; `report` is what the dashboard is told until
    /// the next successful switch.
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub phase: Phase,
    /// The command that activated (`switch`, `pull-switch`, …).
    pub command: String,
    /// `/run/current-system`'s target before the command: what a rollback
    /// goes back to.
    pub system: String,
    /// The system profile's generation before the command, when known.
    #[serde(default)]
    pub generation: Option<u64>,
    /// The boot the record belongs to.
    pub boot_id: String,
    /// The repository's short commit the switch built (set when armed).
    #[serde(default)]
    pub commit: String,
    /// Seconds since the epoch after which an unconfirmed activation is
    /// rolled back (set when armed).
    #[serde(default)]
    pub deadline: u64,
    /// `confirm_timeout` when it was armed, for the report.
    #[serde(default)]
    pub timeout_secs: u64,
    /// The transient systemd timer that rolls back without this agent.
    #[serde(default)]
    pub timer_unit: Option<String>,
    /// The rollback's report (status message and compartment).
    #[serde(default)]
    pub report: Option<String>,
    /// Whether `report` was already sent with its status (a rollback the
    /// timer ran is reported by the next agent).
    #[serde(default = "yes")]
    pub reported: bool,
    /// The host's tests that failed after the switch
    /// (`rollback_on_failed_tests`): the reason for the rollback.
    #[serde(default)]
    pub failed_tests: Vec<String>,
    /// The rollback's exit code, for that status.
    #[serde(default)]
    pub exit_code: i32,
    /// `rollback_on_failed_tests`: the host's tests after the switch have
    /// not ended yet. On disk, so that the agent started after this one
    /// (a self-restart, a crash) still lets a failure roll back.
    #[serde(default)]
    pub tests_due: bool,
    /// How many times the rollback was started (by the agent's countdown,
    /// the timer's hidden mode, or again after it was cut short): a
    /// rollback cut short runs again once, never more.
    #[serde(default)]
    pub attempts: u32,
}

fn yes() -> bool {
    true
}

impl Record {
    /// The record written before a command that may activate.
    pub fn recorded(
        command: &str,
        system: String,
        generation: Option<u64>,
        boot_id: String,
    ) -> Self {
        Record {
            phase: Phase::Recorded,
            command: command.to_owned(),
            system,
            generation,
            boot_id,
            commit: String::new(),
            deadline: 0,
            timeout_secs: 0,
            timer_unit: None,
            report: None,
            reported: true,
            failed_tests: Vec::new(),
            exit_code: 0,
            tests_due: false,
            attempts: 0,
        }
    }

    /// The record, when there is a readable one.
    pub fn load(state_dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(state_dir.join(RECORD_FILE)).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(record) => Some(record),
            Err(error) => {
                tracing::warn!(%error, "ignoring an unreadable activation record");
                None
            }
        }
    }

    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        crate::state_file::save_json(state_dir, RECORD_FILE, self)
    }

    pub fn clear(state_dir: &Path) {
        let path = state_dir.join(RECORD_FILE);
        if let Err(error) = std::fs::remove_file(&path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, path = %path.display(), "cannot remove the activation record");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_record_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert_eq!(Record::load(&state), None);
        let mut record = Record::recorded("switch", "/nix/store/a-sys".into(), Some(3), "b".into());
        record.phase = Phase::Armed;
        record.deadline = 1_700_000_000;
        record.save(&state).unwrap();
        let mode = std::fs::metadata(state.join(RECORD_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Record::load(&state), Some(record));
        std::fs::write(state.join(RECORD_FILE), "{half").unwrap();
        assert_eq!(Record::load(&state), None);
        Record::clear(&state);
        Record::clear(&state);
        assert!(!state.join(RECORD_FILE).exists());
    }
}
