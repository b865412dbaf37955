//! The commands the dashboard may ask for, and how they run.
//!
//! A command is a name from a fixed table; nothing the dashboard sends ever
//! becomes an argument or reaches a shell. Programs come from `PATH`.
//!
//! Each command is a list of steps (processes) decided up front and run
//! by a supervisor process (supervisor.rs) that writes their output and
//! exit codes into the command log; the agent follows that log
//! (follower.rs). Each process runs in its own session (so its own process
//! group), with stdin from /dev/null and a small whitelisted environment:
//! the agent's own secrets (`NIXFLEET_*`, the token) never reach a child
//! or the supervisor.

use crate::command_log::{self, Plan, Step};
use crate::config::Config;
use crate::follower::{Followed, follow};
use crate::handover::{self, CommandRecord};
use crate::heartbeat::generation;
use crate::outbox::{DeliveryCursor, Outbox};
use crate::protocol::{Outcome, Status};
use crate::supervisor::SUPERVISE_ARG;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use crate::command_log::MAX_LINE_BYTES;
pub const TRUNCATED_MARK: &str = " …[truncated]";
/// The last line of a command log written by agents before 0.2 (no
/// supervisor) starts with this, then the exit code; a newer agent that
/// takes over such a command reads it back (see handover.rs).
pub const EXIT_CODE_LOG_PREFIX: &str = "[nixfleet] exit code ";
/// How often a stop checks whether the process group is gone.
const GROUP_POLL: Duration = Duration::from_millis(50);
/// `nixos-rebuild` flags for Nix's structured log, which the agent turns
/// back into plain lines plus build progress (see nix_log.rs and
/// follower.rs). Both are common flags of nixos-rebuild (the Python
/// `nixos-rebuild-ng` and the older shell script), passed on to every `nix`
/// build it runs.
const STRUCTURED_LOG_ARGS: [&str; 3] = ["--log-format", "internal-json", "-v"];
/// Least time between two intermediate build progress reports (at most
/// four a second); the final one is never held back.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Pull,
    Switch,
    PullSwitch,
    Boot,
    Rollback,
    Test,
}

impl CommandKind {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "pull" => CommandKind::Pull,
            "switch" => CommandKind::Switch,
            "pull-switch" => CommandKind::PullSwitch,
            "boot" => CommandKind::Boot,
            "rollback" => CommandKind::Rollback,
            "test" => CommandKind::Test,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            CommandKind::Pull => "pull",
            CommandKind::Switch => "switch",
            CommandKind::PullSwitch => "pull-switch",
            CommandKind::Boot => "boot",
            CommandKind::Rollback => "rollback",
            CommandKind::Test => "test",
        }
    }

    /// Whether success may have changed the running system (and so the
    /// agent's own unit or binary).
    pub fn activates(self) -> bool {
        matches!(
            self,
            CommandKind::Switch | CommandKind::PullSwitch | CommandKind::Rollback
        )
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
    Finished(Status),
}

/// What every command needs, shared by all of them.
pub struct Runner {
    config: Arc<Config>,
    outbox: Arc<Outbox>,
    child_env: Vec<(OsString, OsString)>,
}

impl Runner {
    pub fn new(config: Arc<Config>, outbox: Arc<Outbox>) -> Self {
        let child_env = child_environment(std::env::vars_os(), config.ssh_key.as_deref());
        Runner {
            config,
            outbox,
            child_env,
        }
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
            supervisor: (pid, record.pid_start),
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

/// Stops the process group led by `pid`: the requested signal now, SIGKILL
/// once `grace` has passed (or at once when a later request says so), until
/// the leader is gone (`leader_gone`, which may also reap it) and no member
/// of the group is left. Used for commands an older agent started without
/// a supervisor.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_closed() {
        for name in ["pull", "switch", "pull-switch", "boot", "rollback", "test"] {
            assert_eq!(CommandKind::parse(name).map(CommandKind::name), Some(name));
        }
        for name in [
            "stop",
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
