//! The HTTP API and the agents' connections: auth, registration and
//! heartbeats, the message store and its filters, commands and disconnects
//! sent to an agent, close frames and the record file.

use super::*;

#[tokio::test]
async fn health_and_not_found() {
    let mock = Mock::start(&[]).await;
    assert_eq!(mock.get("/health").await, (200, json!({"status": "ok"})));
    assert_eq!(mock.get("/api/hosts").await, (200, json!([])));
    for path in [
        "/nope",
        "/api/hosts/ghost",
        "/api/hosts/ghost/messages",
        "/api/hosts/ghost/connections",
    ] {
        let (status, v) = mock.get(path).await;
        assert_eq!(status, 404, "{path}");
        assert!(v["error"].is_string(), "{path}: {v}");
    }
    let (status, v) = mock.request("DELETE", "/health", None).await;
    assert_eq!(status, 405);
    assert!(parse(&v)["error"].is_string());
}

#[tokio::test]
async fn upgrade_needs_the_bearer_token() {
    let mock = Mock::start(&[]).await;
    for token in [None, Some("wrong-token"), Some("")] {
        match mock.connect(token).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "token {token:?}")
            }
            Err(e) => panic!("token {token:?}: unexpected error {e}"),
            Ok(_) => panic!("token {token:?}: the upgrade was accepted"),
        }
    }
    // Not a Bearer token, and a plain GET without upgrade headers.
    let (status, body) = http_raw(
        &mock.addr,
        "GET",
        "/ws",
        &[("Authorization", &format!("Basic {TOKEN}"))],
        None,
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(parse(&body), json!({"error": "unauthorized"}));
    let rejected = mock.get_ok("/api/rejected").await;
    assert_eq!(rejected.as_array().unwrap().len(), 4, "{rejected}");
    assert_eq!(mock.get("/api/hosts").await, (200, json!([])));

    // The scheme is case-insensitive; the right token gets through.
    let mut request = format!("ws://{}/ws", mock.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("bearer {TOKEN}").parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    send(&mut ws, &register("auth-ok", 30)).await;
    assert_eq!(next_json(&mut ws).await["type"], "registered");
}

#[tokio::test]
async fn register_and_heartbeat_make_the_host_online() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.agent("web-1", 30).await;
    let host = mock.host("web-1").await;
    assert_eq!(host["online"], true, "{host}");
    assert_eq!(host["connected"], true);
    assert_eq!(host["connections"], 1);
    assert_eq!(host["register"], register("web-1", 30)["payload"]);
    assert_eq!(host["last_heartbeat"], Value::Null);
    assert_eq!(host["heartbeat_interval_ms"], 30_000);

    let hb = heartbeat("def5678");
    send(&mut ws, &hb).await;
    let hosts = mock
        .wait_for("/api/hosts", "the heartbeat", |v| {
            v[0]["last_heartbeat"] == hb["payload"]
        })
        .await;
    assert_eq!(hosts.as_array().unwrap().len(), 1);
    assert_eq!(hosts[0]["hostname"], "web-1");
    assert_eq!(hosts[0]["online"], true);
    assert!(hosts[0]["last_seen"].as_u64().unwrap() >= hosts[0]["registered_at"].as_u64().unwrap());
    let messages = mock.messages("web-1", "").await;
    assert_eq!(types(&messages), ["register", "heartbeat"]);
    assert_eq!(messages["messages"][1]["payload"], hb["payload"]);
}

