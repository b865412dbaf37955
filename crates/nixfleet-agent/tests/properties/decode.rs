//! Inbound frames: `decode` never panics, agrees with a plain JSON reading
//! of the frame, and never carries a large frame into a log line.

use super::*;

/// Longest text a decode error may carry into a log line, whatever the frame.
const MAX_LOGGED_ERROR: usize = 600;

/// Arbitrary JSON, biased towards the shapes the agent looks at.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..=u64::from(u32::MAX) + 2).prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        prop_oneof![
            Just("SIGTERM"),
            Just("SIGKILL"),
            Just("SIGHUP"),
            Just("switch"),
            Just("stop"),
            Just("pull-switch"),
            Just("")
        ]
        .prop_map(Value::from),
        // Occasionally large: the log must not echo it.
        (1usize..4, any::<char>()).prop_map(|(k, c)| Value::from(c.to_string().repeat(k * 3000))),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((field_name(), inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("type".to_owned()),
        Just("payload".to_owned()),
        Just("command".to_owned()),
        Just("signal".to_owned()),
        Just("pid".to_owned()),
        Just("host_id".to_owned()),
        ".{0,12}",
    ]
}

fn message_type() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("registered".to_owned()),
        Just("command".to_owned()),
        Just("kill_command".to_owned()),
        Just("heartbeat".to_owned()),
        Just("Command".to_owned()),
        ".{0,20}",
        (1usize..3).prop_map(|k| "t".repeat(k * 5000)),
    ]
}

/// A frame that is an object with a string `type`: a plausible envelope.
fn envelope() -> impl Strategy<Value = Map<String, Value>> {
    (
        message_type(),
        prop::option::of(json_value()),
        prop::collection::vec((field_name(), json_value()), 0..3),
    )
        .prop_map(|(kind, payload, extra)| {
            let mut envelope = Map::new();
            for (key, value) in extra {
                if key != "type" && key != "payload" {
                    envelope.insert(key, value);
                }
            }
            envelope.insert("type".into(), Value::from(kind));
            if let Some(payload) = payload {
                envelope.insert("payload".into(), payload);
            }
            envelope
        })
}

/// Envelopes whose payload has the right shape for a known type.
fn well_formed() -> impl Strategy<Value = (Value, Inbound)> {
    prop_oneof![
        ".{0,30}".prop_map(|name| (
            json!({"type": "command", "payload": {"command": name}}),
            Inbound::Command { command: name }
        )),
        (
            prop::option::of(prop_oneof![Just(KillSignal::Term), Just(KillSignal::Kill)]),
            prop::option::of(any::<u32>())
        )
            .prop_map(|(signal, pid)| {
                let mut payload = Map::new();
                if let Some(signal) = signal {
                    let name = match signal {
                        KillSignal::Term => "SIGTERM",
                        KillSignal::Kill => "SIGKILL",
                    };
                    payload.insert("signal".into(), name.into());
                }
                if let Some(pid) = pid {
                    payload.insert("pid".into(), pid.into());
                }
                (
                    json!({"type": "kill_command", "payload": payload}),
                    Inbound::KillCommand {
                        signal: signal.unwrap_or(KillSignal::Term),
                        pid: pid.unwrap_or(0),
                    },
                )
            }),
        prop::option::of(".{0,20}").prop_map(|id| {
            let frame = match &id {
                Some(id) => json!({"type": "registered", "payload": {"host_id": id}}),
                None => json!({"type": "registered"}),
            };
            (
                frame,
                Inbound::Registered {
                    host_id: id.unwrap_or_default(),
                },
            )
        }),
    ]
}

