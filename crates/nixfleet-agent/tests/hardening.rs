//! Hardening (issue 16): each test reproduces a hole an attacker or a bad
//! day opened, against the real binary over loopback.

mod common;

use common::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Every datagram the agent sent to its `NOTIFY_SOCKET`, with arrival time.
struct NotifySocket {
    path: std::path::PathBuf,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                s.lock().unwrap().push((Instant::now(), text));
            }
        });
        NotifySocket {
            path,
            seen,
            task,
            _dir: dir,
        }
    }

    fn times_of(&self, datagram: &str) -> Vec<Instant> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|(_, d)| d == datagram)
            .map(|(at, _)| *at)
            .collect()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits for the `n`-th accepted upgrade and returns when it happened.
async fn wait_upgrade(dashboard: &Dashboard, n: usize, timeout: Duration) -> Instant {
    dashboard
        .wait_for(timeout, &format!("upgrade #{n}"), |log| {
            log.iter()
                .filter(|s| matches!(s, Seen::Upgrade { accepted: true, .. }))
                .nth(n - 1)
                .map(Seen::at)
        })
        .await
}

/// 200,000 lines, then the command stays running until told to finish.
const FLOOD_AND_WAIT: &str = r#"
awk 'BEGIN { for (i = 0; i < 200000; i++) printf "line %06d of the flood, padded to about ninety bytes ...............\n", i }'
while [ ! -e "$HOME/finish" ]; do sleep 0.1; done
"#;

