//! Property tests (proptest) over the agent's hostile-input paths:
//!
//! - inbound frame text → `protocol::decode`: never panics, agrees with a
//!   plain JSON reading of the same frame, and never echoes a large frame
//!   into what gets logged;
//! - configuration loading (`config::load_with`) from generated TOML files,
//!   environment values and token sources: never panics, errors are one line
//!   without the token, a loaded configuration renders without the token and
//!   reads back (from its own rendering) to the same configuration;
//! - the outbox, against a model of a connection that breaks mid-batch:
//!   every line and every status arrives, in order; what arrives twice is
//!   only what was written and not acknowledged when a connection broke.
//!
//! `PROPTEST_CASES` scales every test (the defaults keep CI to seconds).
//! The fuzz targets in `fuzz/` check the same properties for longer runs.

use nixfleet_agent::config::{Cli, Config, load_with};
use nixfleet_agent::outbox::{Item, Outbox};
use nixfleet_agent::protocol::{DecodeError, Inbound, KillSignal, decode};
use proptest::prelude::*;
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::Path;

// ---------------------------------------------------------------------------
// Inbound frames

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

/// Cases per test: the default times `PROPTEST_CASES`/256 when that is set.
fn cases(default: u32) -> u32 {
    match std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        Some(n) => (u64::from(default) * u64::from(n) / 256).clamp(1, u64::from(u32::MAX)) as u32,
        None => default,
    }
}

// ---------------------------------------------------------------------------
// Configuration

const KEYS: &[&str] = nixfleet_agent::config::KEYS;

/// A TOML value for the config file.
#[derive(Debug, Clone)]
enum TomlValue {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Array(Vec<TomlValue>),
    Table(Vec<(String, TomlValue)>),
}

