//! The commands the dashboard may ask for, and how they run.
//!
//! A command is a name from a fixed table; nothing the dashboard sends ever
//! becomes an argument or reaches a shell. Programs come from `PATH`.
//!
//! Each process runs in its own session (so its own process group), with
//! stdin from /dev/null and a small whitelisted environment: the agent's own
//! secrets (`NIXFLEET_*`, the token) never reach a child. Output is read
//! from both pipes concurrently, split into lines, written to the command's
//! log file and queued in the outbox, which never blocks; so a child is
//! never held up by a slow or absent dashboard. A rebuild's output is Nix's
//! structured log, rendered back to plain lines on the way, with build
//! progress reports (see nix_log.rs and `Output::emit`).

use crate::command_log::{self, Plan, Step};
use crate::config::Config;
use crate::follower::{Followed, follow};
use crate::handover::{self, CommandRecord};
use crate::heartbeat::{generation, head_commit, resolve_ref};
use crate::nix_log::{Effect, NixLog};
use crate::outbox::{DeliveryCursor, Item, Outbox};
use crate::protocol::{
    CheckStatus, OperationProgress, Outbound, Outcome, PhaseProgress, PhaseStatus, Phases, Status,
    Stream, TestProgress, TestResult, TestsProgress,
};
use crate::redact::{Scrubber, redact_url};
use crate::status::{ChildEnv, Compartment, LockAnswer, current_system, git_check};
use crate::supervisor::SUPERVISE_ARG;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use crate::command_log::MAX_LINE_BYTES;
pub const TRUNCATED_MARK: &str = " …[truncated]";
/// The last line of every command log starts with this, then the exit
/// code: a restarted agent reads it back (see handover.rs).
pub const EXIT_CODE_LOG_PREFIX: &str = "[nixfleet] exit code ";
/// Command logs kept under `state_dir/logs`.
pub const KEPT_LOGS: usize = 50;
/// After a process exits, how long its output pipes may stay open (held by
/// a leftover background process) before the agent stops reading them.
const PIPE_DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Output read between two turns given to the socket writer.
const YIELD_EVERY_BYTES: usize = 16 * 1024;
/// How often a stop checks whether the process group is gone.
const GROUP_POLL: Duration = Duration::from_millis(50);
/// Longest error detail quoted in a status message.
const MAX_DETAIL_CHARS: usize = 200;
/// The dry-run system check gives up after this long.
pub const SYSTEM_CHECK_TIMEOUT: Duration = Duration::from_secs(600);
/// Most stdout kept from a process whose stdout is parsed (the dry run's
/// JSON); the rest is logged but not kept.
const MAX_CAPTURED_BYTES: usize = 4 * 1024 * 1024;
/// Nix needs these for `nix build`/`nix flake` where the host has not
/// enabled them (every NixOS flake host has; the flag is harmless then).
const NIX_FEATURES: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];

/// How a process of a command is run.
#[derive(Debug, Clone, Copy, Default)]
struct ProcessOptions {
    /// Lowest CPU priority (nice 19) and the idle IO class.
    low_priority: bool,
    /// Stopped like a `stop` once this has passed.
    timeout: Option<Duration>,
    /// Keep stdout for parsing instead of sending it as output lines.
    capture_stdout: bool,
}
/// `nixos-rebuild` flags for Nix's structured log, which the agent turns
/// back into plain lines plus build progress (see nix_log.rs). Both are
/// common flags of nixos-rebuild (the Python `nixos-rebuild-ng` and the
/// older shell script), passed on to every `nix` build it runs.
const STRUCTURED_LOG_ARGS: [&str; 3] = ["--log-format", "internal-json", "-v"];
/// Least time between two intermediate build progress reports (at most
/// four a second); the final one is never held back.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// The command table (protocol.md, "Commands"). `stop` is not here: it acts
/// on the running command rather than being one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Pull,
    Switch,
    PullSwitch,
    Boot,
    Rollback,
    Test,
    /// v3: `nix flake update` (every input).
    Update,
    /// v3 registry name: `nix flake update nixfleet` (only that input).
    BumpFlake,
    /// v3: pull, bump the `nixfleet` input, switch bypassing the negative
    /// narinfo cache.
    ForceUpdate,
    /// v3 registry name for the same.
    ForceRebuild,
    RefreshGit,
    RefreshLock,
    RefreshSystem,
    RefreshAll,
}

impl CommandKind {
    pub const ALL: [CommandKind; 14] = [
        CommandKind::Pull,
        CommandKind::Switch,
        CommandKind::PullSwitch,
        CommandKind::Boot,
        CommandKind::Rollback,
        CommandKind::Test,
        CommandKind::Update,
        CommandKind::BumpFlake,
        CommandKind::ForceUpdate,
        CommandKind::ForceRebuild,
        CommandKind::RefreshGit,
        CommandKind::RefreshLock,
        CommandKind::RefreshSystem,
        CommandKind::RefreshAll,
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            CommandKind::Pull => "pull",
            CommandKind::Switch => "switch",
            CommandKind::PullSwitch => "pull-switch",
            CommandKind::Boot => "boot",
            CommandKind::Rollback => "rollback",
            CommandKind::Test => "test",
            CommandKind::Update => "update",
            CommandKind::BumpFlake => "bump-flake",
            CommandKind::ForceUpdate => "force-update",
            CommandKind::ForceRebuild => "force-rebuild",
            CommandKind::RefreshGit => "refresh-git",
            CommandKind::RefreshLock => "refresh-lock",
            CommandKind::RefreshSystem => "refresh-system",
            CommandKind::RefreshAll => "refresh-all",
        }
    }

    /// Whether success may have changed the running system (and so the
    /// agent's own unit or binary).
    pub fn activates(self) -> bool {
        matches!(
            self,
            CommandKind::Switch
                | CommandKind::PullSwitch
                | CommandKind::Rollback
                | CommandKind::ForceUpdate
                | CommandKind::ForceRebuild
        )
    }

    /// Whether the command runs as a plan under the supervisor (lossless
    /// output that survives an agent restart); the other (v3) commands
    /// still run their processes from the agent.
    pub fn supervised(self) -> bool {
        matches!(
            self,
            CommandKind::Pull
                | CommandKind::Switch
                | CommandKind::PullSwitch
                | CommandKind::Boot
                | CommandKind::Rollback
                | CommandKind::Test
        )
    }

    /// The status compartments this command works on (shown as `working`
    /// while it runs).
    pub fn compartments(self) -> &'static [Compartment] {
        use Compartment::*;
        match self {
            CommandKind::Pull | CommandKind::RefreshGit => &[Git],
            CommandKind::PullSwitch => &[Git, System],
            CommandKind::Switch | CommandKind::Rollback | CommandKind::RefreshSystem => &[System],
            CommandKind::Boot => &[],
            CommandKind::Test => &[Tests],
            CommandKind::Update | CommandKind::BumpFlake | CommandKind::RefreshLock => &[Lock],
            CommandKind::ForceUpdate | CommandKind::ForceRebuild => &[Git, Lock, System],
            CommandKind::RefreshAll => &[Git, Lock, System],
        }
    }
}

/// How the dashboard asked to stop the running command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// SIGTERM to the group, SIGKILL after `stop_grace`.
    Terminate,
    /// SIGKILL to the group now.
    Kill,
}

/// What a running command tells the agent core.
#[derive(Debug)]
pub enum Progress {
    /// The supervisor runs: the record a next agent needs to take over.
    Launched(CommandRecord),
    /// A process of the command started (pull-switch and test run several).
    Started {
        pid: u32,
    },
    /// The result of a `test` command, for the tests compartment.
    Tested {
        passed: u32,
        total: u32,
        stopped: bool,
    },
    /// A fresh answer for the lock compartment.
    Lock(LockAnswer),
    /// The verdict of the dry-run system check: does the repo build the
    /// running system?
    System(Result<bool, String>),
    /// `nixos-rebuild` ran to its end (successfully or not).
    Rebuilt {
        ok: bool,
    },
    Finished(Status),
}

/// What every command needs, shared by all of them.
pub struct Runner {
    config: Arc<Config>,
    outbox: Arc<Outbox>,
    child_env: ChildEnv,
    /// Hides `repo_url`'s credentials in everything a command shows.
    scrubber: Scrubber,
}

