//! Inbound frames: text from the dashboard through `protocol::decode` and
//! the core's command-name lookup (what `Core::handle` does with it).
//!
//! Checks, besides "never panics": decode agrees with a plain JSON reading
//! of the frame, and what it hands to the log (unknown type names, errors)
//! stays short however large the frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nixfleet_agent::commands::CommandKind;
use nixfleet_agent::protocol::{DecodeError, Inbound, KillSignal, decode};
use serde_json::Value;

/// Longest error text allowed into a log line (see tests/properties.rs).
const MAX_LOGGED_ERROR: usize = 600;
const MAX_LOGGED_TYPE: usize = 64 + '…'.len_utf8();

fuzz_target!(|data: &[u8]| {
    // WebSocket text frames are valid UTF-8 by the time the agent sees them.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match decode(text) {
        Err(error) => {
            let shown = error.to_string();
            assert!(
                shown.len() <= MAX_LOGGED_ERROR,
                "{}-byte error",
                shown.len()
            );
            if let DecodeError::BadPayload { kind, .. } = &error {
                assert!(kind.len() <= MAX_LOGGED_TYPE);
            }
        }
        Ok(inbound) => {
            // serde skips ignored fields without checking every escape
            // (a lone surrogate in an unknown key passes), so a frame that
            // decodes may still not parse as a `Value`: nothing to compare.
            let Ok(value) = serde_json::from_str::<Value>(text) else {
                return;
            };
            assert!(
                value.is_object(),
                "a frame that is not an object was decoded"
            );
            let kind = value["type"]
                .as_str()
                .expect("decoded frames have a string type");
            let payload = &value["payload"];
            if ["registered", "command", "kill_command"].contains(&kind) {
                assert!(
                    payload.is_object() || payload.is_null(),
                    "payload {payload}"
                );
            }
            match inbound {
                Inbound::Registered { host_id } => {
                    assert_eq!(kind, "registered");
                    assert!(host_id.len() <= 128 + '…'.len_utf8());
                }
                Inbound::Command { command } => {
                    assert_eq!(kind, "command");
                    assert_eq!(payload["command"].as_str(), Some(command.as_str()));
                    // The core's lookup: a name from the table, or rejected.
                    if let Some(kind) = CommandKind::parse(&command) {
                        assert_eq!(kind.name(), command);
                    }
                    let shown: String = command.chars().take(64).collect();
                    assert!(shown.len() <= 64 * 4);
                }
                Inbound::KillCommand { signal, pid } => {
                    assert_eq!(kind, "kill_command");
                    let expected_pid = payload.get("pid").map_or(Some(0), Value::as_u64);
                    assert_eq!(expected_pid, Some(u64::from(pid)));
                    let expected_signal =
                        payload.get("signal").map_or(Some("SIGTERM"), Value::as_str);
                    let signal = match signal {
                        KillSignal::Term => "SIGTERM",
                        KillSignal::Kill => "SIGKILL",
                    };
                    assert_eq!(expected_signal, Some(signal));
                }
                Inbound::Unknown { kind: shown } => {
                    assert!(!["registered", "command", "kill_command"].contains(&kind));
                    assert!(shown.len() <= MAX_LOGGED_TYPE);
                    assert!(kind.starts_with(shown.trim_end_matches('…')));
                }
            }
        }
    }
});
