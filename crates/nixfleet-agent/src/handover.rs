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
//! - A snapshot of the agent's own unit file and binary, taken at start. When
//!   a successful switch changed either, the agent delivers the status and
//!   exits so that systemd starts the new version. A switch the agent did
//!   not run (a manual `nixos-rebuild switch`, `system.autoUpgrade`) is
//!   noticed the same way, by comparing with the snapshot while idle.

use crate::commands::{CommandKind, EXIT_CODE_LOG_PREFIX, StopRequest, signal_group_until_gone};
use crate::heartbeat::generation;
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

/// Test-only: watch this file as the agent's own unit file instead of the
/// one systemd started it from.
pub const TEST_UNIT_FILE_ENV: &str = "NIXFLEET_TEST_UNIT_FILE";

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
        Some(CommandRecord {
            command: command.to_owned(),
            pid,
            pid_start: process_start_ticks(pid)?,
            log: Some(log),
            supervised: true,
            boot_id: boot_id(),
        })
    }

    /// Written atomically (temporary file, then rename).
    pub fn save(&self, state_dir: &Path) {
        if let Err(error) = save_json(state_dir, RECORD_FILE, self) {
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

/// This boot's ID (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> Option<String> {
    static BOOT_ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
            Some(id.trim().to_owned()).filter(|id| !id.is_empty())
        })
        .clone()
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
                let request = (*stop.borrow()).unwrap_or(StopRequest::Terminate);
                stopped = true;
                signal_group_until_gone(record.pid, request, grace, stop, || !record.is_running()).await;
            }
        }
    }
    let exit_code = record.log.as_deref().and_then(exit_code_from_log);
    let (status, exit_code, message) = match (stopped, exit_code) {
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
    };
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

/// The agent's own unit file and binary as they were at start.
#[derive(Debug, Clone)]
pub struct SelfImage {
    unit: Option<UnitSnapshot>,
    exe: Option<PathBuf>,
    /// The unit's `ExecStart=` already named another program than this one
    /// when the snapshot was taken (a wrapper script, or a unit file edited
    /// but not yet reloaded): not a sign of a new version by itself.
    started_elsewhere: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct UnitSnapshot {
    path: PathBuf,
    resolved: Option<PathBuf>,
    content: Option<Vec<u8>>,
}

impl UnitSnapshot {
    fn take(path: &Path) -> Self {
        UnitSnapshot {
            path: path.to_owned(),
            resolved: std::fs::canonicalize(path).ok(),
            content: std::fs::read(path).ok(),
        }
    }
}

impl SelfImage {
    /// Snapshot at start. Outside systemd (no unit to find) there is nothing
    /// to compare later, and the agent never restarts itself.
    pub fn capture() -> Self {
        let unit_file = std::env::var_os(TEST_UNIT_FILE_ENV)
            .map(PathBuf::from)
            .or_else(own_unit_file);
        SelfImage::new(
            unit_file.as_deref().map(UnitSnapshot::take),
            std::fs::read_link("/proc/self/exe").ok(),
        )
    }

    fn new(unit: Option<UnitSnapshot>, exe: Option<PathBuf>) -> Self {
        let mut image = SelfImage {
            unit,
            exe,
            started_elsewhere: false,
        };
        image.started_elsewhere = image
            .unit
            .as_ref()
            .is_some_and(|unit| image.starts_another_program(unit).is_some());
        image
    }

    /// The same image with the unit file as it is now: what the agent
    /// compares with from here on.
    pub fn rebased(&self) -> Self {
        SelfImage::new(
            self.unit
                .as_ref()
                .map(|unit| UnitSnapshot::take(&unit.path)),
            self.exe.clone(),
        )
    }

    pub fn watches_a_unit(&self) -> bool {
        self.unit.is_some()
    }

    /// Why the agent should restart to become the new version, if it should:
    /// asked after a successful switch the agent ran itself.
    pub fn changed(&self) -> Option<String> {
        let unit = self.unit.as_ref()?;
        let now = UnitSnapshot::take(&unit.path);
        self.unit_changed(unit, &now)
            .or_else(|| self.binary_replaced())
            .or_else(|| self.starts_another_program(&now))
    }

    /// What changed since the snapshot, if anything: asked while idle, to
    /// notice a switch the agent did not run. A few syscalls (resolving the
    /// unit's symlinks, reading it, resolving two program paths), so cheap
    /// enough for every heartbeat. Unlike [`SelfImage::changed`] it ignores
    /// an `ExecStart=` that named another program from the start.
    pub fn replaced_since_start(&self) -> Option<String> {
        let unit = self.unit.as_ref()?;
        let now = UnitSnapshot::take(&unit.path);
        self.unit_changed(unit, &now)
            .or_else(|| self.binary_replaced())
            .or_else(|| {
                (!self.started_elsewhere)
                    .then(|| self.starts_another_program(&now))
                    .flatten()
            })
    }

    fn unit_changed(&self, unit: &UnitSnapshot, now: &UnitSnapshot) -> Option<String> {
        if now.resolved != unit.resolved {
            return Some(format!(
                "its unit file {} now points to {}",
                unit.path.display(),
                now.resolved
                    .as_deref()
                    .unwrap_or(Path::new("(nothing)"))
                    .display()
            ));
        }
        (now.content != unit.content)
            .then(|| format!("its unit file {} changed", unit.path.display()))
    }

    fn binary_replaced(&self) -> Option<String> {
        self.exe
            .as_deref()?
            .to_string_lossy()
            .ends_with(" (deleted)")
            .then(|| "its binary was replaced".to_owned())
    }

