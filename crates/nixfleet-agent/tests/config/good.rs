//! Configurations that load: what `--check-config` prints, which layer
//! wins for each kind of key, the system's defaults, `--version` and
//! `--help`.

use super::*;

#[test]
fn valid_configuration_renders_with_redacted_token() {
    let s = Sandbox::valid();
    let out = s.ok();
    assert_eq!(
        line(&out, "token"),
        "token = \"<redacted>\"  # from environment variable NIXFLEET_TOKEN"
    );
    assert_eq!(
        line(&out, "url"),
        "url = \"ws://127.0.0.1:9/ws\"  # from environment variable NIXFLEET_URL"
    );
    assert_eq!(
        line(&out, "interval"),
        "interval = 30  # from built-in default"
    );
    assert_eq!(
        line(&out, "branch"),
        "branch = \"main\"  # from built-in default"
    );
    assert_eq!(
        line(&out, "metrics"),
        "metrics = \"auto\"  # from built-in default"
    );
    assert_eq!(
        line(&out, "ping_interval"),
        "ping_interval = 15  # from built-in default"
    );
    assert_eq!(
        line(&out, "ping_timeout"),
        "ping_timeout = 45  # from built-in default"
    );
    assert_eq!(
        line(&out, "backoff_max"),
        "backoff_max = 60  # from built-in default"
    );
    assert_eq!(
        line(&out, "stop_grace"),
        "stop_grace = 10  # from built-in default"
    );
    assert_eq!(
        line(&out, "log_level"),
        "log_level = \"info\"  # from built-in default"
    );
    assert_eq!(
        line(&out, "stasysmo_dir"),
        "stasysmo_dir = \"/dev/shm/stasysmo\"  # from built-in default"
    );
    for l in out.lines() {
        assert!(
            l.starts_with("# ") || l.contains(" = "),
            "not a key = value line: {l}"
        );
    }
}

#[test]
fn rendered_configuration_reads_back_as_a_file() {
    let mut s = Sandbox::valid();
    s.set("NIXFLEET_REPO_URL", "git@example.org:fleet.git");
    s.set("NIXFLEET_INTERVAL", "2m");
    let first = s.ok();
    let values = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split("  # from").next().unwrap().to_owned())
            .collect()
    };
    // Feed everything but the token back as the only source.
    let file: String = first
        .lines()
        .filter(|l| !l.starts_with("token = "))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut again = Sandbox::bare();
    again.set("NIXFLEET_TOKEN", TOKEN);
    again.file(&file);
    let second = again.ok();
    assert_eq!(values(&first), values(&second));
    assert!(line(&second, "interval").ends_with(&format!("# from {}", again.p("agent.toml"))));
}

#[test]
fn ssh_key_precedence_file_env_credential_flag() {
    let mut s = Sandbox::valid();
    s.file("ssh_key = \"/from/file\"\n");
    let file = s.p("agent.toml");
    assert_eq!(
        line(&s.ok(), "ssh_key"),
        format!("ssh_key = \"/from/file\"  # from {file}")
    );

    s.set("NIXFLEET_SSH_KEY", "/from/env");
    assert_eq!(
        line(&s.ok(), "ssh_key"),
        "ssh_key = \"/from/env\"  # from environment variable NIXFLEET_SSH_KEY"
    );

    s.cred("ssh_key", "PRIVATE KEY\n");
    let cred = s.p("creds/ssh_key");
    assert_eq!(
        line(&s.ok(), "ssh_key"),
        format!("ssh_key = \"{cred}\"  # from systemd credential {cred}")
    );

    s.arg("--ssh-key");
    s.arg("/from/flag");
    assert_eq!(
        line(&s.ok(), "ssh_key"),
        "ssh_key = \"/from/flag\"  # from flag --ssh-key"
    );
}

