//! What a v3 dashboard does with the commands it sends, reduced to what
//! tests and the demo need to see:
//!
//! * a command sent through the API is `executing` until its `status`;
//! * a `status` `error` (or a `command_rejected`) ends it at once;
//! * a `status` `ok` (or `warning`) completes it on the next heartbeat
//!   (`awaiting_heartbeat`), as the v3 dashboard runs its post-checks on
//!   fresh heartbeat data;
//! * after a `switch`/`pull-switch` status `ok` it waits for the agent to
//!   register again (`awaiting_reconnect`), and records "Agent did not
//!   reconnect in time" (`timeout`) when no new `register` arrives within
//!   `--reconnect-timeout`;
//! * `stop`/`kill` are not commands of their own: they mark the running one.
//!
//! Independent of the agent's code: this is its test partner.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Commands remembered per host.
const KEPT: usize = 100;

/// The message the v3 dashboard records for a switch whose agent never
/// registered again.
pub const RECONNECT_TIMEOUT_ERROR: &str = "Agent did not reconnect in time";

/// Commands after whose success the v3 dashboard waits for a new register.
fn awaits_reconnect(command: &str) -> bool {
    matches!(command, "switch" | "pull-switch")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Executing,
    AwaitingHeartbeat,
    AwaitingReconnect { deadline: Instant },
    Ok,
    Error,
    Rejected,
    Timeout,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Executing => "executing",
            Phase::AwaitingHeartbeat => "awaiting_heartbeat",
            Phase::AwaitingReconnect { .. } => "awaiting_reconnect",
            Phase::Ok => "ok",
            Phase::Error => "error",
            Phase::Rejected => "rejected",
            Phase::Timeout => "timeout",
        }
    }

    fn is_open(self) -> bool {
        matches!(
            self,
            Phase::Executing | Phase::AwaitingHeartbeat | Phase::AwaitingReconnect { .. }
        )
    }
}

#[derive(Debug, Clone)]
struct Tracked {
    id: u64,
    command: String,
    sent_at: u64,
    phase: Phase,
    finished_at: Option<u64>,
    status: Option<Value>,
    error: Option<String>,
    kill_requested: bool,
}

impl Tracked {
    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "command": self.command,
            "state": self.phase.name(),
            "sent_at": self.sent_at,
            "finished_at": self.finished_at,
            "status": self.status,
            "error": self.error,
            "kill_requested": self.kill_requested,
        })
    }

    fn finish(&mut self, phase: Phase, now: u64) {
        self.phase = phase;
        self.finished_at = Some(now);
    }
}

/// One host's commands, newest last.
#[derive(Debug, Default)]
pub struct Commands {
    list: VecDeque<Tracked>,
    next_id: u64,
}

impl Commands {
    /// The API sent `command` to the agent.
    pub fn sent(&mut self, command: &str, now: u64) {
        if matches!(command, "stop" | "kill") {
            if let Some(open) = self.open_mut() {
                open.kill_requested = true;
            }
            return;
        }
        self.next_id += 1;
        if self.list.len() >= KEPT {
            self.list.pop_front();
        }
        self.list.push_back(Tracked {
            id: self.next_id,
            command: command.to_owned(),
            sent_at: now,
            phase: Phase::Executing,
            finished_at: None,
            status: None,
            error: None,
            kill_requested: false,
        });
    }

    fn open_mut(&mut self) -> Option<&mut Tracked> {
        self.list.iter_mut().rev().find(|c| c.phase.is_open())
    }

    /// A `status` from the agent.
    pub fn on_status(&mut self, payload: &Value, now: u64, reconnect_timeout: Duration) {
        let Some(name) = payload.get("command").and_then(Value::as_str) else {
            return;
        };
        let Some(tracked) = self
            .list
            .iter_mut()
            .rev()
            .find(|c| c.phase == Phase::Executing && c.command == name)
        else {
            return;
        };
        tracked.status = Some(payload.clone());
        match payload.get("status").and_then(Value::as_str) {
            Some("ok" | "warning") if awaits_reconnect(name) => {
                tracked.phase = Phase::AwaitingReconnect {
                    deadline: Instant::now() + reconnect_timeout,
                };
            }
            Some("ok" | "warning") => tracked.phase = Phase::AwaitingHeartbeat,
            _ => {
                tracked.error = payload
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                tracked.finish(Phase::Error, now);
            }
        }
    }

    /// A `command_rejected` ends the command it answered.
    pub fn on_rejected(&mut self, payload: &Value, now: u64) {
        if let Some(tracked) = self
            .list
            .iter_mut()
            .rev()
            .find(|c| c.phase == Phase::Executing)
        {
            tracked.error = Some(format!(
                "Agent rejected command: {}",
                payload.get("reason").and_then(Value::as_str).unwrap_or("")
            ));
            tracked.finish(Phase::Rejected, now);
        }
    }

