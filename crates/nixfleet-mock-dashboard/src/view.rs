//! What the web page shows about one host beyond the raw message store: a
//! short metrics history for the sparklines, the command that is running
//! (so a status can carry its duration), the latest progress reports, and a
//! bounded timeline of the events a person follows (connections, commands
//! sent, rejections, statuses).
//!
//! Everything here is small and bounded, updated under the state lock from
//! the frames the mock already parses (register, heartbeat, status,
//! rejections, progress); command output is never parsed except the first
//! line of a command, to learn its name and start time.

use std::collections::VecDeque;

use serde_json::{Map, Value, json};

/// Metrics samples kept for a sparkline, and their maximum age.
const MAX_SAMPLES: usize = 120;
const MAX_SAMPLE_AGE_MS: u64 = 10 * 60 * 1000;

/// Timeline entries kept per host.
const MAX_EVENTS: usize = 200;

#[derive(Default)]
pub struct HostView {
    /// `[t, cpu, ram, swap, load]`, oldest first.
    samples: VecDeque<[f64; 5]>,
    /// The running command and since when (unix ms).
    running: Option<(String, u64)>,
    /// The last command sent through the API while the host looked idle:
    /// its start time, should the agent accept it.
    sent: Option<(String, u64)>,
    /// Latest `operation_progress` and `test_progress` payloads.
    progress: Option<Value>,
    test_progress: Option<Value>,
    events: VecDeque<Value>,
    /// Bumped whenever `events` changes.
    pub events_version: u64,
}

fn str_field<'a>(payload: &'a Value, key: &str) -> Option<&'a str> {
    payload.get(key).and_then(Value::as_str)
}

