//! `load_inner` with an explicit environment: defaults, which layer wins,
//! and what `--check-config` prints.

use super::{Fixture, TOKEN};
use crate::config::*;
use figment::providers::{Format, Toml};
use figment::value::Dict;
use secrecy::ExposeSecret;
use std::path::PathBuf;
use std::time::Duration;

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