    pub fn on_heartbeat(&mut self, now: u64) {
        for tracked in &mut self.list {
            if tracked.phase == Phase::AwaitingHeartbeat {
                tracked.finish(Phase::Ok, now);
            }
        }
    }

    /// A `register` on a connection: a waiting switch is complete.
    pub fn on_register(&mut self, now: u64) {
        for tracked in &mut self.list {
            if matches!(tracked.phase, Phase::AwaitingReconnect { .. }) {
                tracked.finish(Phase::Ok, now);
            }
        }
    }

    /// Called periodically: switches whose agent did not come back.
    pub fn check_deadlines(&mut self, now: u64) -> Vec<String> {
        let mut timed_out = Vec::new();
        let instant = Instant::now();
        for tracked in &mut self.list {
            if let Phase::AwaitingReconnect { deadline } = tracked.phase
                && instant >= deadline
            {
                tracked.error = Some(RECONNECT_TIMEOUT_ERROR.to_owned());
                tracked.finish(Phase::Timeout, now);
                timed_out.push(tracked.command.clone());
            }
        }
        timed_out
    }

    pub fn latest_json(&self) -> Value {
        self.list.back().map_or(Value::Null, Tracked::json)
    }

    pub fn all_json(&self) -> Value {
        Value::Array(self.list.iter().map(Tracked::json).collect())
    }
}

/// Merges an `operation_progress` payload into the host's latest
/// progress: each phase present replaces that phase.
pub fn merge_progress(progress: &mut serde_json::Map<String, Value>, payload: &Value) {
    if let Some(Value::Object(phases)) = payload.get("progress") {
        for (phase, value) in phases {
            progress.insert(phase.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_waits_for_a_register_and_times_out_without_one() {
        let mut commands = Commands::default();
        commands.sent("switch", 1);
        commands.on_status(
            &json!({"command": "switch", "status": "ok"}),
            2,
            Duration::ZERO,
        );
        assert_eq!(commands.latest_json()["state"], "awaiting_reconnect");
        commands.on_heartbeat(3);
        assert_eq!(commands.latest_json()["state"], "awaiting_reconnect");
        assert_eq!(commands.check_deadlines(4), ["switch"]);
        assert_eq!(commands.latest_json()["state"], "timeout");
        assert_eq!(commands.latest_json()["error"], RECONNECT_TIMEOUT_ERROR);

        commands.sent("pull-switch", 5);
        commands.on_status(
            &json!({"command": "pull-switch", "status": "ok"}),
            6,
            Duration::from_secs(60),
        );
        commands.on_register(7);
        assert_eq!(commands.latest_json()["state"], "ok");
    }

    #[test]
    fn other_commands_complete_on_the_heartbeat_after_their_status() {
        let mut commands = Commands::default();
        commands.sent("pull", 1);
        commands.on_heartbeat(2);
        assert_eq!(commands.latest_json()["state"], "executing");
        commands.on_status(
            &json!({"command": "pull", "status": "ok"}),
            3,
            Duration::ZERO,
        );
        assert_eq!(commands.latest_json()["state"], "awaiting_heartbeat");
        commands.on_heartbeat(4);
        assert_eq!(commands.latest_json()["state"], "ok");
        commands.sent("test", 5);
        commands.sent("kill", 6);
        assert_eq!(commands.latest_json()["kill_requested"], true);
        commands.on_status(
            &json!({"command": "test", "status": "error", "message": "Stopped by user"}),
            7,
            Duration::ZERO,
        );
        assert_eq!(commands.latest_json()["state"], "error");
        assert_eq!(commands.latest_json()["error"], "Stopped by user");
        commands.sent("reboot", 8);
        commands.on_rejected(&json!({"reason": "not allowed"}), 9);
        assert_eq!(commands.latest_json()["state"], "rejected");
    }

    #[test]
    fn progress_merges_per_phase() {
        let mut progress = serde_json::Map::new();
        merge_progress(
            &mut progress,
            &json!({"progress": {"pull": {"current": 1, "total": 3}}}),
        );
        merge_progress(
            &mut progress,
            &json!({"progress": {"system": {"current": 0, "total": 9}}}),
        );
        merge_progress(
            &mut progress,
            &json!({"progress": {"pull": {"current": 3, "total": 3}}}),
        );
        assert_eq!(progress["pull"]["current"], 3);
        assert_eq!(progress["system"]["total"], 9);
        merge_progress(&mut progress, &json!("garbage"));
        assert_eq!(progress.len(), 2);
    }
}
