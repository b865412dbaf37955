//! The mock at fleet size: the page's feed sends one host's change, not
//! the fleet, and one request sends a command to many hosts.

use super::*;

/// Registers `n` fake hosts `fleet-1..n`, each with one heartbeat (so each
/// carries metrics), and waits until the API shows all their heartbeats.
async fn fleet(mock: &Mock, n: usize) -> Vec<Ws> {
    let mut agents = Vec::with_capacity(n);
    for i in 1..=n {
        let mut ws = mock.agent(&format!("fleet-{i}"), 30).await;
        send(&mut ws, &heartbeat("abc1234")).await;
        agents.push(ws);
    }
    mock.wait_for("/api/hosts", "every heartbeat", |v| {
        v.as_array().is_some_and(|hosts| {
            hosts.len() == n && hosts.iter().all(|h| !h["last_heartbeat"].is_null())
        })
    })
    .await;
    agents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_reaches_the_page_as_one_host_not_the_fleet() {
    let mock = Mock::start(&[]).await;
    let mut agents = fleet(&mock, 200).await;
    let mut page = SseClient::connect(&mock.addr, "/events").await;
    let whole = page.wait("hosts", |_| true).await;
    assert_eq!(whole["hosts"].as_array().unwrap().len(), 200);
    let whole_bytes = whole.to_string().len();

    send(&mut agents[6], &heartbeat("def5678")).await;
    let change = page.wait("hosts_changed", |_| true).await;
    let hosts = change["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 1, "{change}");
    assert_eq!(hosts[0]["hostname"], "fleet-7");
    assert_eq!(hosts[0]["last_heartbeat"]["generation"], "def5678");
    // Only the new metrics sample: the page keeps the older ones.
    assert_eq!(hosts[0]["view"]["metrics"].as_array().unwrap().len(), 1);
    let change_bytes = change.to_string().len();
    assert!(
        change_bytes * 100 < whole_bytes,
        "one host's change is {change_bytes} bytes, the whole fleet {whole_bytes}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_sends_a_command_to_a_list_of_hosts_or_to_all() {
    let mock = Mock::start(&[]).await;
    let mut agents = fleet(&mock, 5).await;
    let reply = mock
        .post_ok(
            "/api/command",
            r#"{"command": "test", "hosts": ["fleet-2", "fleet-4", "nobody"]}"#,
        )
        .await;
    let sent: Vec<&str> = reply["sent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["host"].as_str().unwrap())
        .collect();
    assert_eq!(sent, ["fleet-2", "fleet-4"]);
    assert_eq!(reply["failed"][0]["host"], "nobody");
    assert_eq!(reply["failed"][0]["error"], "unknown host: nobody");
    for i in [1, 3] {
        assert_eq!(
            next_json(&mut agents[i]).await["payload"]["command"],
            "test"
        );
    }

    // "all": every host, one not connected any more is listed as failed.
    agents[0].close(None).await.unwrap();
    mock.wait_for("/api/hosts/fleet-1", "fleet-1 closed", |h| {
        h["connected"] == false
    })
    .await;
    let reply = mock
        .post_ok("/api/command", r#"{"command": "pull", "hosts": "all"}"#)
        .await;
    assert_eq!(reply["sent"].as_array().unwrap().len(), 4, "{reply}");
    assert_eq!(reply["failed"][0]["error"], "host fleet-1 is not connected");
    for ws in &mut agents[1..] {
        let frame = next_json(ws).await;
        assert_eq!(
            frame,
            json!({"type": "command", "payload": {"command": "pull"}})
        );
    }
    let commands = mock.get_ok("/api/hosts/fleet-2/commands").await;
    assert_eq!(commands[1]["command"], "pull", "{commands}");

    // The single-host form still works; bad bodies are refused.
    mock.post_ok("/api/hosts/fleet-5/command", r#"{"command": "boot"}"#)
        .await;
    assert_eq!(
        next_json(&mut agents[4]).await["payload"]["command"],
        "boot"
    );
    for bad in [
        r#"{"command": "test"}"#,
        r#"{"command": "test", "hosts": "some"}"#,
        r#"{"command": "test", "hosts": [1]}"#,
        r#"{"hosts": "all"}"#,
        "not json",
    ] {
        let (status, v) = mock.post("/api/command", bad).await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v["error"].as_str().unwrap().contains("body"), "{bad}: {v}");
    }
}