/// What a reader of the plain JSON would conclude; `decode` must agree.
fn check_decoded(text: &str, decoded: &Result<Inbound, DecodeError>) -> Result<(), TestCaseError> {
    match decoded {
        Err(error) => {
            let shown = error.to_string();
            prop_assert!(
                shown.len() <= MAX_LOGGED_ERROR,
                "a {}-byte error for a {}-byte frame",
                shown.len(),
                text.len()
            );
            if let DecodeError::BadPayload { kind, .. } = error {
                prop_assert!(kind.len() <= 64 + '…'.len_utf8());
            }
        }
        Ok(inbound) => {
            // serde skips ignored fields without checking every escape (a
            // lone surrogate in an unknown key passes), so a frame that
            // decodes may still not parse as a `Value`: nothing to compare.
            let Ok(value) = serde_json::from_str::<Value>(text) else {
                return Ok(());
            };
            prop_assert!(
                value.is_object(),
                "a frame that is not an object was decoded"
            );
            let kind = value["type"].as_str().unwrap_or_default();
            let payload = &value["payload"];
            if ["registered", "command", "kill_command"].contains(&kind) {
                prop_assert!(
                    payload.is_object() || payload.is_null(),
                    "payload {}",
                    payload
                );
            }
            match inbound {
                Inbound::Registered { host_id } => {
                    prop_assert_eq!(kind, "registered");
                    prop_assert!(host_id.len() <= 128 + '…'.len_utf8());
                }
                Inbound::Command { command } => {
                    prop_assert_eq!(kind, "command");
                    prop_assert_eq!(payload["command"].as_str(), Some(command.as_str()));
                }
                Inbound::KillCommand { signal, pid } => {
                    prop_assert_eq!(kind, "kill_command");
                    let expected_pid = payload.get("pid").map_or(Some(0), Value::as_u64);
                    prop_assert_eq!(expected_pid, Some(u64::from(*pid)));
                    let expected_signal =
                        payload.get("signal").map_or(Some("SIGTERM"), Value::as_str);
                    let signal = match signal {
                        KillSignal::Term => "SIGTERM",
                        KillSignal::Kill => "SIGKILL",
                    };
                    prop_assert_eq!(expected_signal, Some(signal));
                }
                Inbound::Unknown { kind: shown } => {
                    prop_assert!(!["registered", "command", "kill_command"].contains(&kind));
                    prop_assert!(shown.len() <= 64 + '…'.len_utf8());
                    prop_assert!(kind.starts_with(shown.trim_end_matches('…')));
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2000)))]

    #[test]
    fn decode_survives_any_text(text in ".{0,200}") {
        let decoded = decode(&text);
        check_decoded(&text, &decoded)?;
    }

    #[test]
    fn decode_survives_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        // Frames are text, so the agent only ever sees valid UTF-8.
        let text = String::from_utf8_lossy(&bytes);
        let decoded = decode(&text);
        check_decoded(&text, &decoded)?;
    }

    #[test]
    fn decode_agrees_with_plain_json_on_envelopes(envelope in envelope()) {
        let text = Value::Object(envelope).to_string();
        let decoded = decode(&text);
        // An object with a string type is never "malformed": at worst its
        // payload is bad, and then the type is named.
        prop_assert!(!matches!(decoded, Err(DecodeError::Malformed(_))), "{:?}", decoded);
        check_decoded(&text, &decoded)?;
    }

    #[test]
    fn decode_reads_well_formed_frames_exactly((frame, expected) in well_formed()) {
        let text = frame.to_string();
        prop_assert_eq!(decode(&text), Ok(expected));
    }

    #[test]
    fn decode_survives_damaged_frames(
        (frame, _) in well_formed(),
        cut in any::<prop::sample::Index>(),
        insert in any::<char>(),
        at in any::<prop::sample::Index>(),
    ) {
        let text = frame.to_string();
        let mut damaged: String = text.chars().take(cut.index(text.chars().count() + 1)).collect();
        let position = damaged.char_indices().map(|(i, _)| i).nth(at.index(damaged.chars().count() + 1)).unwrap_or(damaged.len());
        damaged.insert(position, insert);
        let decoded = decode(&damaged);
        check_decoded(&damaged, &decoded)?;
    }

    #[test]
    fn decode_survives_deep_nesting(depth in 1usize..5000, open in prop_oneof![Just('['), Just('{')]) {
        let inner = match open {
            '[' => "[".repeat(depth),
            _ => "{\"a\":".repeat(depth),
        };
        for text in [
            format!("{{\"type\":\"command\",\"payload\":{inner}"),
            format!("{{\"type\":\"x\",\"payload\":{inner}1"),
            inner.clone(),
        ] {
            let decoded = decode(&text);
            check_decoded(&text, &decoded)?;
        }
    }
}

/// Found by fuzzing: serde's derived structs accept arrays, so these were
/// decoded as messages (`["command", {"command": "switch"}]` ran a switch).
#[test]
fn array_envelopes_and_payloads_are_refused() {
    for frame in [
        r#"["registered"]"#,
        r#"["command", {"command": "switch"}]"#,
        r#"["kill_command", {"signal": "SIGKILL", "pid": 0}]"#,
    ] {
        assert!(
            matches!(decode(frame), Err(DecodeError::Malformed(_))),
            "{frame}"
        );
    }
    for frame in [
        r#"{"type": "command", "payload": ["switch"]}"#,
        r#"{"type": "kill_command", "payload": ["SIGKILL", 0]}"#,
        r#"{"type": "registered", "payload": ["h-1"]}"#,
    ] {
        assert!(
            matches!(decode(frame), Err(DecodeError::BadPayload { .. })),
            "{frame}"
        );
    }
    // Still fine: objects, with whitespace around them, and null payloads.
    assert_eq!(
        decode(" \n{\"type\": \"command\", \"payload\": \t{\"command\": \"switch\"}}"),
        Ok(Inbound::Command {
            command: "switch".into()
        })
    );
    assert_eq!(
        decode(r#"{"type": "registered", "payload": null}"#),
        Ok(Inbound::Registered {
            host_id: String::new()
        })
    );
}

/// Found by fuzzing (the log side): a host id is kept short, and decode
/// errors hold no line breaks, whatever the dashboard sends.
#[test]
fn what_decode_hands_to_the_log_is_short_and_on_one_line() {
    let id = "x".repeat(1 << 20);
    match decode(&json!({"type": "registered", "payload": {"host_id": id}}).to_string()) {
        Ok(Inbound::Registered { host_id }) => assert!(host_id.len() <= 131),
        other => panic!("{other:?}"),
    }
    let signal = format!("SIG\nINT{}", "\n".repeat(500));
    let frame = json!({"type": "kill_command", "payload": {"signal": signal}}).to_string();
    let error = decode(&frame).unwrap_err().to_string();
    assert!(!error.contains(['\n', '\r']), "{error:?}");
    assert!(error.len() <= MAX_LOGGED_ERROR);
}