impl Runner {
    pub fn new(config: Arc<Config>, outbox: Arc<Outbox>) -> Self {
        let child_env = Arc::new(child_environment(
            std::env::vars_os(),
            config.ssh_key.as_deref(),
        ));
        let scrubber = Scrubber::for_url(config.repo_url.as_deref());
        Runner {
            config,
            outbox,
            child_env,
            scrubber,
        }
    }

    /// The environment every child gets (for the agent's own git queries).
    pub fn child_env(&self) -> &[(OsString, OsString)] {
        &self.child_env
    }

    pub fn shared_child_env(&self) -> ChildEnv {
        self.child_env.clone()
    }

    /// Runs one command to its end and returns its status. Output lines and
    /// test progress are queued in the outbox as they happen; the status is
    /// left to the caller, which queues it after them.
    pub async fn run(
        &self,
        kind: CommandKind,
        progress: &mpsc::Sender<Progress>,
        stop: &mut watch::Receiver<Option<StopRequest>>,
    ) -> Status {
        if kind.supervised() {
            return self.run_supervised(kind, progress, stop).await;
        }
        let mut job = Job {
            runner: self,
            command: kind.name(),
            output: Output {
                command: kind.name(),
                outbox: &self.outbox,
                log: Mutex::new(CommandLog::create(&self.config.state_dir, kind.name())),
                error_detail: Mutex::new(ErrorDetail::default()),
                captured: Mutex::new(None),
                scrubber: &self.scrubber,
                build: Mutex::new(None),
            },
            progress,
            stop,
        };
        let (outcome, message, exit_code) = match kind {
            CommandKind::Pull => job.pull().await,
            CommandKind::PullSwitch => match job.pull().await {
                (Outcome::Ok, ..) => job.rebuild(&["switch"]).await,
                failed => failed,
            },
            CommandKind::Switch => job.rebuild(&["switch"]).await,
            CommandKind::Boot => job.rebuild(&["boot"]).await,
            CommandKind::Rollback => job.rebuild_plain(&["switch", "--rollback"]).await,
            CommandKind::Test => job.test().await,
            CommandKind::Update => job.flake_update(None).await,
            CommandKind::BumpFlake => job.flake_update(Some("nixfleet")).await,
            CommandKind::ForceUpdate | CommandKind::ForceRebuild => job.force_update().await,
            CommandKind::RefreshGit => job.refresh_git().await,
            CommandKind::RefreshLock => job.refresh_lock().await,
            CommandKind::RefreshSystem => job.refresh_system().await,
            CommandKind::RefreshAll => job.refresh_all().await,
        };
        job.output.log_line(&format!(
            "{EXIT_CODE_LOG_PREFIX}{exit_code}: {} ({message})",
            outcome_word(outcome)
        ));
        Status {
            status: outcome,
            command: kind.name().to_owned(),
            exit_code,
            message,
            generation: generation(&self.config.repo_dir),
        }
    }
}

impl Runner {
    /// Runs one command to its end and returns its status. Output lines and
    /// test progress are queued in the outbox as they happen; the status is
    /// left to the caller, which queues it after them.
    async fn run_supervised(
        &self,
        kind: CommandKind,
        progress: &mpsc::Sender<Progress>,
        stop: &mut watch::Receiver<Option<StopRequest>>,
    ) -> Status {
        let failed = |message: String, exit_code: i32| {
            warn!(command = kind.name(), "{message}");
            Status {
                status: Outcome::Error,
                command: kind.name().to_owned(),
                exit_code,
                message,
                generation: generation(&self.config.repo_dir),
            }
        };
        if stop.borrow().is_some() {
            return failed("Stopped by user".to_owned(), -1);
        }
        let steps = match self.steps(kind) {
            Ok(steps) => steps,
            Err(message) => return failed(message, 1),
        };
        let launched = match self.launch(kind, steps).await {
            Ok(launched) => launched,
            Err(error) => return failed(format!("cannot start the command: {error}"), -1),
        };
        let _ = progress.send(Progress::Launched(launched.record)).await;
        follow(launched.followed, &self.outbox, progress, stop).await
    }

    /// The processes a command runs, decided before any of them starts.
    fn steps(&self, kind: CommandKind) -> Result<Vec<Step>, String> {
        Ok(match kind {
            CommandKind::Pull => self.pull_steps()?,
            CommandKind::PullSwitch => {
                let mut steps = self.pull_steps()?;
                steps.push(self.rebuild(&["switch"], true));
                steps
            }
            CommandKind::Switch => vec![self.rebuild(&["switch"], true)],
            CommandKind::Boot => vec![self.rebuild(&["boot"], true)],
            CommandKind::Rollback => vec![self.rebuild(&["switch", "--rollback"], false)],
            CommandKind::Test => self.test_steps(),
            other => {
                return Err(format!(
                    "{} does not run under the supervisor",
                    other.name()
                ));
            }
        })
    }

    fn pull_steps(&self) -> Result<Vec<Step>, String> {
        let config = &self.config;
        let repo = config.repo_dir.as_path();
        let git = |label: &str, cwd: &Path, args: &[&str]| Step {
            label: label.to_owned(),
            program: "git".to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            cwd: cwd.to_owned(),
            stop_on_failure: true,
        };
        let Some(url) = config.repo_url.as_deref() else {
            return Ok(vec![git("git pull", repo, &["pull", "--ff-only"])]);
        };
        if !repo.join(".git").exists() {
            if repo.exists()
                && std::fs::read_dir(repo)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(true)
            {
                return Err(format!(
                    "repo_dir {} exists and is not a git repository",
                    repo.display()
                ));
            }
            let parent = repo.parent().unwrap_or(Path::new("/"));
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            let repo_arg = repo.as_os_str().to_str().unwrap_or_default();
            let args = [
                "clone",
                "--branch",
                &config.branch,
                "--single-branch",
                "--",
                url,
                repo_arg,
            ];
            return Ok(vec![git("git clone", parent, &args)]);
        }
        let branch = config.branch.as_str();
        let remote_branch = format!("origin/{branch}");
        Ok(vec![
            git("git fetch", repo, &["fetch", "origin", branch]),
            git("git reset", repo, &["reset", "--hard", &remote_branch]),
            git("git clean", repo, &["clean", "-fd"]),
        ])
    }

    /// `nixos-rebuild <op> [--flake <repo_dir>#<hostname>]`; with the
    /// flake (a build), Nix's structured log for build progress. A rollback
    /// builds nothing and runs plain.
    fn rebuild(&self, op: &[&str], flake: bool) -> Step {
        let mut args: Vec<String> = op.iter().map(|a| (*a).to_owned()).collect();
        if flake {
            args.push("--flake".to_owned());
            args.push(format!(
                "{}#{}",
                self.config.repo_dir.display(),
                self.config.hostname
            ));
            args.extend(STRUCTURED_LOG_ARGS.map(str::to_owned));
        }
        Step {
            label: format!("nixos-rebuild {}", op.join(" ")),
            program: "nixos-rebuild".to_owned(),
            args,
            cwd: self.working_dir(),
            stop_on_failure: true,
        }
    }

    /// Every executable `hosts/<hostname>/tests/T*.sh`, in name order.
    fn test_steps(&self) -> Vec<Step> {
        let dir = self
            .config
            .repo_dir
            .join("hosts")
            .join(&self.config.hostname)
            .join("tests");
        let cwd = self.working_dir();
        find_test_scripts(&dir)
            .into_iter()
            .map(|script| Step {
                label: script
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                program: script.to_string_lossy().into_owned(),
                args: Vec::new(),
                cwd: cwd.clone(),
                stop_on_failure: false,
            })
            .collect()
    }

    /// Commands run in the repository when it exists, else in `/` (so that
    /// `rollback` works before the first pull).
    fn working_dir(&self) -> PathBuf {
        let repo = &self.config.repo_dir;
        if repo.is_dir() {
            repo.clone()
        } else {
            PathBuf::from("/")
        }
    }

