//! Unit tests of protocol.rs, kept apart so the module stays readable.

use super::*;
use serde_json::{Value, json};

fn parse(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn output_line_has_the_envelope_and_is_error_follows_the_stream() {
    let frame = Outbound::Output(OutputLine::new("switch", Stream::Stderr, "boom \"x\"")).to_json();
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
