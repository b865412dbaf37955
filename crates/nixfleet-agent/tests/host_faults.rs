//! The host's own faults, with the real agent binary over loopback: a
//! state disk that fills up during a command, one remounted read-only,
//! and an agent suspended (SIGSTOP) while the dashboard drops it.
//!
//! The disk tests mount a tmpfs on the agent's `state_dir`, so they need
//! root; elsewhere they print why they are skipped and pass.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::time::Instant;

const FLOOD_LINES: u64 = 300_000;

/// Prints FLOOD_LINES numbered lines (about 15 MB: far more than the
/// 4 MiB state disk holds), notes how long that took it in
/// `$HOME/wall_ms`, then exits with the code in `$HOME/code`.
const FLOOD: &str = r#"
t0=$(date +%s%N)
awk 'BEGIN { for (i = 1; i <= 300000; i++) printf "line %d of a flood meant to fill the state disk\n", i }'
echo $(( ($(date +%s%N) - t0) / 1000000 )) > "$HOME/wall_ms"
exit "$(cat "$HOME/code")"
"#;

/// The start of the notice that a command streams only.
const STREAMING: &str = "[nixfleet] streaming only from here, output not kept on disk: ";

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn skip_unless_root(test: &str) -> bool {
    if !is_root() {
        eprintln!("{test}: skipped: needs root to mount a tmpfs");
    }
    !is_root()
}

/// A tmpfs mounted by the test, unmounted (and its directory tree removed)
/// when dropped, after the agent that used it.
struct TmpfsMount {
    path: PathBuf,
    /// The agent's directory, removed once the mount is gone (removing it
    /// while mounted stops at the mount point).
    root: PathBuf,
}