    /// Creates the command log and starts the supervisor on it.
    async fn launch(&self, kind: CommandKind, steps: Vec<Step>) -> std::io::Result<Launched> {
        use tokio::io::AsyncWriteExt;
        let state_dir = &self.config.state_dir;
        let log = command_log::create(
            state_dir,
            kind.name(),
            self.config.log_max_bytes,
            self.config.logs_max_bytes,
        )?;
        let stop_file = handover::stop_path(state_dir);
        let _ = std::fs::remove_file(&stop_file);
        let cursor = DeliveryCursor::create(&handover::sent_path(state_dir))?;
        let plan = Plan {
            log: log.clone(),
            stop_file: stop_file.clone(),
            stop_grace_ms: self.config.stop_grace.as_millis() as u64,
            max_bytes: self.config.log_max_bytes,
            steps,
        };
        // The running binary, even when a switch replaced the file: the
        // supervisor is always this very version.
        let mut command = tokio::process::Command::new("/proc/self/exe");
        command
            .arg0("nixfleet-agent")
            .arg(SUPERVISE_ARG)
            .current_dir("/")
            .env_clear()
            .envs(self.child_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(false);
        // SAFETY: setsid is async-signal-safe and touches no memory of ours.
        // Its own session: a signal meant for the agent (Ctrl-C in a
        // terminal) reaches neither the supervisor nor the deployment.
        unsafe {
            command.pre_exec(|| rustix::process::setsid().map(|_| ()).map_err(Into::into));
        }
        let mut child = command.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("the supervisor exited at once"))?;
        let json = serde_json::to_vec(&plan).map_err(std::io::Error::other)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&json).await?;
        }
        // Reaps the supervisor when it ends (a next agent cannot: it is
        // then init's child).
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        info!(command = kind.name(), pid, log = %log.display(), "started the command's supervisor");
        let log_id = self.outbox.track(cursor);
        let record = CommandRecord::supervised(kind.name(), pid, log.clone())
            .ok_or_else(|| std::io::Error::other("the supervisor exited at once"))?;
        let followed = Followed {
            kind,
            log,
            supervisor: Some((pid, record.pid_start)),
            resume_at: 0,
            log_id,
            stop_file,
            repo_dir: self.config.repo_dir.clone(),
        };
        Ok(Launched { record, followed })
    }
}

struct Launched {
    record: CommandRecord,
    followed: Followed,
}

fn outcome_word(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Ok => "ok",
        Outcome::Error => "error",
        Outcome::Warning => "warning",
    }
}

type StepOutcome = (Outcome, String, i32);

/// How one process ended.
enum Ended {
    Exited(ExitStatus),
    Stopped(ExitStatus),
    /// Stopped because [`ProcessOptions::timeout`] passed.
    TimedOut(Duration),
    NotStarted(String),
}

/// One command in progress.
struct Job<'a> {
    runner: &'a Runner,
    command: &'static str,
    output: Output<'a>,
    progress: &'a mpsc::Sender<Progress>,
    stop: &'a mut watch::Receiver<Option<StopRequest>>,
}

/// Where a command's output goes. Both pipes are read concurrently and share
/// it, hence the (uncontended) locks.
struct Output<'a> {
    command: &'static str,
    outbox: &'a Outbox,
    log: Mutex<Option<CommandLog>>,
    /// The current process's stderr line that best says what went wrong.
    error_detail: Mutex<ErrorDetail>,
    /// Stdout of the current process when it is kept for parsing.
    captured: Mutex<Option<String>>,
    scrubber: &'a Scrubber,
    /// While a `nixos-rebuild` runs: its structured log's state.
    build: Mutex<Option<BuildProgress>>,
}

/// Picks the line of a failed process's stderr that a status message
/// quotes. git (and nix) prefix the actual error with `fatal:` or `error:`
/// and follow it with hints, so the last such line wins; without one, the
/// first line (the lead sentence: hints come after it).
#[derive(Debug, Default)]
struct ErrorDetail {
    first: String,
    error: String,
}

impl ErrorDetail {
    fn note(&mut self, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        if line.starts_with("fatal:") || line.starts_with("error:") {
            self.error.clear();
            self.error.extend(line.chars().take(MAX_DETAIL_CHARS));
        } else if self.first.is_empty() {
            self.first.extend(line.chars().take(MAX_DETAIL_CHARS));
        }
    }

    fn get(&self) -> Option<&str> {
        [&self.error, &self.first]
            .into_iter()
            .find(|s| !s.is_empty())
            .map(String::as_str)
    }
}

/// A rebuild's structured log and what was last reported of it.
struct BuildProgress {
    log: NixLog,
    /// Counts changed since the last report.
    dirty: bool,
    last_report: Option<Instant>,
    /// The last `system` step sent; reports never go backwards.
    sent: Option<PhaseProgress>,
}

impl BuildProgress {
    fn new() -> Self {
        BuildProgress {
            log: NixLog::new(),
            dirty: false,
            last_report: None,
            sent: None,
        }
    }

    /// The report for the counts now, or `None` when it would repeat the
    /// last one. `current`/`total` count builds plus downloaded paths; Nix
    /// may lower an expected total (a path it no longer needs), but the
    /// dots only move forward, so both are kept at their highest.
    fn report(&mut self, status: PhaseStatus) -> Option<OperationProgress> {
        let snapshot = self.log.snapshot();
        let (done, expected) = snapshot.steps();
        let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let (mut current, mut total) = (clamp(done), clamp(expected));
        if let Some(sent) = &self.sent {
            current = current.max(sent.current);
            total = total.max(sent.total);
        }
        if status == PhaseStatus::Complete {
            // Success means everything expected was done.
            current = current.max(total);
        }
        total = total.max(current);
        let step = PhaseProgress {
            current,
            total,
            status,
            detail: serde_json::to_value(&snapshot).ok(),
        };
        if self.sent.as_ref() == Some(&step) {
            return None;
        }
        self.sent = Some(step.clone());
        Some(OperationProgress {
            progress: Phases {
                system: Some(step),
                ..Phases::default()
            },
        })
    }
}