#[tokio::test]
async fn messages_are_kept_in_order_and_can_be_filtered() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.agent("web-2", 30).await;
    send(&mut ws, &heartbeat("a")).await;
    for i in 0..5 {
        send(&mut ws, &output(&format!("line {i}"))).await;
        if i == 2 {
            send(&mut ws, &heartbeat("b")).await;
        }
    }
    let status = json!({"type": "status", "payload": {"status": "ok", "command": "switch",
        "exit_code": 0, "message": "ok", "generation": "b"}});
    send(&mut ws, &status).await;
    let all = mock.wait_messages("web-2", 9).await;
    assert_eq!(
        types(&all),
        [
            "register",
            "heartbeat",
            "output",
            "output",
            "output",
            "heartbeat",
            "output",
            "output",
            "status"
        ]
    );
    let indices: Vec<u64> = all["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, (0..9).collect::<Vec<_>>());
    assert_eq!(all["messages"][8]["payload"], status["payload"]);
    assert_eq!(all["evicted"], 0);
    let conn = all["messages"][0]["conn"].clone();
    assert!(
        all["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["conn"] == conn && m["t"].is_u64())
    );

    let outputs = mock.messages("web-2", "?type=output").await;
    let lines: Vec<&str> = outputs["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"]["line"].as_str().unwrap())
        .collect();
    assert_eq!(lines, ["line 0", "line 1", "line 2", "line 3", "line 4"]);
    assert_eq!(outputs["next"], 9);

    let newer = mock.messages("web-2", "?since=9").await;
    assert_eq!(newer["messages"], json!([]));
    assert_eq!(newer["next"], 9);
    let page = mock.messages("web-2", "?type=output&since=3&limit=2").await;
    assert_eq!(page["messages"][0]["payload"]["line"], "line 1");
    assert_eq!(page["messages"][1]["payload"]["line"], "line 2");
    assert_eq!(page["next"], 5);
    let page = mock.messages("web-2", "?type=output&since=5").await;
    assert_eq!(types(&page), ["output", "output"]);

    send(&mut ws, &output("line 5")).await;
    let later = mock
        .wait_for("/api/hosts/web-2/messages?since=9", "one more", |v| {
            v["next"] == 10
        })
        .await;
    assert_eq!(later["messages"][0]["payload"]["line"], "line 5");
    assert_eq!(later["messages"][0]["index"], 9);

    for bad in ["?since=x", "?since=-1", "?limit=1.5"] {
        let (status, v) = mock.get(&format!("/api/hosts/web-2/messages{bad}")).await;
        assert_eq!(status, 400, "{bad}: {v}");
    }
}

