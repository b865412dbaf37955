//! Configuration loading: a fuzzed TOML file and fuzzed environment values
//! through `config::load_with`, with a distinctive token placed by the
//! harness (inline, environment, token file or systemd credential).
//!
//! Input format (so that seeds are readable and libFuzzer's mutations stay
//! meaningful): `<toml>` then optionally `\n%%\n` and `KEY=value` lines for
//! `NIXFLEET_KEY`, then optionally `\n%%\n` and one placement word:
//! `inline`, `env`, `file`, `file-open`, `cred`, `cred-open` or `none`.
//!
//! Checks: never panics; an error is one line starting with
//! "config error: " that never shows the token; a loaded configuration
//! renders without the token, warns about a token file readable by others,
//! and its rendering loads back to the same values.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nixfleet_agent::config::{Cli, Config, load_with, toml_str};
use secrecy::ExposeSecret;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const TOKEN: &str = "tK-FUZZ-7b2e9c41d0f3";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains(TOKEN) {
        return;
    }
    let mut sections = text.splitn(3, "\n%%\n");
    let mut toml = sections.next().unwrap_or_default().to_owned();
    let env_lines = sections.next().unwrap_or_default();
    let place = sections.next().unwrap_or("env").trim();

    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for line in env_lines.lines() {
        if let Some((key, value)) = line.split_once('=') {
            env.insert(
                format!("NIXFLEET_{}", key.to_ascii_uppercase()),
                value.to_owned(),
            );
        }
    }
    let write_token = |path: &Path, mode: u32| {
        std::fs::write(path, format!("{TOKEN}\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        path.display().to_string()
    };
    let mut loose = false;
    match place {
        "inline" => toml = format!("token = \"{TOKEN}\"\n{toml}"),
        "file" | "file-open" => {
            loose = place == "file-open";
            let path = write_token(&base.join("token"), if loose { 0o644 } else { 0o600 });
            env.insert("NIXFLEET_TOKEN_FILE".into(), path);
        }
        "cred" | "cred-open" => {
            loose = place == "cred-open";
            std::fs::create_dir(base.join("creds")).unwrap();
            write_token(&base.join("creds/token"), if loose { 0o644 } else { 0o600 });
            env.insert(
                "CREDENTIALS_DIRECTORY".into(),
                base.join("creds").display().to_string(),
            );
        }
        "none" => {}
        _ => {
            env.insert("NIXFLEET_TOKEN".into(), TOKEN.into());
        }
    }
    let config_path = base.join("agent.toml");
    std::fs::write(&config_path, &toml).unwrap();
    std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cli = Cli {
        config: Some(config_path),
        ..Cli::default()
    };
    match load_with(&cli, |name| env.get(name).cloned()) {
        Err(error) => {
            let line = error.0;
            assert!(line.starts_with("config error: "), "{line}");
            assert!(!line.contains(['\n', '\r']), "{line:?}");
            assert!(!line.contains(TOKEN), "the token leaked: {line}");
        }
        Ok(config) => {
            assert!(config.ping_timeout > config.ping_interval);
            assert!(config.interval.as_secs() >= 1);
            let rendered = config.render();
            assert!(!rendered.contains(TOKEN), "the token leaked:\n{rendered}");
            assert!(!format!("{config:?}").contains(TOKEN));
            assert!(config.warnings.iter().all(|w| !w.contains(TOKEN)));
            if loose
                && config.token.expose_secret() == TOKEN
                && config.token_source.path().is_some()
            {
                assert!(
                    config
                        .warnings
                        .iter()
                        .any(|w| w.contains("group or others")),
                    "{:?}",
                    config.warnings
                );
            }
            let token_line = format!("token = {}", toml_str(config.token.expose_secret()));
            let again: String = rendered
                .lines()
                .map(|l| {
                    if l.starts_with("token = ") {
                        token_line.as_str()
                    } else {
                        l
                    }
                })
                .flat_map(|l| [l, "\n"])
                .collect();
            let path = base.join("rendered.toml");
            std::fs::write(&path, &again).unwrap();
            let cli = Cli {
                config: Some(path),
                ..Cli::default()
            };
            match load_with(&cli, |_| None) {
                Ok(reloaded) => assert_eq!(effective(&reloaded), effective(&config), "\n{again}"),
                Err(e) => panic!("the rendering does not load back: {}\n{again}", e.0),
            }
        }
    }
});

fn effective(c: &Config) -> String {
    format!(
        "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
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
