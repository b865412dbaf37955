//! The real agent binary, started as a process with its own directory,
//! config, token file and stand-in directory first on its PATH.

use super::TOKEN;
use super::host::{script, set_mode};
use super::host_tools::proc_status_kib;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::time::Instant;

/// Options for starting the agent.
#[derive(Clone)]
pub struct AgentOptions {
    pub url: String,
    pub interval: u64,
    pub ping_interval: u64,
    pub ping_timeout: u64,
    pub backoff_max: u64,
    pub stop_grace: u64,
    pub metrics: &'static str,
    pub hostname: String,
    /// Extra `key = value` TOML lines.
    pub extra_toml: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Put the token in the environment instead of a token file.
    pub token_in_env: bool,
    /// The agent's umask (None: the test's).
    pub umask: Option<u32>,
}

impl AgentOptions {
    pub fn new(url: String) -> Self {
        AgentOptions {
            url,
            interval: 1,
            ping_interval: 1,
            ping_timeout: 3,
            backoff_max: 2,
            stop_grace: 1,
            metrics: "none",
            hostname: "test-host".into(),
            extra_toml: Vec::new(),
            env: Vec::new(),
            token_in_env: false,
            umask: None,
        }
    }

    /// Isolated mode: the agent follows branch `main` of `upstream`, a
    /// local repository (start it with [`Agent::prepare_to_clone`]).
    pub fn follow(&mut self, upstream: &Path) {
        let url = upstream.display().to_string();
        self.extra_toml.push(format!("repo_url = {url:?}"));
        self.extra_toml.push("branch = \"main\"".into());
    }
}

/// The real agent binary, running. Killed when dropped.
pub struct Agent {
    pub child: tokio::process::Child,
    pub dir: tempfile::TempDir,
    pub repo_dir: PathBuf,
    pub state_dir: PathBuf,
    pub bin_dir: PathBuf,
    stderr_path: PathBuf,
    /// Whether dropping the agent also ends its running command (see Drop).
    end_command_on_drop: bool,
}

