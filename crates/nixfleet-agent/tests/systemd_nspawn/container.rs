//! One container: booted from the cached tree in its own cgroups, with this
//! test's copies of the binaries; commands and files inside, checks that
//! show the units' journal on failure, and a teardown that leaves nothing.

use super::tree::Env;
use super::util::{last_lines, run_bounded};
use serde_json::Value;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Inside the container: the freshly built binaries.
pub const BIN_DIR: &str = "/opt/nixfleet";
/// Inside the container: the PATH of commands run there.
pub const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Generous: the machine may be busy with other builds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Container {
    name: String,
    nspawn: Child,
    /// The container's PID 1, as the host sees it.
    pid1: u32,
    /// Our own cgroups (one per mounted hierarchy), removed on shutdown.
    pub cgroups: Vec<PathBuf>,
    console: PathBuf,
    /// Holds this container's copies of the binaries.
    _bins: tempfile::TempDir,
    down: bool,
}

#[derive(Debug)]
pub struct ShutdownReport {
    /// nspawn exited 0 after the first SIGTERM.
    pub clean: bool,
    pub took: Duration,
}

impl Container {
    /// Boots a container named after `tag` and waits until its systemd is
    /// up (`is-system-running --wait`).
    pub fn boot(env: &Env, tag: &str) -> Container {
        let name = format!("nf-{}-{tag}", std::process::id());
        let bins = private_binaries();
        let cgroups = own_cgroups(&name);
        let console =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("nspawn-{name}.console"));
        let console_file = fs::File::create(&console).expect("console log");
        let started = Instant::now();
        let nspawn = spawn_nspawn(env, &name, bins.path(), &cgroups, console_file);
        let mut container = Container {
            name,
            nspawn,
            pid1: 0,
            cgroups,
            console,
            _bins: bins,
            down: false,
        };
        match container.wait_for_boot() {
            Ok(()) => {
                eprintln!(
                    "{}: booted in {:?} (PID 1 is {} on the host)",
                    container.name,
                    started.elapsed(),
                    container.pid1
                );
                container
            }
            Err(error) => {
                let console = fs::read_to_string(&container.console).unwrap_or_default();
                let tail = last_lines(&console, 30);
                drop(container);
                panic!("the container did not boot: {error}\nconsole:\n{tail}");
            }
        }
    }

    fn wait_for_boot(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let nspawn_pid = self.nspawn.id();
        loop {
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                return Err(format!("systemd-nspawn exited: {status}"));
            }
            let init = children_of(nspawn_pid).into_iter().find(|&pid| {
                fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "systemd")
                    && Path::new(&format!("/proc/{pid}/root/run/systemd/private")).exists()
            });
            if let Some(pid) = init {
                self.pid1 = pid;
                break;
            }
            if Instant::now() > deadline {
                return Err("no systemd with a private bus in the container".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = self.exec_timeout(&["systemctl", "is-system-running", "--wait"], BOOT_TIMEOUT);
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        match state.as_str() {
            "running" => Ok(()),
            "degraded" => {
                let failed = self.exec(&["systemctl", "--failed", "--no-legend", "--plain"]);
                eprintln!(
                    "{}: degraded (harmless for these tests); failed units:\n{}",
                    self.name,
                    String::from_utf8_lossy(&failed.stdout)
                );
                Ok(())
            }
            _ => Err(format!(
                "is-system-running: {state:?} {}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    /// Runs a command inside the container (all its namespaces), with a
    /// clean environment.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_timeout(args, Duration::from_secs(60))
    }

    fn exec_timeout(&self, args: &[&str], limit: Duration) -> Output {
        self.try_exec(args, limit)
            .unwrap_or_else(|e| panic!("{}: {args:?}: {e}", self.name))
    }

    fn try_exec(&self, args: &[&str], limit: Duration) -> Result<Output, String> {
        let secs = limit.as_secs().max(1).to_string();
        let mut command = Command::new("nsenter");
        command
            .args(["--target", &self.pid1.to_string(), "--all", "--"])
            // coreutils' timeout inside: a hung command dies with the limit.
            .args(["timeout", "--kill-after=5", &secs])
            .args(args)
            .env_clear()
            .env("PATH", CONTAINER_PATH)
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0");
        run_bounded(command, limit + Duration::from_secs(10))
    }

    /// Runs a command inside; it must succeed. Returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        if !out.status.success() {
            self.fail(&format!(
                "{args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl show -p <property> --value <unit>`.
    pub fn prop(&self, unit: &str, property: &str) -> String {
        let out = self.exec(&["systemctl", "show", "-p", property, "--value", unit]);
        String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_owned()
    }

    /// The host's path to `path` in the container.
    fn host_path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid1)).join(path.trim_start_matches('/'))
    }

    pub fn mkdir(&self, path: &str) {
        fs::create_dir_all(self.host_path(path)).expect("mkdir in the container");
    }

    pub fn write(&self, path: &str, contents: &[u8], mode: u32) {
        let target = self.host_path(path);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).expect("mkdir in the container");
        }
        fs::write(&target, contents).unwrap_or_else(|e| panic!("write {path}: {e}"));
        fs::set_permissions(&target, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    pub fn read(&self, path: &str) -> Vec<u8> {
        fs::read(self.host_path(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
    }

    /// Reads a file from inside the container's namespaces (for `/proc`).
    pub fn read_in(&self, path: &str) -> Vec<u8> {
        let out = self.exec(&["cat", path]);
        assert!(
            out.status.success(),
            "cat {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `journalctl -o json` of a unit, one object per entry.
    pub fn journal_json(&self, unit: &str) -> Vec<Value> {
        let out = self.exec(&["journalctl", "--no-pager", "-o", "json", "-u", unit]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The MESSAGE of each of a unit's entries.
    pub fn journal_messages(&self, unit: &str) -> Vec<String> {
        let out = self.exec(&["journalctl", "--no-pager", "-o", "cat", "-u", unit]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The whole journal, `journalctl -o export`.
    pub fn journal_export(&self) -> Vec<u8> {
        self.exec(&["journalctl", "--no-pager", "-o", "export"])
            .stdout
    }

    /// `result`'s value, or a failure (with the units' journal) saying `what`.
    pub fn check<T>(&self, result: Result<T, String>, what: &str) -> T {
        result.unwrap_or_else(|error| self.fail(&format!("{what}: {error}")))
    }

    fn fail(&self, message: &str) -> ! {
        let journal = self.try_exec(
            &[
                "journalctl",
                "--no-pager",
                "-o",
                "short-precise",
                "-n",
                "60",
                "-u",
                "nixfleet.service",
                "-u",
                "nixfleet-mock-dashboard.service",
                "-u",
                "standin.service",
            ],
            Duration::from_secs(30),
        );
        let journal = journal.map_or_else(
            |e| e,
            |out| String::from_utf8_lossy(&out.stdout).into_owned(),
        );
        panic!(
            "{}: {message}\n--- the end of the units' journal ---\n{journal}",
            self.name,
        );
    }

    /// Halts the container (SIGTERM to nspawn; again, then SIGKILL, if it
    /// hangs), kills whatever is left in our cgroups and removes them.
    pub fn shutdown(&mut self) -> ShutdownReport {
        let started = Instant::now();
        self.down = true;
        let pid = rustix::process::Pid::from_child(&self.nspawn);
        let mut clean = false;
        for (attempt, (signal, patience)) in [
            (rustix::process::Signal::TERM, Duration::from_secs(20)),
            (rustix::process::Signal::TERM, Duration::from_secs(5)),
            (rustix::process::Signal::KILL, Duration::from_secs(5)),
        ]
        .into_iter()
        .enumerate()
        {
            let _ = rustix::process::kill_process(pid, signal);
            let deadline = Instant::now() + patience;
            let mut exited = None;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = self.nspawn.try_wait() {
                    exited = Some(status);
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Some(status) = exited {
                clean = attempt == 0 && status.success();
                break;
            }
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        remove_cgroups(&self.cgroups);
        let _ = fs::remove_file(&self.console);
        ShutdownReport {
            clean,
            took: started.elapsed(),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.down {
            return;
        }
        if std::thread::panicking() && self.pid1 != 0 {
            let journal = self.try_exec(
                &["journalctl", "--no-pager", "-o", "short-precise"],
                Duration::from_secs(30),
            );
            let saved = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("nspawn-{}.journal", self.name));
            if let Ok(journal) = journal
                && fs::write(&saved, &journal.stdout).is_ok()
            {
                eprintln!(
                    "{}: the container's journal is in {}",
                    self.name,
                    saved.display()
                );
            }
        }
        self.shutdown();
    }
}

/// The container's own cgroups, one per hierarchy, created.
fn own_cgroups(name: &str) -> Vec<PathBuf> {
    let cgroups: Vec<PathBuf> = cgroup_roots()
        .into_iter()
        .map(|root| root.join(format!("T-{name}")))
        .collect();
    for cgroup in &cgroups {
        fs::create_dir_all(cgroup)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", cgroup.display()));
    }
    cgroups
}

/// Starts `systemd-nspawn --boot` on the tree, its output into `console`.
/// The shell moves itself into our cgroups, then becomes nspawn, so
/// nspawn's own cgroups (payload/, supervisor/) land under ours.
fn spawn_nspawn(
    env: &Env,
    name: &str,
    bins: &Path,
    cgroups: &[PathBuf],
    console: fs::File,
) -> Child {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(
            "for cg in $NF_CGROUPS; do echo $$ > \"$cg/cgroup.procs\" || exit 1; done; \
             unset NF_CGROUPS; exec systemd-nspawn \"$@\"",
        )
        .arg("sh")
        .args([
            "--boot",
            "--volatile=overlay",
            "--register=no",
            "--keep-unit",
            "--console=passive",
            "--machine",
            name,
        ])
        .arg("--directory")
        .arg(&env.tree)
        .arg(format!("--bind-ro={}:{BIN_DIR}", bins.display()))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env(
            "NF_CGROUPS",
            cgroups
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(" "),
        )
        .stdin(Stdio::null())
        .stdout(console.try_clone().expect("console log"))
        .stderr(console)
        .spawn()
        .expect("cannot start systemd-nspawn")
}

/// The hierarchies to put a container's cgroups in: the named `systemd`
/// one and the `unified` one on a hybrid host, or the root of a pure
/// cgroup v2 host.
fn cgroup_roots() -> Vec<PathBuf> {
    let hybrid: Vec<PathBuf> = ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    if !hybrid.is_empty() {
        hybrid
    } else {
        vec![PathBuf::from("/sys/fs/cgroup")]
    }
}

/// Kills what is left in `cgroups` (only our container's processes can be
/// there) and removes them depth-first.
fn remove_cgroups(cgroups: &[PathBuf]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut left = Vec::new();
        for root in cgroups {
            let mut dirs = Vec::new();
            collect_dirs(root, &mut dirs);
            // Deepest first.
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for dir in dirs {
                if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                            let _ =
                                rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                        }
                    }
                }
                if fs::remove_dir(&dir).is_err() && dir.exists() {
                    left.push(dir);
                }
            }
        }
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("cannot remove cgroups: {left:?}");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
    out.push(dir.to_owned());
}

/// Processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // "pid (comm) state ppid …"; comm may hold spaces and parens.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

/// This container's own copies of the two binaries (hard links when
/// possible): a rebuild in the shared target directory during the test
/// cannot swap them underneath the running units.
fn private_binaries() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("nspawn-bin-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir for binaries");
    for source in [
        PathBuf::from(env!("CARGO_BIN_EXE_nixfleet-agent")),
        mock_dashboard_binary(),
    ] {
        let source = source.as_path();
        let target = dir.path().join(source.file_name().expect("file name"));
        if fs::hard_link(source, &target).is_err() {
            fs::copy(source, &target).unwrap_or_else(|e| panic!("copy {}: {e}", source.display()));
        }
    }
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// The mock dashboard is its own crate, so Cargo gives this test no
/// `CARGO_BIN_EXE_` for it; it sits beside the agent in the same target
/// directory. `cargo test --workspace` (what scripts/test.sh runs) builds
/// it; run alone, this test builds it first.
fn mock_dashboard_binary() -> PathBuf {
    let agent = Path::new(env!("CARGO_BIN_EXE_nixfleet-agent"));
    let beside = agent.with_file_name("nixfleet-mock-dashboard");
    if !beside.exists() {
        let profile_dir = agent.parent().expect("profile directory");
        let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        build.args(["build", "--quiet", "-p", "nixfleet-mock-dashboard"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        if let Some(target_dir) = profile_dir.parent() {
            build.arg("--target-dir").arg(target_dir);
        }
        let status = build.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build -p nixfleet-mock-dashboard failed"
        );
    }
    beside
}