impl Job<'_> {
    fn config(&self) -> &Config {
        &self.runner.config
    }

    /// `pull` with its progress dots: one per git step.
    async fn pull(&mut self) -> StepOutcome {
        let isolated_fetch =
            self.config().repo_url.is_some() && self.config().repo_dir.join(".git").exists();
        let total = if isolated_fetch { 3 } else { 1 };
        self.pull_progress(0, total, PhaseStatus::InProgress);
        let (outcome, steps_done) = self.pull_steps(total).await;
        match outcome.0 {
            Outcome::Ok => self.pull_progress(total, total, PhaseStatus::Complete),
            _ => self.pull_progress(steps_done, total, PhaseStatus::Error),
        }
        outcome
    }

    fn pull_progress(&self, current: u32, total: u32, status: PhaseStatus) {
        self.send_phases(Phases {
            pull: Some(PhaseProgress {
                current,
                total,
                status,
                detail: None,
            }),
            ..Phases::default()
        });
    }

    fn send_phases(&self, phases: Phases) {
        self.runner.outbox.push_frame(
            Outbound::OperationProgress(&OperationProgress { progress: phases }).to_json(),
        );
    }

    /// Returns the outcome and how many steps succeeded.
    async fn pull_steps(&mut self, total: u32) -> (StepOutcome, u32) {
        let config = self.runner.config.clone();
        let repo = config.repo_dir.as_path();
        let Some(url) = config.repo_url.as_deref() else {
            let outcome = self
                .git_step("git pull", repo, &["pull", "--ff-only"])
                .await;
            let done = u32::from(outcome.0 == Outcome::Ok);
            return (outcome, done);
        };
        if !repo.join(".git").exists() {
            if repo.exists()
                && std::fs::read_dir(repo)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(true)
            {
                let why = format!(
                    "repo_dir {} exists and is not a git repository",
                    repo.display()
                );
                return ((Outcome::Error, why, 1), 0);
            }
            let parent = repo.parent().unwrap_or(Path::new("/"));
            if let Err(e) = std::fs::create_dir_all(parent) {
                let why = format!("cannot create {}: {e}", parent.display());
                return ((Outcome::Error, why, 1), 0);
            }
            let repo_arg = repo.as_os_str().to_str().unwrap_or_default();
            let args = [
                "clone",
                "--branch",
                &config.branch,
                "--single-branch",
                "--",
                url,
                repo_arg,
            ];
            return match self.git_step("git clone", parent, &args).await {
                (Outcome::Ok, ..) => (self.pulled(), 1),
                failed => (failed, 0),
            };
        }
        if let Some(failed) = self.follow_configured_origin(repo, url).await {
            return (failed, 0);
        }
        let branch = config.branch.as_str();
        let remote_branch = format!("refs/remotes/origin/{branch}");
        // An explicit refspec: a clone made for another branch (or with
        // --single-branch) would not update origin/<branch> otherwise.
        let refspec = format!("+refs/heads/{branch}:{remote_branch}");
        let steps: [(&str, Vec<&str>); 3] = [
            ("git fetch", vec!["fetch", "origin", &refspec]),
            (
                "git checkout",
                vec!["checkout", "--force", "-B", branch, &remote_branch, "--"],
            ),
            ("git clean", vec!["clean", "-fd"]),
        ];
        let previous_branch = self
            .git_query(repo, &["symbolic-ref", "--short", "-q", "HEAD"])
            .await;
        if previous_branch.as_deref().is_some_and(|b| b != branch) {
            self.say(&format!(
                "[nixfleet] branch changed from {} to {branch}: checking out {branch}",
                previous_branch.as_deref().unwrap_or_default()
            ));
        }
        let mut done = 0;
        for (what, args) in steps {
            if let failed @ (Outcome::Error, ..) = self.git_step(what, repo, &args).await {
                return (failed, done);
            }
            done += 1;
            if done < total {
                self.pull_progress(done, total, PhaseStatus::InProgress);
            }
        }
        (self.pulled(), done)
    }

    /// Isolated mode: `origin` must be `repo_url`, whatever it was before
    /// (a host moving away from a compromised repository must not keep
    /// pulling from it). Says so when it changes it; returns the failure.
    async fn follow_configured_origin(&mut self, repo: &Path, url: &str) -> Option<StepOutcome> {
        let current = self
            .git_query(repo, &["config", "--get", "remote.origin.url"])
            .await;
        if current.as_deref() == Some(url) {
            return None;
        }
        let (what, args) = match &current {
            Some(old) => {
                self.say(&format!(
                    "[nixfleet] origin is {}, but repo_url is {}: pointing origin at repo_url",
                    redact_url(old),
                    redact_url(url)
                ));
                (
                    "git remote set-url",
                    vec!["remote", "set-url", "origin", url],
                )
            }
            None => {
                self.say(&format!(
                    "[nixfleet] the repository has no origin: adding repo_url {}",
                    redact_url(url)
                ));
                ("git remote add", vec!["remote", "add", "origin", url])
            }
        };
        match self.git_step(what, repo, &args).await {
            (Outcome::Ok, ..) => None,
            failed => Some(failed),
        }
    }

    /// A line of the agent's own in the command's output (log and dashboard).
    fn say(&self, text: &str) {
        self.output.emit(Stream::Stdout, text.as_bytes(), false);
    }

    /// The trimmed stdout of a quick git query, not shown anywhere; `None`
    /// when git fails or prints nothing.
    async fn git_query(&self, repo: &Path, args: &[&str]) -> Option<String> {
        let output = tokio::process::Command::new("git")
            .args(args)
            .current_dir(repo)
            .env_clear()
            .envs(self.runner.child_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        (output.status.success() && !text.is_empty()).then_some(text)
    }

    fn pulled(&self) -> StepOutcome {
        let generation = generation(&self.config().repo_dir);
        (Outcome::Ok, format!("at {generation}"), 0)
    }

    async fn git_step(&mut self, what: &str, cwd: &Path, args: &[&str]) -> StepOutcome {
        match self.run_process("git", args, cwd).await {
            Ended::Exited(status) if status.success() => (Outcome::Ok, String::new(), 0),
            Ended::Exited(status) => {
                let detail = self.failure_detail(status);
                (
                    Outcome::Error,
                    format!("{what} failed: {detail}"),
                    exit_code_of(status),
                )
            }
            ended => self.not_ok(ended),
        }
    }

    /// `nixos-rebuild <op> --flake <repo_dir>#<hostname>`, with Nix's
    /// structured log, reporting build progress.
    async fn rebuild(&mut self, op: &[&str]) -> StepOutcome {
        let flake = format!(
            "{}#{}",
            self.config().repo_dir.display(),
            self.config().hostname
        );
        let mut args = op.to_vec();
        args.extend(["--flake", &flake]);
        args.extend(STRUCTURED_LOG_ARGS);
        *self.output.build_lock() = Some(BuildProgress::new());
        let outcome = self.rebuild_plain(&args).await;
        self.output.finish_progress(outcome.0);
        outcome
    }

    /// `nixos-rebuild` with these arguments. A rollback builds nothing, so
    /// it runs without the structured log and reports no build progress.
    async fn rebuild_plain(&mut self, args: &[&str]) -> StepOutcome {
        let cwd = self.working_dir();
        let ended = self.run_process("nixos-rebuild", args, &cwd).await;
        if let Ended::Exited(status) = &ended {
            let ok = status.success();
            let _ = self.progress.send(Progress::Rebuilt { ok }).await;
        }
        match ended {
            Ended::Exited(status) if status.success() => {
                (Outcome::Ok, format!("{} succeeded", self.command), 0)
            }
            Ended::Exited(status) => (Outcome::Error, describe_exit(status), exit_code_of(status)),
            ended => self.not_ok(ended),
        }
    }

    /// Every executable `hosts/<hostname>/tests/T*.sh`, in name order.
    async fn test(&mut self) -> StepOutcome {
        let dir = self
            .config()
            .repo_dir
            .join("hosts")
            .join(&self.config().hostname)
            .join("tests");
        let scripts = find_test_scripts(&dir);
        let total = scripts.len() as u32;
        let cwd = self.working_dir();
        let mut passed = 0;
        let mut results = vec![TestResult::Pending; scripts.len()];
        self.tests_progress(0, &results, PhaseStatus::InProgress);
        for (index, script) in scripts.iter().enumerate() {
            let current = index as u32 + 1;
            let name = script
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let script_arg = script.to_string_lossy().into_owned();
            let ended = match untrusted_script(&self.config().repo_dir, script) {
                Some(why) => {
                    self.say(&format!("[nixfleet] refusing to run {name}: {why}"));
                    Ended::NotStarted(why)
                }
                None => self.run_process(&script_arg, &[], &cwd).await,
            };
            let ok = matches!(&ended, Ended::Exited(status) if status.success());
            passed += ok as u32;
            let stopped = matches!(ended, Ended::Stopped(_));
            let last = current == total || stopped;
            results[index] = if ok {
                TestResult::Pass
            } else {
                TestResult::Fail
            };
            let phase = match (last, passed == current && !stopped) {
                (false, _) => PhaseStatus::InProgress,
                (true, true) => PhaseStatus::Complete,
                (true, false) => PhaseStatus::Error,
            };
            self.tests_progress(current, &results, phase);
            let result = if last {
                format!("{passed}/{total} passed")
            } else {
                format!("{name} {}", if ok { "passed" } else { "failed" })
            };
            self.send_progress(TestProgress {
                current,
                total,
                passed,
                running: !last,
                result,
            });
            if stopped {
                let _ = self
                    .progress
                    .send(Progress::Tested {
                        passed,
                        total,
                        stopped: true,
                    })
                    .await;
                return self.not_ok(ended);
            }
        }
        let _ = self
            .progress
            .send(Progress::Tested {
                passed,
                total,
                stopped: false,
            })
            .await;
        let summary = format!("{passed}/{total} passed");
        if total == 0 {
            self.tests_progress(0, &results, PhaseStatus::Complete);
            self.send_progress(TestProgress {
                current: 0,
                total: 0,
                passed: 0,
                running: false,
                result: summary.clone(),
            });
        }
        if passed == total {
            (Outcome::Ok, summary, 0)
        } else {
            (Outcome::Error, summary, 1)
        }
    }

    fn tests_progress(&self, current: u32, results: &[TestResult], status: PhaseStatus) {
        self.send_phases(Phases {
            tests: Some(TestsProgress {
                current,
                total: results.len() as u32,
                results: results.to_vec(),
                status,
            }),
            ..Phases::default()
        });
    }

    /// A line of the agent's own on stdout, e.g. the result of a check.
    fn note(&self, text: &str) {
        self.output.emit(Stream::Stdout, text.as_bytes(), false);
    }

    /// `nix flake update [input]` with the lock compartment's dot.
    async fn flake_update(&mut self, input: Option<&str>) -> StepOutcome {
        let lock = |status| Phases {
            lock: Some(PhaseProgress {
                current: u32::from(status == PhaseStatus::Complete),
                total: 1,
                status,
                detail: None,
            }),
            ..Phases::default()
        };
        self.send_phases(lock(PhaseStatus::InProgress));
        let mut args = NIX_FEATURES.to_vec();
        args.extend(["flake", "update"]);
        args.extend(input);
        let cwd = self.working_dir();
        let outcome = match self.run_process("nix", &args, &cwd).await {
            Ended::Exited(status) if status.success() => {
                let what = input.map_or("every input".to_owned(), |i| format!("input {i}"));
                (Outcome::Ok, format!("flake.lock updated ({what})"), 0)
            }
            Ended::Exited(status) => {
                let detail = self.failure_detail(status);
                (
                    Outcome::Error,
                    format!("nix flake update failed: {detail}"),
                    exit_code_of(status),
                )
            }
            ended => self.not_ok(ended),
        };
        self.send_phases(lock(if outcome.0 == Outcome::Ok {
            PhaseStatus::Complete
        } else {
            PhaseStatus::Error
        }));
        outcome
    }

    /// Pull, bump the `nixfleet` input when the flake has one, then switch
    /// with the negative narinfo cache off, so that a freshly pushed agent
    /// is fetched or built rather than assumed missing.
    async fn force_update(&mut self) -> StepOutcome {
        if let failed @ (Outcome::Error, ..) = self.pull().await {
            return failed;
        }
        if flake_has_input(&self.config().repo_dir, "nixfleet") {
            if let failed @ (Outcome::Error, ..) = self.flake_update(Some("nixfleet")).await {
                return failed;
            }
        } else {
            self.note("[nixfleet] the flake has no input named nixfleet; not bumping it");
        }
        self.rebuild(&["switch", "--option", "narinfo-cache-negative-ttl", "0"])
            .await
    }

    /// `git fetch origin <branch>`, then HEAD against it.
    async fn refresh_git(&mut self) -> StepOutcome {
        let repo = self.config().repo_dir.clone();
        if !repo.join(".git").exists() {
            return (
                Outcome::Error,
                format!("no git repository at {}", repo.display()),
                1,
            );
        }
        let branch = self.config().branch.clone();
        if let failed @ (Outcome::Error, ..) = self
            .git_step("git fetch", &repo, &["fetch", "origin", &branch])
            .await
        {
            return failed;
        }
        let upstream = resolve_ref(&repo, &format!("refs/remotes/origin/{branch}"));
        let (status, message) =
            git_check(head_commit(&repo).as_deref(), upstream.as_deref(), &branch);
        let summary = format!("git: {} ({message})", check_word(status));
        self.note(&format!("[nixfleet] {summary}"));
        (Outcome::Ok, summary, 0)
    }

    /// The age of the commit that last changed `flake.lock`.
    async fn refresh_lock(&mut self) -> StepOutcome {
        let repo = self.config().repo_dir.clone();
        let answer = LockAnswer::query(&repo, self.runner.child_env()).await;
        let (outcome, summary) = match answer.verdict() {
            Ok((status, message)) => (
                Outcome::Ok,
                format!("lock: {} ({message})", check_word(status)),
            ),
            Err(why) => (Outcome::Error, format!("lock: {why}")),
        };
        let _ = self.progress.send(Progress::Lock(answer)).await;
        self.note(&format!("[nixfleet] {summary}"));
        let code = i32::from(outcome != Outcome::Ok);
        (outcome, summary, code)
    }

    /// The full check: a dry-run build of the host's toplevel, at the lowest
    /// CPU and IO priority and with a timeout, compared with the running
    /// system.
    async fn refresh_system(&mut self) -> StepOutcome {
        let Some(current) = current_system() else {
            let why = "no /run/current-system to compare with (not NixOS?)".to_owned();
            let _ = self.progress.send(Progress::System(Err(why.clone()))).await;
            return (Outcome::Error, why, 1);
        };
        let attr = format!(
            "{}#nixosConfigurations.{}.config.system.build.toplevel",
            self.config().repo_dir.display(),
            self.config().hostname
        );
        let mut args = NIX_FEATURES.to_vec();
        args.extend(["build", "--dry-run", "--json", "--no-link", &attr]);
        let cwd = self.working_dir();
        let options = ProcessOptions {
            low_priority: true,
            timeout: Some(SYSTEM_CHECK_TIMEOUT),
            capture_stdout: true,
        };
        let ended = self.run_process_with("nix", &args, &cwd, options).await;
        let captured = self
            .output
            .captured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        let (verdict, outcome) = match ended {
            Ended::Exited(status) if status.success() => {
                let matches = dry_run_builds(&captured, &current);
                let summary = if matches {
                    "system: ok (the repo builds the running system)".to_owned()
                } else {
                    "system: outdated (the repo builds a different system)".to_owned()
                };
                (Ok(matches), (Outcome::Ok, summary, 0))
            }
            Ended::Exited(status) => {
                let detail = self.failure_detail(status);
                let why = format!("nix build --dry-run failed: {detail}");
                (
                    Err(why.clone()),
                    (Outcome::Error, why, exit_code_of(status)),
                )
            }
            ended => {
                let outcome = self.not_ok(ended);
                (Err(outcome.1.clone()), outcome)
            }
        };
        let _ = self.progress.send(Progress::System(verdict)).await;
        self.note(&format!("[nixfleet] {}", outcome.1));
        outcome
    }

    /// git, lock and system, each reported; the first failure decides the
    /// status, the others still run.
    async fn refresh_all(&mut self) -> StepOutcome {
        let git = self.refresh_git().await;
        let lock = self.refresh_lock().await;
        if self.stop.borrow().is_some() {
            return self.not_ok(Ended::NotStarted("Stopped by user".to_owned()));
        }
        let system = self.refresh_system().await;
        let summary = [&git.1, &lock.1, &system.1].map(String::as_str).join("; ");
        match [git, lock, system].into_iter().find(|o| o.0 != Outcome::Ok) {
            Some((_, _, code)) => (Outcome::Error, summary, code),
            None => (Outcome::Ok, summary, 0),
        }
    }

    fn send_progress(&self, progress: TestProgress) {
        self.output.log_line(&format!(
            "[nixfleet] test {}/{}: {}",
            progress.current, progress.total, progress.result
        ));
        self.runner
            .outbox
            .push_frame(Outbound::TestProgress(&progress).to_json());
    }

    /// Commands run in the repository when it exists, else in `/` (so that
    /// `rollback` works before the first pull).
    fn working_dir(&self) -> PathBuf {
        let repo = &self.config().repo_dir;
        if repo.is_dir() {
            repo.clone()
        } else {
            PathBuf::from("/")
        }
    }

    fn not_ok(&self, ended: Ended) -> StepOutcome {
        match ended {
            Ended::Stopped(status) => (
                Outcome::Error,
                "Stopped by user".to_owned(),
                exit_code_of(status),
            ),
            Ended::TimedOut(after) => (
                Outcome::Error,
                format!("timed out after {}s", after.as_secs()),
                124,
            ),
            Ended::NotStarted(why) => (Outcome::Error, why, 127),
            Ended::Exited(status) => (Outcome::Error, describe_exit(status), exit_code_of(status)),
        }
    }

    fn failure_detail(&self, status: ExitStatus) -> String {
        let detail = self
            .output
            .error_detail
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match detail.get() {
            Some(line) => line.to_owned(),
            None => describe_exit(status),
        }
    }

    /// Runs one process to its end, streaming its output, honouring stop
    /// requests.
    async fn run_process(&mut self, program: &str, args: &[&str], cwd: &Path) -> Ended {
        self.run_process_with(program, args, cwd, ProcessOptions::default())
            .await
    }

    async fn run_process_with(
        &mut self,
        program: &str,
        args: &[&str],
        cwd: &Path,
        options: ProcessOptions,
    ) -> Ended {
        if self.stop.borrow().is_some() {
            return Ended::NotStarted("Stopped by user".to_owned());
        }
        *self
            .output
            .error_detail
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = ErrorDetail::default();
        let argv = format!("[nixfleet] $ {program} {}", args.join(" "));
        self.output.log_line(&self.output.scrubber.scrub(&argv));
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .current_dir(cwd)
            .env_clear()
            .envs(self.runner.child_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        // SAFETY: setsid is async-signal-safe and touches no memory of ours.
        // A new session makes the child the leader of its own process group,
        // so a stop can signal everything it started, and a signal meant for
        // the agent (Ctrl-C in a terminal) does not reach the deployment.
        let low_priority = options.low_priority;
        unsafe {
            command.pre_exec(move || {
                rustix::process::setsid()?;
                if low_priority {
                    lower_priority();
                }
                Ok(())
            });
        }
        *self
            .output
            .captured
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = options.capture_stdout.then(String::new);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                let why = format!("cannot run {program}: {error}");
                warn!(command = self.command, error = %error, "{why}");
                self.output.log_line(&format!("[nixfleet] {why}"));
                return Ended::NotStarted(why);
            }
        };
        let Some(pid) = child.id() else {
            return Ended::NotStarted(format!("{program} exited before it could be tracked"));
        };
        info!(command = self.command, pid, "started {program}");
        let _ = self.progress.send(Progress::Started { pid }).await;

        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let grace = self.config().stop_grace;
        let output = &self.output;
        let stop = &mut *self.stop;
        let exited = tokio::sync::Notify::new();
        let deadline = options
            .timeout
            .map(|t| (tokio::time::Instant::now() + t, t));
        let reap = async {
            let ended = supervise(&mut child, pid, grace, stop, deadline).await;
            exited.notify_one();
            ended
        };
        let drain = async {
            let pumps = async {
                let both = async {
                    tokio::join!(
                        output.pump(stdout, Stream::Stdout),
                        output.pump(stderr, Stream::Stderr)
                    );
                };
                tokio::select! {
                    () = both => {}
                    () = output.report_pending_progress() => {}
                }
            };
            let exit_then_grace = async {
                exited.notified().await;
                tokio::time::sleep(PIPE_DRAIN_GRACE).await;
            };
            tokio::select! {
                () = pumps => {}
                () = exit_then_grace => {
                    warn!(command = output.command, pid, "output pipes still open after the process exited; not reading them further");
                }
            }
        };
        let (ended, ()) = tokio::join!(reap, drain);
        ended
    }
}

