//! Faults while a command runs: the dashboard killed and back 5 s later,
//! a network that silently stops passing bytes. Every line arrives, in
//! order, and the command survives.

use super::*;

/// The numbers of `line N[ …]` output frames, per connection, in arrival
/// order.
fn numbered_lines(log: &[Seen]) -> Vec<(u64, u64)> {
    log.iter()
        .filter(|s| s.kind() == Some("output"))
        .filter_map(|s| {
            let n = s.payload()["line"]
                .as_str()?
                .strip_prefix("line ")?
                .split(' ')
                .next()?
                .parse()
                .ok()?;
            Some((s.conn(), n))
        })
        .collect()
}

/// Checks that numbers `first..=last` all arrived in order: each is the
/// next one or a repeat of one already seen (sent again after a broken
/// connection), never a jump. Returns the number of repeats.
fn assert_gapless(numbers: &[u64], first: u64, last: u64) -> u64 {
    let (mut next, mut repeats) = (first, 0);
    for &n in numbers {
        if n == next {
            next += 1;
        } else if n < next {
            repeats += 1;
        } else {
            panic!("line {next} missing: line {n} arrived next");
        }
    }
    assert_eq!(next, last + 1, "only lines up to {} arrived", next - 1);
    repeats
}

/// Prints numbered lines every 20 ms until `$HOME/finish` exists, then 20
/// more at once, then records how many it printed in `$HOME/total`.
const NUMBERED_UNTIL_FINISH: &str = r#"
i=0
while [ ! -e "$HOME/finish" ]; do i=$((i+1)); echo "line $i"; sleep 0.02; done
for j in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do i=$((i+1)); echo "line $i"; done
echo "$i" > "$HOME/total.tmp" && mv "$HOME/total.tmp" "$HOME/total"
"#;

#[tokio::test]
async fn dashboard_killed_mid_command_and_back_5s_later() {
    let mut dashboard = Dashboard::start().await;
    let agent = start_with_rebuild(dashboard.url(), NUMBERED_UNTIL_FINISH, |_| {}).await;
    dashboard.command_first("switch").await;
    dashboard
        .wait_frame_where("output", 10 * SECOND, |p| p["line"] == "line 10")
        .await;

    dashboard.kill();
    let killed_at = Instant::now();
    // The command ends while the dashboard is away.
    std::fs::write(agent.dir.path().join("finish"), "").unwrap();
    let total: u64 = wait_for_file(&agent.dir.path().join("total"), 10 * SECOND)
        .await
        .trim()
        .parse()
        .unwrap();
    assert!(
        killed_at.elapsed() < 5 * SECOND,
        "the command should have ended during the outage"
    );
    agent.wait_stderr("reconnecting", 5 * SECOND).await;
    // The outage lasts 5 s (the scenario, not a synchronisation).
    tokio::time::sleep_until(killed_at + 5 * SECOND).await;
    dashboard.restart().await;

    let register = dashboard.wait_frame("register", 2, 10 * SECOND).await;
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(
        status.conn(),
        register.conn(),
        "status on the new connection"
    );
    assert!(
        status.at() >= register.at(),
        "status after the new register"
    );
    assert_eq!(status.payload()["status"], "ok");
    assert_eq!(status.payload()["command"], "switch");
    // A few quiet heartbeats later: still exactly one status.
    let beats = dashboard.frames("heartbeat").len();
    dashboard
        .wait_frame("heartbeat", beats + 2, 5 * SECOND)
        .await;
    assert_eq!(dashboard.frames("status").len(), 1, "exactly one status");

    let log = dashboard.log();
    let lines = numbered_lines(&log);
    let numbers: Vec<u64> = lines.iter().map(|(_, n)| *n).collect();
    // Every line, in order; lines written but not acknowledged when the
    // dashboard died are sent again after the reconnect.
    let repeats = assert_gapless(&numbers, 1, total);
    assert_eq!(dropped_lines(&log), 0);
    eprintln!("figures: killed mid-command: {total} lines, all delivered, {repeats} sent twice");
    assert!(repeats <= 25, "{repeats} lines sent twice");
    // The status comes after every output line of the command.
    let last_output = log
        .iter()
        .filter(|s| s.kind() == Some("output"))
        .map(Seen::at)
        .max()
        .unwrap();
    assert!(last_output <= status.at());
    assert!(!agent.stderr().contains("panicked"), "{}", agent.stderr());
}