#[tokio::test]
async fn api_posts_reach_the_agent_and_disconnect_closes_with_the_code() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.agent("web-3", 30).await;

    let ok = mock
        .post_ok("/api/hosts/web-3/command", r#"{"command": "switch"}"#)
        .await;
    assert_eq!(ok["ok"], true);
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "command", "payload": {"command": "switch"}})
    );
    // Names are not validated by the mock.
    mock.post_ok("/api/hosts/web-3/command", r#"{"command": "rm -rf /"}"#)
        .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "command", "payload": {"command": "rm -rf /"}})
    );

    mock.post_ok(
        "/api/hosts/web-3/kill",
        r#"{"signal": "SIGKILL", "pid": 4242}"#,
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "kill_command", "payload": {"signal": "SIGKILL", "pid": 4242}})
    );
    mock.post_ok("/api/hosts/web-3/kill", "").await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "kill_command", "payload": {"signal": "SIGTERM", "pid": 0}})
    );

    let unknown = r#"{"type":"future_thing","payload":{"x":[1,2]}}"#;
    mock.post_ok("/api/hosts/web-3/send", unknown).await;
    assert_eq!(next_text(&mut ws).await, unknown);
    mock.post_ok("/api/hosts/web-3/send", r#"{"raw": "{not json"}"#)
        .await;
    assert_eq!(next_text(&mut ws).await, "{not json");
    mock.post_ok("/api/hosts/web-3/send", r#"{"binary": "bin"}"#)
        .await;
    assert_eq!(next_frame(&mut ws).await, Message::binary(b"bin".to_vec()));

    mock.post_ok(
        "/api/hosts/web-3/disconnect",
        r#"{"code": 1011, "reason": "server exploded"}"#,
    )
    .await;
    let close = next_close(&mut ws).await;
    assert_eq!(close.code, CloseCode::Error);
    assert_eq!(u16::from(close.code), 1011);
    assert_eq!(close.reason.as_str(), "server exploded");
    // Finish the handshake: the client's echo goes out, then the stream ends.
    while let Some(Ok(_)) = ws.next().await {}

    let conns = mock
        .wait_for("/api/hosts/web-3/connections", "the close", |v| {
            v[0]["closed_at"].is_u64()
        })
        .await;
    assert_eq!(conns[0]["closed_by"], "dashboard");
    assert_eq!(conns[0]["sent_close_code"], 1011);
    assert_eq!(conns[0]["sent_close_reason"], "server exploded");
    assert_eq!(conns[0]["close_code"], 1011, "the client echoes the code");
    let host = mock.host("web-3").await;
    assert_eq!(host["connected"], false);
    assert_eq!(host["online"], false);
    let (status, v) = mock
        .post("/api/hosts/web-3/command", r#"{"command": "switch"}"#)
        .await;
    assert_eq!(status, 409, "{v}");
}

#[tokio::test]
async fn disconnect_abort_drops_the_connection() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.agent("web-abort", 30).await;
    mock.post_ok("/api/hosts/web-abort/disconnect", r#"{"abort": true}"#)
        .await;
    // No close frame: the stream just ends (or errors).
    let end = tokio::time::timeout(DEADLINE, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Close(frame))) => return Some(frame),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the connection was not dropped");
    assert_eq!(end, None);
    let conns = mock
        .wait_for("/api/hosts/web-abort/connections", "the drop", |v| {
            v[0]["closed_at"].is_u64()
        })
        .await;
    assert_eq!(conns[0]["closed_by"], "dashboard");
    assert_eq!(conns[0]["sent_close_code"], Value::Null);
}

#[tokio::test]
async fn api_errors() {
    let mock = Mock::start(&[]).await;
    let endpoints = ["command", "kill", "send", "disconnect"];
    for ep in endpoints {
        let (status, v) = mock
            .post(&format!("/api/hosts/nobody/{ep}"), r#"{"command": "x"}"#)
            .await;
        assert_eq!(status, 404, "{ep}: {v}");
        assert!(v["error"].as_str().unwrap().contains("nobody"), "{v}");
    }
    let mut ws = mock.agent("web-4", 30).await;
    let bad_bodies: &[(&str, &str)] = &[
        ("command", "{"),
        ("command", ""),
        ("command", "[]"),
        ("command", r#"{"command": 5}"#),
        ("command", r#"{"cmd": "switch"}"#),
        ("kill", r#"{"pid": "x"}"#),
        ("kill", r#"{"signal": 9}"#),
        ("kill", "nope"),
        ("send", ""),
        ("send", "{\"raw\": "),
        ("disconnect", r#"{"code": 999}"#),
        ("disconnect", r#"{"code": 1005}"#),
        ("disconnect", r#"{"code": "1000"}"#),
        ("disconnect", r#"{"code": 70000}"#),
        (
            "disconnect",
            &format!(r#"{{"reason": "{}"}}"#, "x".repeat(124)),
        ),
    ];
    for (ep, body) in bad_bodies {
        let (status, v) = mock.post(&format!("/api/hosts/web-4/{ep}"), body).await;
        assert_eq!(status, 400, "{ep} {body:?}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    // None of that reached the agent, and the connection is still up.
    mock.post_ok("/api/hosts/web-4/command", r#"{"command": "pull"}"#)
        .await;
    assert_eq!(next_json(&mut ws).await["payload"]["command"], "pull");

    ws.close(None).await.unwrap();
    mock.wait_for("/api/hosts/web-4", "disconnected", |v| {
        v["connected"] == false
    })
    .await;
    for ep in endpoints {
        let (status, v) = mock
            .post(&format!("/api/hosts/web-4/{ep}"), r#"{"command": "x"}"#)
            .await;
        assert_eq!(status, 409, "{ep}: {v}");
    }
}

#[tokio::test]
async fn a_duplicate_hostname_closes_the_older_connection() {
    let mock = Mock::start(&[]).await;
    let mut old = mock.agent("dup", 30).await;
    let mut new = mock.agent("dup", 30).await;
    let close = next_close(&mut old).await;
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "duplicate host");

    // Commands now go to the newer connection.
    mock.post_ok("/api/hosts/dup/command", r#"{"command": "boot"}"#)
        .await;
    assert_eq!(next_json(&mut new).await["payload"]["command"], "boot");

    let host = mock.host("dup").await;
    assert_eq!(host["connections"], 2);
    assert_eq!(host["connected"], true);
    assert_eq!(host["online"], true);
    let conns = mock
        .wait_for("/api/hosts/dup/connections", "the old one closed", |v| {
            v[0]["closed_at"].is_u64()
        })
        .await;
    assert_eq!(conns[0]["sent_close_code"], 1008);
    assert_eq!(conns[0]["closed_by"], "dashboard");
    assert_eq!(conns[1]["open"], true);
    assert_eq!(conns[1]["live"], true);
    assert_eq!(host["live_connection"], conns[1]["id"]);
}

#[tokio::test]
async fn the_agents_close_frame_is_recorded() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.agent("web-5", 30).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "shutdown".into(),
    }))
    .await
    .unwrap();
    // The mock answers the close.
    let reply = next_close(&mut ws).await;
    assert_eq!(reply.code, CloseCode::Normal);
    let conns = mock
        .wait_for("/api/hosts/web-5/connections", "the close", |v| {
            v[0]["closed_at"].is_u64()
        })
        .await;
    assert_eq!(conns[0]["close_code"], 1000);
    assert_eq!(conns[0]["close_reason"], "shutdown");
    assert_eq!(conns[0]["closed_by"], "agent");
    assert_eq!(conns[0]["sent_close_code"], Value::Null);
    assert_eq!(conns[0]["error"], Value::Null);
    assert_eq!(conns[0]["host"], "web-5");
    assert_eq!(conns[0]["frames"], 1);
    let host = mock.host("web-5").await;
    assert_eq!(host["connected"], false);
    assert_eq!(host["online"], false);
}

#[tokio::test]
async fn the_record_file_has_every_frame_and_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("record.jsonl");
    let mock = Mock::start(&["--record", path.to_str().unwrap()]).await;
    let mut ws = mock.connect(Some(TOKEN)).await.unwrap();
    ws.send(Message::text("before register")).await.unwrap();
    send(&mut ws, &register("rec-1", 30)).await;
    next_json(&mut ws).await;
    let hb = heartbeat("abc");
    send(&mut ws, &hb).await;
    ws.send(Message::text("{broken")).await.unwrap();
    ws.send(Message::text(
        "{\n  \"type\": \"multi\",\n  \"payload\": 1\n}",
    ))
    .await
    .unwrap();
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "shutdown".into(),
    }))
    .await
    .unwrap();

    let start = Instant::now();
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains("\"event\":\"close\"") {
            break text.lines().map(parse).collect();
        }
        assert!(start.elapsed() < DEADLINE, "no close event in {text:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 7, "{lines:#?}");
    let conn = lines[0]["conn"].clone();
    assert!(lines.iter().all(|l| l["conn"] == conn && l["t"].is_u64()));
    assert_eq!(lines[0]["event"], "open");
    assert_eq!(lines[0]["host"], "");
    assert_eq!(lines[1]["host"], "");
    assert_eq!(lines[1]["frame"], json!({"_raw": "before register"}));
    assert_eq!(lines[2]["host"], "rec-1");
    assert_eq!(lines[2]["frame"], register("rec-1", 30));
    assert_eq!(lines[3]["frame"], hb);
    assert_eq!(lines[4]["frame"], json!({"_raw": "{broken"}));
    assert_eq!(lines[5]["frame"], json!({"type": "multi", "payload": 1}));
    assert_eq!(lines[6]["event"], "close");
    assert_eq!(lines[6]["host"], "rec-1");
    assert_eq!(lines[6]["code"], 1000);
    assert_eq!(lines[6]["reason"], "shutdown");
    assert_eq!(lines[6]["closed_by"], "agent");
}