impl Output<'_> {
    async fn pump(&self, pipe: Option<impl AsyncRead + Unpin>, stream: Stream) {
        let Some(pipe) = pipe else { return };
        let mut reader = BufReader::with_capacity(64 * 1024, pipe);
        let mut line: Vec<u8> = Vec::with_capacity(256);
        let mut cut = false;
        let mut since_yield = 0;
        loop {
            // Give the writer its turn: on the agent's single thread, tokio
            // would let this loop run for 128 pipe reads (about 8 MiB of
            // output) before the writer could drain a line, and the outbox
            // would overflow although the dashboard keeps up.
            if since_yield >= YIELD_EVERY_BYTES {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
            let buf = match reader.fill_buf().await {
                Ok(buf) => buf,
                Err(error) => {
                    warn!(command = self.command, error = %error, "reading command output failed");
                    break;
                }
            };
            if buf.is_empty() {
                if !line.is_empty() || cut {
                    self.emit(stream, &line, cut);
                }
                break;
            }
            let newline = memchr::memchr(b'\n', buf);
            let chunk = &buf[..newline.unwrap_or(buf.len())];
            let room = MAX_LINE_BYTES - line.len();
            if chunk.len() > room {
                line.extend_from_slice(&chunk[..room]);
                cut = true;
            } else {
                line.extend_from_slice(chunk);
            }
            let used = chunk.len() + usize::from(newline.is_some());
            reader.consume(used);
            since_yield += used;
            if newline.is_some() {
                self.emit(stream, &line, cut);
                line.clear();
                cut = false;
            }
        }
    }

    /// Where a line read from the child becomes what the dashboard gets:
    /// during a rebuild, Nix's structured log is rendered to plain lines
    /// and its counts reported; anything else goes out as it is.
    fn emit(&self, stream: Stream, raw: &[u8], cut: bool) {
        let text = line_text(raw, cut);
        if stream == Stream::Stdout {
            let mut captured = self.captured.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(captured) = captured.as_mut() {
                // Kept for parsing (the dry run's JSON), logged, not sent.
                self.log_line(&text);
                if captured.len() + text.len() < MAX_CAPTURED_BYTES {
                    captured.push_str(&text);
                    captured.push('\n');
                }
                return;
            }
        }
        let mut build = self.build_lock();
        let Some(progress) = build.as_mut() else {
            drop(build);
            self.send_line(stream, &text);
            return;
        };
        let effect = progress
            .log
            .feed(&text, &mut |plain| self.send_line(stream, plain));
        if effect == Effect::Counts {
            progress.dirty = true;
            self.report_progress(progress, false);
        }
    }

    /// Sends a progress report when the counts changed and the last report
    /// is at least [`PROGRESS_INTERVAL`] old. It is queued after the lines
    /// read so far, so it never runs ahead of the lines it describes.
    fn report_progress(&self, progress: &mut BuildProgress, force: bool) {
        if !progress.dirty || !progress.log.is_structured() {
            return;
        }
        let now = Instant::now();
        if !force
            && progress
                .last_report
                .is_some_and(|last| now.duration_since(last) < PROGRESS_INTERVAL)
        {
            return;
        }
        progress.dirty = false;
        progress.last_report = Some(now);
        if let Some(report) = progress.report(PhaseStatus::InProgress) {
            self.outbox
                .push_progress(Item::new(Outbound::OperationProgress(&report).to_json()));
        }
    }

    /// Sends what the throttle held back once its interval is over, while
    /// the pipes are quiet (a long build phase prints nothing). Runs until
    /// dropped.
    async fn report_pending_progress(&self) {
        if self.build_lock().is_none() {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(PROGRESS_INTERVAL).await;
            if let Some(progress) = self.build_lock().as_mut() {
                self.report_progress(progress, false);
            }
        }
    }

    /// After the rebuild: the final report, whatever the throttle says, and
    /// only when the output was Nix's structured log (for a stand-in or an
    /// old Nix there are no counts to report). Reliable: it is what the
    /// dots end on.
    fn finish_progress(&self, outcome: Outcome) {
        let Some(mut progress) = self.build_lock().take() else {
            return;
        };
        if !progress.log.is_structured() {
            return;
        }
        let status = match outcome {
            Outcome::Ok => PhaseStatus::Complete,
            Outcome::Error | Outcome::Warning => PhaseStatus::Error,
        };
        if let Some(report) = progress.report(status) {
            self.outbox
                .push_frame(Outbound::OperationProgress(&report).to_json());
        }
    }

    fn build_lock(&self) -> std::sync::MutexGuard<'_, Option<BuildProgress>> {
        self.build.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send_line(&self, stream: Stream, text: &str) {
        // repo_url's credentials, should a child print them (redact.rs).
        let scrubbed;
        let text = if self.scrubber.is_empty() {
            text
        } else {
            scrubbed = self.scrubber.scrub(text);
            scrubbed.as_str()
        };
        self.log_line(text);
        self.outbox
            .push_frame(crate::follower::output_frame(self.command, stream, text));
        if stream == Stream::Stderr {
            self.error_detail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .note(text);
        }
    }

    fn log_line(&self, text: &str) {
        if let Some(log) = self.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            log.write_line(text);
        }
    }
}

