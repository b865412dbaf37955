//! Protocol v3 as the mock shows it: a switch that completes only on a
//! new register, the v3 fields, progress and compartments, and the log
//! line naming each command sent.

use super::*;

#[tokio::test]
async fn v3_a_switch_waits_for_a_new_register_and_times_out_without_one() {
    let mock = Mock::start(&["--reconnect-timeout", "1"]).await;
    let mut ws = mock.agent("web-7", 30).await;
    for command in [
        "switch",
        "restart",
        "reboot",
        "check-version",
        "refresh-all",
        "force-update",
        "kill",
    ] {
        mock.post_ok(
            "/api/hosts/web-7/command",
            &json!({ "command": command }).to_string(),
        )
        .await;
        assert_eq!(next_json(&mut ws).await["payload"]["command"], command);
    }
    // `kill` marks the running command instead of becoming one.
    let commands = mock.get_ok("/api/hosts/web-7/commands").await;
    assert_eq!(commands.as_array().unwrap().len(), 6);
    assert_eq!(commands[5]["kill_requested"], true);

    // The switch: ok, then no new register within the timeout.
    send(
        &mut ws,
        &json!({"type": "status", "payload": {"status": "ok", "command": "switch",
            "exit_code": 0, "message": "", "generation": "abc1234"}}),
    )
    .await;
    let commands = mock
        .wait_for("/api/hosts/web-7/commands", "the reconnect timeout", |v| {
            v[0]["state"] == "timeout"
        })
        .await;
    assert_eq!(commands[0]["error"], "Agent did not reconnect in time");

    // check-version: warning, completed by the next heartbeat.
    send(
        &mut ws,
        &json!({"type": "status", "payload": {"status": "warning", "command": "check-version",
            "exit_code": 0, "message": "restart to run it", "generation": "abc1234"}}),
    )
    .await;
    mock.wait_for("/api/hosts/web-7/commands", "awaiting the heartbeat", |v| {
        v[3]["state"] == "awaiting_heartbeat"
    })
    .await;
    send(&mut ws, &heartbeat("abc1234")).await;
    mock.wait_for("/api/hosts/web-7/commands", "completed", |v| {
        v[3]["state"] == "ok"
    })
    .await;
    // A refused reboot is recorded as rejected.
    send(
        &mut ws,
        &json!({"type": "command_rejected", "payload": {"reason": "reboot is not allowed",
            "current_command": "", "current_pid": 0}}),
    )
    .await;
    let commands = mock
        .wait_for("/api/hosts/web-7/commands", "rejected", |v| {
            v.as_array()
                .unwrap()
                .iter()
                .any(|c| c["state"] == "rejected")
        })
        .await;
    let rejected: Vec<&Value> = commands
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == "rejected")
        .collect();
    assert_eq!(
        rejected[0]["error"],
        "Agent rejected command: reboot is not allowed"
    );
}

#[tokio::test]
async fn v3_a_switch_completes_when_the_agent_registers_again() {
    let mock = Mock::start(&["--reconnect-timeout", "30"]).await;
    let mut ws = mock.agent("web-8", 30).await;
    mock.post_ok("/api/hosts/web-8/command", r#"{"command": "pull-switch"}"#)
        .await;
    next_json(&mut ws).await;
    send(
        &mut ws,
        &json!({"type": "status", "payload": {"status": "ok", "command": "pull-switch",
            "exit_code": 0, "message": "", "generation": "abc1234"}}),
    )
    .await;
    mock.wait_for("/api/hosts/web-8", "awaiting the reconnect", |v| {
        v["command"]["state"] == "awaiting_reconnect"
    })
    .await;
    // A heartbeat does not complete a switch.
    send(&mut ws, &heartbeat("abc1234")).await;
    let _again = mock.agent("web-8", 30).await;
    let host = mock
        .wait_for("/api/hosts/web-8", "the switch complete", |v| {
            v["command"]["state"] == "ok"
        })
        .await;
    assert_eq!(host["command"]["command"], "pull-switch");
}

#[tokio::test]
async fn v3_fields_progress_and_compartments_are_shown() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.connect(Some(TOKEN)).await.unwrap();
    let mut reg = register("web-9", 30);
    reg["payload"]["theme_color"] = json!("#7aa2f7");
    reg["payload"]["location"] = json!("cloud");
    reg["payload"]["device_type"] = json!("server");
    reg["payload"]["source_commit"] = json!("c0ffee");
    send(&mut ws, &reg).await;
    next_json(&mut ws).await;
    let mut beat = heartbeat("abc1234");
    beat["payload"]["lock_hash"] = json!("ab".repeat(32));
    beat["payload"]["update_status"] = json!({
        "git": {"status": "ok", "message": "", "checked_at": ""},
        "lock": {"status": "outdated", "message": "Updated 9 days ago", "checked_at": ""},
        "system": {"status": "working", "message": "switch in progress", "checked_at": ""},
        "tests": {"status": "unknown", "message": "", "checked_at": ""}});
    send(&mut ws, &beat).await;
    for progress in [
        json!({"pull": {"current": 1, "total": 3, "status": "in_progress"}}),
        json!({"pull": {"current": 3, "total": 3, "status": "complete"}}),
        json!({"system": {"current": 2, "total": 9, "status": "in_progress"}}),
    ] {
        send(
            &mut ws,
            &json!({"type": "operation_progress", "payload": {"progress": progress}}),
        )
        .await;
    }
    let host = mock
        .wait_for("/api/hosts/web-9", "the progress", |v| {
            v["progress"]["system"]["current"] == 2
        })
        .await;
    assert_eq!(host["progress"]["pull"]["status"], "complete");
    assert_eq!(host["theme_color"], "#7aa2f7");
    assert_eq!(host["location"], "cloud");
    assert_eq!(host["device_type"], "server");
    assert_eq!(host["source_commit"], "c0ffee");
    assert_eq!(host["lock_hash"], "ab".repeat(32));
    assert_eq!(host["update_status"]["lock"]["status"], "outdated");
    assert_eq!(host["update_status"]["system"]["status"], "working");
    // A new command starts with fresh progress.
    mock.post_ok("/api/hosts/web-9/command", r#"{"command": "test"}"#)
        .await;
    assert_eq!(mock.host("web-9").await["progress"], json!({}));
    let types = types(&mock.messages("web-9", "?type=operation_progress").await);
    assert_eq!(types.len(), 3);
}

#[tokio::test]
async fn the_log_names_the_command_sent() {
    let mut mock = Mock::start(&[]).await;
    let mut ws = mock.agent("web-log", 30).await;
    mock.post_ok(
        "/api/hosts/web-log/command",
        r#"{"command": "pull-switch"}"#,
    )
    .await;
    next_json(&mut ws).await;
    mock.sigterm();
    let (_, stderr) = mock.wait_exit().await;
    assert!(
        stderr.contains("API: sent command \"pull-switch\""),
        "{stderr}"
    );
}