#[tokio::test]
async fn a_network_that_freezes_mid_command_is_noticed_and_the_command_survives() {
    let dashboard = Dashboard::start().await;
    let proxy = FreezableProxy::start(dashboard.addr).await;
    // Output fast enough to fill the socket once the network freezes, so a
    // blocked write must not hide the silence.
    let body = r#"
i=0
while [ ! -e "$HOME/finish" ]; do
  i=$((i+1)); echo "line $i of a steady stream of build output, padded out to a realistic length"
  case $i in *0) sleep 0.01;; esac
done
echo "finished after $i"
"#;
    let agent = start_with_rebuild(proxy.url(), body, |o| {
        o.ping_interval = 1;
        o.ping_timeout = 3;
    })
    .await;
    let conn = dashboard.command_first("switch").await;
    dashboard
        .wait_output_starting("line 200 ", 10 * SECOND)
        .await;

    proxy.freeze(true);
    let frozen_at = Instant::now();
    let redial = proxy.wait_accepts(2, 15 * SECOND).await;
    // Redial = detection + first backoff step (1 s ± 10 %).
    let noticed = (redial - frozen_at).as_secs_f64() - 1.1;
    eprintln!(
        "figures: frozen network mid-command: dead connection noticed after ≤ {noticed:.2} s (ping_timeout 3 s)"
    );
    assert!(noticed <= 3.0 + 1.0, "noticed after {noticed:.2}s");
    assert!(
        redial - frozen_at >= Duration::from_millis(2700),
        "not before ping_timeout"
    );
    proxy.freeze(false);

    let register = dashboard
        .wait_for(10 * SECOND, "register on a new connection", |log| {
            log.iter()
                .find(|s| s.kind() == Some("register") && s.conn() != conn)
                .cloned()
        })
        .await;
    // The command kept running through all this.
    dashboard
        .wait_for(
            5 * SECOND,
            "a heartbeat of the running command on the new connection",
            |log| {
                log.iter()
                    .find(|s| {
                        s.conn() == register.conn()
                            && s.kind() == Some("heartbeat")
                            && s.payload()["pending_command"] == "switch"
                    })
                    .cloned()
            },
        )
        .await;
    std::fs::write(agent.dir.path().join("finish"), "").unwrap();
    let status = dashboard.wait_frame("status", 1, 15 * SECOND).await;
    assert_eq!(status.conn(), register.conn());
    assert_eq!(status.payload()["status"], "ok");
    let finished = dashboard
        .wait_output_starting("finished after ", 5 * SECOND)
        .await;
    assert!(finished.at() <= status.at());
    let beats = dashboard.frames("heartbeat").len();
    dashboard
        .wait_frame("heartbeat", beats + 2, 5 * SECOND)
        .await;
    assert_eq!(dashboard.frames("status").len(), 1, "exactly one status");

    // Every line, in order on each connection. What was in flight when the
    // network froze is sent again on the new connection (the old one's last
    // bytes may also reach the dashboard once the freeze ends): bounded by
    // the unacknowledged window.
    let lines = numbered_lines(&dashboard.log());
    let last: u64 = finished.payload()["line"]
        .as_str()
        .unwrap()
        .trim_start_matches("finished after ")
        .parse()
        .unwrap();
    let on_new: Vec<u64> = lines
        .iter()
        .filter(|(k, _)| *k == register.conn())
        .map(|(_, n)| *n)
        .collect();
    let resumed_at = *on_new.first().unwrap();
    let on_old: Vec<u64> = lines
        .iter()
        .filter(|(k, _)| *k == conn)
        .map(|(_, n)| *n)
        .collect();
    assert_gapless(&on_old, 1, *on_old.last().unwrap());
    assert!(
        resumed_at <= on_old.last().unwrap() + 1,
        "a gap between the connections"
    );
    assert_gapless(&on_new, resumed_at, last);
    let twice = lines.len() as u64 - last;
    eprintln!("figures: frozen network: {last} lines, {twice} sent twice");
    assert!(twice <= 2_000, "{twice} lines sent twice");
    assert!(!agent.stderr().contains("panicked"));
}