impl Agent {
    /// A working directory with a config and an (empty) stand-in directory
    /// put first on PATH; the agent is started by [`Agent::spawn`].
    pub fn prepare(options: &AgentOptions) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir_all(&bin_dir).unwrap();
        std::fs::create_dir_all(dir.path().join("repo")).unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
        set_mode(&dir.path().join("token"), 0o600);
        let _ = options;
        (dir, bin_dir)
    }

    /// [`Agent::prepare`] for an agent in isolated mode: no `repo_dir` yet,
    /// so that its first pull clones.
    pub fn prepare_to_clone(options: &AgentOptions) -> (tempfile::TempDir, PathBuf) {
        let (dir, bin_dir) = Agent::prepare(options);
        std::fs::remove_dir(dir.path().join("repo")).unwrap();
        (dir, bin_dir)
    }

    pub async fn start(options: AgentOptions) -> Agent {
        let (dir, _) = Agent::prepare(&options);
        Agent::spawn(dir, options).await
    }

    pub async fn spawn(dir: tempfile::TempDir, options: AgentOptions) -> Agent {
        let repo_dir = dir.path().join("repo");
        let state_dir = dir.path().join("state");
        let bin_dir = dir.path().join("bin");
        let config = write_config(dir.path(), &options);
        let stderr_path = dir.path().join("agent.stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"));
        command
            .arg("--config")
            .arg(&config)
            .env_clear()
            .env("PATH", path)
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        if options.token_in_env {
            command.env("NIXFLEET_TOKEN", TOKEN);
        }
        for (k, v) in &options.env {
            command.env(k, v);
        }
        if let Some(mask) = options.umask {
            let mask = rustix::fs::Mode::from_raw_mode(mask);
            // SAFETY: umask is async-signal-safe and touches no memory.
            unsafe {
                command.pre_exec(move || {
                    rustix::process::umask(mask);
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("agent binary starts");
        Agent {
            child,
            dir,
            repo_dir,
            state_dir,
            bin_dir,
            stderr_path,
            end_command_on_drop: true,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("agent is running")
    }

    pub fn signal(&self, signal: i32) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        let signal = rustix::process::Signal::from_named_raw(signal).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Waits for exit (with a deadline) and returns the exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.unwrap().code(),
            Err(_) => panic!(
                "agent did not exit within {timeout:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// SIGKILLs the agent (a crash) and hands back its directory, so that a
    /// new agent can start on the same state.
    pub async fn crash(mut self) -> tempfile::TempDir {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
        // The command goes on, for the next agent to adopt.
        self.end_command_on_drop = false;
        let placeholder = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, placeholder)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Resident set size in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    pub fn hwm_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }
}

impl Agent {
    /// Open file descriptors of the agent process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// What each open descriptor of the agent points at (`socket:[…]`,
    /// `anon_inode:[timerfd]`, a path), for failure messages.
    pub fn fd_targets(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return Vec::new();
        };
        let mut targets: Vec<String> = dir
            .flatten()
            .map(|entry| {
                let target = std::fs::read_link(entry.path())
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "?".into());
                format!("{}→{target}", entry.file_name().to_string_lossy())
            })
            .collect();
        targets.sort();
        targets
    }

    /// Threads of the agent process.
    pub fn thread_count(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (polling the log, with a deadline) until stderr contains
    /// `needle`; returns the whole log.
    pub async fn wait_stderr(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let stderr = self.stderr();
            if stderr.contains(needle) {
                return stderr;
            }
            assert!(
                Instant::now() < deadline,
                "agent stderr lacks {needle:?} after {timeout:?}:\n{stderr}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Writes `agent.toml` in `dir` (the agent's directory) from `options`;
/// returns its path.
fn write_config(dir: &Path, options: &AgentOptions) -> PathBuf {
    let mut toml = format!(
        "url = {url:?}\nrepo_dir = {repo:?}\nstate_dir = {state:?}\nhostname = {host:?}\n\
         interval = {i}\nping_interval = {pi}\nping_timeout = {pt}\nbackoff_max = {bm}\n\
         stop_grace = {sg}\nmetrics = {m:?}\nlog_level = \"debug\"\n",
        url = options.url,
        repo = dir.join("repo").display().to_string(),
        state = dir.join("state").display().to_string(),
        host = options.hostname,
        i = options.interval,
        pi = options.ping_interval,
        pt = options.ping_timeout,
        bm = options.backoff_max,
        sg = options.stop_grace,
        m = options.metrics,
    );
    if !options.token_in_env {
        toml.push_str(&format!(
            "token_file = {:?}\n",
            dir.join("token").display().to_string()
        ));
    }
    for line in &options.extra_toml {
        toml.push_str(line);
        toml.push('\n');
    }
    let config = dir.join("agent.toml");
    std::fs::write(&config, toml).unwrap();
    config
}

/// A command's supervisor outlives the agent by design (as under systemd's
/// `KillMode=process`); a test's must not outlive the test, flooding into a
/// deleted log. So a dropped agent (not one handed on by [`Agent::crash`])
/// asks every supervisor writing into its state directory to kill its
/// command, as `kill_command` would, and waits for them briefly.
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if self.end_command_on_drop {
            end_supervisors(&self.state_dir);
        }
    }
}

pub fn end_supervisors(state_dir: &Path) {
    let logs = state_dir.join("logs");
    if supervisors_writing_into(&logs).is_empty() {
        return;
    }
    let _ = std::fs::write(state_dir.join("running-command.stop"), "KILL");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !supervisors_writing_into(&logs).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live `nixfleet-agent --supervise` processes with a file open under `dir`.
fn supervisors_writing_into(dir: &Path) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.starts_with(b"nixfleet-agent\0--supervise"))
        })
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|to| to.starts_with(dir)))
            })
        })
        .collect()
}

/// Starts the agent with a stand-in `nixos-rebuild` (running `body`)
/// first on its PATH.
pub async fn start_with_rebuild(
    url: String,
    body: &str,
    tweak: impl FnOnce(&mut AgentOptions),
) -> Agent {
    let mut options = AgentOptions::new(url);
    tweak(&mut options);
    let (dir, bin) = Agent::prepare(&options);
    script(&bin, "nixos-rebuild", body);
    Agent::spawn(dir, options).await
}
