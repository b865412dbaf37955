//! The NixFleet v2 wire protocol (`docs/protocol.md`): the JSON
//! envelope `{"type": …, "payload": {…}}` and every message in it.
//!
//! Outgoing messages borrow their data and serialise straight into the
//! frame's text, so an output line costs one allocation (the frame itself).
//! Incoming frames are decoded in two steps, envelope first and payload
//! second, so a bad payload can be reported with its message type.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;

/// Agent → dashboard. Adjacently tagged, which is exactly the envelope.
#[derive(Debug, Serialize)]
#[serde(tag = "type", content = "payload", rename_all = "snake_case")]
pub enum Outbound<'a> {
    Register(&'a Register),
    Heartbeat(&'a Heartbeat<'a>),
    Output(OutputLine<'a>),
    Status(&'a Status),
    CommandRejected(&'a CommandRejected),
    TestProgress(&'a TestProgress),
    /// v3 dashboards: the progress dots of the status column.
    OperationProgress(&'a OperationProgress),
}

impl Outbound<'_> {
    /// The frame text. Serialising these types cannot fail (no maps with
    /// non-string keys, no failing `Serialize` impls), so a failure here is
    /// a bug worth crashing on in tests; in release it yields an empty frame
    /// rather than a panic.
    pub fn to_json(&self) -> String {
        let mut buf = Vec::with_capacity(128);
        match serde_json::to_writer(&mut buf, self) {
            // serde_json only ever writes valid UTF-8.
            Ok(()) => String::from_utf8(buf).unwrap_or_default(),
            Err(error) => {
                debug_assert!(false, "serialising an outbound message failed: {error}");
                String::new()
            }
        }
    }
}

/// Serialises frames into one buffer that lives as long as the
/// connection. A frame handed out shares the buffer's memory; once the
/// socket has written and dropped it, the next frame reuses that memory, so
/// the steady heartbeat allocates nothing.
#[derive(Debug)]
pub struct FrameBuffer {
    buf: bytes::BytesMut,
}

/// Room reserved before each frame: a heartbeat fits.
const FRAME_BUFFER_ROOM: usize = 512;

impl Default for FrameBuffer {
    fn default() -> Self {
        FrameBuffer {
            buf: bytes::BytesMut::with_capacity(FRAME_BUFFER_ROOM),
        }
    }
}

impl FrameBuffer {
    /// The frame text as UTF-8 bytes (see [`Outbound::to_json`] on errors).
    pub fn encode(&mut self, message: &Outbound<'_>) -> bytes::Bytes {
        use bytes::BufMut;
        // Takes back the memory of the previous frame if it has been dropped.
        self.buf.clear();
        self.buf.reserve(FRAME_BUFFER_ROOM);
        if let Err(error) = serde_json::to_writer((&mut self.buf).writer(), message) {
            debug_assert!(false, "serialising an outbound message failed: {error}");
            self.buf.clear();
        }
        self.buf.split().freeze()
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Register {
    pub hostname: String,
    pub host_type: String,
    pub agent_version: String,
    pub os_version: String,
    pub nixpkgs_version: String,
    pub generation: String,
    /// Seconds; the dashboard marks the host offline after three of these.
    pub heartbeat_interval: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binary_hash: Option<String>,
    /// v3: `#rrggbb`, from config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub theme_color: Option<String>,
    /// v3: `home`, `work`, `cloud`, from config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// v3: `server`, `desktop`, `laptop`, `gaming`, from config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    /// v3: the git commit this binary was built from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_commit: Option<String>,
    /// Ours: the crate version, always, so that it stays known when
    /// `agent_version` carries `report_agent_version` (dashboards ignore
    /// unknown fields).
    pub real_agent_version: String,
}

/// Borrowed: the agent sends one every few seconds for as long as it runs,
/// and builds it from values it holds anyway.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Heartbeat<'a> {
    pub generation: &'a str,
    pub nixpkgs_version: &'a str,
    pub pending_command: Option<&'a str>,
    pub command_pid: Option<u32>,
    pub metrics: Option<Metrics>,
    /// v3: the status compartments; v2 dashboards ignore it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_status: Option<&'a UpdateStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_commit: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binary_hash: Option<&'a str>,
    /// v3: sha256 hex of the repository's `flake.lock`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_hash: Option<&'a str>,
    /// Ours: the booted and current systems differ in their kernel, initrd
    /// or kernel modules (`reboot.rs`); sent only when true.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub needs_reboot: bool,
}

/// v3: the four status compartments of a host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct UpdateStatus {
    pub git: Check,
    pub lock: Check,
    pub system: Check,
    pub tests: Check,
}

/// One compartment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Check {
    pub status: CheckStatus,
    pub message: String,
    /// RFC 3339, UTC.
    pub checked_at: String,
}

impl Default for Check {
    fn default() -> Self {
        Check {
            status: CheckStatus::Unknown,
            message: String::new(),
            checked_at: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Ok,
    Outdated,
    Error,
    Unknown,
    Working,
}

/// v3 `operation_progress`: `{"progress": {"pull"?: P, "lock"?: P,
/// "system"?: P, "tests"?: T}}`. Only the phases present are drawn anew.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct OperationProgress {
    pub progress: Phases,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Phases {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull: Option<PhaseProgress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock: Option<PhaseProgress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<PhaseProgress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tests: Option<TestsProgress>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PhaseProgress {
    pub current: u32,
    pub total: u32,
    pub status: PhaseStatus,
    /// Extra detail v3 dashboards ignore (e.g. build counts); any JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TestsProgress {
    pub current: u32,
    pub total: u32,
    pub results: Vec<TestResult>,
    pub status: PhaseStatus,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PhaseStatus {
    Pending,
    InProgress,
    Complete,
    Error,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TestResult {
    Pending,
    Pass,
    Fail,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Metrics {
    pub cpu: f64,
    pub ram: f64,
    pub swap: f64,
    pub load: f64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Serialize)]
pub struct OutputLine<'a> {
    pub line: &'a str,
    pub command: &'a str,
    pub stream: Stream,
    pub is_error: bool,
}

impl<'a> OutputLine<'a> {
    pub fn new(command: &'a str, stream: Stream, line: &'a str) -> Self {
        OutputLine {
            line,
            command,
            stream,
            is_error: stream == Stream::Stderr,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Error,
    /// Only for `check-version` (v3): running, but not the installed agent.
    Warning,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub status: Outcome,
    pub command: String,
    pub exit_code: i32,
    pub message: String,
    pub generation: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CommandRejected {
    pub reason: String,
    /// The running command, `""` when idle (the Go dashboards expect the
    /// field to be present and a string).
    pub current_command: String,
    /// The running command's pid, `0` when idle.
    pub current_pid: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TestProgress {
    pub current: u32,
    pub total: u32,
    pub passed: u32,
    pub running: bool,
    pub result: String,
}

/// Dashboard → agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Registered {
        host_id: String,
    },
    Command {
        command: String,
    },
    KillCommand {
        signal: KillSignal,
        pid: u32,
    },
    /// A type this agent does not know; logged at debug and ignored.
    Unknown {
        kind: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum KillSignal {
    #[serde(rename = "SIGTERM")]
    Term,
    #[serde(rename = "SIGKILL")]
    Kill,
}

/// Why an inbound frame was ignored. Never carries the frame itself, which
/// may be large or hostile; only what is needed to log it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a JSON object with a string `type`.
    Malformed(String),
    /// The envelope was fine but the payload did not fit the type.
    BadPayload { kind: String, error: String },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Malformed(error) => write!(f, "malformed frame: {error}"),
            DecodeError::BadPayload { kind, error } => {
                write!(f, "bad payload for message type {kind:?}: {error}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RegisteredPayload {
    #[serde(default)]
    host_id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct CommandPayload {
    command: String,
}

#[derive(Deserialize)]
struct KillCommandPayload {
    #[serde(default = "default_kill_signal")]
    signal: KillSignal,
    #[serde(default)]
    pid: u32,
}

fn default_kill_signal() -> KillSignal {
    KillSignal::Term
}

/// Longest message type echoed back into a log line.
const MAX_LOGGED_TYPE_LEN: usize = 64;
/// Longest `host_id` kept (it is only logged).
const MAX_LOGGED_ID_LEN: usize = 128;

/// Decodes one text frame from the dashboard.
pub fn decode(text: &str) -> Result<Inbound, DecodeError> {
    let envelope: Envelope<'_> =
        from_object(text).map_err(|e| DecodeError::Malformed(short_error(&e)))?;
    let kind = envelope.kind;
    let payload = envelope.payload.map(RawValue::get).unwrap_or("{}");
    let bad = |e: serde_json::Error| DecodeError::BadPayload {
        kind: truncate(&kind, MAX_LOGGED_TYPE_LEN),
        error: short_error(&e),
    };
    match kind.as_str() {
        "registered" => {
            let p: RegisteredPayload = from_object(payload).map_err(bad)?;
            // Dashboards disagree on whether ids are strings or numbers; the
            // agent only logs it, so accept either.
            let host_id = match p.host_id {
                Some(serde_json::Value::String(s)) => s,
                Some(serde_json::Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            // Only logged: keep a hostile id from filling the log.
            let host_id = truncate(&host_id, MAX_LOGGED_ID_LEN);
            Ok(Inbound::Registered { host_id })
        }
        "command" => {
            let p: CommandPayload = from_object(payload).map_err(bad)?;
            Ok(Inbound::Command { command: p.command })
        }
        "kill_command" => {
            let p: KillCommandPayload = from_object(payload).map_err(bad)?;
            Ok(Inbound::KillCommand {
                signal: p.signal,
                pid: p.pid,
            })
        }
        _ => Ok(Inbound::Unknown {
            kind: truncate(&kind, MAX_LOGGED_TYPE_LEN),
        }),
    }
}

/// serde's derived structs also accept a JSON array (`["command", {…}]` would
/// be a command); the envelope and the payloads are objects, so anything
/// else is refused.
fn from_object<'a, T: Deserialize<'a>>(text: &'a str) -> serde_json::Result<T> {
    if !text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return Err(serde::de::Error::custom("expected a JSON object"));
    }
    serde_json::from_str(text)
}

/// serde_json's messages quote offending input, which for a hostile frame
/// can be long and hold line breaks; keep what reaches the log short and on
/// one line.
fn short_error(error: &serde_json::Error) -> String {
    let text: String = error
        .to_string()
        .chars()
        .flat_map(char::escape_debug)
        .collect();
    truncate(&text, 200)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
