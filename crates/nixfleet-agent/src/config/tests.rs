//! Unit tests of the loader: value checks, and `load_inner` with an explicit
//! environment (no process environment is touched).

use super::errors::error_line;
use super::sources::toml_file::suggest_key;
use super::validate::redact_url;
use super::values::{short_str, show_value};
use super::*;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Value};
use secrecy::ExposeSecret;
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

const TOKEN: &str = "s3cr3t-TOKEN-value";

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

// --- load_inner with an explicit environment --------------------------

struct Fixture {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut env = HashMap::new();
        env.insert("NIXFLEET_URL".into(), "ws://127.0.0.1:9/ws".into());
        env.insert("NIXFLEET_REPO_DIR".into(), "/srv/fleet".into());
        Fixture { dir, env }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, content: &str, mode: u32) -> PathBuf {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn set(&mut self, key: &str, value: impl Into<String>) {
        self.env.insert(key.into(), value.into());
    }

    fn load(&self, cli: &Cli) -> Result<Config, ConfigError> {
        let env = |k: &str| self.env.get(k).cloned();
        load_inner(cli, &env, Some("testhost".into()))
    }

    fn error(&self, cli: &Cli) -> String {
        match self.load(cli) {
            Ok(_) => panic!("expected an error"),
            Err(e) => {
                assert!(!e.0.contains('\n'));
                assert!(!e.0.contains(TOKEN), "{}", e.0);
                e.0
            }
        }
    }
}

