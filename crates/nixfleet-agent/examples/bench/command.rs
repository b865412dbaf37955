//! One `switch` as the dashboard sees it: sent, its output lines, its
//! status, the fresh register after it and the heartbeat that closes it.

use crate::agent::{Agent, INTERVAL_SECS};
use crate::dashboard::{Dashboard, Lines};
use std::time::{Duration, Instant};

/// What one command looked like from the dashboard.
pub struct CommandRun {
    /// When the agent registered, over the whole run.
    pub registers: Vec<Instant>,
    pub sent_at: Instant,
    pub status_at: Instant,
    pub status: String,
    pub message: String,
    pub lines: Lines,
    pub largest_gap: Duration,
    pub beats: usize,
    pub last_line_to_status_ms: f64,
}

impl CommandRun {
    pub fn first_register_after(&self, at: Instant) -> Option<Instant> {
        self.registers.iter().copied().find(|r| *r > at)
    }

    /// Why this run means the benchmark failed, if it does.
    pub fn failure(&self, expected: u64) -> Option<String> {
        let lines = &self.lines;
        if self.status != "ok" {
            Some(format!(
                "the command ended {}: {}",
                self.status, self.message
            ))
        } else if lines.received != expected || lines.dropped > 0 {
            Some(format!(
                "{} of {expected} lines arrived ({} reported dropped) although the dashboard kept up",
                lines.received, lines.dropped
            ))
        } else if lines.out_of_order > 0 || lines.foreign > 0 {
            Some(format!(
                "{} lines out of order, {} unexpected lines",
                lines.out_of_order, lines.foreign
            ))
        } else {
            None
        }
    }
}

/// Sends `switch` and waits for its status and the heartbeat after it.
pub async fn run_command(
    dashboard: &Dashboard,
    agent: &mut Agent,
    expected_lines: u64,
) -> Result<CommandRun, String> {
    let run = run_command_started(dashboard, expected_lines).await;
    agent.alive()?;
    run.map_err(|e| format!("{e}{}", agent.tail()))
}

/// Sends `switch` and waits for its status and the heartbeat after it,
/// without watching the agent (which may be restarted meanwhile).
pub async fn run_command_started(
    dashboard: &Dashboard,
    expected_lines: u64,
) -> Result<CommandRun, String> {
    let statuses_before = {
        let mut record = dashboard.record();
        record.lines = Lines {
            latency_us: Vec::with_capacity(expected_lines as usize),
            ..Lines::default()
        };
        record.statuses.len()
    };
    let sent_at = Instant::now();
    if !dashboard.command("switch") {
        return Err("the agent is not connected".into());
    }
    wait_command(dashboard, expected_lines, statuses_before, sent_at).await
}

async fn wait_command(
    dashboard: &Dashboard,
    expected_lines: u64,
    statuses_before: usize,
    sent_at: Instant,
) -> Result<CommandRun, String> {
    // Generous: a slow debug build on a busy machine still finishes.
    let timeout = Duration::from_secs(60 + expected_lines / 5_000);
    let status = dashboard
        .wait_for(timeout, |r| r.statuses.get(statuses_before).cloned())
        .await;
    let status = status.ok_or_else(|| format!("no status within {timeout:?}"))?;
    if status.status == "ok" {
        // After a successful switch the agent registers again on a fresh
        // connection (v3); the next command must go to that one.
        dashboard
            .wait_for(Duration::from_secs(10), |r| {
                r.registers.last().filter(|&&at| at > status.at).copied()
            })
            .await
            .ok_or("no register after the successful switch within 10 s")?;
    }
    // The heartbeat after the status closes the last gap of the command.
    let beat_wait = Duration::from_secs(INTERVAL_SECS * 2 + 1);
    dashboard
        .wait_for(beat_wait, |r| {
            r.heartbeats.last().filter(|&&h| h > status.at).copied()
        })
        .await;
    let mut record = dashboard.record();
    let lines = std::mem::take(&mut record.lines);
    let gaps: Vec<Duration> = record
        .heartbeats
        .windows(2)
        .filter(|w| w[1] > sent_at && w[0] < status.at)
        .map(|w| w[1] - w[0])
        .collect();
    let last_line_to_status_ms =
        status.realtime_ns.saturating_sub(lines.last_stamp_ns) as f64 / 1e6;
    let registers = record.registers.clone();
    Ok(CommandRun {
        registers,
        sent_at,
        status_at: status.at,
        status: status.status,
        message: status.message,
        lines,
        largest_gap: gaps.iter().copied().max().unwrap_or_default(),
        beats: gaps.len(),
        last_line_to_status_ms,
    })
}
