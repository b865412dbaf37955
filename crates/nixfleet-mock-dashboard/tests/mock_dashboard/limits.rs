//! What the mock does with hosts that go quiet, malformed, big and too
//! many frames, SIGTERM, and its token options.

use super::*;

#[tokio::test]
async fn a_host_goes_offline_after_three_missed_intervals() {
    let mock = Mock::start(&[]).await;
    let registered = Instant::now();
    let mut ws = mock.agent("slow", 1).await;
    assert_eq!(mock.host("slow").await["online"], true);
    let host = mock
        .wait_for("/api/hosts/slow", "offline", |v| v["online"] == false)
        .await;
    let elapsed = registered.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2900),
        "offline after only {elapsed:?}"
    );
    assert_eq!(host["connected"], true, "still connected, just silent");

    send(&mut ws, &heartbeat("abc")).await;
    mock.wait_for("/api/hosts/slow", "online again", |v| v["online"] == true)
        .await;
}

#[tokio::test]
async fn malformed_frames_are_stored_and_the_connection_stays_up() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.connect(Some(TOKEN)).await.unwrap();
    ws.send(Message::text("hello?")).await.unwrap();
    let early = mock.wait_messages("(unregistered)", 1).await;
    assert_eq!(early["messages"][0]["type"], "_malformed");
    assert_eq!(early["messages"][0]["raw"], "hello?");
    // A register without a hostname is stored but not answered.
    send(
        &mut ws,
        &json!({"type": "register", "payload": {"hostname": 7}}),
    )
    .await;
    mock.wait_messages("(unregistered)", 2).await;
    assert_eq!(mock.get("/api/hosts").await, (200, json!([])));

    send(&mut ws, &register("messy", 30)).await;
    assert_eq!(next_json(&mut ws).await["type"], "registered");
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let frames = [
        "not json",
        "[1, 2]",
        "\"register\"",
        r#"{"payload": {}}"#,
        r#"{"type": 5}"#,
        r#"{"type": "output", "payload": {"line": "x"}} trailing"#,
        "",
        &deep,
    ];
    for f in frames {
        ws.send(Message::text(f)).await.unwrap();
    }
    ws.send(Message::binary(vec![0xff, 0x00, b'a']))
        .await
        .unwrap();
    let unknown = json!({"type": "who_knows", "payload": [1]});
    send(&mut ws, &unknown).await;
    send(&mut ws, &json!({"type": "no_payload"})).await;
    send(&mut ws, &heartbeat("z")).await;

    let all = mock.wait_messages("messy", 13).await;
    let msgs = all["messages"].as_array().unwrap();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(msgs[1 + i]["type"], "_malformed", "{i}");
        assert_eq!(msgs[1 + i]["raw"], *f, "{i}");
        assert_eq!(msgs[1 + i]["payload"], Value::Null);
    }
    assert_eq!(msgs[9]["type"], "_binary");
    assert_eq!(msgs[9]["raw"], "\u{fffd}\u{0}a");
    assert_eq!(msgs[10]["type"], "who_knows");
    assert_eq!(msgs[10]["payload"], json!([1]));
    assert_eq!(msgs[11]["type"], "no_payload");
    assert_eq!(msgs[11]["payload"], Value::Null);
    assert!(msgs[11].get("raw").is_none());
    assert_eq!(msgs[12]["type"], "heartbeat");
    let malformed = mock.messages("messy", "?type=_malformed").await;
    assert_eq!(
        malformed["messages"].as_array().unwrap().len(),
        frames.len()
    );

    // Still connected and usable.
    let host = mock.host("messy").await;
    assert_eq!(host["online"], true);
    assert_eq!(host["last_heartbeat"], heartbeat("z")["payload"]);
    mock.post_ok("/api/hosts/messy/command", r#"{"command": "test"}"#)
        .await;
    assert_eq!(next_json(&mut ws).await["payload"]["command"], "test");
}