#[test]
fn defaults() {
    let mut f = Fixture::new();
    f.set("NIXFLEET_TOKEN", TOKEN);
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(c.url, "ws://127.0.0.1:9/ws");
    assert_eq!(c.token.expose_secret(), TOKEN);
    assert_eq!(c.branch, "main");
    assert_eq!(c.interval, Duration::from_secs(30));
    assert_eq!(c.ping_interval, Duration::from_secs(15));
    assert_eq!(c.ping_timeout, Duration::from_secs(45));
    assert_eq!(c.backoff_max, Duration::from_secs(60));
    assert_eq!(c.stop_grace, Duration::from_secs(10));
    assert_eq!(c.hostname, "testhost");
    assert_eq!(c.log_level, "info");
    assert_eq!(c.metrics, MetricsMode::Auto);
    assert_eq!(c.stasysmo_dir, PathBuf::from("/dev/shm/stasysmo"));
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/nixfleet"));
    assert_eq!(c.repo_url, None);
    assert_eq!(c.ssh_key, None);
    assert_eq!(c.ca_file, None);
    assert_eq!(
        c.token_source,
        TokenSource::Inline {
            origin: "environment variable NIXFLEET_TOKEN".into()
        }
    );
    assert_eq!(c.origin("hostname"), Some("system hostname"));
    assert_eq!(c.origin("branch"), Some("built-in default"));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn v3_presentation_keys_and_allow_reboot() {
    let mut f = Fixture::new();
    f.set("NIXFLEET_TOKEN", TOKEN);
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(
        (&c.theme_color, &c.location, &c.device_type, c.allow_reboot),
        (&None, &None, &None, false)
    );
    assert_eq!(c.origin("allow_reboot"), Some("built-in default"));
    let file = f.write(
        "agent.toml",
        "theme_color = \"#7aa2f7\"\nlocation = \"cloud\"\ndevice_type = \"server\"\nallow_reboot = true\n",
        0o600,
    );
    f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(c.theme_color.as_deref(), Some("#7aa2f7"));
    assert_eq!(c.location.as_deref(), Some("cloud"));
    assert_eq!(c.device_type.as_deref(), Some("server"));
    assert!(c.allow_reboot);
    assert!(c.render().contains("allow_reboot = true  # from "));
    f.set("NIXFLEET_ALLOW_REBOOT", "false");
    assert!(!f.load(&Cli::default()).unwrap().allow_reboot);
    for (var, value, needle) in [
        ("NIXFLEET_THEME_COLOR", "blue", "theme_color = \"blue\""),
        ("NIXFLEET_THEME_COLOR", "#12345g", "six hex digits"),
        (
            "NIXFLEET_LOCATION",
            "moon",
            "expected one of home, work, cloud",
        ),
        ("NIXFLEET_DEVICE_TYPE", "toaster", "expected one of server"),
        ("NIXFLEET_ALLOW_REBOOT", "yes please", "allow_reboot"),
    ] {
        let mut f = Fixture::new();
        f.set("NIXFLEET_TOKEN", TOKEN);
        f.set(var, value);
        let e = f.load(&Cli::default()).unwrap_err();
        assert!(e.0.contains(needle), "{var}={value}: {}", e.0);
        assert!(
            e.0.contains(&format!("environment variable {var}")),
            "{}",
            e.0
        );
    }
}

#[test]
fn state_directory_first_entry() {
    let mut f = Fixture::new();
    f.set("NIXFLEET_TOKEN", TOKEN);
    f.set("STATE_DIRECTORY", "/var/lib/a:/var/lib/b");
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/a"));
    assert_eq!(c.origin("state_dir"), Some("$STATE_DIRECTORY"));
    f.set("NIXFLEET_STATE_DIR", "/srv/state");
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(c.state_dir, PathBuf::from("/srv/state"));
}

#[test]
fn layer_precedence_for_interval() {
    let mut f = Fixture::new();
    f.set("NIXFLEET_TOKEN", TOKEN);
    let file = f.write("agent.toml", "interval = \"2m\"\n", 0o600);
    f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(c.interval, Duration::from_secs(120));
    assert_eq!(c.origin("interval"), Some(file.to_str().unwrap()));

    f.set("NIXFLEET_INTERVAL", "90s");
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(c.interval, Duration::from_secs(90));
    assert_eq!(
        c.origin("interval"),
        Some("environment variable NIXFLEET_INTERVAL")
    );

    let cli = Cli {
        interval: Some("7".into()),
        ..Cli::default()
    };
    let c = f.load(&cli).unwrap();
    assert_eq!(c.interval, Duration::from_secs(7));
    assert_eq!(c.origin("interval"), Some("flag --interval"));
}

#[test]
fn token_precedence_by_value() {
    let mut f = Fixture::new();
    let tf_env = f.write("env-token", "from-env-file\n", 0o600);
    let tf_flag = f.write("flag-token", "  from-flag-file  \n", 0o600);
    let creds = f.path("creds");
    f.write("creds/token", "from-credential\n", 0o600);
    let file = f.write("agent.toml", "token = \"from-config-file\"\n", 0o600);
    f.set("NIXFLEET_CONFIG", file.to_str().unwrap());

    let token = |f: &Fixture, cli: &Cli| {
        let c = f.load(cli).unwrap();
        (c.token.expose_secret().to_owned(), c.token_source)
    };
    let cli = Cli::default();
    assert_eq!(token(&f, &cli).0, "from-config-file");

    // env token_file beats the file's inline token
    f.set("NIXFLEET_TOKEN_FILE", tf_env.to_str().unwrap());
    let (t, src) = token(&f, &cli);
    assert_eq!(t, "from-env-file");
    assert_eq!(
        src,
        TokenSource::File {
            path: tf_env.clone(),
            origin: "environment variable NIXFLEET_TOKEN_FILE".into()
        }
    );

    // the credential beats the environment
    f.set("CREDENTIALS_DIRECTORY", creds.to_str().unwrap());
    let (t, src) = token(&f, &cli);
    assert_eq!(t, "from-credential");
    assert_eq!(
        src,
        TokenSource::Credential {
            path: creds.join("token")
        }
    );

    // --token-file beats the credential, and is trimmed
    let cli = Cli {
        token_file: Some(tf_flag.clone()),
        ..Cli::default()
    };
    let (t, src) = token(&f, &cli);
    assert_eq!(t, "from-flag-file");
    assert_eq!(src.path(), Some(tf_flag.as_path()));
}

#[test]
fn inline_env_token_beats_file_token_file() {
    let mut f = Fixture::new();
    let tf = f.write("tok", "from-token-file", 0o600);
    let file = f.write(
        "agent.toml",
        &format!("token_file = {}\n", toml_str(tf.to_str().unwrap())),
        0o600,
    );
    f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
    f.set("NIXFLEET_TOKEN", "from-env-inline");
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(c.token.expose_secret(), "from-env-inline");
}

#[test]
fn token_and_token_file_in_one_layer() {
    let mut f = Fixture::new();
    let tf = f.write("tok", TOKEN, 0o600);
    f.set("NIXFLEET_TOKEN", TOKEN);
    f.set("NIXFLEET_TOKEN_FILE", tf.to_str().unwrap());
    let e = f.error(&Cli::default());
    assert!(e.contains("set only one of token and token_file"), "{e}");
    assert!(e.contains("NIXFLEET_TOKEN_FILE"), "{e}");
}

#[test]
fn token_file_problems_name_key_and_source() {
    let mut f = Fixture::new();
    f.write("empty", "  \n", 0o600);
    fs::create_dir(f.path("adir")).unwrap();
    std::os::unix::fs::symlink(f.path("nowhere"), f.path("dangling")).unwrap();
    for (name, expect) in [
        ("empty", "empty"),
        ("missing", "No such file"),
        ("adir", "directory"),
        ("dangling", "No such file"),
    ] {
        let cli = Cli {
            token_file: Some(f.path(name)),
            ..Cli::default()
        };
        let e = f.error(&cli);
        assert!(e.contains("token_file = "), "{e}");
        assert!(e.contains("flag --token-file"), "{e}");
        assert!(e.contains(expect), "{e}");
    }
    f.set("NIXFLEET_TOKEN_FILE", f.path("empty").to_str().unwrap());
    let e = f.error(&Cli::default());
    assert!(
        e.contains("(from environment variable NIXFLEET_TOKEN_FILE)"),
        "{e}"
    );
}

#[test]
fn loose_token_file_permissions_warn_without_content() {
    let mut f = Fixture::new();
    let tf = f.write("tok", TOKEN, 0o644);
    f.set("NIXFLEET_TOKEN_FILE", tf.to_str().unwrap());
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].contains(tf.to_str().unwrap()));
    assert!(c.warnings[0].contains("0644"));
    assert!(!c.warnings[0].contains(TOKEN));
    assert!(!c.render().contains(TOKEN));
}