impl TomlValue {
    fn render(&self) -> String {
        match self {
            TomlValue::Str(s) => nixfleet_agent::config::toml_str(s),
            TomlValue::Int(n) => n.to_string(),
            TomlValue::Float(f) if f.is_nan() => "nan".into(),
            TomlValue::Float(f) if f.is_infinite() => {
                if *f > 0.0 {
                    "inf".into()
                } else {
                    "-inf".into()
                }
            }
            TomlValue::Float(f) => format!("{f:?}"),
            TomlValue::Bool(b) => b.to_string(),
            TomlValue::Array(items) => format!(
                "[{}]",
                items
                    .iter()
                    .map(TomlValue::render)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            TomlValue::Table(fields) => format!(
                "{{{}}}",
                fields
                    .iter()
                    .map(|(k, v)| format!(
                        "{} = {}",
                        nixfleet_agent::config::toml_str(k),
                        v.render()
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn strings(&self, out: &mut Vec<String>) {
        match self {
            TomlValue::Str(s) => out.push(s.clone()),
            TomlValue::Array(items) => items.iter().for_each(|i| i.strings(out)),
            TomlValue::Table(fields) => fields.iter().for_each(|(k, v)| {
                out.push(k.clone());
                v.strings(out);
            }),
            _ => {}
        }
    }
}

/// Strings a configuration value might plausibly (or implausibly) hold.
fn config_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => ".{0,24}",
        1 => Just(String::new()),
        2 => prop_oneof![
            Just("ws://127.0.0.1:9/ws"), Just("wss://dash.example/ws?v=2"), Just("http://h/ws"),
            Just("ws://h:99999/ws"), Just("ws://user:pw@h/ws"), Just("wss://[::1]:8443/ws"),
            Just("30"), Just(" 45 "), Just("90s"), Just("2m"), Just("1h 30m"), Just("-5"), Just("0"),
            Just("1.5"), Just("1500ms"), Just("99999999999999999999999999999"), Just("100000d"),
            Just("debug"), Just("TRACE"), Just("info,nixfleet_agent=debug"), Just("verbose"),
            Just("auto"), Just("none"), Just("proc"), Just("stasysmo"), Just("main"),
            Just("release/25.11"), Just("a..b"), Just("-x"), Just("web-01"), Just("/srv/fleet"),
            Just("./-repo"), Just("/nonexistent/file"), Just("/dev/null"), Just("/"),
            Just("git@example.org:fleet.git"), Just("\u{0}"), Just("a\nb"), Just("é\u{202e}"),
        ].prop_map(str::to_owned),
    ]
}

fn toml_value() -> impl Strategy<Value = TomlValue> {
    let leaf = prop_oneof![
        4 => config_string().prop_map(TomlValue::Str),
        2 => prop_oneof![any::<i64>(), -5i64..100_000].prop_map(TomlValue::Int),
        1 => any::<f64>().prop_map(TomlValue::Float),
        1 => any::<bool>().prop_map(TomlValue::Bool),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(TomlValue::Array),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..3).prop_map(TomlValue::Table),
        ]
    })
}

/// Mostly plausible values for a known key (so that many cases load and
/// the round trip is exercised), sometimes anything at all.
fn value_for(key: &str) -> BoxedStrategy<TomlValue> {
    let strings = |choices: &'static [&'static str]| {
        prop::sample::select(choices).prop_map(|s| TomlValue::Str(s.to_owned()))
    };
    let plausible: BoxedStrategy<TomlValue> = match key {
        "url" => strings(&[
            "ws://127.0.0.1:9/ws",
            "wss://dash.example/ws?v=2",
            "wss://[::1]:8443/ws",
            "ws://h",
            "wss://dash.example:443/a/b",
        ])
        .boxed(),
        "branch" => strings(&["main", "release/25.11", "feature-x", "v1.2"]).boxed(),
        "hostname" => "[a-z][a-z0-9_.-]{0,20}".prop_map(TomlValue::Str).boxed(),
        "log_level" => strings(&[
            "debug",
            "info",
            "WARN",
            "error",
            "trace",
            "off",
            "info,nixfleet_agent=debug",
        ])
        .boxed(),
        "metrics" => strings(&["auto", "stasysmo", "proc", "none"]).boxed(),
        "interval" | "ping_interval" | "ping_timeout" | "backoff_max" | "stop_grace" => {
            prop_oneof![
                (0i64..200_000).prop_map(TomlValue::Int),
                (0u64..5000).prop_map(|n| TomlValue::Str(n.to_string())),
                strings(&["90s", "2m", "1h 30m", "1day", " 45 ", "10m 5s"]),
            ]
            .boxed()
        }
        "repo_dir" | "stasysmo_dir" | "state_dir" | "ssh_key" => {
            "/[a-z0-9 ._'\\-]{1,20}(/[a-z0-9._-]{1,8}){0,2}"
                .prop_map(TomlValue::Str)
                .boxed()
        }
        "repo_url" => strings(&[
            "git@example.org:fleet.git",
            "https://example.org/fleet.git",
            // Credentials, which the rendering redacts.
            "https://user:pw@example.org/fleet.git",
            "/srv/upstream",
        ])
        .boxed(),
        "ca_file" => strings(&["/dev/null", "/etc/hostname", "/etc/passwd"]).boxed(),
        _ => toml_value().boxed(),
    };
    prop_oneof![4 => plausible, 1 => toml_value()].boxed()
}

fn config_key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(KEYS).prop_map(str::to_owned),
        1 => prop_oneof![Just("tokne"), Just("repo-dir"), Just("Interval"), Just("")].prop_map(str::to_owned),
        1 => ".{1,10}",
    ]
}

/// Where the (distinctive) token is put.
#[derive(Debug, Clone, Copy)]
enum TokenPlace {
    Nowhere,
    FileInline,
    Env,
    TokenFile { mode: u32, via_env: bool },
    Credential { mode: u32 },
}

fn token_place() -> impl Strategy<Value = TokenPlace> {
    let mode = prop_oneof![Just(0o600u32), Just(0o640), Just(0o644), Just(0o400)];
    prop_oneof![
        1 => Just(TokenPlace::Nowhere),
        2 => Just(TokenPlace::FileInline),
        2 => Just(TokenPlace::Env),
        2 => (mode.clone(), any::<bool>()).prop_map(|(mode, via_env)| TokenPlace::TokenFile { mode, via_env }),
        2 => mode.prop_map(|mode| TokenPlace::Credential { mode }),
    ]
}