#[test]
fn token_precedence_file_env_credential_flag() {
    let mut s = Sandbox::valid();
    s.unset("NIXFLEET_TOKEN");
    s.file(&format!("token = \"{TOKEN}\"\n"));
    let file = s.p("agent.toml");
    assert_eq!(
        line(&s.ok(), "token"),
        format!("token = \"<redacted>\"  # from {file}")
    );

    s.set("NIXFLEET_TOKEN_FILE", &s.p("token"));
    assert_eq!(
        line(&s.ok(), "token"),
        format!(
            "token = \"<redacted>\"  # from token_file {} (set by environment variable NIXFLEET_TOKEN_FILE)",
            s.p("token")
        )
    );

    s.cred("token", &format!("{TOKEN}\n"));
    assert_eq!(
        line(&s.ok(), "token"),
        format!(
            "token = \"<redacted>\"  # from systemd credential {}",
            s.p("creds/token")
        )
    );

    s.arg("--token-file");
    s.arg("{dir}/token2");
    assert_eq!(
        line(&s.ok(), "token"),
        format!(
            "token = \"<redacted>\"  # from token_file {} (set by flag --token-file)",
            s.p("token2")
        )
    );
}

#[test]
fn inline_token_from_a_higher_layer_beats_a_lower_token_file() {
    let mut s = Sandbox::valid();
    s.file("token_file = \"{dir}/token\"\n");
    assert_eq!(
        line(&s.ok(), "token"),
        "token = \"<redacted>\"  # from environment variable NIXFLEET_TOKEN"
    );
}

#[test]
fn interval_precedence_file_env_flag() {
    let mut s = Sandbox::valid();
    s.file("interval = 10\n");
    let file = s.p("agent.toml");
    assert_eq!(
        line(&s.ok(), "interval"),
        format!("interval = 10  # from {file}")
    );
    s.set("NIXFLEET_INTERVAL", "90s");
    assert_eq!(
        line(&s.ok(), "interval"),
        "interval = 90  # from environment variable NIXFLEET_INTERVAL"
    );
    s.arg("--interval=2m");
    assert_eq!(
        line(&s.ok(), "interval"),
        "interval = 120  # from flag --interval"
    );
}

#[test]
fn defaults_from_the_system() {
    let mut s = Sandbox::valid();
    s.unset("NIXFLEET_HOSTNAME");
    s.unset("NIXFLEET_STATE_DIR");
    s.set("STATE_DIRECTORY", "/var/lib/nixfleet-a:/var/lib/nixfleet-b");
    let out = s.ok();
    assert_eq!(
        line(&out, "state_dir"),
        "state_dir = \"/var/lib/nixfleet-a\"  # from $STATE_DIRECTORY"
    );
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(
        line(&out, "hostname"),
        format!("hostname = \"{}\"  # from system hostname", hostname.trim())
    );
    s.unset("STATE_DIRECTORY");
    assert_eq!(
        line(&s.ok(), "state_dir"),
        "state_dir = \"/var/lib/nixfleet\"  # from built-in default"
    );
}

#[test]
fn loose_token_file_permissions_are_a_warning_not_an_error() {
    let mut s = Sandbox::valid();
    s.unset("NIXFLEET_TOKEN");
    s.write("open_token", TOKEN, 0o644);
    s.arg("--token-file={dir}/open_token");
    let out = s.ok();
    let warning = out
        .lines()
        .find(|l| l.starts_with("# warning: "))
        .unwrap_or_else(|| panic!("no warning in:\n{out}"));
    assert!(warning.contains(&s.p("open_token")), "{warning}");
    assert!(warning.contains("0644"), "{warning}");
}

#[test]
fn version_and_help() {
    let s = Sandbox::bare();
    let out = s.run_with(&["--version"]);
    let (stdout, _) = texts(&out);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout.trim(),
        format!("nixfleet-agent {}", env!("CARGO_PKG_VERSION"))
    );

    let out = s.run_with(&["--help"]);
    let (stdout, _) = texts(&out);
    assert_eq!(out.status.code(), Some(0));
    for flag in [
        "--config",
        "--check-config",
        "--url",
        "--token-file",
        "--hostname",
        "--repo-dir",
        "--repo-url",
        "--branch",
        "--interval",
        "--ssh-key",
        "--log-level",
        "--metrics",
        "--state-dir",
        "--ca-file",
    ] {
        assert!(stdout.contains(flag), "{flag} missing from --help");
    }
    // No way to put the token on the (world-readable) command line.
    assert!(!stdout.contains("--token "), "{stdout}");
    assert!(!stdout.contains("--token <"), "{stdout}");
}
