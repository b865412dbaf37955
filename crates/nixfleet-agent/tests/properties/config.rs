//! Configuration loading from generated files, environments and token
//! sources: never panics, never leaks the token, reads back its own
//! rendering.

use super::*;

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
