//! The checks of single values: durations, URLs, names, levels, and the
//! one-line error that never carries a secret.

use crate::config::errors::error_line;
use crate::config::sources::toml_file::suggest_key;
use crate::config::validate::redact_url;
use crate::config::values::{short_str, show_value};
use crate::config::*;
use figment::value::Value;

fn num(n: i64) -> Value {
    Value::from(n)
}

fn text(s: &str) -> Value {
    Value::from(s)
}

fn dur(v: Value) -> Result<u64, String> {
    parse_duration(&v, 1, MAX_PERIOD_SECS).map(|d| d.as_secs())
}

#[test]
fn durations_accept_seconds_and_humantime() {
    assert_eq!(dur(num(30)), Ok(30));
    assert_eq!(dur(text("30")), Ok(30));
    assert_eq!(dur(text(" 45 ")), Ok(45));
    assert_eq!(dur(text("90s")), Ok(90));
    assert_eq!(dur(text("2m")), Ok(120));
    assert_eq!(dur(text("1h 30m")), Ok(5400));
    assert_eq!(dur(text("1day")), Ok(86_400));
    assert_eq!(parse_duration(&num(0), 0, 10).map(|d| d.as_secs()), Ok(0));
}

#[test]
fn durations_reject_bad_values() {
    for bad in [
        num(0),
        num(-5),
        num(86_401),
        num(i64::MAX),
        Value::from(1.5f64),
        Value::from(30.0f64),
        text("0s"),
        text("-5s"),
        text("-5"),
        text("1.5"),
        text("1500ms"),
        text("abc"),
        text(""),
        text("2 apples"),
        text("99999999999d"),
        text("99999999999999999999999999999999999999999999"),
        Value::from(true),
    ] {
        let shown = show_value(&bad);
        assert!(dur(bad).is_err(), "{shown} accepted");
    }
    assert!(parse_duration(&num(3601), 0, MAX_STOP_GRACE_SECS).is_err());
    assert!(
        dur(text("abc"))
            .unwrap_err()
            .contains("expected whole seconds ≥ 1 like 30 or \"2m\"")
    );
    assert!(dur(num(-5)).unwrap_err().contains("negative"));
    assert!(dur(num(100_000)).unwrap_err().contains("at most 86400"));
}

#[test]
fn urls() {
    for good in [
        "ws://127.0.0.1:8080/ws",
        "wss://dashboard.example.org/ws",
        "wss://[::1]:8443/ws",
        "ws://host",
        "wss://host/ws?v=2",
    ] {
        assert_eq!(check_url(good), Ok(()), "{good}");
    }
    for bad in [
        "http://host/ws",
        "https://host/ws",
        "WSS://host/ws",
        "host:80",
        "/ws",
        "ws://",
        "ws:///ws",
        "wss://agent:pw@host/ws",
        "wss://@host/ws",
        "ws://host:99999/ws",
        "ws://host:0/ws",
        "ws://host:abc/ws",
        "ws://host:/ws",
        "ws://host/ws#frag",
        "ws://ho st/ws",
        "",
    ] {
        assert!(check_url(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn url_redaction_hides_userinfo_and_query() {
    assert_eq!(
        redact_url("wss://a:b@h/ws?t=x"),
        "wss://<redacted>@h/ws?<redacted>"
    );
    assert_eq!(redact_url("ws://h:1/p"), "ws://h:1/p");
}

#[test]
fn hostnames() {
    for good in ["web-01", "a", "db_1.lan", "X9"] {
        assert_eq!(check_hostname(good), Ok(()), "{good}");
    }
    let long = "a".repeat(254);
    for bad in [
        "",
        "-web",
        ".web",
        "we b",
        "web/1",
        "wéb",
        "a\"b",
        long.as_str(),
    ] {
        assert!(check_hostname(bad).is_err(), "{bad} accepted");
    }
    assert_eq!(check_hostname(&"a".repeat(253)), Ok(()));
}

#[test]
fn branches() {
    for good in ["main", "release/25.11", "feature-x", "v1.2"] {
        assert_eq!(check_branch(good), Ok(()), "{good}");
    }
    for bad in [
        "", "-main", "a..b", "a b", "a\tb", "a\nb", "a~1", "a^", "a:b", "a?", "a*", "a[", "a\\b",
        "a@{1}", "@", "/a", "a/", "a//b", "a.", "a.lock", ".hidden", "a/.b",
    ] {
        assert!(check_branch(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn repo_urls() {
    assert_eq!(check_repo_url("git@github.com:org/fleet.git"), Ok(()));
    assert!(check_repo_url("").is_err());
    assert!(check_repo_url("-oProxyCommand=x").is_err());
    assert!(check_repo_url("a\nb").is_err());
}

#[test]
fn log_levels() {
    for good in [
        "info",
        "DEBUG",
        "warn",
        "error",
        "trace",
        "off",
        "info,nixfleet_agent=debug",
        "warn,tokio_tungstenite::protocol=trace",
    ] {
        assert_eq!(check_log_level(good), Ok(()), "{good}");
    }
    for bad in [
        "",
        " ",
        "verbose",
        "warning",
        "info,foo=bogus",
        "=",
        "foo=",
        "=info",
        "a b",
        "info,",
    ] {
        assert!(check_log_level(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn toml_strings_are_escaped() {
    assert_eq!(toml_str("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
    assert_eq!(toml_str("\u{1}"), "\"\\u0001\"");
    let long = "x".repeat(300);
    assert_eq!(toml_str(&long).len(), 302);
    assert_eq!(short_str(&long), format!("\"{}…\"", "x".repeat(200)));
}

#[test]
fn key_suggestions() {
    assert_eq!(suggest_key("repo-dir"), Some("repo_dir"));
    assert_eq!(suggest_key("tokne"), Some("token"));
    assert_eq!(suggest_key("intervall"), Some("interval"));
    assert_eq!(suggest_key("completely_different"), None);
}

#[test]
fn error_lines_are_single_lines_without_secrets() {
    let e = error_line("bad\nthing s3cr3t here", &[SecretString::from("s3cr3t")]);
    assert_eq!(e.0, "config error: bad\\nthing <redacted> here");
}
