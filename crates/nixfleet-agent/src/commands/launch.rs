//! Starting a command: its log is created, its supervisor started on the
//! plan (`nixfleet-agent --supervise`, see supervisor.rs), and what the
//! follower and a next agent need to pick it up is returned.

use super::handover::{self, CommandRecord};
use super::log::{self, Plan};
use super::plan::Planned;
use super::relay::RelayIn;
use super::table::CommandKind;
use crate::config::Config;
use crate::outbox::{DeliveryCursor, Outbox};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

/// The hidden first argument that makes the binary a supervisor.
pub const SUPERVISE_ARG: &str = "--supervise";
/// The running binary, even when a switch replaced the file: the
/// supervisor is always this very version.
const SELF_EXE: &str = "/proc/self/exe";

/// A command to follow: one this agent launched, or one a previous agent
/// left running (or ended) whose log is not yet delivered.
pub struct Followed {
    pub kind: CommandKind,
    pub log: PathBuf,
    /// The supervisor: pid and start time (so a recycled pid is not it);
    /// `None` when it is gone or not ours.
    pub supervisor: Option<(u32, u64)>,
    /// Log offset up to which everything was delivered.
    pub resume_at: u64,
    /// The id the outbox gave this log's delivery cursor.
    pub log_id: u64,
    /// Where a stop request is written for the supervisor.
    pub stop_file: PathBuf,
    pub repo_dir: PathBuf,
    /// The configured branch (what a git check compares HEAD with).
    pub branch: String,
    /// The stdout of a supervisor this agent started, which carries what
    /// the log could not keep (relay.rs); closed for a command another
    /// agent started.
    pub relay: RelayIn,
}

/// A started command: the record a next agent adopts, and what to follow.
pub struct Launched {
    pub record: CommandRecord,
    pub followed: Followed,
}

/// Where a command's log goes and what bounds it: from the configuration,
/// or, in the rollback timer's hidden mode (which has none), fixed.
pub struct LogSettings {
    pub state_dir: PathBuf,
    /// This command's cap (`CommandKind::log_max_bytes` applied).
    pub max_bytes: u64,
    /// All logs together (older ones are pruned to fit).
    pub logs_max_bytes: u64,
    pub stop_grace: Duration,
    /// `repo_url`, scrubbed from every line.
    pub scrub_url: Option<String>,
}

impl LogSettings {
    pub fn of(config: &Config, kind: CommandKind) -> Self {
        LogSettings {
            state_dir: config.state_dir.clone(),
            max_bytes: kind.log_max_bytes(config.log_max_bytes),
            logs_max_bytes: config.logs_max_bytes,
            stop_grace: config.stop_grace,
            scrub_url: config.repo_url.clone(),
        }
    }
}

/// A supervisor started on its plan.
pub struct Started {
    /// What a next agent adopts, saved before the supervisor got its plan.
    pub record: CommandRecord,
    pub log: PathBuf,
    pub cursor: DeliveryCursor,
    pub supervisor: (u32, u64),
    pub stop_file: PathBuf,
    /// The supervisor's stdout, which carries what the log could not keep
    /// (relay.rs).
    pub relay: tokio::process::ChildStdout,
}

/// Creates the command log and starts the supervisor on it.
pub async fn launch(
    config: &Config,
    child_env: &[(std::ffi::OsString, std::ffi::OsString)],
    outbox: &Outbox,
    kind: CommandKind,
    planned: Planned,
) -> std::io::Result<Launched> {
    let started = start(&LogSettings::of(config, kind), child_env, kind, planned).await?;
    let log_id = outbox.track(started.cursor);
    let followed = Followed {
        kind,
        log: started.log,
        supervisor: Some(started.supervisor),
        resume_at: 0,
        log_id,
        stop_file: started.stop_file,
        repo_dir: config.repo_dir.clone(),
        branch: config.branch.clone(),
        relay: RelayIn::new(Some(started.relay)),
    };
    Ok(Launched {
        record: started.record,
        followed,
    })
}

/// The one way a command starts, for the agent and for the rollback
/// timer's hidden mode alike: its log, end file and delivery cursor
/// created, its supervisor started, the running-command record saved,
/// then the plan handed to the supervisor.
pub async fn start(
    settings: &LogSettings,
    child_env: &[(std::ffi::OsString, std::ffi::OsString)],
    kind: CommandKind,
    planned: Planned,
) -> std::io::Result<Started> {
    let state_dir = &settings.state_dir;
    let (log, end_file) = create_log(settings, kind);
    let stop_file = handover::stop_path(state_dir);
    let _ = std::fs::remove_file(&stop_file);
    let cursor = DeliveryCursor::create(&handover::sent_path(state_dir)).unwrap_or_else(|error| {
        warn!(%error, "cannot create the delivery cursor; a restarted agent would send this log again");
        DeliveryCursor::detached()
    });
    let plan = Plan {
        log: log.clone(),
        stop_file: stop_file.clone(),
        stop_grace_ms: settings.stop_grace.as_millis() as u64,
        max_bytes: settings.max_bytes,
        scrub_url: settings.scrub_url.clone(),
        end_file,
        notes: planned.notes,
        steps: planned.steps,
    };
    let waiting = start_supervisor(Path::new(SELF_EXE), child_env)?;
    let (pid, pid_start) = (waiting.pid, waiting.pid_start);
    // Durable before the supervisor has its plan: from the moment it can
    // run anything, a next agent adopts it even if this one dies right
    // now (crash, OOM kill). An agent that dies before this line leaves a
    // supervisor that reads no plan and ends having run nothing.
    let record = CommandRecord::supervised_since(kind.name(), pid, pid_start, log.clone());
    record.save(state_dir);
    let relay = match waiting.hand_plan(&plan).await {
        Ok(relay) => relay,
        Err(error) => {
            // It never got its plan: no command runs, nothing to adopt.
            CommandRecord::clear(state_dir, Some(pid));
            return Err(error);
        }
    };
    info!(command = kind.name(), pid, log = %log.display(), "started the command's supervisor");
    Ok(Started {
        record,
        log,
        cursor,
        supervisor: (pid, pid_start),
        stop_file,
        relay,
    })
}