#[test]
fn world_readable_config_file_holding_the_token_warns() {
    let mut f = Fixture::new();
    let file = f.write("agent.toml", &format!("token = \"{TOKEN}\"\n"), 0o444);
    f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].contains("config file holding the token"));
    assert!(c.warnings[0].contains(file.to_str().unwrap()));
    assert!(!c.warnings[0].contains(TOKEN));
}

#[test]
fn credential_ssh_key_is_a_path() {
    let mut f = Fixture::new();
    f.set("NIXFLEET_TOKEN", TOKEN);
    f.write("creds/ssh_key", "KEY", 0o600);
    f.set("NIXFLEET_SSH_KEY", "/env/key");
    f.set("CREDENTIALS_DIRECTORY", f.path("creds").to_str().unwrap());
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(c.ssh_key, Some(f.path("creds/ssh_key")));
    let cli = Cli {
        ssh_key: Some("/flag/key".into()),
        ..Cli::default()
    };
    let c = f.load(&cli).unwrap();
    assert_eq!(c.ssh_key, Some(PathBuf::from("/flag/key")));
    assert_eq!(c.origin("ssh_key"), Some("flag --ssh-key"));
}

#[test]
fn unrelated_nixfleet_variables_are_ignored() {
    let mut f = Fixture::new();
    f.set("NIXFLEET_TOKEN", TOKEN);
    f.set("NIXFLEET_TEST_HOOK", "whatever");
    f.set("NIXFLEET_FOO", "1");
    assert!(f.load(&Cli::default()).is_ok());
}

#[test]
fn type_errors_never_echo_the_token() {
    let mut f = Fixture::new();
    let file = f.write("agent.toml", "token = 987654321\n", 0o600);
    f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
    let e = f.error(&Cli::default());
    assert!(e.contains("token (from "), "{e}");
    assert!(e.contains(file.to_str().unwrap()), "{e}");
    assert!(!e.contains("987654321"), "{e}");

    let file = f.write("agent2.toml", "url = 5\n", 0o600);
    f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
    f.env.remove("NIXFLEET_URL");
    f.set("NIXFLEET_TOKEN", TOKEN);
    let e = f.error(&Cli::default());
    assert!(e.contains("url = 5 (from "), "{e}");
    assert!(e.contains("expected a string"), "{e}");
}

#[test]
fn url_holding_the_token_is_rejected_without_echo() {
    let mut f = Fixture::new();
    f.set("NIXFLEET_TOKEN", TOKEN);
    f.set("NIXFLEET_URL", format!("wss://host/ws?token={TOKEN}"));
    let e = f.error(&Cli::default());
    assert!(
        e.contains("url (from environment variable NIXFLEET_URL)"),
        "{e}"
    );
    f.set("NIXFLEET_URL", format!("http://host/ws?token={TOKEN}"));
    let e = f.error(&Cli::default());
    assert!(e.contains("unsupported scheme"), "{e}");
}

#[test]
fn invalid_toml_does_not_quote_the_line() {
    let mut f = Fixture::new();
    let file = f.write(
        "agent.toml",
        "url = \"ws://h/ws\"\ntoken = \"s3cr3t-TOKEN-value\n",
        0o600,
    );
    f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
    let e = f.error(&Cli::default());
    assert!(e.contains("is not valid TOML"), "{e}");
    assert!(e.contains("line 2"), "{e}");
}

#[test]
fn render_is_toml_with_sources() {
    let mut f = Fixture::new();
    f.set("NIXFLEET_TOKEN", TOKEN);
    let c = f.load(&Cli::default()).unwrap();
    let out = c.render();
    assert!(!out.contains(TOKEN));
    assert!(
        out.contains("token = \"<redacted>\"  # from environment variable NIXFLEET_TOKEN\n"),
        "{out}"
    );
    assert!(
        out.contains("interval = 30  # from built-in default\n"),
        "{out}"
    );
    assert!(
        out.contains("url = \"ws://127.0.0.1:9/ws\"  # from environment variable NIXFLEET_URL\n"),
        "{out}"
    );
    // Everything but the token parses back as a config file.
    let back: String = out
        .lines()
        .filter(|l| !l.starts_with("token"))
        .map(|l| format!("{l}\n"))
        .collect();
    let dict: Dict = Toml::from_str(&back).unwrap();
    assert!(dict.keys().all(|k| KEYS.contains(&k.as_str())));
    assert_eq!(dict.len(), 19);
}
