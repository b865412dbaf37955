//! Safe deployments (issue 28): a switch that changed the running system
//! waits for the dashboard to confirm it, and rolls back to the recorded
//! system when that does not happen within `confirm_timeout`.
//!
//! Stand-ins: `nixos-rebuild` (the switch flips a fake `current-system`
//! link), `nix-env` (records its arguments) and the recorded system's
//! `bin/switch-to-configuration` (flips the link back).

mod common;

use common::*;

/// `--check-config` with the safe-deployment keys set in `toml`.
fn check_config(toml: &str, env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("repo")).unwrap();
    let config = dir.path().join("agent.toml");
    let base = format!(
        "url = \"ws://127.0.0.1:9/ws\"\ntoken = \"t\"\nhostname = \"h\"\nrepo_dir = {:?}\nstate_dir = {:?}\n",
        dir.path().join("repo").display().to_string(),
        dir.path().join("state").display().to_string(),
    );
    std::fs::write(&config, format!("{base}{toml}")).unwrap();
    set_mode(&config, 0o600);
    std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"))
        .arg("--check-config")
        .arg("--config")
        .arg(&config)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn the_safe_deployment_keys_have_defaults_and_are_validated() {
    let out = check_config("", &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("confirm_timeout = 300"), "{stdout}");
    assert!(
        stdout.contains("rollback_on_failed_tests = false"),
        "{stdout}"
    );

    let out = check_config(
        "confirm_timeout = \"2m\"\nrollback_on_failed_tests = true\n",
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("confirm_timeout = 120"), "{stdout}");
    assert!(
        stdout.contains("rollback_on_failed_tests = true"),
        "{stdout}"
    );

    let out = check_config("", &[("NIXFLEET_CONFIRM_TIMEOUT", "0")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("confirm_timeout = 0"));

    for (toml, needle) in [
        ("confirm_timeout = -5\n", "confirm_timeout"),
        ("confirm_timeout = 86401\n", "confirm_timeout"),
        (
            "rollback_on_failed_tests = \"maybe\"\n",
            "rollback_on_failed_tests",
        ),
        ("rollback_on_failed_tests = 3\n", "rollback_on_failed_tests"),
    ] {
        let out = check_config(toml, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{toml}: {stderr}");
        assert!(stderr.contains(needle), "{toml}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}