#[tokio::test]
async fn a_dashboard_that_pings_but_never_reads_is_dropped_and_sigterm_still_works() {
    const PING_TIMEOUT: u64 = 2;
    let dashboard = Dashboard::start_with_recv_buffer(4096).await;
    let notify = NotifySocket::bind();
    let mut agent = start_with_rebuild(dashboard.url(), FLOOD_AND_WAIT, |o| {
        o.ping_interval = 1;
        o.ping_timeout = PING_TIMEOUT;
        o.env.extend([
            ("NOTIFY_SOCKET".into(), notify.path.display().to_string()),
            // WatchdogSec=1: a ping every 500 ms.
            ("WATCHDOG_USEC".into(), "1000000".into()),
            // Reconnect at once, so the time measured is the detection.
            ("NIXFLEET_TEST_FIRST_BACKOFF_MS".into(), "100".into()),
        ]);
    })
    .await;
    let conn = dashboard
        .wait_frame("register", 1, 10 * SECOND)
        .await
        .conn();
    dashboard.set_reading(false);
    dashboard.command(conn, "switch");
    let flood_started = Instant::now();

    let deadline = Duration::from_secs(PING_TIMEOUT) + SECOND;
    let mut previous = flood_started;
    for n in [2, 3] {
        // The dashboard stays loud: the agent hears from it all the time,
        // so only a write deadline can tell that it is gone.
        let upgrade = {
            let wait = wait_upgrade(&dashboard, n, 15 * SECOND);
            tokio::pin!(wait);
            let mut ping = tokio::time::interval(Duration::from_millis(300));
            loop {
                tokio::select! {
                    at = &mut wait => break at,
                    _ = ping.tick() => {
                        if let Some(current) = dashboard.current_conn() {
                            dashboard.send_raw(current, Message::Ping(Default::default()));
                        }
                    }
                }
            }
        };
        let took = upgrade - previous;
        eprintln!(
            "figures: never-reading dashboard: reconnected {:.2} s after the writes stalled (ping_timeout {PING_TIMEOUT} s)",
            took.as_secs_f64()
        );
        assert!(
            took <= deadline,
            "reconnect #{n} took {took:?}; stderr:\n{}",
            agent.stderr()
        );
        previous = upgrade;
    }
    assert!(
        agent.stderr().contains("the dashboard read no data for 2s"),
        "{}",
        agent.stderr()
    );

    // The new connection gets the backlog, one unacknowledged window
    // (128 KiB) at a time, and reads none of it: keep pinging while the
    // writer waits for its acknowledgement, then stop the agent.
    let stuck_until = Instant::now() + SECOND;
    while Instant::now() < stuck_until {
        if let Some(current) = dashboard.current_conn() {
            dashboard.send_raw(current, Message::Ping(Default::default()));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let signalled = Instant::now();
    agent.signal(15);
    let code = agent.wait_exit(10 * SECOND).await;
    let stop_took = signalled.elapsed();
    eprintln!(
        "figures: never-reading dashboard: SIGTERM honoured in {:.2} s while a write was blocked",
        stop_took.as_secs_f64()
    );
    assert_eq!(code, Some(0), "{}", agent.stderr());
    assert!(stop_took < 5 * SECOND, "SIGTERM took {stop_took:?}");

    // systemd's watchdog was fed all along: no gap near WatchdogSec.
    let pings: Vec<Instant> = notify
        .times_of("WATCHDOG=1")
        .into_iter()
        .filter(|at| *at >= flood_started && *at <= signalled)
        .collect();
    let mut edges = vec![flood_started];
    edges.extend(&pings);
    edges.push(signalled);
    let longest = edges.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    eprintln!(
        "figures: never-reading dashboard: {} watchdog pings, longest gap {:.2} s (WatchdogSec 1 s)",
        pings.len(),
        longest.as_secs_f64()
    );
    assert!(
        longest < Duration::from_millis(900),
        "watchdog starved for {longest:?}; stderr:\n{}",
        agent.stderr()
    );
    // (The close frame of the shutdown may go unanswered, as this
    // dashboard reads nothing; the watchdog's loops must not.)
    assert!(!agent.stderr().contains("loop did not answer"));
}

#[tokio::test]
async fn the_running_agent_is_not_dumpable() {
    use std::os::unix::fs::MetadataExt;
    // The kernel hands the /proc files of a non-dumpable process to root:
    // visible only when the agent runs as another user, so a test running
    // as root starts it as `nobody`.
    let as_root = rustix::process::getuid().is_root();
    let dashboard = Dashboard::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (repo, state) = (dir.path().join("repo"), dir.path().join("state"));
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "url = {:?}\nrepo_dir = {:?}\nstate_dir = {:?}\nhostname = \"dump-test\"\nmetrics = \"none\"\n",
            dashboard.url(),
            repo.display().to_string(),
            state.display().to_string(),
        ),
    )
    .unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"));
    command
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NIXFLEET_TOKEN", TOKEN)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    if as_root {
        const NOBODY: u32 = 65534;
        for path in [dir.path(), &config] {
            set_mode(path, 0o755);
        }
        for path in [&repo, &state] {
            std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        command.uid(NOBODY).gid(NOBODY);
    }
    let agent = command.spawn().unwrap();
    let pid = agent.id().unwrap();
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let status_file = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&status_file).unwrap();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_ne!(uid, 0, "the agent must run as an ordinary user here");
    let owner = std::fs::metadata(&status_file).unwrap().uid();
    assert_eq!(
        owner, 0,
        "/proc/{pid} belongs to uid {owner}, the agent's own: it is dumpable"
    );
}

#[tokio::test]
async fn a_record_from_another_boot_is_not_adopted_and_kill_command_signals_nothing() {
    use std::os::unix::process::CommandExt;
    let dashboard = Dashboard::start().await;
    let options = AgentOptions::new(dashboard.url());
    let (dir, _) = Agent::prepare(&options);
    // An unrelated process that leads its own group, named by a record that
    // matches its pid and start time but comes from another boot (a stale
    // record after a reboot, or a forged one).
    let mut victim = std::process::Command::new("sleep")
        .arg("60")
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = victim.id();
    let ticks = nixfleet_agent::commands::handover::process_start_ticks(pid).unwrap();
    let record = serde_json::json!({
        "command": "switch", "pid": pid, "pid_start": ticks, "log": null,
        "boot_id": "00000000-0000-4000-8000-000000000000",
    });
    std::fs::write(
        dir.path().join("state/running-command.json"),
        record.to_string(),
    )
    .unwrap();
    let agent = Agent::spawn(dir, options).await;
    let conn = dashboard
        .wait_frame("register", 1, 10 * SECOND)
        .await
        .conn();
    // The record is settled at once: the command it names is not running.
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.payload()["status"], "error");
    assert!(
        status.payload()["message"]
            .as_str()
            .unwrap()
            .contains("exit code unknown"),
        "{}",
        status.payload()
    );
    dashboard.send_json(
        conn,
        serde_json::json!({"type": "kill_command", "payload": {"signal": "SIGKILL", "pid": 0}}),
    );
    let rejected = dashboard
        .wait_frame("command_rejected", 1, 5 * SECOND)
        .await;
    assert_eq!(rejected.payload()["reason"], "no command running");
    let beats = dashboard.frames("heartbeat").len();
    dashboard
        .wait_frame("heartbeat", beats + 1, 5 * SECOND)
        .await;
    assert!(
        victim.try_wait().unwrap().is_none(),
        "the agent killed a process it does not own"
    );
    let named = dashboard
        .frames("heartbeat")
        .iter()
        .any(|beat| beat.payload()["command_pid"] == pid);
    assert!(!named, "a heartbeat reported the foreign pid {pid}");
    assert!(agent.stderr().contains("no longer running (or not ours)"));
    victim.kill().unwrap();
    victim.wait().unwrap();
}

