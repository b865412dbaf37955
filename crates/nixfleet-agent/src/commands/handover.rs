//! What one agent instance hands to the next.
//!
//! The agent runs the `nixos-rebuild switch` that may replace it, and the
//! unit uses `KillMode=process`, so a command can outlive the agent that
//! started it (a crash, a watchdog restart, the agent's own restart after a
//! switch). Two things make that safe:
//!
//! - A record of the running command under `state_dir`: its supervisor
//!   (supervisor.rs) and its log, plus a cursor saying how far the log was
//!   delivered. A new instance follows the log from the cursor on, reports
//!   the command in its heartbeats, and sends its status with the exit code
//!   the supervisor wrote (also when the command ended while no agent ran).
//!   Records of older agents, which ran commands without a supervisor, are
//!   still followed the old way (exit code from the end of the log, if the
//!   previous agent got to write it).
//! - A snapshot of the agent's own unit file and binary (self_image.rs).

use super::group::{GROUP_POLL, GroupStop};
use super::table::{CommandKind, StopRequest};
use crate::host_facts::{boot_id, generation};
use crate::protocol::{Outcome, Status};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

const RECORD_FILE: &str = "running-command.json";
/// The running command's delivery cursor (outbox.rs).
const SENT_FILE: &str = "running-command.sent";
/// A stop request for the running command's supervisor.
const STOP_FILE: &str = "running-command.stop";
/// How often an adopted command (not our child: no SIGCHLD) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(250);

/// The last line of a log written by an older agent's in-agent command
/// starts with this, then the exit code (see [`follow_legacy`]).
pub const EXIT_CODE_LOG_PREFIX: &str = "[nixfleet] exit code ";

/// The command in progress, as written to `state_dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub command: String,
    /// The command's supervisor (with `supervised`), else the leader of
    /// the command's process group.
    pub pid: u32,
    /// The process's start time (clock ticks since boot), so a recycled pid
    /// is never mistaken for the command.
    pub pid_start: u64,
    pub log: Option<PathBuf>,
    /// Whether `pid` is a supervisor writing `log` in the command log
    /// format (absent in records of older agents).
    #[serde(default)]
    pub supervised: bool,
    /// The boot the process ran in: start ticks count from boot, so after a
    /// reboot another process can match pid and ticks.
    #[serde(default)]
    pub boot_id: Option<String>,
}

pub fn sent_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SENT_FILE)
}

pub fn stop_path(state_dir: &Path) -> PathBuf {
    state_dir.join(STOP_FILE)
}

impl CommandRecord {
    /// A command run by the supervisor `pid`, writing `log`.
    pub fn supervised(command: &str, pid: u32, log: PathBuf) -> Option<Self> {
        Some(Self::supervised_since(
            command,
            pid,
            process_start_ticks(pid)?,
            log,
        ))
    }

    /// The same, with the supervisor's start time read earlier (while it
    /// was surely alive: it may have ended by now, see launch.rs).
    pub fn supervised_since(command: &str, pid: u32, pid_start: u64, log: PathBuf) -> Self {
        CommandRecord {
            command: command.to_owned(),
            pid,
            pid_start,
            log: Some(log),
            supervised: true,
            boot_id: boot_id(),
        }
    }

    /// Written atomically (temporary file, then rename).
    pub fn save(&self, state_dir: &Path) {
        if let Err(error) = crate::state_file::save_json(state_dir, RECORD_FILE, self) {
            warn!(error = %error, path = %state_dir.join(RECORD_FILE).display(), "cannot record the running command; a restarted agent would not know about it");
        }
    }

    pub fn load(state_dir: &Path) -> Option<Self> {
        let text = std::fs::read(state_dir.join(RECORD_FILE)).ok()?;
        match serde_json::from_slice(&text) {
            Ok(record) => Some(record),
            Err(error) => {
                warn!(error = %error, "ignoring an unreadable running-command record");
                Self::clear(state_dir, None);
                None
            }
        }
    }

    /// Removes the record (and its cursor and stop request); with `pid`,
    /// only if it is still that command's.
    pub fn clear(state_dir: &Path, pid: Option<u32>) {
        if let Some(pid) = pid
            && Self::load_quiet(state_dir).is_some_and(|r| r.pid != pid)
        {
            return;
        }
        for file in [RECORD_FILE, SENT_FILE, STOP_FILE] {
            let _ = std::fs::remove_file(state_dir.join(file));
        }
    }

    fn load_quiet(state_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(state_dir.join(RECORD_FILE)).ok()?).ok()
    }

    /// Whether the recorded process is still the one running: same boot,
    /// same start time, and in the agent's own cgroup. A record that fails
    /// any of these (stale, or forged by whoever could write `state_dir`)
    /// never makes the agent report or signal the process it names.
    pub fn is_running(&self) -> bool {
        self.boot_id.is_some()
            && self.boot_id == boot_id()
            && process_start_ticks(self.pid) == Some(self.pid_start)
            && shares_our_cgroup(self.pid)
    }
}

/// Whether `pid` sits in the same cgroups as the agent. The agent's
/// commands stay in its unit's cgroup (`KillMode=process` keeps them there
/// across restarts). Without cgroups to read there is nothing to compare.
fn shares_our_cgroup(pid: u32) -> bool {
    let Ok(ours) = std::fs::read("/proc/self/cgroup") else {
        return true;
    };
    std::fs::read(format!("/proc/{pid}/cgroup")).is_ok_and(|theirs| theirs == ours)
}