impl HostView {
    fn push_event(&mut self, event: Value) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
        self.events_version += 1;
    }

    pub fn on_register(&mut self, t: u64, conn: u64, remote: &str, payload: &Value) {
        self.push_event(json!({
            "t": t, "kind": "registered", "conn": conn, "remote": remote,
            "agent_version": payload.get("agent_version"),
        }));
    }

    /// A `register` for this host refused: its token is another host's.
    pub fn on_refused(&mut self, t: u64, conn: u64, remote: &str, token_of: &str) {
        self.push_event(json!({
            "t": t, "kind": "refused", "conn": conn, "remote": remote,
            "reason": format!("presented the token of {token_of}"),
        }));
    }

    pub fn on_heartbeat(&mut self, t: u64, payload: &Value) {
        if let Some(m) = payload.get("metrics").filter(|m| m.is_object()) {
            let num = |k: &str| m.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
            if self.samples.len() >= MAX_SAMPLES {
                self.samples.pop_front();
            }
            self.samples
                .push_back([t as f64, num("cpu"), num("ram"), num("swap"), num("load")]);
        }
        while self
            .samples
            .front()
            .is_some_and(|s| (t as f64 - s[0]) > MAX_SAMPLE_AGE_MS as f64)
        {
            self.samples.pop_front();
        }
        if self.running.is_none()
            && let Some(command) = str_field(payload, "pending_command")
        {
            self.start(command, t);
        }
    }

    /// Whether the first output line of a command is still to come (the
    /// caller parses an output frame only then).
    pub fn wants_output_command(&self) -> bool {
        self.running.is_none()
    }

    pub fn on_output(&mut self, t: u64, payload: &Value) {
        if self.running.is_none() {
            let command = str_field(payload, "command").unwrap_or("?");
            self.start(command, t);
        }
    }

    fn start(&mut self, command: &str, t: u64) {
        // The agent's first sign of a command comes after the dashboard
        // sent it: the send time is when it started.
        let since = match self.sent.take() {
            Some((sent, at)) if sent == command => at.min(t),
            _ => t,
        };
        self.running = Some((command.to_owned(), since));
        self.progress = None;
        if command == "test" {
            self.test_progress = None;
        }
    }

    pub fn on_status(&mut self, t: u64, payload: &Value) {
        let command = str_field(payload, "command").unwrap_or("?");
        let started = match self.running.take() {
            Some((running, since)) if running == command => Some(since),
            other => {
                self.running = other;
                match self.sent.take() {
                    Some((sent, at)) if sent == command => Some(at),
                    _ => None,
                }
            }
        };
        self.push_event(json!({
            "t": t, "kind": "status", "command": command,
            "status": payload.get("status"), "exit_code": payload.get("exit_code"),
            "message": payload.get("message"),
            "duration_ms": started.map(|s| t.saturating_sub(s)),
        }));
    }

    pub fn on_rejected(&mut self, t: u64, payload: &Value) {
        // The rejected command never ran: forget its send time.
        self.sent = None;
        self.push_event(json!({
            "t": t, "kind": "rejected", "reason": payload.get("reason"),
            "current_command": payload.get("current_command"),
        }));
    }

    pub fn on_progress(&mut self, payload: Value) {
        self.progress = Some(payload);
    }

    pub fn on_test_progress(&mut self, payload: Value) {
        self.test_progress = Some(payload);
    }

    /// A command or kill sent through the API.
    pub fn on_sent(&mut self, t: u64, what: &str, detail: Value) {
        if what == "command"
            && self.running.is_none()
            && let Some(command) = detail.as_str()
        {
            self.sent = Some((command.to_owned(), t));
        }
        self.push_event(json!({ "t": t, "kind": "sent", "what": what, "detail": detail }));
    }

    /// A connection of this host ended; `conn` is its API object.
    pub fn on_closed(&mut self, t: u64, conn: &Value) {
        let mut event = Map::new();
        event.insert("t".into(), t.into());
        event.insert("kind".into(), "closed".into());
        for key in [
            "id",
            "close_code",
            "close_reason",
            "closed_by",
            "sent_close_code",
            "sent_close_reason",
            "error",
        ] {
            event.insert(key.into(), conn.get(key).cloned().unwrap_or(Value::Null));
        }
        self.push_event(Value::Object(event));
    }

    /// What the host list shows, with the metrics samples taken at
    /// `samples_from` (unix ms) or later.
    pub fn summary(&self, samples_from: u64) -> Value {
        let from = samples_from as f64;
        json!({
            "metrics": self.samples.iter().filter(|s| s[0] >= from).map(|s| {
                s.iter().map(|&v| if v.is_finite() { json!(v) } else { Value::Null }).collect::<Vec<_>>()
            }).collect::<Vec<_>>(),
            "running": self.running.as_ref().map(|(c, since)| json!({"command": c, "since": since})),
            "progress": self.progress,
            "test_progress": self.test_progress,
        })
    }

    pub fn events(&self) -> Value {
        Value::Array(self.events.iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_carries_the_duration_since_the_command_was_sent() {
        let mut view = HostView::default();
        view.on_sent(1_000, "command", json!("switch"));
        view.on_output(1_250, &json!({"command": "switch", "line": "x"}));
        view.on_status(
            4_000,
            &json!({"command": "switch", "status": "ok", "exit_code": 0}),
        );
        let events = view.events();
        let status = &events[1];
        assert_eq!(status["kind"], "status");
        assert_eq!(status["duration_ms"], 3_000);
        assert_eq!(view.summary(0)["running"], Value::Null);
    }

    #[test]
    fn a_rejected_command_does_not_count_as_started() {
        let mut view = HostView::default();
        view.on_heartbeat(500, &json!({"pending_command": "switch"}));
        view.on_sent(1_000, "command", json!("test"));
        view.on_rejected(1_001, &json!({"reason": "command already running"}));
        view.on_status(2_000, &json!({"command": "switch", "status": "ok"}));
        assert_eq!(view.events()[2]["duration_ms"], 1_500);
    }

    #[test]
    fn metrics_history_is_bounded() {
        let mut view = HostView::default();
        for i in 0..1_000u64 {
            view.on_heartbeat(i * 100, &json!({"metrics": {"cpu": 1.0, "ram": 2.0}}));
        }
        let metrics = view.summary(0)["metrics"].as_array().unwrap().len();
        assert_eq!(metrics, MAX_SAMPLES);
        for i in 0..1_000u64 {
            view.on_closed(i, &json!({"id": i}));
        }
        assert_eq!(view.events().as_array().unwrap().len(), MAX_EVENTS);
    }
}