/// A repository with one commit on `main` (and `other` when asked), for
/// the agent to clone; returns its work tree and that commit.
fn upstream(
    root: &std::path::Path,
    name: &str,
    with_other_branch: bool,
) -> (std::path::PathBuf, String) {
    let work = root.join(name);
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("flake.nix"), format!("# {name}\n{{ }}\n")).unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", name]);
    if with_other_branch {
        git(&work, &["checkout", "-q", "-b", "other"]);
        std::fs::write(work.join("flake.nix"), format!("# {name} other\n{{ }}\n")).unwrap();
        git(&work, &["commit", "-qam", "other"]);
        git(&work, &["checkout", "-q", "main"]);
    }
    let head = git(&work, &["rev-parse", "--short=7", "main"]);
    (work, head)
}

/// Starts an agent in isolated mode on `dir`, runs one `pull` and returns
/// its status and every output line, then stops the agent.
async fn pull_once(
    dir: tempfile::TempDir,
    repo_url: &str,
    branch: &str,
) -> (serde_json::Value, Vec<String>, tempfile::TempDir) {
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options.extra_toml.push(format!("repo_url = {repo_url:?}"));
    options.extra_toml.push(format!("branch = {branch:?}"));
    let agent = Agent::spawn(dir, options).await;
    let conn = dashboard
        .wait_frame("register", 1, 10 * SECOND)
        .await
        .conn();
    dashboard.command(conn, "pull");
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    let lines = dashboard
        .frames("output")
        .iter()
        .map(|f| f.payload()["line"].as_str().unwrap_or_default().to_owned())
        .collect();
    // The record goes once the status is delivered; a next agent must not
    // find it (it would send that status again).
    let record = agent.state_dir.join("running-command.json");
    let deadline = Instant::now() + 5 * SECOND;
    while record.exists() {
        assert!(
            Instant::now() < deadline,
            "record not cleared: {:?} {:?}\n{}",
            std::fs::read_to_string(&record),
            status.payload(),
            agent.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (status.payload().clone(), lines, agent.crash().await)
}

#[tokio::test]
async fn a_changed_repo_url_or_branch_is_followed_and_said() {
    let root = tempfile::tempdir().unwrap();
    let (a, a_head) = upstream(root.path(), "a", false);
    let (b, b_head) = upstream(root.path(), "b", true);
    let b_other = git(&b, &["rev-parse", "--short=7", "other"]);
    let (a, b) = (a.display().to_string(), b.display().to_string());
    let (dir, _) = Agent::prepare(&AgentOptions::new(String::new()));
    std::fs::remove_dir(dir.path().join("repo")).unwrap();
    let repo = dir.path().join("repo");

    let (status, _, dir) = pull_once(dir, &a, "main").await;
    assert_eq!(status["status"], "ok", "{status}");
    assert_eq!(status["generation"], a_head.as_str());

    // Moving away from repository A: the next pull must come from B.
    let (status, lines, dir) = pull_once(dir, &b, "main").await;
    assert_eq!(status["status"], "ok", "{status}");
    assert_eq!(status["generation"], b_head.as_str(), "{lines:#?}");
    assert_eq!(git(&repo, &["config", "--get", "remote.origin.url"]), b);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("origin is {a}, but repo_url is {b}"))),
        "{lines:#?}"
    );

    // And to another branch of B.
    let (status, lines, _dir) = pull_once(dir, &b, "other").await;
    assert_eq!(status["status"], "ok", "{status}");
    assert_eq!(status["generation"], b_other.as_str(), "{lines:#?}");
    assert_eq!(git(&repo, &["symbolic-ref", "--short", "HEAD"]), "other");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("branch changed from main to other")),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn credentials_in_repo_url_never_reach_logs_frames_or_messages() {
    const SECRET: &str = "s3cr3t-REPO-password";
    let url = format!("https://deploy:{SECRET}@127.0.0.1:9/fleet.git");
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options.extra_toml.push(format!("repo_url = {url:?}"));
    let (dir, bin) = Agent::prepare(&options);
    std::fs::remove_dir(dir.path().join("repo")).unwrap();
    // A git that echoes its arguments (which hold the URL without its
    // credentials: trust_credentials.rs) and the URL with the credentials
    // it got in its environment, as git's own errors may quote the URL; it
    // fails, so the failure message is built from its words.
    script(
        &bin,
        "git",
        r#"echo "git was asked: $*"
echo "fatal: cannot reach https://$NIXFLEET_GIT_USERNAME:$NIXFLEET_GIT_PASSWORD@127.0.0.1:9/fleet.git" >&2
exit 128"#,
    );
    let agent = Agent::spawn(dir, options).await;
    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    assert_eq!(
        register.payload()["repo_url"],
        "https://<redacted>@127.0.0.1:9/fleet.git"
    );
    dashboard.command(register.conn(), "pull");
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "error");
    let lines: Vec<_> = dashboard
        .frames("output")
        .iter()
        .map(|f| f.payload()["line"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("https://<redacted>@127.0.0.1:9/fleet.git")),
        "the child's output arrives, scrubbed: {lines:#?}"
    );
    for seen in dashboard.log() {
        if let Seen::Frame { raw, .. } = seen {
            assert!(!raw.contains(SECRET), "a frame carries the secret: {raw}");
        }
    }
    let logs = agent.state_dir.join("logs");
    let mut log_text = String::new();
    for entry in std::fs::read_dir(&logs).unwrap() {
        log_text.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    assert!(
        log_text
            .lines()
            .any(|l| l.starts_with("# start 0 ") && l.ends_with(" git clone")),
        "{log_text}"
    );
    assert!(!log_text.contains(SECRET), "the command log:\n{log_text}");
    assert!(!agent.stderr().contains(SECRET), "{}", agent.stderr());

    // --check-config, and a configuration error about the URL.
    let config = agent.dir.path().join("agent.toml");
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"))
        .args(["--check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&checked.stdout);
    assert!(
        shown.contains("repo_url = \"https://<redacted>@127.0.0.1:9/fleet.git\""),
        "{shown}"
    );
    assert!(!shown.contains(SECRET), "{shown}");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"))
        .args(["--check-config", "--config"])
        .arg(&config)
        .args(["--repo-url", &format!("{url}\u{7}")])
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(78), "{error}");
    assert!(error.contains("repo_url"), "{error}");
    assert!(!error.contains(SECRET), "{error}");
}

#[tokio::test]
async fn ws_to_a_host_beyond_loopback_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let run = async |url: &str, allow: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"));
        command
            .env_clear()
            .env("NIXFLEET_URL", url)
            .env("NIXFLEET_TOKEN", TOKEN)
            .env("NIXFLEET_REPO_DIR", dir.path().join("repo"))
            .env("NIXFLEET_STATE_DIR", dir.path().join("state"))
            .env("NIXFLEET_HOSTNAME", "test-host");
        if let Some(allow) = allow {
            command.env("NIXFLEET_ALLOW_INSECURE_URL", allow);
        }
        // Not --check-config: the agent itself must refuse to start, and
        // it does before opening any connection. An agent that would try
        // is stopped at once (192.0.2.0/24 is reserved for documentation).
        let mut child = tokio::process::Command::from(command)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let ended = tokio::time::timeout(5 * SECOND, child.wait())
            .await
            .expect("the agent started instead of refusing its configuration")
            .unwrap();
        let mut text = String::new();
        let mut stderr = stderr;
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text)
            .await
            .unwrap();
        (ended.code(), text)
    };
    let (code, stderr) = run("ws://192.0.2.1:8000/ws", None).await;
    assert_eq!(code, Some(78), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("allow_insecure_url"), "{stderr}");
    assert!(stderr.contains("unencrypted"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "{stderr}");

    let (code, _) = run("ws://dashboard.example.org/ws", Some("no")).await;
    assert_eq!(code, Some(78));

    // Allowed explicitly, or to loopback, the configuration is accepted.
    let check = |url: &str, allow: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"));
        command
            .arg("--check-config")
            .env_clear()
            .env("NIXFLEET_URL", url)
            .env("NIXFLEET_TOKEN", TOKEN)
            .env("NIXFLEET_REPO_DIR", dir.path().join("repo"))
            .env("NIXFLEET_STATE_DIR", dir.path().join("state"))
            .env("NIXFLEET_HOSTNAME", "test-host");
        if let Some(allow) = allow {
            command.env("NIXFLEET_ALLOW_INSECURE_URL", allow);
        }
        command.output().unwrap()
    };
    let allowed = check("ws://192.0.2.1:8000/ws", Some("true"));
    assert_eq!(
        allowed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    assert!(String::from_utf8_lossy(&allowed.stdout).contains("allow_insecure_url = true"));
    for url in [
        "ws://127.0.0.1:8000/ws",
        "ws://[::1]:8000/ws",
        "ws://localhost/ws",
        "wss://192.0.2.1/ws",
    ] {
        let ok = check(url, None);
        assert_eq!(
            ok.status.code(),
            Some(0),
            "{url}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
    }
}

#[tokio::test]
async fn test_scripts_outside_the_repository_or_writable_by_others_are_refused() {
    let dashboard = Dashboard::start().await;
    let agent = start_with_rebuild(dashboard.url(), "true", |_| {}).await;
    let conn = dashboard
        .wait_frame("register", 1, 10 * SECOND)
        .await
        .conn();
    let home = agent.dir.path();
    let tests = agent.repo_dir.join("hosts/test-host/tests");
    std::fs::create_dir_all(&tests).unwrap();
    script(&tests, "T01-ok.sh", "echo fine");
    // Dropped by someone who may write outside the repository...
    let outside = home.join("world-writable");
    std::fs::create_dir(&outside).unwrap();
    let evil = script(
        &outside,
        "evil.sh",
        &format!("touch {:?}", home.join("ran-symlinked")),
    );
    std::os::unix::fs::symlink(&evil, tests.join("T02-linked.sh")).unwrap();
    // ...or by a group that may write this one script.
    let loose = script(
        &tests,
        "T03-group.sh",
        &format!("touch {:?}", home.join("ran-group-writable")),
    );
    set_mode(&loose, 0o775);

    dashboard.command(conn, "test");
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "error", "{}", status.payload());
    assert_eq!(status.payload()["message"], "1/3 passed");
    assert!(
        !home.join("ran-symlinked").exists(),
        "a script outside the repository ran"
    );
    assert!(
        !home.join("ran-group-writable").exists(),
        "a group-writable script ran"
    );
    let lines: Vec<String> = dashboard
        .frames("output")
        .iter()
        .map(|f| f.payload()["line"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        lines.iter().any(|l| l
            .starts_with("[nixfleet] refusing to run T02-linked.sh: it resolves to ")
            && l.contains("outside")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(
            |l| l.starts_with("[nixfleet] refusing to run T03-group.sh: ")
                && l.contains("writable by group or others (mode 0775)")
        ),
        "{lines:#?}"
    );

    // The whole tests directory a symlink out of the repository.
    std::fs::remove_dir_all(&tests).unwrap();
    script(
        &outside,
        "T01-outside.sh",
        &format!("touch {:?}", home.join("ran-from-linked-dir")),
    );
    std::os::unix::fs::symlink(&outside, &tests).unwrap();
    dashboard.command(conn, "test");
    let status = dashboard.wait_frame("status", 2, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "error", "{}", status.payload());
    assert!(
        !home.join("ran-from-linked-dir").exists(),
        "a script of a linked directory ran"
    );
}