    /// The unit's `ExecStart=` program, all symlinks resolved, is not this
    /// process's binary (the symlinks may have moved: ExecStart= through
    /// /run/current-system).
    fn starts_another_program(&self, now: &UnitSnapshot) -> Option<String> {
        let exe = self.exe.as_deref()?;
        let started_from = now.content.as_deref().and_then(exec_start_program)?;
        let started_from = std::fs::canonicalize(&started_from).unwrap_or(started_from);
        let exe = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_owned());
        (started_from != exe).then(|| {
            format!(
                "its unit now starts {} instead of {}",
                started_from.display(),
                exe.display()
            )
        })
    }
}

/// The unit file systemd started this process from, found through the
/// cgroup (`0::/system.slice/nixfleet.service`).
fn own_unit_file() -> Option<PathBuf> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let unit = cgroup.lines().find_map(|line| {
        let path = line.rsplit(':').next()?;
        path.rsplit('/')
            .find(|c| c.ends_with(".service"))
            .map(str::to_owned)
    })?;
    [
        "/etc/systemd/system",
        "/run/systemd/system",
        "/usr/lib/systemd/system",
        "/lib/systemd/system",
    ]
    .iter()
    .map(|dir| Path::new(dir).join(&unit))
    .find(|p| p.exists())
}

/// The program of the unit's `ExecStart=` (without systemd's `@-:+!`
/// prefixes).
fn exec_start_program(unit: &[u8]) -> Option<PathBuf> {
    let text = String::from_utf8_lossy(unit);
    let value = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ExecStart="))
        .rfind(|v| !v.trim().is_empty())?;
    let program = value.trim().trim_start_matches(['@', '-', ':', '+', '!']);
    let program = program.split_whitespace().next()?;
    Some(PathBuf::from(program.trim_matches('"')))
}

/// Writes `value` as JSON to `state_dir/file` atomically (a temporary file,
/// then rename), so a reader never sees half a record.
pub fn save_json(
    state_dir: &Path,
    file: &str,
    value: &impl serde::Serialize,
) -> std::io::Result<()> {
    let json = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    crate::command_log::private_dir(state_dir)?;
    crate::command_log::write_private(&state_dir.join(file), &json)
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

    #[test]
    fn exec_start_programs_are_found() {
        let unit = b"[Service]\nType=notify\nExecStart=\nExecStart=@/nix/store/abc-agent/bin/nixfleet-agent --config /x\n";
        assert_eq!(
            exec_start_program(unit),
            Some(PathBuf::from("/nix/store/abc-agent/bin/nixfleet-agent"))
        );
        assert_eq!(exec_start_program(b"[Service]\n"), None);
    }

    #[test]
    fn self_image_notices_retargeted_and_edited_units() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let old = dir.path().join("old.service");
        std::fs::write(
            &old,
            format!("[Service]\nExecStart={} --config x\n", exe.display()),
        )
        .unwrap();
        let link = dir.path().join("nixfleet.service");
        std::os::unix::fs::symlink(&old, &link).unwrap();
        let image = SelfImage::new(Some(UnitSnapshot::take(&link)), Some(exe.clone()));
        assert_eq!(image.changed(), None);
        assert_eq!(image.replaced_since_start(), None);

        let new = dir.path().join("new.service");
        std::fs::write(
            &new,
            format!("[Service]\nExecStart={} --config x\n", exe.display()),
        )
        .unwrap();
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&new, &link).unwrap();
        assert!(image.changed().unwrap().contains("now points to"));
        assert!(
            image
                .replaced_since_start()
                .unwrap()
                .contains("now points to")
        );

        let image = image.rebased();
        assert_eq!(
            image.replaced_since_start(),
            None,
            "rebased on the new unit"
        );
        std::fs::write(
            &new,
            "[Service]\nExecStart=/nix/store/other/bin/nixfleet-agent\n",
        )
        .unwrap();
        assert!(image.changed().unwrap().contains("changed"));
        assert!(image.replaced_since_start().unwrap().contains("changed"));
        let no_unit = SelfImage::new(None, None);
        assert_eq!(no_unit.changed(), None);
        assert_eq!(no_unit.replaced_since_start(), None);
    }

    #[test]
    fn a_unit_that_starts_a_wrapper_is_not_a_replacement_while_idle() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let unit = dir.path().join("nixfleet.service");
        std::fs::write(&unit, "[Service]\nExecStart=/usr/local/bin/agent-wrapper\n").unwrap();
        let image = SelfImage::new(Some(UnitSnapshot::take(&unit)), Some(exe));
        assert!(image.changed().is_some(), "after a switch: restart anyway");
        assert_eq!(
            image.replaced_since_start(),
            None,
            "while idle: nothing changed since start"
        );
    }

    #[test]
    fn a_moved_exec_start_symlink_is_a_replacement() {
        // ExecStart= through a symlink that a switch moves, with the unit
        // file itself unchanged (as with /run/current-system/sw/bin).
        let dir = tempfile::tempdir().unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let current = dir.path().join("current-agent");
        std::os::unix::fs::symlink(&exe, &current).unwrap();
        let unit = dir.path().join("nixfleet.service");
        std::fs::write(
            &unit,
            format!("[Service]\nExecStart={}\n", current.display()),
        )
        .unwrap();
        let image = SelfImage::new(Some(UnitSnapshot::take(&unit)), Some(exe));
        assert_eq!(image.replaced_since_start(), None);
        std::fs::remove_file(&current).unwrap();
        std::os::unix::fs::symlink("/nix/store/new-agent/bin/nixfleet-agent", &current).unwrap();
        assert!(image.replaced_since_start().unwrap().contains("instead of"));
    }
}
