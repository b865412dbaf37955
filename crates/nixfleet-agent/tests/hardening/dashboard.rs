//! What a dashboard can do to the agent: ping but never read, or sit
//! beyond loopback on plain `ws://`.

use super::*;

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
