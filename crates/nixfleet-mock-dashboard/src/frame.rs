//! A frame received from an agent: its type, classified before the state is
//! locked, and how it is stored and recorded.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

/// Connections are numbered from 1, in the order they opened.
pub type ConnId = u64;

/// The mock's clock for everything it stores and serves: unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A received frame's `type`, without an allocation for the usual ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Register,
    Heartbeat,
    Output,
    Status,
    CommandRejected,
    TestProgress,
    OperationProgress,
    Other(Arc<str>),
    /// A text frame that is not a JSON object with a string `type`.
    Malformed,
    /// A binary frame (agents should never send one).
    Binary,
}

impl Kind {
    fn from_type(t: &str) -> Kind {
        match t {
            "register" => Kind::Register,
            "heartbeat" => Kind::Heartbeat,
            "output" => Kind::Output,
            "status" => Kind::Status,
            "command_rejected" => Kind::CommandRejected,
            "test_progress" => Kind::TestProgress,
            "operation_progress" => Kind::OperationProgress,
            other => Kind::Other(Arc::from(other)),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Kind::Register => "register",
            Kind::Heartbeat => "heartbeat",
            Kind::Output => "output",
            Kind::Status => "status",
            Kind::CommandRejected => "command_rejected",
            Kind::TestProgress => "test_progress",
            Kind::OperationProgress => "operation_progress",
            Kind::Other(t) => t,
            Kind::Malformed => "_malformed",
            Kind::Binary => "_binary",
        }
    }

    /// Whether the stored text is the frame itself, a JSON envelope
    /// (otherwise it is the raw text to show as `raw`).
    pub fn is_envelope(&self) -> bool {
        !matches!(self, Kind::Malformed | Kind::Binary)
    }
}

/// One stored frame. `text` is the frame exactly as received (for binary
/// frames: its bytes, lossily decoded as UTF-8); the payload is extracted
/// again when the API serves it, which keeps the per-frame cost at one copy.
#[derive(Debug, Clone)]
pub struct Msg {
    pub t: u64,
    pub conn: ConnId,
    pub kind: Kind,
    pub text: Arc<str>,
}

/// A text frame, classified outside the lock.
pub struct Incoming {
    pub kind: Kind,
    /// The text is valid JSON (even when it is not a valid envelope).
    pub is_json: bool,
    /// The parsed payload, only for the types the mock acts on or the web
    /// page shows (not for the many `output` lines).
    pub payload: Option<Value>,
}

#[derive(Deserialize)]
struct TypeProbe<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct PayloadOnly {
    #[serde(default)]
    payload: Value,
}

impl Incoming {
    pub fn is_malformed(&self) -> bool {
        self.kind == Kind::Malformed
    }
}

pub fn classify(text: &str) -> Incoming {
    // serde would also accept a JSON array for a struct; only objects count.
    let is_object = text.trim_start().starts_with('{');
    let probe = if is_object {
        serde_json::from_str::<TypeProbe<'_>>(text).ok()
    } else {
        None
    };
    match probe.and_then(|p| p.kind) {
        Some(t) => {
            let kind = Kind::from_type(&t);
            let parse = matches!(
                kind,
                Kind::Register
                    | Kind::Heartbeat
                    | Kind::Status
                    | Kind::CommandRejected
                    | Kind::TestProgress
                    | Kind::OperationProgress
            );
            let payload = parse.then(|| payload_of(text));
            Incoming {
                kind,
                is_json: true,
                payload,
            }
        }
        None => Incoming {
            kind: Kind::Malformed,
            is_json: serde_json::from_str::<IgnoredAny>(text).is_ok(),
            payload: None,
        },
    }
}

/// The frame's `payload`, `null` when it has none or is not JSON.
pub fn payload_of(text: &str) -> Value {
    serde_json::from_str::<PayloadOnly>(text)
        .map(|p| p.payload)
        .unwrap_or(Value::Null)
}

/// The `frame` value of a record line: the frame itself when it is JSON on
/// one line, re-serialised when it spans lines, else `{"_raw": text}`.
pub fn record_frame(text: &str, is_json: bool) -> Cow<'_, str> {
    if is_json {
        if !text.contains(['\n', '\r']) {
            return Cow::Borrowed(text);
        }
        if let Ok(v) = serde_json::from_str::<Value>(text) {
            return Cow::Owned(v.to_string());
        }
    }
    Cow::Owned(json!({ "_raw": text }).to_string())
}