#[tokio::test]
async fn big_frames_and_floods_are_stored_in_order() {
    let mock = Mock::start(&[]).await;
    let mut ws = mock.agent("flood", 30).await;
    let big_line = "x".repeat(3 * 1024 * 1024);
    send(&mut ws, &output(&big_line)).await;
    const N: usize = 20_000;
    for i in 0..N {
        ws.feed(Message::text(output(&format!("{i}")).to_string()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    mock.wait_messages("flood", 2 + N as u64).await;

    let big = mock.messages("flood", "?since=1&limit=1").await;
    assert_eq!(
        big["messages"][0]["payload"]["line"]
            .as_str()
            .unwrap()
            .len(),
        big_line.len()
    );
    assert_eq!(big["next"], 2);
    let rest = mock.messages("flood", "?since=2&type=output").await;
    let msgs = rest["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), N);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m["payload"]["line"], i.to_string());
        assert_eq!(m["index"], 2 + i as u64);
    }
    assert_eq!(mock.host("flood").await["online"], true);
}

#[tokio::test]
async fn the_message_cap_evicts_the_oldest() {
    let mock = Mock::start(&["--max-messages-per-host", "5"]).await;
    let mut ws = mock.agent("capped", 30).await;
    for i in 0..10 {
        send(&mut ws, &output(&i.to_string())).await;
    }
    let all = mock.wait_messages("capped", 11).await;
    assert_eq!(all["evicted"], 6);
    let lines: Vec<&str> = all["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"]["line"].as_str().unwrap())
        .collect();
    assert_eq!(lines, ["5", "6", "7", "8", "9"]);
    assert_eq!(all["messages"][0]["index"], 6);
    let host = mock.host("capped").await;
    assert_eq!(host["messages"], 11);
    assert_eq!(host["evicted"], 6);
    // The register payload survives eviction.
    assert_eq!(host["register"]["hostname"], "capped");
}

#[tokio::test]
async fn sigterm_closes_agents_with_1001_and_exits_0() {
    let mut mock = Mock::start(&[]).await;
    // A refused attempt with a wrong token, to check it is not logged.
    assert!(mock.connect(Some("wrong-secret-xyz")).await.is_err());
    let mut ws = mock.agent("bye", 30).await;
    mock.sigterm();
    let close = next_close(&mut ws).await;
    assert_eq!(u16::from(close.code), 1001);
    while let Some(Ok(_)) = ws.next().await {}
    let (status, stderr) = mock.wait_exit().await;
    assert!(
        status.success(),
        "exit status {status:?}; stderr:\n{stderr}"
    );
    assert!(stderr.contains("registered"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "the token was logged:\n{stderr}");
    assert!(
        !stderr.contains("wrong-secret-xyz"),
        "a token was logged:\n{stderr}"
    );
}

#[tokio::test]
async fn token_file_is_trimmed_and_a_token_is_required() {
    let output = Command::new(env!("CARGO_BIN_EXE_nixfleet-mock-dashboard"))
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--token"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, " \n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_nixfleet-mock-dashboard"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            empty.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    // The message names the file to fix.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(empty.to_str().unwrap()), "{stderr}");

    let file = dir.path().join("token");
    std::fs::write(&file, format!("  {TOKEN}\n")).unwrap();
    let mock = Mock::start(&["--token-file", file.to_str().unwrap()]).await;
    let mut ws = mock.agent("file-token", 30).await;
    send(&mut ws, &heartbeat("x")).await;
    mock.wait_messages("file-token", 2).await;
}

/// Throughput check, not run by default (meaningful only in an optimised
/// build): `cargo test --test mock_dashboard -- --ignored --nocapture
/// flood_throughput`. Set `FLOOD_RECORD=1` to include `--record`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn flood_throughput() {
    let n: u64 = std::env::var("FLOOD_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let mut args = Vec::new();
    if std::env::var_os("FLOOD_RECORD").is_some() {
        args.extend(["--record", record.to_str().unwrap()]);
    }
    let mock = Mock::start(&args).await;
    let mut ws = mock.agent("flood", 30).await;
    let frames: Vec<String> = (0..1000)
        .map(|i| output(&format!("build step {i:06} done")).to_string())
        .collect();
    let start = Instant::now();
    for i in 0..n {
        ws.feed(Message::text(frames[(i % 1000) as usize].as_str()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    let sent = start.elapsed();
    let mut slowest_health = Duration::ZERO;
    loop {
        let t = Instant::now();
        let (status, v) = mock.get("/api/hosts/flood").await;
        slowest_health = slowest_health.max(t.elapsed());
        assert_eq!(status, 200);
        if v["messages"] == n + 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "{v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = start.elapsed();
    let pid = mock.child.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("");
    eprintln!(
        "{n} frames: client sent in {sent:?}, mock stored all after {total:?} = {:.0} frames/s; \
         slowest GET during the flood {slowest_health:?}; mock {peak}",
        n as f64 / total.as_secs_f64()
    );
}

#[tokio::test]
async fn a_frame_over_the_limit_ends_only_that_connection() {
    let mock = Mock::start(&[]).await;
    let mut other = mock.agent("bystander", 30).await;
    let mut ws = mock.agent("huge", 30).await;
    let huge = output(&"y".repeat(17 * 1024 * 1024)).to_string();
    // The mock may drop the connection while the frame is still going out.
    let _ = ws.send(Message::text(huge)).await;
    let conns = mock
        .wait_for("/api/hosts/huge/connections", "the drop", |v| {
            v[0]["closed_at"].is_u64()
        })
        .await;
    assert!(conns[0]["error"].is_string(), "{conns}");
    assert_eq!(mock.host("huge").await["connected"], false);
    assert_eq!(mock.get("/health").await.0, 200);
    mock.post_ok("/api/hosts/bystander/command", r#"{"command": "pull"}"#)
        .await;
    assert_eq!(next_json(&mut other).await["payload"]["command"], "pull");
}
