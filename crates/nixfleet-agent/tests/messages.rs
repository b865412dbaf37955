//! What the agent tells its operator (issue 26): a refused command is in
//! the agent's own log with its reason.

mod common;

use common::*;

#[tokio::test]
async fn a_rejected_command_is_logged_with_its_reason() {
    let dashboard = Dashboard::start().await;
    let agent = Agent::start(AgentOptions::new(dashboard.url())).await;
    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;

    dashboard.command(register.conn(), "stop");
    dashboard.wait_frame("command_rejected", 1, 10 * SECOND).await;
    let log = agent
        .wait_stderr("rejected a command", 10 * SECOND)
        .await;
    assert!(log.contains("no command running"), "{log}");
}
