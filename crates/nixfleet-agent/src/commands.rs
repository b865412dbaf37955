//! The commands the dashboard may ask for, and how they run.
//!
//! A command is a name from a fixed table; nothing the dashboard sends ever
//! becomes an argument or reaches a shell. Programs come from `PATH`.
//!
//! A command that changes something is planned here (its steps, decided
//! before any runs, and the agent's notes about them) and run by its
//! supervisor (supervisor.rs), which writes everything into the command
//! log; the follower (follower.rs) turns that log into frames and the
//! status. So the command never waits for the agent or the dashboard, and
//! it survives the agent.
//!
//! The read-only checks (`refresh-*`) run here, in the agent: each process
//! in its own session (so its own process group), with stdin from
//! /dev/null and a small whitelisted environment (the agent's own secrets,
//! `NIXFLEET_*` and the token, never reach a child, supervised or not).
//! Their output is read from both pipes, written to the check's log file
//! and queued in the outbox up to [`CHECK_QUEUE_BYTES`].

use crate::command_log::{self, Plan, Step};
use crate::config::Config;
use crate::follower::{Followed, follow};
use crate::handover::{self, CommandRecord};
use crate::heartbeat::{generation, head_commit, resolve_ref};
use crate::outbox::{DeliveryCursor, Outbox};
use crate::protocol::{CheckStatus, Outcome, Status, Stream};
use crate::redact::{Scrubber, redact_url};
use crate::status::{ChildEnv, Compartment, LockAnswer, current_system, git_check};
use crate::supervisor::{SUPERVISE_ARG, describe_exit, exit_code_of};
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use crate::command_log::MAX_LINE_BYTES;
pub const TRUNCATED_MARK: &str = " …[truncated]";
/// The last line of every command log starts with this, then the exit
/// code: a restarted agent reads it back (see handover.rs).
pub const EXIT_CODE_LOG_PREFIX: &str = "[nixfleet] exit code ";
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
/// Most output frames queued in memory for a read-only check (`refresh-*`,
/// run from the agent, not from the supervisor's disk-backed log): their
/// output is a few lines, so this bound is only ever reached by a broken
/// Nix or git printing without end; past it lines are counted, and the
/// check's own log under `state_dir` still has every one.
const CHECK_QUEUE_BYTES: usize = 1024 * 1024;
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
    /// output that survives an agent restart): every command that changes
    /// something. The read-only checks (`refresh-*`) run from the agent:
    /// they compute a verdict from what they read, their output is a few
    /// lines, and a check cut short by a restart is simply asked again.
    pub fn supervised(self) -> bool {
        !matches!(
            self,
            CommandKind::RefreshGit
                | CommandKind::RefreshLock
                | CommandKind::RefreshSystem
                | CommandKind::RefreshAll
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
                log: Mutex::new(CommandLog::create(&self.config, kind.name())),
                error_detail: Mutex::new(ErrorDetail::default()),
                captured: Mutex::new(None),
                dropped: Mutex::new(0),
                scrubber: &self.scrubber,
            },
            progress,
            stop,
        };
        let (outcome, message, exit_code) = match kind {
            CommandKind::RefreshGit => job.refresh_git().await,
            CommandKind::RefreshLock => job.refresh_lock().await,
            CommandKind::RefreshSystem => job.refresh_system().await,
            CommandKind::RefreshAll => job.refresh_all().await,
            // Dispatched to run_supervised above.
            other => (
                Outcome::Error,
                format!("{} runs under the supervisor", other.name()),
                1,
            ),
        };
        let dropped = *job.output.dropped.lock().unwrap_or_else(|e| e.into_inner());
        if dropped > 0 {
            let notice = format!(
                "[nixfleet] {dropped} lines not sent (the dashboard read too slowly); the command log has them"
            );
            self.outbox.push_frame(crate::follower::output_frame(
                kind.name(),
                Stream::Stderr,
                &notice,
            ));
        }
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
        let (steps, notes) = match self.plan(kind).await {
            Ok(planned) => planned,
            Err(message) => return failed(message, 1),
        };
        let launched = match self.launch(kind, steps, notes).await {
            Ok(launched) => launched,
            Err(error) => return failed(format!("cannot start the command: {error}"), -1),
        };
        let _ = progress.send(Progress::Launched(launched.record)).await;
        follow(launched.followed, &self.outbox, progress, stop).await
    }

    /// The processes a command runs, decided before any of them starts,
    /// and the agent's notes about them.
    async fn plan(&self, kind: CommandKind) -> Result<(Vec<Step>, Vec<String>), String> {
        let mut notes = Vec::new();
        let steps = match kind {
            CommandKind::Pull => self.pull_steps(&mut notes).await?,
            CommandKind::PullSwitch => {
                let mut steps = self.pull_steps(&mut notes).await?;
                steps.push(self.rebuild(&["switch"], true));
                steps
            }
            CommandKind::Switch => vec![self.rebuild(&["switch"], true)],
            CommandKind::Boot => vec![self.rebuild(&["boot"], true)],
            CommandKind::Rollback => vec![self.rebuild(&["switch", "--rollback"], false)],
            CommandKind::Test => self.test_steps(),
            CommandKind::Update => vec![self.flake_update(None)],
            CommandKind::BumpFlake => vec![self.flake_update(Some("nixfleet"))],
            // Pull, bump the `nixfleet` input when the flake has one, then
            // switch with the negative narinfo cache off, so that a freshly
            // pushed agent is fetched or built rather than assumed missing.
            // Whether the input exists is read from the lock as it is now,
            // before the pull: an input added by this very pull is bumped
            // by the next force-update.
            CommandKind::ForceUpdate | CommandKind::ForceRebuild => {
                let mut steps = self.pull_steps(&mut notes).await?;
                if flake_has_input(&self.config.repo_dir, "nixfleet") {
                    steps.push(self.flake_update(Some("nixfleet")));
                } else {
                    notes.push(
                        "[nixfleet] the flake has no input named nixfleet; not bumping it"
                            .to_owned(),
                    );
                }
                steps.push(self.rebuild(
                    &["switch", "--option", "narinfo-cache-negative-ttl", "0"],
                    true,
                ));
                steps
            }
            CommandKind::RefreshGit
            | CommandKind::RefreshLock
            | CommandKind::RefreshSystem
            | CommandKind::RefreshAll => {
                return Err(format!("{} does not run under the supervisor", kind.name()));
            }
        };
        Ok((steps, notes))
    }

    /// The git steps of a pull. In isolated mode (`repo_url` set): a clone
    /// when there is no repository yet, else `origin` pointed at
    /// `repo_url` if it differs, an explicit-refspec fetch, a forced
    /// checkout of the branch at origin's commit, and a clean.
    async fn pull_steps(&self, notes: &mut Vec<String>) -> Result<Vec<Step>, String> {
        let config = &self.config;
        let repo = config.repo_dir.as_path();
        let git = |label: &str, cwd: &Path, args: &[&str]| Step {
            label: label.to_owned(),
            program: "git".to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            cwd: cwd.to_owned(),
            stop_on_failure: true,
            trusted_within: None,
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
        let mut steps = Vec::new();
        // `origin` must be repo_url, whatever it was before: a host moving
        // away from a compromised repository must not keep pulling from it.
        match self
            .git_query(repo, &["config", "--get", "remote.origin.url"])
            .await
        {
            Some(current) if current == url => {}
            Some(current) => {
                notes.push(format!(
                    "[nixfleet] origin is {}, but repo_url is {}: pointing origin at repo_url",
                    redact_url(&current),
                    redact_url(url)
                ));
                steps.push(git(
                    "git remote set-url",
                    repo,
                    &["remote", "set-url", "origin", url],
                ));
            }
            None => {
                notes.push(format!(
                    "[nixfleet] the repository has no origin: adding repo_url {}",
                    redact_url(url)
                ));
                steps.push(git(
                    "git remote add",
                    repo,
                    &["remote", "add", "origin", url],
                ));
            }
        }
        let branch = config.branch.as_str();
        let remote_branch = format!("refs/remotes/origin/{branch}");
        // An explicit refspec: a clone made for another branch (or with
        // --single-branch) would not update origin/<branch> otherwise.
        let refspec = format!("+refs/heads/{branch}:{remote_branch}");
        if let Some(previous) = self
            .git_query(repo, &["symbolic-ref", "--short", "-q", "HEAD"])
            .await
            .filter(|previous| previous != branch)
        {
            notes.push(format!(
                "[nixfleet] branch changed from {previous} to {branch}: checking out {branch}"
            ));
        }
        steps.extend([
            git("git fetch", repo, &["fetch", "origin", &refspec]),
            git(
                "git checkout",
                repo,
                &["checkout", "--force", "-B", branch, &remote_branch, "--"],
            ),
            git("git clean", repo, &["clean", "-fd"]),
        ]);
        Ok(steps)
    }

    /// The trimmed stdout of a quick git query, not shown anywhere; `None`
    /// when git fails or prints nothing.
    async fn git_query(&self, repo: &Path, args: &[&str]) -> Option<String> {
        let output = tokio::process::Command::new("git")
            .args(args)
            .current_dir(repo)
            .env_clear()
            .envs(self.child_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        (output.status.success() && !text.is_empty()).then_some(text)
    }

    /// `nix flake update [input]` (the lock compartment's step).
    fn flake_update(&self, input: Option<&str>) -> Step {
        let mut args: Vec<String> = NIX_FEATURES.map(str::to_owned).to_vec();
        args.extend(["flake".to_owned(), "update".to_owned()]);
        args.extend(input.map(str::to_owned));
        Step {
            label: match input {
                Some(input) => format!("nix flake update {input}"),
                None => "nix flake update".to_owned(),
            },
            program: "nix".to_owned(),
            args,
            cwd: self.working_dir(),
            stop_on_failure: true,
            trusted_within: None,
        }
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
            trusted_within: None,
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
                trusted_within: Some(self.config.repo_dir.clone()),
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
    async fn launch(
        &self,
        kind: CommandKind,
        steps: Vec<Step>,
        notes: Vec<String>,
    ) -> std::io::Result<Launched> {
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
            scrub_url: self.config.repo_url.clone(),
            notes,
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
    /// Lines not queued because the outbox was over [`CHECK_QUEUE_BYTES`].
    dropped: Mutex<u64>,
}

/// Picks the line of a failed process's stderr that a status message
/// quotes. git (and nix) prefix the actual error with `fatal:` or `error:`
/// and follow it with hints, so the last such line wins; without one, the
/// first line (the lead sentence: hints come after it).
#[derive(Debug, Default)]
pub(crate) struct ErrorDetail {
    first: String,
    error: String,
}

impl ErrorDetail {
    pub(crate) fn note(&mut self, line: &str) {
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

    pub(crate) fn get(&self) -> Option<&str> {
        [&self.error, &self.first]
            .into_iter()
            .find(|s| !s.is_empty())
            .map(String::as_str)
    }
}

impl Job<'_> {
    fn config(&self) -> &Config {
        &self.runner.config
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

    /// A line of the agent's own on stdout, e.g. the result of a check.
    /// A line of the agent's own (a check's verdict): a few per check, so
    /// never held to the queue bound that a child's flood is.
    fn note(&self, text: &str) {
        self.output.log_line(text);
        self.outbox().push_frame(crate::follower::output_frame(
            self.command,
            Stream::Stdout,
            text,
        ));
    }

    fn outbox(&self) -> &Outbox {
        &self.runner.outbox
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
                tokio::join!(
                    output.pump(stdout, Stream::Stdout),
                    output.pump(stderr, Stream::Stderr)
                );
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
        self.send_line(stream, &text);
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
        if self.outbox.queued_bytes() < CHECK_QUEUE_BYTES {
            self.outbox
                .push_frame(crate::follower::output_frame(self.command, stream, text));
        } else {
            *self.dropped.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        }
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

/// The output of a check run from the agent, in `state_dir/logs` beside the
/// supervised commands' logs: created, made private and pruned by the same
/// code (command_log.rs), written a line at a time (so it survives the
/// agent), and capped like them.
struct CommandLog {
    file: std::io::LineWriter<std::fs::File>,
    path: PathBuf,
    room: u64,
    failed: bool,
}

impl CommandLog {
    /// On failure the check runs without a log (a full disk must not stop
    /// it).
    fn create(config: &Config, command: &str) -> Option<CommandLog> {
        let result = command_log::create(
            &config.state_dir,
            command,
            config.log_max_bytes,
            config.logs_max_bytes,
        )
        .and_then(|path| {
            let file = command_log::private_file(&path, std::fs::OpenOptions::new().append(true))?;
            Ok((file, path))
        });
        match result {
            Ok((file, path)) => Some(CommandLog {
                file: std::io::LineWriter::new(file),
                path,
                room: config.log_max_bytes,
                failed: false,
            }),
            Err(error) => {
                warn!(command, error = %error, "cannot write the command log");
                None
            }
        }
    }

    fn write_line(&mut self, text: &str) {
        if self.failed {
            return;
        }
        let needed = text.len() as u64 + 1;
        if needed > self.room {
            // Past log_max_bytes, as a supervised command's log: the rest
            // is not kept.
            self.failed = true;
            return;
        }
        self.room -= needed;
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
}