#[derive(Debug, Clone)]
struct ConfigCase {
    /// Start from a valid configuration before applying the changes.
    valid_base: bool,
    token: String,
    token_place: TokenPlace,
    file: Vec<(String, TomlValue)>,
    env: Vec<(String, String)>,
    /// Something that is not TOML appended to the file.
    garbage: Option<String>,
}

fn config_case() -> impl Strategy<Value = ConfigCase> {
    (
        prop::bool::weighted(0.9),
        "[A-Za-z0-9]{12,20}".prop_map(|t| format!("tK-{t}")),
        token_place(),
        prop::collection::vec(
            config_key().prop_flat_map(|key| {
                let value = value_for(&key);
                (Just(key), value)
            }),
            0..5,
        ),
        prop::collection::vec(
            (
                prop::sample::select(KEYS).prop_map(str::to_owned),
                config_string(),
            ),
            0..4,
        ),
        prop::option::weighted(0.1, ".{0,20}"),
    )
        .prop_map(
            |(valid_base, token, token_place, file, env, garbage)| ConfigCase {
                valid_base,
                token,
                token_place,
                file,
                env,
                garbage,
            },
        )
}

/// Everything a case feeds the loader, ready to run.
struct Prepared {
    _dir: tempfile::TempDir,
    cli: Cli,
    env: BTreeMap<String, String>,
    /// Whether the token's text appears in some other input (then it may
    /// legitimately be shown as that other value).
    token_elsewhere: bool,
}

fn prepare(case: &ConfigCase) -> Prepared {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let mut file: Vec<(String, String)> = Vec::new();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    if case.valid_base {
        file.push(("url".into(), "\"ws://127.0.0.1:9/ws\"".into()));
        file.push(("repo_dir".into(), toml_path(&base.join("repo"))));
        file.push(("state_dir".into(), toml_path(&base.join("state"))));
        file.push(("hostname".into(), "\"prop-host\"".into()));
    }
    let write_token = |name: &str, mode: u32| {
        let path = base.join(name);
        std::fs::write(&path, format!("{}\n", case.token)).unwrap();
        set_mode(&path, mode);
        path
    };
    match case.token_place {
        TokenPlace::Nowhere => {}
        TokenPlace::FileInline => file.push(("token".into(), format!("\"{}\"", case.token))),
        TokenPlace::Env => {
            env.insert("NIXFLEET_TOKEN".into(), case.token.clone());
        }
        TokenPlace::TokenFile { mode, via_env } => {
            let path = write_token("token", mode);
            if via_env {
                env.insert("NIXFLEET_TOKEN_FILE".into(), path.display().to_string());
            } else {
                file.push(("token_file".into(), toml_path(&path)));
            }
        }
        TokenPlace::Credential { mode } => {
            std::fs::create_dir(base.join("creds")).unwrap();
            write_token("creds/token", mode);
            env.insert(
                "CREDENTIALS_DIRECTORY".into(),
                base.join("creds").display().to_string(),
            );
        }
    }
    let mut others: Vec<String> = Vec::new();
    for (key, value) in &case.file {
        file.retain(|(k, _)| k != key);
        file.push((key.clone(), value.render()));
        others.push(key.clone());
        value.strings(&mut others);
    }
    for (key, value) in &case.env {
        env.insert(
            format!("NIXFLEET_{}", key.to_ascii_uppercase()),
            value.clone(),
        );
        others.push(value.clone());
    }
    let mut text: String = file
        .iter()
        .map(|(k, v)| format!("{} = {v}\n", toml_key(k)))
        .collect();
    if let Some(garbage) = &case.garbage {
        text.push_str(garbage);
        others.push(garbage.clone());
    }
    let path = base.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    set_mode(&path, 0o600);
    let token_elsewhere = others.iter().any(|o| o.contains(&case.token));
    Prepared {
        _dir: dir,
        cli: Cli {
            config: Some(path),
            ..Cli::default()
        },
        env,
        token_elsewhere,
    }
}

fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_owned()
    } else {
        nixfleet_agent::config::toml_str(key)
    }
}

