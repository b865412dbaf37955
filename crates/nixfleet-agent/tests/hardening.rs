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
        agent
            .stderr()
            .contains("the dashboard accepted no data for 2s"),
        "{}",
        agent.stderr()
    );

    // The new connection gets the backlog (over 1 MB of queued output)
    // at once and cannot take it (about 270 KiB of socket buffers): keep
    // pinging while the writer is stuck on it, then stop the agent.
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
    assert!(!agent.stderr().contains("did not answer"));
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
    let ticks = nixfleet_agent::handover::process_start_ticks(pid).unwrap();
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
