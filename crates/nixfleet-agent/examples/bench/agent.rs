//! The agent under test: finding (or building) its binary, the work
//! directory and config it runs with, starting it, and stopping it.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

/// The heartbeat interval the benchmark configures, in seconds.
pub const INTERVAL_SECS: u64 = 1;
const TOKEN: &str = "bench-token-0123456789";

/// A running agent.
pub struct Agent {
    pub child: tokio::process::Child,
    pub pid: u32,
    stderr: PathBuf,
}

impl Agent {
    /// Fails the benchmark if the agent is gone.
    pub fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("the agent exited ({status}){}", self.tail())),
            Err(error) => Err(format!("cannot check on the agent: {error}")),
        }
    }

    /// SIGTERM, and wait (at most 10 s) for it to exit.
    pub async fn stop(&mut self) -> Result<(), String> {
        self.terminate().await.map(drop)
    }

    /// SIGTERM, and wait (at most 10 s) for its exit status.
    pub async fn terminate(&mut self) -> Result<ExitStatus, String> {
        let pid = rustix::process::Pid::from_raw(self.pid as i32).ok_or("bad pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .map_err(|e| format!("SIGTERM: {e}"))?;
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(error)) => Err(format!("waiting for the agent: {error}")),
            Err(_) => Err(format!(
                "the agent did not exit within 10 s of SIGTERM{}",
                self.tail()
            )),
        }
    }

    /// The end of its stderr, to append to an error.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("; last lines of its stderr:\n{tail}")
    }
}

/// How to start the agent.
pub struct AgentSettings<'a> {
    pub binary: &'a Path,
    /// A command to run the agent under (`BENCH_WRAP`, e.g. valgrind).
    pub wrapper: &'a [String],
    pub dir: &'a Path,
    pub url: String,
    pub metrics: &'a str,
    pub interval_secs: u64,
}

/// The agent binary: `BENCH_AGENT`, else built now by cargo with this
/// example's profile and target directory (a no-op when up to date).
pub fn locate_agent() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("BENCH_AGENT") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // <target>/<profile>/examples/bench
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot find the target directory")?;
    let target_dir = profile_dir
        .parent()
        .ok_or("cannot find the target directory")?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--quiet",
            "--bin",
            "nixfleet-agent",
            "--target-dir",
        ])
        .arg(target_dir);
    match profile {
        "debug" => {
            eprintln!(
                "bench: this is a debug build; figures are for `cargo bench-agent` (release)"
            );
        }
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    let status = build
        .status()
        .map_err(|e| format!("cannot run cargo to build the agent: {e}"))?;
    if !status.success() {
        return Err(format!("building the agent failed ({status})"));
    }
    Ok(profile_dir.join("nixfleet-agent"))
}

/// Creates what an agent needs in `dir`: `bin` (for the stand-in), `state`,
/// and a repository with a commit (HEAD and a branch ref), which every
/// heartbeat reports, as on a host.
pub fn prepare_work_dir(dir: &Path) -> Result<(), String> {
    for sub in ["bin", "repo/.git/refs/heads", "state"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{sub}: {e}"))?;
    }
    let git = dir.join("repo/.git");
    std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n")
        .and_then(|()| {
            std::fs::write(
                git.join("refs/heads/main"),
                format!("{}\n", "5eed".repeat(10)),
            )
        })
        .map_err(|e| format!("repo: {e}"))
}

/// Writes the token and the config into `settings.dir` and starts the
/// agent with the stand-in's `bin` first on its `PATH`.
pub fn spawn_agent(settings: &AgentSettings<'_>) -> Result<Agent, String> {
    let dir = settings.dir;
    let config_path = write_config(settings)?;
    let stderr = dir.join("agent.stderr");
    let stderr_file = std::fs::File::create(&stderr).map_err(|e| format!("stderr: {e}"))?;
    let path = format!(
        "{}:{}",
        dir.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = match settings.wrapper.split_first() {
        Some((program, args)) => {
            let mut command = tokio::process::Command::new(program);
            command.args(args).arg(settings.binary);
            command
        }
        None => tokio::process::Command::new(settings.binary),
    };
    let child = command
        .arg("--config")
        .arg(&config_path)
        .env_clear()
        .env("PATH", path)
        .env("HOME", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_file)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", settings.binary.display()))?;
    let pid = child.id().ok_or("the agent exited at once")?;
    Ok(Agent { child, pid, stderr })
}

/// The token file (mode 0600) and `agent.toml`;
/// returns the config's path.
fn write_config(settings: &AgentSettings<'_>) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = settings.dir;
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).map_err(|e| format!("token: {e}"))?;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("token: {e}"))?;
    let quoted = |p: &Path| format!("{:?}", p.display().to_string());
    let config = format!(
        "url = {:?}\ntoken_file = {}\nrepo_dir = {}\nstate_dir = {}\n\
         hostname = \"bench-host\"\ninterval = {}\nmetrics = {:?}\n\
         log_level = \"info\"\n",
        settings.url,
        quoted(&token),
        quoted(&dir.join("repo")),
        quoted(&dir.join("state")),
        settings.interval_secs,
        settings.metrics,
    );
    let config_path = dir.join("agent.toml");
    std::fs::write(&config_path, config).map_err(|e| format!("config: {e}"))?;
    Ok(config_path)
}