/// The command's log and its end file. Neither failing is a reason to
/// refuse the command (a full or read-only state disk is when the operator
/// needs it most): without a log the command runs all the same, streaming
/// only, its records reaching this agent on the supervisor's stdout
/// (relay.rs); without an end file (no room even for that) a next agent
/// would not learn its end.
fn create_log(settings: &LogSettings, kind: CommandKind) -> (PathBuf, Option<PathBuf>) {
    let state_dir = &settings.state_dir;
    let created = log::create(
        state_dir,
        kind.name(),
        settings.max_bytes,
        settings.logs_max_bytes,
    );
    let log = match created {
        Ok(log) => log,
        Err(error) => {
            warn!(%error, "cannot create the command log; the command runs streaming only");
            log::new_path(state_dir, kind.name())
        }
    };
    let end_file = match log::reserve_end(&log) {
        Ok(path) => Some(path),
        Err(error) => {
            warn!(%error, "cannot reserve the command's end file; only this agent will learn the command's end");
            None
        }
    };
    (log, end_file)
}

/// A supervisor started and waiting for its plan on stdin.
struct Waiting {
    child: tokio::process::Child,
    pid: u32,
    /// Read while it waits, so surely alive (see [`start_supervisor`]).
    pid_start: u64,
}

/// Starts `program --supervise`, which waits for its plan on stdin (so
/// that nothing of it shows in `ps`, and so that it runs nothing before
/// the caller recorded it); returns it with its pid and start time.
///
/// The start time is read before the plan is written: until its stdin
/// ends, the supervisor waits, so it is surely alive then. Read later, a
/// short plan (a `test` with no scripts) may already be done and the
/// supervisor a zombie, which has no start time to read: the command then
/// failed as "the supervisor exited at once" on a busy machine.
fn start_supervisor(
    program: &Path,
    child_env: &[(std::ffi::OsString, std::ffi::OsString)],
) -> std::io::Result<Waiting> {
    let mut command = tokio::process::Command::new(program);
    command
        .arg0("nixfleet-agent")
        .arg(SUPERVISE_ARG)
        .current_dir("/")
        .env_clear()
        .envs(child_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(false);
    // SAFETY: setsid and sigprocmask are async-signal-safe and touch no
    // memory of ours.
    // Its own session: a signal meant for the agent (Ctrl-C in a
    // terminal) reaches neither the supervisor nor the deployment.
    // Stop signals are blocked until the supervisor catches them.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid()?;
            super::stop_signal::block_in_child()
        });
    }
    let child = command.spawn()?;
    let exited = || std::io::Error::other("the supervisor exited at once");
    let pid = child.id().ok_or_else(exited)?;
    let pid_start = handover::process_start_ticks(pid).ok_or_else(exited)?;
    Ok(Waiting {
        child,
        pid,
        pid_start,
    })
}

impl Waiting {
    /// Writes the plan to the supervisor's stdin and closes it: from here
    /// on it runs the steps. Returns its stdout (relay.rs).
    async fn hand_plan(mut self, plan: &Plan) -> std::io::Result<tokio::process::ChildStdout> {
        let exited = || std::io::Error::other("the supervisor exited at once");
        let json = serde_json::to_vec(plan).map_err(std::io::Error::other)?;
        if let Some(mut stdin) = self.child.stdin.take() {
            stdin.write_all(&json).await?;
        }
        let stdout = self.child.stdout.take().ok_or_else(exited)?;
        // Reaps the supervisor when it ends (a next agent cannot: it is
        // then init's child). What it relayed stays in the pipe for the
        // follower.
        let mut child = self.child;
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(stdout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    /// `pid`'s state letter in /proc (`Z` for a zombie).
    fn state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .next()?
            .chars()
            .next()
    }

    #[tokio::test]
    async fn a_supervisor_that_ends_at_once_still_has_its_start_time() {
        let dir = tempfile::tempdir().unwrap();
        // A stand-in supervisor with nothing to do: it ends as soon as its
        // plan is read, as one with an empty plan does.
        let program = dir.path().join("supervisor");
        std::fs::write(&program, "#!/bin/sh\ncat >/dev/null\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plan = Plan {
            log: dir.path().join("log"),
            stop_file: dir.path().join("stop"),
            stop_grace_ms: 1000,
            max_bytes: 1024,
            scrub_url: None,
            end_file: None,
            notes: Vec::new(),
            steps: Vec::new(),
        };
        let waiting = start_supervisor(&program, &[]).unwrap();
        let (pid, pid_start) = (waiting.pid, waiting.pid_start);
        let _tail = waiting.hand_plan(&plan).await.unwrap();
        // Without yielding, nothing reaps it: wait (for the event, not a
        // time) until it is a zombie, as a busy machine can make it before
        // the agent runs on.
        let give_up = Instant::now() + Duration::from_secs(60);
        while state(pid) != Some('Z') {
            assert!(Instant::now() < give_up, "the stand-in never ended");
            std::thread::yield_now();
        }
        // Read now, there is no start time: the command would have failed.
        assert_eq!(handover::process_start_ticks(pid), None);
        assert!(pid_start > 0);
    }
}