fn toml_path(path: &Path) -> String {
    nixfleet_agent::config::toml_str(&path.display().to_string())
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn load(cli: &Cli, env: &BTreeMap<String, String>) -> Result<Config, String> {
    load_with(cli, |name| env.get(name).cloned()).map_err(|e| e.0)
}

/// The effective values, for comparing two loads.
fn effective(c: &Config) -> String {
    format!(
        "url={:?} token={:?} repo_dir={:?} repo_url={:?} branch={:?} interval={:?} ssh_key={:?} \
         hostname={:?} log_level={:?} metrics={} stasysmo_dir={:?} ping_interval={:?} \
         ping_timeout={:?} backoff_max={:?} stop_grace={:?} state_dir={:?} ca_file={:?}",
        c.url,
        c.token.expose_secret(),
        c.repo_dir,
        c.repo_url,
        c.branch,
        c.interval,
        c.ssh_key,
        c.hostname,
        c.log_level,
        c.metrics,
        c.stasysmo_dir,
        c.ping_interval,
        c.ping_timeout,
        c.backoff_max,
        c.stop_grace,
        c.state_dir,
        c.ca_file
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(400)))]

    #[test]
    fn config_loading_never_panics_or_leaks_the_token(case in config_case()) {
        let prepared = prepare(&case);
        let secret_safe = !prepared.token_elsewhere;
        match load(&prepared.cli, &prepared.env) {
            Err(line) => {
                prop_assert!(line.starts_with("config error: "), "{}", line);
                prop_assert!(!line.contains(['\n', '\r']), "not one line: {:?}", line);
                if secret_safe {
                    prop_assert!(!line.contains(&case.token), "the token leaked: {}", line);
                }
            }
            Ok(config) => {
                // Sanity of what the rest of the agent relies on.
                prop_assert!(config.interval.as_secs() >= 1);
                prop_assert!(config.ping_timeout > config.ping_interval);
                prop_assert!(config.url.starts_with("ws://") || config.url.starts_with("wss://"));
                prop_assert!(!config.token.expose_secret().is_empty());
                let rendered = config.render();
                prop_assert!(rendered.contains("token = \"<redacted>\""), "{}", rendered);
                if secret_safe {
                    prop_assert!(!rendered.contains(&case.token), "the token leaked:\n{}", rendered);
                    for warning in &config.warnings {
                        prop_assert!(!warning.contains(&case.token));
                    }
                    prop_assert!(!format!("{config:?}").contains(&case.token), "Debug shows the token");
                }
                for line in rendered.lines() {
                    prop_assert!(
                        line.starts_with("# warning: ") || line.contains(" = "),
                        "odd line {:?}", line
                    );
                }
                // A token file or credential readable by others is warned about.
                if let TokenPlace::TokenFile { mode, .. } | TokenPlace::Credential { mode } = case.token_place
                    && mode & 0o077 != 0
                    && config.token.expose_secret() == case.token
                    && config.token_source.path().is_some()
                {
                    prop_assert!(
                        config.warnings.iter().any(|w| w.contains("group or others")),
                        "no warning for mode {:o}: {:?}", mode, config.warnings
                    );
                }

                // The rendering is a configuration file that loads back to
                // the same values (with the real secrets in place of the
                // redactions: the token, and repo_url's user info).
                let token_line = format!("token = {}", nixfleet_agent::config::toml_str(config.token.expose_secret()));
                let repo_url_line = config
                    .repo_url
                    .as_deref()
                    .map(|url| format!("repo_url = {}", nixfleet_agent::config::toml_str(url)));
                let again: String = rendered
                    .lines()
                    .map(|l| match &repo_url_line {
                        _ if l.starts_with("token = ") => token_line.clone(),
                        Some(line) if l.starts_with("repo_url = ") => line.clone(),
                        _ => l.to_owned(),
                    })
                    .map(|l| l + "\n")
                    .collect();
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("rendered.toml");
                std::fs::write(&path, &again).unwrap();
                let cli = Cli { config: Some(path), ..Cli::default() };
                match load(&cli, &BTreeMap::new()) {
                    Ok(reloaded) => prop_assert_eq!(effective(&reloaded), effective(&config), "\n{}", again),
                    Err(e) => prop_assert!(false, "the rendering does not load back: {}\n{}", e, again),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Outbox

#[derive(Debug, Clone)]
enum Op {
    Line {
        len: usize,
    },
    Status,
    /// The writer takes a batch and writes it; then the dashboard
    /// acknowledges it, or the connection breaks after the dashboard got
    /// the first `received` frames of it.
    Batch {
        max_bytes: usize,
        broken: Option<usize>,
    },
    /// The dashboard acknowledges everything written so far.
    Acknowledge,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => prop_oneof![0usize..40, 0usize..3000].prop_map(|len| Op::Line { len }),
        1 => Just(Op::Status),
        3 => (prop_oneof![1usize..200, 1usize..20_000], prop::option::weighted(0.2, 0usize..50))
            .prop_map(|(max_bytes, broken)| Op::Batch { max_bytes, broken }),
        1 => Just(Op::Acknowledge),
    ]
}

/// What one frame was: a line or a status, with its number.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Frame {
    Line(u64),
    Status(u64),
}

fn classify(item: &Item) -> Frame {
    let v: Value = serde_json::from_str(&item.frame).unwrap();
    let n = v["payload"]["n"].as_u64().unwrap();
    match v["type"].as_str() {
        Some("output") => Frame::Line(n),
        _ => Frame::Status(n),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(500)))]

    #[test]
    fn outbox_delivers_every_frame_in_order_and_repeats_only_after_a_break(
        ops in prop::collection::vec(op(), 0..200),
    ) {
        let outbox = Outbox::default();
        let (mut lines, mut statuses) = (0u64, 0u64);
        let mut received: Vec<Frame> = Vec::new();
        let mut batch = Vec::new();
        let mut resend_budget = 0usize;
        // Written and not acknowledged: what a break may send again.
        let mut unacknowledged = 0usize;
        let mut last_written = None;
        for op in &ops {
            match *op {
                Op::Line { len } => {
                    let frame = json!({"type": "output", "payload": {"n": lines, "line": "x".repeat(len)}}).to_string();
                    outbox.push(Item::from_log(frame, 1, lines + 1));
                    lines += 1;
                }
                Op::Status => {
                    outbox.push_frame(json!({"type": "status", "payload": {"n": statuses}}).to_string());
                    statuses += 1;
                }
                Op::Batch { max_bytes, broken } => {
                    batch.clear();
                    outbox.take_batch(max_bytes, &mut batch);
                    match broken {
                        None => {
                            received.extend(batch.iter().map(classify));
                            outbox.confirm_written();
                            unacknowledged += batch.len();
                            last_written = batch.last().map(|i| i.seq).or(last_written);
                        }
                        Some(got) => {
                            received.extend(batch.iter().take(got).map(classify));
                            resend_budget += unacknowledged + got.min(batch.len());
                            unacknowledged = 0;
                            last_written = None;
                            outbox.requeue_in_flight();
                        }
                    }
                }
                Op::Acknowledge => {
                    if let Some(seq) = last_written {
                        outbox.acknowledge(seq);
                    }
                    unacknowledged = 0;
                }
            }
        }
        while !outbox.is_empty() {
            batch.clear();
            outbox.take_batch(64 * 1024, &mut batch);
            received.extend(batch.iter().map(classify));
            outbox.confirm_written();
            if let Some(last) = batch.last() {
                outbox.acknowledge(last.seq);
            }
        }

        // Frames arrive in order; a repeat goes back, a new frame is the
        // next one; nothing is skipped.
        let (mut next_line, mut next_status) = (0u64, 0u64);
        let mut repeats = 0usize;
        for frame in &received {
            match *frame {
                Frame::Line(n) if n == next_line => next_line += 1,
                Frame::Status(n) if n == next_status => next_status += 1,
                Frame::Line(n) if n < next_line => repeats += 1,
                Frame::Status(n) if n < next_status => repeats += 1,
                other => prop_assert!(false, "{:?} skips ahead (next line {}, next status {})", other, next_line, next_status),
            }
        }
        prop_assert_eq!(next_line, lines, "lines lost");
        prop_assert_eq!(next_status, statuses, "statuses lost");
        prop_assert!(repeats <= resend_budget, "{} repeats, {} frames were in flight on broken connections", repeats, resend_budget);
    }
}