/// Waits for the process, applying stop requests to its whole group.
async fn supervise(
    child: &mut tokio::process::Child,
    pid: u32,
    grace: Duration,
    stop: &mut watch::Receiver<Option<StopRequest>>,
    deadline: Option<(tokio::time::Instant, Duration)>,
) -> Ended {
    let timeout = async {
        match deadline {
            Some((at, _)) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let mut timed_out = false;
    let requested = tokio::select! {
        status = child.wait() => return match status {
            Ok(status) => Ended::Exited(status),
            Err(error) => Ended::NotStarted(format!("waiting for the process failed: {error}")),
        },
        request = stop.wait_for(Option::is_some) => request.map(|r| r.unwrap_or(StopRequest::Terminate)),
        () = timeout => {
            warn!(pid, "the process ran out of time; stopping it");
            timed_out = true;
            Ok(StopRequest::Terminate)
        }
    };
    let Ok(request) = requested else {
        // The core is gone: the agent is exiting and leaves the command
        // running on purpose (see agent.rs); just wait for it.
        return match child.wait().await {
            Ok(status) => Ended::Exited(status),
            Err(error) => Ended::NotStarted(format!("waiting for the process failed: {error}")),
        };
    };
    let mut status = None;
    signal_group_until_gone(pid, request, grace, stop, || {
        if status.is_none() {
            status = child.try_wait().ok().flatten();
        }
        status.is_some()
    })
    .await;
    match (status, deadline) {
        (_, Some((_, after))) if timed_out => Ended::TimedOut(after),
        (Some(status), _) => Ended::Stopped(status),
        (None, _) => Ended::NotStarted("Stopped by user".into()),
    }
}

/// In the child, before exec: nice 19 and the idle IO class, so that the
/// dry-run evaluation never makes a small host unresponsive. Best effort:
/// failing leaves the normal priority.
fn lower_priority() {
    // IOPRIO_WHO_PROCESS, this process, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT.
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_IDLE: libc::c_long = 3 << 13;
    // SAFETY: both are plain syscalls on the calling process, which is
    // async-signal-safe (pre_exec runs between fork and exec).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, IOPRIO_IDLE);
    }
}

/// Whether `nix build --dry-run --json` says the toplevel's output is the
/// running system: the `outputs` of its JSON, else (another shape) any
/// mention of the path.
fn dry_run_builds(stdout: &str, current: &str) -> bool {
    match serde_json::from_str::<serde_json::Value>(stdout.trim()) {
        Ok(serde_json::Value::Array(items)) => items.iter().any(|item| {
            item.get("outputs")
                .and_then(serde_json::Value::as_object)
                .is_some_and(|outputs| outputs.values().any(|v| v.as_str() == Some(current)))
        }),
        _ => stdout.contains(current),
    }
}

/// Whether `flake.lock`'s root node has an input with this name.
fn flake_has_input(repo_dir: &Path, input: &str) -> bool {
    let Ok(text) = std::fs::read(repo_dir.join("flake.lock")) else {
        return false;
    };
    let Ok(lock) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return false;
    };
    let root = lock.get("root").and_then(|r| r.as_str()).unwrap_or("root");
    lock.pointer(&format!("/nodes/{root}/inputs/{input}"))
        .is_some()
}

