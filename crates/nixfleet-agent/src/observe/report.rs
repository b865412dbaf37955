//! `nixfleet-agent status`: the state file as a few aligned lines for
//! people, or one JSON object for scripts (`--json`). It only reads the
//! file; the running agent is never asked anything.

use super::snapshot::{CommandResult, Link, Snapshot, unix_now};
use crate::protocol::{Check, CheckStatus};
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

/// Exit code: connected.
pub const EXIT_CONNECTED: u8 = 0;
/// Exit code: the agent runs but is not connected.
pub const EXIT_NOT_CONNECTED: u8 = 3;
/// Exit code: no state (no record, or its agent no longer runs).
pub const EXIT_NO_STATE: u8 = 4;

/// What `status` found, printed and turned into the exit code.
pub struct Report {
    pub exit_code: u8,
    pub text: String,
}

/// Reads the record in `state_dir` (named `origin`: where that setting
/// came from) and describes it.
pub fn report(state_dir: &Path, origin: &str, json: bool) -> Report {
    let file = state_dir.join(super::STATE_FILE);
    let hint = format!(
        "read {} (state_dir from {origin}; point elsewhere with --state-dir, \
         --config or NIXFLEET_STATE_DIR)",
        file.display()
    );
    let snapshot = match Snapshot::load(state_dir) {
        Ok(Some(snapshot)) => snapshot,
        Ok(None) => return no_state(json, &hint, "no agent state found".to_owned()),
        Err(error) => {
            return no_state(json, &hint, format!("cannot read the agent state: {error}"));
        }
    };
    let running = process_runs(snapshot.agent.pid);
    let exit_code = match (running, snapshot.link.is_connected()) {
        (false, _) => EXIT_NO_STATE,
        (true, true) => EXIT_CONNECTED,
        (true, false) => EXIT_NOT_CONNECTED,
    };
    let now = unix_now();
    let text = if json {
        as_json(&snapshot, running, &file, now)
    } else {
        as_text(&snapshot, running, &hint, now)
    };
    Report { exit_code, text }
}

fn no_state(json: bool, hint: &str, problem: String) -> Report {
    let text = if json {
        serde_json::json!({ "error": problem, "hint": hint }).to_string() + "\n"
    } else {
        format!("{problem}: the agent is not running, or uses another state_dir\n{hint}\n")
    };
    Report {
        exit_code: EXIT_NO_STATE,
        text,
    }
}

/// Whether the agent that wrote the record still runs: its pid names a
/// process called nixfleet-agent (a reused pid is some other program).
fn process_runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.trim_end() == "nixfleet-agent")
}

fn as_json(snapshot: &Snapshot, running: bool, file: &Path, now: u64) -> String {
    let mut value = serde_json::to_value(snapshot).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert("agent_running".into(), running.into());
        object.insert(
            "connected".into(),
            (running && snapshot.link.is_connected()).into(),
        );
        object.insert("last_heartbeat".into(), snapshot.last_heartbeat(now).into());
        object.insert("state_file".into(), file.display().to_string().into());
    }
    value.to_string() + "\n"
}

fn as_text(snapshot: &Snapshot, running: bool, hint: &str, now: u64) -> String {
    let mut out = String::new();
    let mut line = |label: &str, text: String| {
        let _ = writeln!(out, "{:<12} {text}", format!("{label}:"));
    };
    let agent = &snapshot.agent;
    let state = if running {
        format!("running (pid {})", agent.pid)
    } else {
        format!("NOT RUNNING (the record is from pid {})", agent.pid)
    };
    line("agent", state);
    line("connection", connection(snapshot, now));
    line("heartbeat", heartbeat(snapshot, now));
    line("command", command(snapshot, now));
    for result in snapshot.last_results.values() {
        line("last", last_result(result, now));
    }
    line("reboot", reboot(snapshot));
    if let Some(status) = &snapshot.compartments {
        let named = [
            ("git", &status.git),
            ("lock", &status.lock),
            ("system", &status.system),
            ("tests", &status.tests),
        ];
        for (name, check) in named {
            line(name, compartment(check));
        }
    }
    let commit = agent.source_commit.as_deref().unwrap_or("unknown");
    line(
        "version",
        format!("nixfleet-agent {} (commit {commit})", agent.version),
    );
    line("binary", agent.binary.clone());
    out.push_str(hint);
    out.push('\n');
    out
}

fn connection(snapshot: &Snapshot, now: u64) -> String {
    match &snapshot.link {
        Link::Starting { since } => {
            format!("connecting to {} since {}", snapshot.url, ago(*since, now))
        }
        Link::Connected { since } => {
            format!("connected to {} since {}", snapshot.url, ago(*since, now))
        }
        Link::Disconnected {
            since,
            error,
            next_retry,
            ..
        } => format!(
            "disconnected from {} since {}: {error}; next attempt {}",
            snapshot.url,
            ago(*since, now),
            when(*next_retry, now)
        ),
        Link::Stopped { since } => format!("stopped at {}", ago(*since, now)),
    }
}

fn heartbeat(snapshot: &Snapshot, now: u64) -> String {
    let every = format!("every {}s", snapshot.interval_secs);
    match snapshot.last_heartbeat(now) {
        Some(last) => format!("{every}, last at {} (derived)", ago(last, now)),
        None => format!("{every}, none while not connected"),
    }
}

fn command(snapshot: &Snapshot, now: u64) -> String {
    let Some(running) = &snapshot.running else {
        return "idle".to_owned();
    };
    let mut text = format!(
        "{}, running for {}s",
        running.command,
        now.saturating_sub(running.started)
    );
    if let Some(pid) = running.pid {
        let _ = write!(text, ", pid {pid}");
    }
    if let Some(log) = &running.log {
        let _ = write!(text, ", log {}", log.display());
    }
    text
}

fn last_result(result: &CommandResult, now: u64) -> String {
    format!(
        "{:<13} {} at {}, exit {}, {:.1}s: {}",
        result.command,
        if result.ok { "ok" } else { "error" },
        ago(result.finished, now),
        result.exit_code,
        result.duration_secs,
        result.message
    )
}

fn reboot(snapshot: &Snapshot) -> String {
    let entries: Vec<&str> = snapshot.reboot_entries.iter().map(String::as_str).collect();
    match crate::reboot::describe(&entries) {
        Some(why) if snapshot.needs_reboot => why.replacen("reboot needed", "needed", 1),
        _ => "not needed".to_owned(),
    }
}

/// One v3 compartment: its verdict, message and when it was checked.
fn compartment(check: &Check) -> String {
    let status = match check.status {
        CheckStatus::Ok => "ok",
        CheckStatus::Outdated => "outdated",
        CheckStatus::Error => "error",
        CheckStatus::Unknown => "unknown",
        CheckStatus::Working => "working",
    };
    let mut text = format!("{status:<9}");
    if !check.message.is_empty() {
        let _ = write!(text, "{}", check.message);
    }
    if !check.checked_at.is_empty() {
        let _ = write!(text, " (checked {})", check.checked_at);
    }
    text
}

/// A past time as UTC and how long ago.
fn ago(at: u64, now: u64) -> String {
    format!("{} ({}s ago)", utc(at), now.saturating_sub(at))
}

/// A future time as UTC and how long from now.
fn when(at: u64, now: u64) -> String {
    format!("{} (in {}s)", utc(at), at.saturating_sub(now))
}

fn utc(at: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(at)).to_string()
}
