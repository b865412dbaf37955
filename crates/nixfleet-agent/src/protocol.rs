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
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn output_line_has_the_envelope_and_is_error_follows_the_stream() {
        let frame =
            Outbound::Output(OutputLine::new("switch", Stream::Stderr, "boom \"x\"")).to_json();
        assert_eq!(
            parse(&frame),
            json!({"type": "output", "payload": {
                "line": "boom \"x\"", "command": "switch", "stream": "stderr", "is_error": true}})
        );
        let frame = Outbound::Output(OutputLine::new("pull", Stream::Stdout, "ok")).to_json();
        assert_eq!(parse(&frame)["payload"]["is_error"], json!(false));
    }

    #[test]
    fn register_omits_absent_optional_fields() {
        let register = Register {
            hostname: "web-1".into(),
            host_type: "nixos".into(),
            agent_version: "0.1.0".into(),
            os_version: "25.11".into(),
            nixpkgs_version: "25.11.20251120.abc1234".into(),
            generation: "".into(),
            heartbeat_interval: 30,
            repo_url: None,
            repo_dir: Some("/var/lib/nixfleet/repo".into()),
            store_path: None,
            binary_hash: None,
            theme_color: None,
            location: None,
            device_type: None,
            source_commit: None,
            real_agent_version: "0.1.0".into(),
        };
        let v = parse(&Outbound::Register(&register).to_json());
        assert_eq!(v["type"], "register");
        assert_eq!(v["payload"]["heartbeat_interval"], 30);
        assert_eq!(v["payload"]["repo_dir"], "/var/lib/nixfleet/repo");
        assert!(v["payload"].get("repo_url").is_none());
        assert!(v["payload"].get("store_path").is_none());
    }

    #[test]
    fn idle_heartbeat_carries_nulls() {
        let hb = Heartbeat {
            generation: "abc1234",
            nixpkgs_version: "",
            pending_command: None,
            command_pid: None,
            metrics: None,
            update_status: None,
            source_commit: None,
            store_path: None,
            binary_hash: None,
            lock_hash: None,
            needs_reboot: false,
        };
        let v = parse(&Outbound::Heartbeat(&hb).to_json());
        assert_eq!(
            v,
            json!({"type": "heartbeat", "payload": {"generation": "abc1234", "nixpkgs_version": "",
                "pending_command": null, "command_pid": null, "metrics": null}})
        );
        let reboot = Heartbeat {
            needs_reboot: true,
            ..hb
        };
        let v = parse(&Outbound::Heartbeat(&reboot).to_json());
        assert_eq!(v["payload"]["needs_reboot"], true);
    }

    #[test]
    fn frame_buffer_frames_match_to_json_and_reuse_the_memory() {
        let hb = Heartbeat {
            generation: "abc1234",
            nixpkgs_version: "25.11",
            pending_command: Some("switch"),
            command_pid: Some(42),
            metrics: Some(Metrics {
                cpu: 1.5,
                ram: 20.25,
                swap: 0.0,
                load: 0.5,
            }),
            update_status: None,
            source_commit: Some("0123abc"),
            store_path: None,
            binary_hash: None,
            lock_hash: Some("ba7816bf"),
            needs_reboot: false,
        };
        let expected = Outbound::Heartbeat(&hb).to_json();
        let mut frames = FrameBuffer::default();
        let first = frames.encode(&Outbound::Heartbeat(&hb));
        assert_eq!(first, expected.as_bytes());
        // A frame still held (not yet written) is never overwritten.
        let idle = Heartbeat {
            pending_command: None,
            command_pid: None,
            ..hb.clone()
        };
        let second = frames.encode(&Outbound::Heartbeat(&idle));
        assert_eq!(first, expected.as_bytes());
        assert_eq!(second, Outbound::Heartbeat(&idle).to_json().as_bytes());
        let memory = second.as_ptr();
        drop((first, second));
        // Occupies what the allocator would hand out next, so that only
        // reusing the buffer yields the same memory again.
        let _elsewhere = vec![0u8; FRAME_BUFFER_ROOM];
        let third = frames.encode(&Outbound::Heartbeat(&hb));
        assert_eq!(third, expected.as_bytes());
        assert_eq!(
            third.as_ptr(),
            memory,
            "the dropped frame's memory is reused"
        );
        drop(third);
        let _elsewhere_too = vec![0u8; FRAME_BUFFER_ROOM];
        assert_eq!(frames.encode(&Outbound::Heartbeat(&hb)).as_ptr(), memory);
    }

    #[test]
    fn operation_progress_and_update_status_shapes() {
        let progress = OperationProgress {
            progress: Phases {
                pull: Some(PhaseProgress {
                    current: 1,
                    total: 3,
                    status: PhaseStatus::InProgress,
                    detail: None,
                }),
                tests: Some(TestsProgress {
                    current: 1,
                    total: 2,
                    results: vec![TestResult::Pass, TestResult::Pending],
                    status: PhaseStatus::InProgress,
                }),
                ..Phases::default()
            },
        };
        assert_eq!(
            parse(&Outbound::OperationProgress(&progress).to_json()),
            json!({"type": "operation_progress", "payload": {"progress": {
                "pull": {"current": 1, "total": 3, "status": "in_progress"},
                "tests": {"current": 1, "total": 2, "results": ["pass", "pending"], "status": "in_progress"}}}})
        );
        let status = UpdateStatus {
            lock: Check {
                status: CheckStatus::Outdated,
                message: "Updated 9 days ago".into(),
                checked_at: "2026-12-01T00:00:00Z".into(),
            },
            ..UpdateStatus::default()
        };
        let v = serde_json::to_value(&status).unwrap();
        assert_eq!(v["lock"]["status"], "outdated");
        assert_eq!(v["git"]["status"], "unknown");
        assert_eq!(v["tests"]["checked_at"], "");
    }

    #[test]
    fn status_and_rejection_shapes() {
        let status = Status {
            status: Outcome::Error,
            command: "switch".into(),
            exit_code: 1,
            message: "exit code 1".into(),
            generation: "abc1234".into(),
        };
        let v = parse(&Outbound::Status(&status).to_json());
        assert_eq!(v["payload"]["status"], "error");
        assert_eq!(v["payload"]["exit_code"], 1);
        let rejected = CommandRejected {
            reason: "command already running".into(),
            current_command: "switch".into(),
            current_pid: 42,
        };
        let v = parse(&Outbound::CommandRejected(&rejected).to_json());
        assert_eq!(v["type"], "command_rejected");
        assert_eq!(v["payload"]["current_pid"], 42);
    }

    #[test]
    fn decodes_the_three_known_messages() {
        assert_eq!(
            decode(r#"{"type":"registered","payload":{"host_id":"h-1"}}"#),
            Ok(Inbound::Registered {
                host_id: "h-1".into()
            })
        );
        assert_eq!(
            decode(r#"{"type":"registered","payload":{"host_id":7}}"#),
            Ok(Inbound::Registered {
                host_id: "7".into()
            })
        );
        assert_eq!(
            decode(r#"{"type":"command","payload":{"command":"switch"}}"#),
            Ok(Inbound::Command {
                command: "switch".into()
            })
        );
        assert_eq!(
            decode(r#"{"type":"kill_command","payload":{"signal":"SIGKILL","pid":0}}"#),
            Ok(Inbound::KillCommand {
                signal: KillSignal::Kill,
                pid: 0
            })
        );
        assert_eq!(
            decode(r#"{"type":"registered"}"#),
            Ok(Inbound::Registered { host_id: "".into() })
        );
    }

    #[test]
    fn unknown_types_are_not_errors() {
        assert_eq!(
            decode(r#"{"type":"future_thing","payload":[1,2,3]}"#),
            Ok(Inbound::Unknown {
                kind: "future_thing".into()
            })
        );
    }

    #[test]
    fn bad_frames_are_errors_that_name_the_type() {
        assert!(matches!(decode("not json"), Err(DecodeError::Malformed(_))));
        assert!(matches!(
            decode(r#"{"payload":{}}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(r#"{"type":5}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(decode("[]"), Err(DecodeError::Malformed(_))));
        match decode(r#"{"type":"command","payload":{"command":42}}"#) {
            Err(DecodeError::BadPayload { kind, .. }) => assert_eq!(kind, "command"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            decode(r#"{"type":"kill_command","payload":{"signal":"SIGHUP"}}"#),
            Err(DecodeError::BadPayload { .. })
        ));
        assert!(matches!(
            decode(r#"{"type":"kill_command","payload":{"pid":-1}}"#),
            Err(DecodeError::BadPayload { .. })
        ));
    }

    #[test]
    fn long_types_are_cut_for_the_log() {
        let kind = "x".repeat(10_000);
        match decode(&format!(r#"{{"type":"{kind}"}}"#)) {
            Ok(Inbound::Unknown { kind }) => assert!(kind.len() < 100),
            other => panic!("unexpected {other:?}"),
        }
    }
}