fn check_word(status: CheckStatus) -> &'static str {
    match status {
        CheckStatus::Ok => "ok",
        CheckStatus::Outdated => "outdated",
        CheckStatus::Error => "error",
        CheckStatus::Unknown => "unknown",
        CheckStatus::Working => "working",
    }
}

/// Stops the process group led by `pid`: the requested signal now, SIGKILL
/// once `grace` has passed (or at once when a later request says so), until
/// the leader is gone (`leader_gone`, which may also reap it) and no member
/// of the group is left. No process of the group survives a stop.
pub async fn signal_group_until_gone(
    pid: u32,
    request: StopRequest,
    grace: Duration,
    stop: &mut watch::Receiver<Option<StopRequest>>,
    mut leader_gone: impl FnMut() -> bool,
) {
    use rustix::process::{Signal, kill_process_group, test_kill_process_group};
    let Some(group) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    let deadline = tokio::time::Instant::now() + grace;
    let mut signal = match request {
        StopRequest::Terminate => Signal::TERM,
        StopRequest::Kill => Signal::KILL,
    };
    info!(pid, ?request, "stopping the command's process group");
    let _ = kill_process_group(group, signal);
    loop {
        if leader_gone() && test_kill_process_group(group).is_err() {
            return;
        }
        let kill_now = *stop.borrow_and_update() == Some(StopRequest::Kill);
        if signal != Signal::KILL && (kill_now || tokio::time::Instant::now() >= deadline) {
            if !kill_now {
                warn!(
                    pid,
                    "the command did not stop within the grace period; killing it"
                );
            }
            signal = Signal::KILL;
            let _ = kill_process_group(group, signal);
        }
        tokio::select! {
            _ = tokio::time::sleep(GROUP_POLL) => {}
            Ok(_) = stop.changed() => {}
        }
    }
}

/// A line as sent: lossy UTF-8, one trailing `\r` removed, cut lines marked.
pub fn line_text(raw: &[u8], cut: bool) -> String {
    let mut bytes = raw;
    if cut {
        // Do not split a UTF-8 sequence at the cut.
        if let Err(e) = std::str::from_utf8(bytes)
            && e.error_len().is_none()
        {
            bytes = &bytes[..e.valid_up_to()];
        }
    } else if let Some(stripped) = bytes.strip_suffix(b"\r") {
        bytes = stripped;
    }
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if cut {
        text.push_str(TRUNCATED_MARK);
    }
    text
}

fn exit_code_of(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "ended abnormally".to_owned(),
    }
}

/// Why a test script must not run (as root) if it must not: it, and every
/// directory from it up to `repo_dir`, must resolve inside `repo_dir` (no
/// symlink out), be owned by root or the agent's user, and be writable by
/// no one else. Otherwise whoever could write there would choose what runs.
fn untrusted_script(repo_dir: &Path, script: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let repo = match std::fs::canonicalize(repo_dir) {
        Ok(repo) => repo,
        Err(e) => return Some(format!("cannot resolve repo_dir: {e}")),
    };
    let real = match std::fs::canonicalize(script) {
        Ok(real) => real,
        Err(e) => return Some(format!("cannot resolve it: {e}")),
    };
    if !real.starts_with(&repo) || real == repo {
        return Some(format!(
            "it resolves to {}, outside {}",
            real.display(),
            repo.display()
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    for path in real.ancestors().take_while(|p| p.starts_with(&repo)) {
        let metadata = match std::fs::symlink_metadata(path) {
            Ok(metadata) => metadata,
            Err(e) => return Some(format!("cannot inspect {}: {e}", path.display())),
        };
        if metadata.uid() != 0 && metadata.uid() != me {
            return Some(format!(
                "{} is owned by uid {}, not by root or the agent",
                path.display(),
                metadata.uid()
            ));
        }
        if metadata.mode() & 0o022 != 0 {
            return Some(format!(
                "{} is writable by group or others (mode {:04o})",
                path.display(),
                metadata.mode() & 0o7777
            ));
        }
    }
    None
}

fn find_test_scripts(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut scripts: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.as_encoded_bytes();
            name.starts_with(b"T") && name.ends_with(b".sh")
        })
        .filter(|entry| {
            std::fs::metadata(entry.path())
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .map(|entry| entry.path())
        .collect();
    scripts.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    scripts
}

/// Variables a child may inherit from the agent. Everything else, notably
/// every `NIXFLEET_*` variable and the token, stays with the agent.
const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LOCALE_ARCHIVE",
    "TZ",
    "TZDIR",
    "SSL_CERT_FILE",
    "NIX_SSL_CERT_FILE",
    "NIX_PATH",
    "NIX_REMOTE",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
];

/// The environment every command runs with.
pub fn child_environment(
    agent_env: impl Iterator<Item = (OsString, OsString)>,
    ssh_key: Option<&Path>,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = agent_env
        .filter(|(key, _)| key.to_str().is_some_and(|k| INHERITED_ENV.contains(&k)))
        .collect();
    let mut set_default = |key: &str, value: &str| {
        if !env.iter().any(|(k, _)| k == key) {
            env.push((key.into(), value.into()));
        }
    };
    set_default(
        "PATH",
        "/run/current-system/sw/bin:/usr/local/bin:/usr/bin:/bin",
    );
    set_default("HOME", "/root");
    set_default("LANG", "C.UTF-8");
    env.push(("GIT_TERMINAL_PROMPT".into(), "0".into()));
    if let Some(key) = ssh_key {
        env.push(("GIT_SSH_COMMAND".into(), git_ssh_command(key).into()));
    }
    env
}

/// git runs `GIT_SSH_COMMAND` through a shell, so the key path is quoted.
/// `accept-new` trusts a host on first contact but refuses changed keys;
/// `no` would accept any key and is never used.
fn git_ssh_command(key: &Path) -> String {
    let quoted = key.to_string_lossy().replace('\'', r"'\''");
    format!("ssh -i '{quoted}' -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new")
}

/// The full output of one command in `state_dir/logs`, before any dropping.
struct CommandLog {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    failed: bool,
}

impl CommandLog {
    /// Opens a new log and prunes old ones; on failure the command runs
    /// without a log (a full disk must not stop a rollback).
    fn create(state_dir: &Path, command: &str) -> Option<CommandLog> {
        let dir = state_dir.join("logs");
        let result = std::fs::create_dir_all(&dir).and_then(|()| {
            let stamp = humantime::format_rfc3339_millis(SystemTime::now())
                .to_string()
                .replace([':', '-'], "");
            let path = dir.join(format!("{stamp}-{command}.log"));
            let file = std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&path)?;
            Ok((file, path))
        });
        match result {
            Ok((file, path)) => {
                prune_logs(&dir, KEPT_LOGS);
                Some(CommandLog {
                    file: std::io::BufWriter::with_capacity(64 * 1024, file),
                    path,
                    failed: false,
                })
            }
            Err(error) => {
                warn!(command, error = %error, dir = %dir.display(), "cannot write the command log");
                None
            }
        }
    }

    fn write_line(&mut self, text: &str) {
        if self.failed {
            return;
        }
        let result = self
            .file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.write_all(b"\n"));
        if let Err(error) = result {
            warn!(error = %error, path = %self.path.display(), "writing the command log failed; the rest of this command is not logged");
            self.failed = true;
        }
    }
}