impl TmpfsMount {
    fn new(path: &Path, size: &str, root: &Path) -> TmpfsMount {
        mount(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ],
            path,
        );
        TmpfsMount {
            path: path.to_owned(),
            root: root.to_owned(),
        }
    }

    fn remount(&self, how: &str) {
        mount(&["-o", &format!("remount,{how}")], &self.path);
    }

    /// Remounts read-only as soon as the kernel allows it: while any file
    /// on it is open for writing (a state file being replaced, the log of
    /// the lock check that follows a register) `mount` says "busy", as it
    /// would to an operator. Polled with a deadline, like the tests' other
    /// waits for an event.
    async fn remount_read_only(&self) {
        let give_up = Instant::now() + 30 * SECOND;
        loop {
            let output = Command::new("mount")
                .args(["-o", "remount,ro"])
                .arg(&self.path)
                .output()
                .unwrap();
            if output.status.success() {
                return;
            }
            let why = String::from_utf8_lossy(&output.stderr);
            assert!(
                why.contains("busy") && Instant::now() < give_up,
                "remount,ro {} failed: {why}",
                self.path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.path).status();
        if !unmounted.is_ok_and(|s| s.success()) {
            // Something still holds it: detach it now, gone once released.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn mount(args: &[&str], path: &Path) {
    let status = Command::new("mount").args(args).arg(path).status().unwrap();
    assert!(status.success(), "mount {args:?} {} failed", path.display());
}

/// Starts the agent with `nixos-rebuild` running `body` and its state
/// directory on a fresh tmpfs of `size`.
async fn agent_on_tmpfs(url: String, body: &str, size: &str) -> (TmpfsMount, Agent) {
    let options = AgentOptions::new(url);
    let (dir, bin) = Agent::prepare(&options);
    script(&bin, "nixos-rebuild", body);
    let mount = TmpfsMount::new(&dir.path().join("state"), size, dir.path());
    (mount, Agent::spawn(dir, options).await)
}

/// The numbers of `line N …` output frames from `from` on (distinct).
fn delivered_lines(log: &[Seen], from: Instant, to: Instant) -> BTreeSet<u64> {
    log.iter()
        .filter(|s| s.kind() == Some("output") && s.at() >= from && s.at() <= to)
        .filter_map(|s| {
            s.payload()["line"]
                .as_str()?
                .strip_prefix("line ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The count announced by `[nixfleet] N lines not kept: …`, and the rest
/// of the notice.
fn not_kept(log: &[Seen], from: Instant, to: Instant) -> Option<(u64, String)> {
    log.iter()
        .filter(|s| s.kind() == Some("output") && s.at() >= from && s.at() <= to)
        .find_map(|s| {
            let line = s.payload()["line"].as_str()?;
            let (n, why) = line
                .strip_prefix("[nixfleet] ")?
                .split_once(" lines not kept: ")?;
            Some((n.parse().ok()?, why.to_owned()))
        })
}

/// The output lines (their text) from `from` to `to`, in order.
fn output_lines(log: &[Seen], from: Instant, to: Instant) -> Vec<String> {
    log.iter()
        .filter(|s| s.kind() == Some("output") && s.at() >= from && s.at() <= to)
        .filter_map(|s| s.payload()["line"].as_str().map(str::to_owned))
        .collect()
}

/// How long the stand-in took to print its flood, in ms.
fn wall_ms(agent: &Agent) -> u64 {
    let text = std::fs::read_to_string(agent.dir.path().join("wall_ms")).unwrap();
    text.trim().parse().unwrap()
}

/// One flood on the full disk: the real exit code; the log's lines, then
/// the streaming notice, then the rest streamed, those the agent could not
/// take counted before the status: delivered + not kept = every line.
/// Returns the stand-in's wall time.
async fn flood_once(dashboard: &Dashboard, agent: &Agent, n: usize, code: i32) -> u64 {
    std::fs::write(agent.dir.path().join("code"), code.to_string()).unwrap();
    let from = Instant::now();
    let conn = dashboard.current_conn().unwrap();
    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", n, 120 * SECOND).await;
    let payload = status.payload();
    assert_eq!(payload["command"], "switch", "{payload}");
    assert_eq!(payload["exit_code"], code, "the real exit code: {payload}");
    assert_eq!(payload["status"], if code == 0 { "ok" } else { "error" });
    let log = dashboard.log();
    let delivered = delivered_lines(&log, from, status.at());
    let why = format!("no space left on {}", agent.state_dir.display());
    let count = match not_kept(&log, from, status.at()) {
        Some((count, said)) => {
            assert_eq!(said, why);
            count
        }
        None => 0,
    };
    let lines = output_lines(&log, from, status.at());
    let notice = format!("{STREAMING}{why}");
    let streamed_from = lines.iter().position(|l| *l == notice);
    let streamed_from = streamed_from.unwrap_or_else(|| panic!("no streaming notice; {payload}"));
    // The lines the log kept are the first ones, every one delivered.
    let kept = delivered_lines_in(&lines[..streamed_from]);
    assert_eq!(kept.first(), Some(&1));
    assert_eq!(kept.last(), Some(&(kept.len() as u64)));
    assert_eq!(delivered.len() as u64 + count, FLOOD_LINES);
    let wall = wall_ms(agent);
    eprintln!(
        "figures: full disk, run {n}: {} lines from the log, {} streamed, {count} not kept, \
         exit code {code}; the stand-in printed its flood in {wall} ms",
        kept.len(),
        delivered.len() - kept.len(),
    );
    // The agent goes on: two more heartbeats.
    let beats = dashboard.frames("heartbeat").len();
    dashboard
        .wait_frame("heartbeat", beats + 2, 10 * SECOND)
        .await;
    wall
}

/// The numbers of `line N …` lines among `lines`.
fn delivered_lines_in(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("line ")?.split(' ').next()?.parse().ok())
        .collect()
}

#[tokio::test]
async fn a_full_state_disk_costs_lines_counted_never_the_exit_code() {
    if skip_unless_root("a_full_state_disk_costs_lines_counted_never_the_exit_code") {
        return;
    }
    let dashboard = Dashboard::start().await;
    let (_mount, agent) = agent_on_tmpfs(dashboard.url(), FLOOD, "4m").await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let full = flood_once(&dashboard, &agent, 1, 3).await;
    // The next command on the disk the first one filled.
    flood_once(&dashboard, &agent, 2, 0).await;
    assert!(!agent.stderr().contains("panicked"), "{}", agent.stderr());
    drop(agent);

    // The same flood with room to spare, for comparison (a figure, not
    // an assertion: the child is never held back either way).
    let dashboard = Dashboard::start().await;
    let (_mount, agent) = agent_on_tmpfs(dashboard.url(), FLOOD, "64m").await;
    std::fs::write(agent.dir.path().join("code"), "0").unwrap();
    let conn = dashboard
        .wait_frame("register", 1, 10 * SECOND)
        .await
        .conn();
    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", 1, 120 * SECOND).await;
    assert_eq!(status.payload()["exit_code"], 0, "{}", status.payload());
    eprintln!(
        "figures: the stand-in printed its flood in {full} ms on the full 4 MiB disk, \
         in {} ms on a 64 MiB one",
        wall_ms(&agent)
    );
}

/// A state disk already full when the command starts: the command runs
/// streaming only, says so, and every line reaches the dashboard.
#[tokio::test]
async fn a_command_on_a_full_state_disk_streams_its_lines() {
    if skip_unless_root("a_command_on_a_full_state_disk_streams_its_lines") {
        return;
    }
    let dashboard = Dashboard::start().await;
    let body = r#"awk 'BEGIN { for (i = 1; i <= 2000; i++) printf "marker %d\n", i }'; exit 3"#;
    let (_mount, agent) = agent_on_tmpfs(dashboard.url(), body, "4m").await;
    let conn = dashboard
        .wait_frame("register", 1, 10 * SECOND)
        .await
        .conn();
    fill(&agent.state_dir.join("filler"));
    let from = Instant::now();
    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", 1, 60 * SECOND).await;
    assert_eq!(status.payload()["exit_code"], 3, "{}", status.payload());
    let lines = output_lines(&dashboard.log(), from, status.at());
    let notice = format!("{STREAMING}no space left on {}", agent.state_dir.display());
    let markers: Vec<String> = (1..=2000).map(|i| format!("marker {i}")).collect();
    let from_notice = lines.iter().position(|l| *l == notice);
    let from_notice = from_notice.unwrap_or_else(|| panic!("no streaming notice: {lines:?}"));
    assert_eq!(
        lines[from_notice + 1..],
        markers[..],
        "every marker, in order"
    );
    assert!(not_kept(&dashboard.log(), from, status.at()).is_none());
    assert!(!agent.stderr().contains("panicked"), "{}", agent.stderr());
}

/// Writes zeros into `path` until its file system has no block left.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    for chunk in [64 * 1024, 4096, 1] {
        let zeros = vec![0u8; chunk];
        while file.write_all(&zeros).is_ok() {}
    }
    let _ = file.sync_all();
}

#[tokio::test]
async fn a_read_only_state_disk_keeps_heartbeats_statuses_and_stops() {
    if skip_unless_root("a_read_only_state_disk_keeps_heartbeats_statuses_and_stops") {
        return;
    }
    let dashboard = Dashboard::start().await;
    // Runs until stopped while `$HOME/hang` exists.
    let body = r#"
if [ -e "$HOME/hang" ]; then echo yes > "$HOME/running"; fi
while [ -e "$HOME/hang" ]; do sleep 0.05; done
echo one; echo two; exit 0"#;
    let (mount, agent) = agent_on_tmpfs(dashboard.url(), body, "16m").await;
    let conn = dashboard
        .wait_frame("register", 1, 10 * SECOND)
        .await
        .conn();
    dashboard.wait_frame("heartbeat", 1, 10 * SECOND).await;
    mount.remount_read_only().await;
    let from = Instant::now();
    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.payload()["exit_code"], 0, "{}", status.payload());
    assert_eq!(status.payload()["status"], "ok");
    // No log: the lines stream to the dashboard, after a notice.
    let notice = format!("{STREAMING}{} is read-only", agent.state_dir.display());
    let lines = output_lines(&dashboard.log(), from, status.at());
    assert_eq!(lines, [notice.as_str(), "one", "two"]);
    assert!(not_kept(&dashboard.log(), from, status.at()).is_none());
    let beats = dashboard.frames("heartbeat").len();
    dashboard
        .wait_frame("heartbeat", beats + 2, 10 * SECOND)
        .await;

    // A stop reaches the command although no stop file can be written
    // (on the connection the agent registers again on after a command).
    std::fs::write(agent.dir.path().join("hang"), "").unwrap();
    let conn = dashboard
        .wait_frame("register", 2, 10 * SECOND)
        .await
        .conn();
    dashboard.command(conn, "switch");
    wait_for_file(&agent.dir.path().join("running"), 10 * SECOND).await;
    dashboard.command(conn, "stop");
    let status = dashboard.wait_frame("status", 2, 10 * SECOND).await;
    assert_eq!(status.payload()["exit_code"], 143, "{}", status.payload());
    assert_eq!(
        status.payload()["message"],
        "Stopped by user",
        "{}",
        status.payload()
    );
    std::fs::remove_file(agent.dir.path().join("hang")).unwrap();

    // Writable again: lines are kept and delivered as usual.
    mount.remount("rw");
    let conn = dashboard.current_conn().unwrap();
    let from = Instant::now();
    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", 3, 10 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok");
    let lines: Vec<String> = dashboard
        .log()
        .iter()
        .filter(|s| s.kind() == Some("output") && s.at() >= from)
        .filter_map(|s| s.payload()["line"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(lines, ["one", "two"]);
    assert!(!agent.stderr().contains("panicked"), "{}", agent.stderr());
    drop(agent);
}

/// The issue's scenario: stopped 10 s while the dashboard drops the
/// connection; after SIGCONT, `register` again within 3 s and at most one
/// heartbeat in the first second. At a 3 s interval, so that a second
/// heartbeat in that second is a burst, not the next regular one (the
/// first heartbeat follows `register` at once; the timer's next one comes
/// at least half an interval later: `Ticker::spaced`).
#[tokio::test]
async fn a_suspended_agent_re_registers_without_a_burst_of_heartbeats() {
    let mut dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options.interval = 3;
    let agent = Agent::start(options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    dashboard.wait_frame("heartbeat", 2, 10 * SECOND).await;

    agent.signal(rustix::process::Signal::STOP.as_raw());
    // The dashboard drops the connection while the agent is stopped.
    dashboard.kill();
    dashboard.restart().await;
    // The suspension lasts a few heartbeat intervals (the scenario, not a
    // synchronisation): ticks missed meanwhile must not come in a burst.
    tokio::time::sleep(Duration::from_secs(10)).await;
    agent.signal(rustix::process::Signal::CONT.as_raw());
    let woken = Instant::now();

    let register = dashboard.wait_frame("register", 2, 3 * SECOND).await;
    let conn = register.conn();
    // Wait until a heartbeat on the new connection comes a second or more
    // after the register, then count those before it.
    let window = Duration::from_secs(1);
    dashboard
        .wait_for(10 * SECOND, "a heartbeat 1 s after the register", |log| {
            log.iter()
                .find(|s| {
                    s.kind() == Some("heartbeat")
                        && s.conn() == conn
                        && s.at() >= register.at() + window
                })
                .cloned()
        })
        .await;
    let early = dashboard
        .frames("heartbeat")
        .iter()
        .filter(|s| s.conn() == conn && s.at() < register.at() + window)
        .count();
    eprintln!(
        "figures: after SIGCONT: register again after {:.2} s, {early} heartbeat(s) in the first second",
        (register.at() - woken).as_secs_f64()
    );
    assert!(
        early <= 1,
        "{early} heartbeats in the first second after re-registering"
    );
    assert!(!agent.stderr().contains("panicked"), "{}", agent.stderr());
}