/// Field 22 of `/proc/<pid>/stat`; `None` when there is no such process or
/// it is a zombie (it runs nothing any more).
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start
    // after the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `state` was field 3; the start time is field 22.
    fields.nth(18)?.parse().ok()
}

/// Follows a command that an older agent started without a supervisor
/// until it ends and returns its status. Stop requests signal its process
/// group as usual.
pub async fn follow_legacy(
    record: CommandRecord,
    kind: CommandKind,
    repo_dir: PathBuf,
    grace: Duration,
    stop: &mut watch::Receiver<Option<StopRequest>>,
) -> Status {
    let mut stopped = false;
    while record.is_running() {
        tokio::select! {
            _ = tokio::time::sleep(ADOPTED_POLL) => {}
            Ok(_) = stop.changed(), if !stopped => {
                stopped = true;
                stop_group(&record, grace, stop).await;
            }
        }
    }
    let exit_code = record.log.as_deref().and_then(exit_code_from_log);
    let (status, exit_code, message) = legacy_outcome(kind, stopped, exit_code);
    info!(
        command = kind.name(),
        pid = record.pid,
        exit_code,
        "an adopted command ended: {message}"
    );
    Status {
        status,
        command: kind.name().to_owned(),
        exit_code,
        message,
        generation: generation(&repo_dir),
    }
}

/// Stops the recorded process group until no member is left, applying
/// later requests (a KILL after a TERM) as they come.
async fn stop_group(
    record: &CommandRecord,
    grace: Duration,
    stop: &mut watch::Receiver<Option<StopRequest>>,
) {
    info!(pid = record.pid, "stopping the command's process group");
    let mut group = GroupStop::new(record.pid, grace);
    loop {
        let request = (*stop.borrow_and_update()).unwrap_or(StopRequest::Terminate);
        if group.request(request) {
            warn!(
                pid = record.pid,
                "the command did not stop within the grace period; killing it"
            );
        }
        if !record.is_running() && group.group_gone() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(GROUP_POLL) => {}
            Ok(_) = stop.changed() => {}
        }
    }
}

fn legacy_outcome(kind: CommandKind, stopped: bool, code: Option<i32>) -> (Outcome, i32, String) {
    match (stopped, code) {
        (true, code) => (
            Outcome::Error,
            code.unwrap_or(-1),
            "Stopped by user".to_owned(),
        ),
        (false, Some(0)) => (Outcome::Ok, 0, format!("{} succeeded", kind.name())),
        (false, Some(code)) => (Outcome::Error, code, format!("exit code {code}")),
        (false, None) => (
            Outcome::Error,
            -1,
            "ended while the agent was restarting; exit code unknown".to_owned(),
        ),
    }
}

/// The exit code the previous instance wrote at the end of the log.
fn exit_code_from_log(log: &Path) -> Option<i32> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    // The line is written last; the tail is enough.
    file.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let tail = String::from_utf8_lossy(&tail);
    tail.lines().rev().find_map(|line| {
        let rest = line.strip_prefix(EXIT_CODE_LOG_PREFIX)?;
        let digits: String = rest
            .chars()
            .take_while(|c| *c == '-' || c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_clear_only_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let record = CommandRecord::supervised("switch", me, "/x.log".into()).unwrap();
        record.save(dir.path());
        assert_eq!(CommandRecord::load(dir.path()), Some(record.clone()));
        assert!(record.is_running());
        CommandRecord::clear(dir.path(), Some(me + 1));
        assert!(
            CommandRecord::load(dir.path()).is_some(),
            "another pid's clear leaves it"
        );
        CommandRecord::clear(dir.path(), Some(me));
        assert_eq!(CommandRecord::load(dir.path()), None);
    }

    #[test]
    fn a_recycled_pid_is_not_the_command() {
        let mut record =
            CommandRecord::supervised("switch", std::process::id(), "/x".into()).unwrap();
        record.pid_start += 1;
        assert!(!record.is_running());
        assert_eq!(process_start_ticks(u32::MAX), None);
    }

    #[test]
    fn a_record_from_another_boot_is_not_running() {
        let mut record =
            CommandRecord::supervised("switch", std::process::id(), "/x".into()).unwrap();
        assert!(record.is_running());
        record.boot_id = Some("00000000-0000-0000-0000-000000000000".into());
        assert!(!record.is_running());
        record.boot_id = None;
        assert!(!record.is_running(), "a record without a boot ID");
    }

    #[test]
    fn garbage_records_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RECORD_FILE), "{not json").unwrap();
        assert_eq!(CommandRecord::load(dir.path()), None);
        assert!(!dir.path().join(RECORD_FILE).exists());
    }

    #[test]
    fn records_of_older_agents_still_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(RECORD_FILE),
            r#"{"command":"switch","pid":1,"pid_start":2,"log":"/x.log"}"#,
        )
        .unwrap();
        let record = CommandRecord::load(dir.path()).unwrap();
        assert!(!record.supervised);
    }

    #[test]
    fn exit_codes_are_read_from_the_end_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        std::fs::write(&log, format!("building\n{EXIT_CODE_LOG_PREFIX}0: ok\n")).unwrap();
        assert_eq!(exit_code_from_log(&log), Some(0));
        std::fs::write(
            &log,
            format!("{EXIT_CODE_LOG_PREFIX}-1: x\n{EXIT_CODE_LOG_PREFIX}4: error\n"),
        )
        .unwrap();
        assert_eq!(exit_code_from_log(&log), Some(4));
        std::fs::write(&log, "still building\n").unwrap();
        assert_eq!(exit_code_from_log(&log), None);
    }
}