impl Drop for CommandLog {
    fn drop(&mut self) {
        let _ = self.file.flush();
    }
}

/// Keeps the newest `keep` logs. Names start with a UTC timestamp, so name
/// order is age order.
fn prune_logs(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    if logs.len() <= keep {
        return;
    }
    logs.sort();
    for old in &logs[..logs.len() - keep] {
        let _ = std::fs::remove_file(old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dry_run_verdicts() {
        let json =
            r#"[{"drvPath":"/nix/store/d.drv","outputs":{"out":"/nix/store/abc-nixos-system"}}]"#;
        assert!(dry_run_builds(json, "/nix/store/abc-nixos-system"));
        assert!(!dry_run_builds(json, "/nix/store/xyz-nixos-system"));
        assert!(!dry_run_builds("[]", "/nix/store/abc"));
        assert!(dry_run_builds("not json /nix/store/abc", "/nix/store/abc"));
    }

    #[test]
    fn flake_inputs_are_read_from_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!flake_has_input(dir.path(), "nixfleet"));
        std::fs::write(
            dir.path().join("flake.lock"),
            r#"{"nodes":{"root":{"inputs":{"nixfleet":"nixfleet","nixpkgs":"nixpkgs"}}},"root":"root","version":7}"#,
        )
        .unwrap();
        assert!(flake_has_input(dir.path(), "nixfleet"));
        assert!(!flake_has_input(dir.path(), "other"));
        std::fs::write(dir.path().join("flake.lock"), "{broken").unwrap();
        assert!(!flake_has_input(dir.path(), "nixfleet"));
    }

    #[test]
    fn error_detail_prefers_git_errors_over_hints() {
        let detail = |lines: &[&str]| {
            let mut d = ErrorDetail::default();
            lines.iter().for_each(|l| d.note(l));
            d.get().map(str::to_owned)
        };
        // `git pull` with no upstream: no fatal line, the lead sentence.
        assert_eq!(
            detail(&[
                "There is no tracking information for the current branch.",
                "Please specify which branch you want to merge with.",
                "",
                "    git branch --set-upstream-to=<remote>/<branch> main",
            ])
            .as_deref(),
            Some("There is no tracking information for the current branch.")
        );
        assert_eq!(
            detail(&[
                "Cloning into 'repo'...",
                "fatal: repository '/x' does not exist",
                "hint: try again",
            ])
            .as_deref(),
            Some("fatal: repository '/x' does not exist")
        );
        assert_eq!(
            detail(&["error: one", "error: two", "hint: h"]).as_deref(),
            Some("error: two")
        );
        assert_eq!(detail(&["", "  "]), None);
    }

    #[test]
    fn the_table_is_closed() {
        for kind in CommandKind::ALL {
            assert_eq!(CommandKind::parse(kind.name()), Some(kind));
        }
        for name in [
            "stop",
            "kill",
            "restart",
            "reboot",
            "check-version",
            "",
            "switch ",
            "SWITCH",
            "rm -rf /",
            "switch; reboot",
        ] {
            assert_eq!(CommandKind::parse(name), None, "{name:?}");
        }
    }

    #[test]
    fn build_progress_reports_only_changes_and_never_goes_backwards() {
        let mut progress = BuildProgress::new();
        let feed = |p: &mut BuildProgress, line: &str| {
            p.log.feed(line, &mut |_| {});
        };
        let step = |report: Option<OperationProgress>| {
            report.map(|r| {
                let s = r.progress.system.unwrap();
                (s.current, s.total, s.status)
            })
        };
        feed(
            &mut progress,
            r#"@nix {"action":"start","id":1,"type":104}"#,
        );
        feed(
            &mut progress,
            r#"@nix {"action":"result","id":1,"type":105,"fields":[1,5,1,0]}"#,
        );
        assert_eq!(
            step(progress.report(PhaseStatus::InProgress)),
            Some((1, 5, PhaseStatus::InProgress))
        );
        assert_eq!(
            step(progress.report(PhaseStatus::InProgress)),
            None,
            "no change, no report"
        );
        // Nix lowers what it expects: the dots stay where they were.
        feed(
            &mut progress,
            r#"@nix {"action":"result","id":1,"type":105,"fields":[2,3,1,0]}"#,
        );
        assert_eq!(
            step(progress.report(PhaseStatus::InProgress)),
            Some((2, 5, PhaseStatus::InProgress))
        );
        // Success fills the dots; a failure keeps what was done.
        let mut failed = BuildProgress::new();
        feed(&mut failed, r#"@nix {"action":"start","id":1,"type":104}"#);
        feed(
            &mut failed,
            r#"@nix {"action":"result","id":1,"type":105,"fields":[2,5,0,1]}"#,
        );
        assert_eq!(
            step(failed.report(PhaseStatus::Error)),
            Some((2, 5, PhaseStatus::Error))
        );
        assert_eq!(
            step(progress.report(PhaseStatus::Complete)),
            Some((5, 5, PhaseStatus::Complete))
        );
    }

    #[test]
    fn line_text_strips_cr_replaces_bad_utf8_and_marks_cuts() {
        assert_eq!(line_text(b"hello\r", false), "hello");
        assert_eq!(line_text(b"a\rb", false), "a\rb");
        assert_eq!(line_text(b"bad \xff byte", false), "bad \u{fffd} byte");
        // A cut inside "é" (0xC3 0xA9) drops the half character.
        assert_eq!(line_text(b"ab\xc3", true), format!("ab{TRUNCATED_MARK}"));
    }

    #[test]
    fn child_environment_is_a_whitelist() {
        let agent_env = [
            ("PATH", "/bin"),
            ("NIXFLEET_TOKEN", "secret"),
            ("NIXFLEET_URL", "ws://x"),
            ("CREDENTIALS_DIRECTORY", "/run/credentials/x"),
            ("LANG", "de_DE.UTF-8"),
            ("RANDOM_THING", "1"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = child_environment(agent_env.into_iter(), Some(Path::new("/keys/it's")));
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.to_str().unwrap())
        };
        assert_eq!(get("PATH"), Some("/bin"));
        assert_eq!(get("LANG"), Some("de_DE.UTF-8"));
        assert_eq!(get("HOME"), Some("/root"));
        assert_eq!(get("NIXFLEET_TOKEN"), None);
        assert_eq!(get("NIXFLEET_URL"), None);
        assert_eq!(get("CREDENTIALS_DIRECTORY"), None);
        assert_eq!(get("RANDOM_THING"), None);
        assert_eq!(
            get("GIT_SSH_COMMAND"),
            Some(
                r"ssh -i '/keys/it'\''s' -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new"
            )
        );
    }

    #[test]
    fn test_scripts_are_executable_t_star_sh_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        make("T10-late.sh", 0o755);
        make("T02-early.sh", 0o755);
        make("T03-not-executable.sh", 0o644);
        make("X01-other.sh", 0o755);
        make("T04.txt", 0o755);
        std::fs::create_dir(dir.path().join("T05-dir.sh")).unwrap();
        let names: Vec<_> = find_test_scripts(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["T02-early.sh", "T10-late.sh"]);
        assert!(find_test_scripts(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn logs_are_pruned_to_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..7 {
            std::fs::write(dir.path().join(format!("2026010{i}T000000Z-pull.log")), "").unwrap();
        }
        prune_logs(dir.path(), 3);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "20260104T000000Z-pull.log",
                "20260105T000000Z-pull.log",
                "20260106T000000Z-pull.log"
            ]
        );
    }
}
