//! Stopping a command: the whole process group, grandchildren included;
//! SIGKILL after the grace period or at once; nothing to stop when idle.

use super::*;

#[tokio::test]
async fn stop_when_idle_is_rejected() {
    let dashboard = Dashboard::start().await;
    let (_agent, conn) = agent_with_rebuild(&dashboard, "true", |_| {}).await;
    dashboard.command(conn, "stop");
    let r = dashboard
        .wait_frame("command_rejected", 1, 5 * SECOND)
        .await;
    assert_eq!(r.payload()["reason"], "no command running");
    dashboard.send_json(
        conn,
        json!({"type": "kill_command", "payload": {"signal": "SIGTERM", "pid": 0}}),
    );
    let r = dashboard
        .wait_frame("command_rejected", 2, 5 * SECOND)
        .await;
    assert_eq!(r.payload()["reason"], "no command running");
}

#[tokio::test]
async fn stop_kills_the_whole_group_including_grandchildren() {
    let dashboard = Dashboard::start().await;
    let body = r#"
sleep 1000 &
echo $! > "$HOME/grandchild"
echo $$ > "$HOME/pid"
echo started
wait"#;
    let (agent, conn) = agent_with_rebuild(&dashboard, body, |_| {}).await;
    dashboard.command(conn, "switch");
    dashboard
        .wait_frame_where("output", 10 * SECOND, |p| p["line"] == "started")
        .await;
    let grandchild = read_pid(&agent.dir.path().join("grandchild"));
    assert!(alive(grandchild));
    dashboard.command(conn, "stop");
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.payload()["status"], "error");
    assert_eq!(status.payload()["message"], "Stopped by user");
    assert_eq!(status.payload()["command"], "switch");
    assert!(
        !alive(grandchild),
        "grandchild {grandchild} survived the stop"
    );
}

#[tokio::test]
async fn a_child_ignoring_sigterm_is_killed_after_the_grace_period() {
    let dashboard = Dashboard::start().await;
    let body = r#"
trap '' TERM
echo $$ > "$HOME/pid"
echo stubborn
while true; do sleep 0.1; done"#;
    let (agent, conn) = agent_with_rebuild(&dashboard, body, |o| o.stop_grace = 1).await;
    dashboard.command(conn, "switch");
    dashboard
        .wait_frame_where("output", 10 * SECOND, |p| p["line"] == "stubborn")
        .await;
    let pid = read_pid(&agent.dir.path().join("pid"));
    let asked = tokio::time::Instant::now();
    dashboard.command(conn, "stop");
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    let took = status.at() - asked;
    assert!(
        took >= Duration::from_millis(900),
        "SIGKILL only after the grace period: {took:?}"
    );
    assert!(took <= Duration::from_secs(4), "{took:?}");
    assert_eq!(status.payload()["message"], "Stopped by user");
    assert_eq!(status.payload()["exit_code"], 128 + 9);
    assert!(!alive(pid));
}

#[tokio::test]
async fn kill_command_with_sigkill_stops_at_once() {
    let dashboard = Dashboard::start().await;
    let body = "trap '' TERM\necho $$ > \"$HOME/pid\"\necho up\nwhile true; do sleep 0.1; done";
    let (agent, conn) = agent_with_rebuild(&dashboard, body, |o| o.stop_grace = 30).await;
    dashboard.command(conn, "switch");
    dashboard
        .wait_frame_where("output", 10 * SECOND, |p| p["line"] == "up")
        .await;
    let pid = read_pid(&agent.dir.path().join("pid"));
    // A pid that is not the command's is refused, and nothing is signalled.
    dashboard.send_json(
        conn,
        json!({"type": "kill_command", "payload": {"signal": "SIGKILL", "pid": 1}}),
    );
    dashboard
        .wait_frame("command_rejected", 1, 5 * SECOND)
        .await;
    assert!(alive(pid));
    dashboard.send_json(
        conn,
        json!({"type": "kill_command", "payload": {"signal": "SIGKILL", "pid": pid}}),
    );
    let status = dashboard.wait_frame("status", 1, 5 * SECOND).await;
    assert_eq!(status.payload()["message"], "Stopped by user");
    assert!(!alive(pid));
}
