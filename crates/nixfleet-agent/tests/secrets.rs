//! The token never leaks: not into the agent's log at `debug` or `trace`
//! over a whole session (auth failure, connect, commands that fail, bad
//! frames, a reconnect, shutdown), not into `--check-config`, not into the
//! environment of the commands the agent runs, not into the files it
//! writes. Whether it comes from the environment, a token file or a systemd
//! credential. Plus the systemd-credential configuration cases that
//! tests/config.rs does not have, and the "token file readable by others"
//! warning, logged once.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;

/// In the token file when the credential must win: if the agent used this
/// one the dashboard would refuse it, and it must not leak either.
const DECOY: &str = "decoy-T0KEN-from-the-file-91cc";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Env,
    File,
    Credential,
}

/// Stand-ins that dump the environment they were given, as the shell sees
/// it and as the kernel has it (`/proc/$$/environ`), then fail.
const REBUILD_DUMP: &str = r#"
env > "$HOME/env-nixos-rebuild"
tr '\0' '\n' < /proc/$$/environ > "$HOME/environ-nixos-rebuild"
echo "building"
echo "something went wrong" >&2
exit 1
"#;
const GIT_DUMP: &str = r#"
case "$1" in
  pull)
    env > "$HOME/env-git"
    tr '\0' '\n' < /proc/$$/environ > "$HOME/environ-git"
    echo "fatal: not a git repository" >&2
    exit 128;;
esac
exit 0
"#;

/// Runs a whole session and returns the agent's log and its directory.
async fn session(source: Source, level: &str) -> (String, tempfile::TempDir) {
    let dashboard = Dashboard::start().await;
    // The first attempts are refused: an auth failure is part of the session.
    dashboard.reject_upgrades(Some(401));
    let mut options = AgentOptions::new(dashboard.url());
    options
        .env
        .push(("NIXFLEET_LOG_LEVEL".into(), level.into()));
    let (dir, bin) = Agent::prepare(&options);
    match source {
        Source::Env => options.token_in_env = true,
        Source::File => {}
        Source::Credential => {
            // The credential outranks the config file's token_file.
            std::fs::write(dir.path().join("token"), format!("{DECOY}\n")).unwrap();
            let creds = dir.path().join("creds");
            std::fs::create_dir(&creds).unwrap();
            std::fs::write(creds.join("token"), format!("{TOKEN}\n")).unwrap();
            set_mode(&creds.join("token"), 0o400);
            options
                .env
                .push(("CREDENTIALS_DIRECTORY".into(), creds.display().to_string()));
        }
    }
    script(&bin, "nixos-rebuild", REBUILD_DUMP);
    script(&bin, "git", GIT_DUMP);
    let mut agent = Agent::spawn(dir, options).await;

    dashboard
        .wait_for(10 * SECOND, "a refused upgrade", |log| {
            log.iter()
                .find(|s| {
                    matches!(
                        s,
                        Seen::Upgrade {
                            accepted: false,
                            ..
                        }
                    )
                })
                .cloned()
        })
        .await;
    agent.wait_stderr("authentication failed", 5 * SECOND).await;
    dashboard.reject_upgrades(None);
    let conn = dashboard.command_first("switch").await;
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.payload()["status"], "error");
    dashboard.command(conn, "pull");
    let status = dashboard.wait_frame("status", 2, 10 * SECOND).await;
    assert_eq!(status.payload()["status"], "error", "{}", status.payload());

    // Errors of every kind.
    dashboard.send_raw(
        conn,
        tokio_tungstenite::tungstenite::Message::text("not json"),
    );
    dashboard.send_json(conn, json!({"type": "command", "payload": {"command": 7}}));
    dashboard.send_json(conn, json!({"type": "from_the_future", "payload": {}}));
    dashboard.command(conn, "no-such-command");
    dashboard.send_json(
        conn,
        json!({"type": "kill_command", "payload": {"signal": "SIGKILL", "pid": 0}}),
    );
    dashboard
        .wait_frame("command_rejected", 2, 5 * SECOND)
        .await;

    // A reconnect.
    dashboard.close(conn, 1011, "restarting");
    let second = dashboard.wait_frame("register", 2, 10 * SECOND).await;
    dashboard.send_json(
        second.conn(),
        json!({"type": "registered", "payload": {"host_id": "h-1"}}),
    );
    let beats = dashboard.frames("heartbeat").len();
    dashboard
        .wait_frame("heartbeat", beats + 1, 5 * SECOND)
        .await;

    agent.signal(15);
    assert_eq!(agent.wait_exit(10 * SECOND).await, Some(0));
    let stderr = agent.stderr();
    (stderr, agent.crash().await)
}

/// Every file under `dir` (recursively) with its content.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else if let Ok(content) = std::fs::read(&path) {
            out.push((path.display().to_string(), content));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

async fn check_session(source: Source, level: &str) {
    let (stderr, dir) = session(source, level).await;
    let what = format!("{source:?} token at log level {level}");
    for secret in [TOKEN, DECOY] {
        assert!(
            !stderr.contains(secret),
            "{what}: the token is in the log:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("Bearer"),
        "{what}: an Authorization header was logged"
    );
    // The session went through what it should have, at the right level.
    for expected in [
        // Logged at debug: proves the level was in force.
        "ignoring a message of unknown type",
        "authentication failed",
        "401",
        "ignoring a bad message",
        "rejecting an unknown command",
        "reconnecting",
        "registered with the dashboard",
    ] {
        assert!(
            stderr.contains(expected),
            "{what}: no {expected:?} in:\n{stderr}"
        );
    }

    // The children's environments.
    for child in ["nixos-rebuild", "git"] {
        for dump in ["env", "environ"] {
            let path = dir.path().join(format!("{dump}-{child}"));
            let env = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{what}: {} not written: {e}", path.display()));
            assert!(
                !env.contains(TOKEN) && !env.contains(DECOY),
                "{what}: the token reached {child}:\n{env}"
            );
            let agent_vars: Vec<&str> = env
                .lines()
                .filter(|l| l.starts_with("NIXFLEET_") || l.starts_with("CREDENTIALS_DIRECTORY="))
                .collect();
            assert!(agent_vars.is_empty(), "{what}: {child} got {agent_vars:?}");
            assert!(env.lines().any(|l| l.starts_with("PATH=")), "{what}: {env}");
        }
    }

    // Nothing the agent wrote holds it (command logs, state).
    for (path, content) in files(&dir.path().join("state")) {
        assert!(!contains(&content, TOKEN), "{what}: the token is in {path}");
    }
}

#[tokio::test]
async fn env_token_never_leaks_at_debug() {
    check_session(Source::Env, "debug").await;
}

#[tokio::test]
async fn env_token_never_leaks_at_trace() {
    check_session(Source::Env, "trace").await;
}

#[tokio::test]
async fn token_file_never_leaks_at_debug() {
    check_session(Source::File, "debug").await;
}

#[tokio::test]
async fn token_file_never_leaks_at_trace() {
    check_session(Source::File, "trace").await;
}

#[tokio::test]
async fn credential_token_never_leaks_at_debug() {
    check_session(Source::Credential, "debug").await;
}

#[tokio::test]
async fn credential_token_never_leaks_at_trace() {
    check_session(Source::Credential, "trace").await;
}

// ---------------------------------------------------------------------------
// The binary without a session: --check-config and configuration errors.

const BIN: &str = env!("CARGO_BIN_EXE_nixfleet-agent");

/// A directory with a repo and a token file, and a clean environment.
struct Setup {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("repo")).unwrap();
        let env = vec![
            ("NIXFLEET_URL".to_owned(), "ws://127.0.0.1:9/ws".to_owned()),
            (
                "NIXFLEET_REPO_DIR".to_owned(),
                dir.path().join("repo").display().to_string(),
            ),
            ("NIXFLEET_HOSTNAME".to_owned(), "secrets-host".to_owned()),
            (
                "NIXFLEET_STATE_DIR".to_owned(),
                dir.path().join("state").display().to_string(),
            ),
            ("NIXFLEET_LOG_LEVEL".to_owned(), "trace".to_owned()),
        ];
        Setup { dir, env }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn write(&self, name: &str, content: &[u8], mode: u32) -> String {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        set_mode(&path, mode);
        path.display().to_string()
    }

    fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    fn use_source(&mut self, source: Source) {
        match source {
            Source::Env => self.set("NIXFLEET_TOKEN", TOKEN),
            Source::File => {
                let path = self.write("token", format!("{TOKEN}\n").as_bytes(), 0o600);
                self.set("NIXFLEET_TOKEN_FILE", &path);
            }
            Source::Credential => {
                self.write("creds/token", format!("{TOKEN}\n").as_bytes(), 0o600);
                let creds = self.path("creds");
                self.set("CREDENTIALS_DIRECTORY", &creds);
            }
        }
    }

    /// `--check-config`: exit code, stdout, stderr.
    fn check(&self) -> (Option<i32>, String, String) {
        let out = Command::new(BIN)
            .arg("--check-config")
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[test]
fn check_config_redacts_the_token_from_every_source() {
    for source in [Source::Env, Source::File, Source::Credential] {
        let mut setup = Setup::new();
        setup.use_source(source);
        let (code, stdout, stderr) = setup.check();
        assert_eq!(code, Some(0), "{source:?}: {stderr}");
        assert!(
            stdout.contains("token = \"<redacted>\""),
            "{source:?}:\n{stdout}"
        );
        assert!(
            !stdout.contains(TOKEN) && !stderr.contains(TOKEN),
            "{source:?}:\n{stdout}{stderr}"
        );
    }
}

/// Credential cases that tests/config.rs does not cover: exit 78, one line
/// naming the credential, never the token.
#[test]
fn bad_credentials_exit_78_naming_the_credential() {
    type Setup_ = fn(&Setup);
    let cases: [(&str, Setup_, &str); 4] = [
        (
            "dangling symlink",
            |s| std::os::unix::fs::symlink(s.path("nowhere"), s.path("creds/token")).unwrap(),
            "cannot read it",
        ),
        (
            "larger than 64 KiB",
            |s| {
                let big = format!("{TOKEN}{}", "x".repeat(70 * 1024));
                s.write("creds/token", big.as_bytes(), 0o600);
            },
            "larger than",
        ),
        (
            "not UTF-8",
            |s| {
                let mut bytes = TOKEN.as_bytes().to_vec();
                bytes.extend([0xff, 0xfe]);
                s.write("creds/token", &bytes, 0o600);
            },
            "UTF-8",
        ),
        (
            "a FIFO",
            |s| {
                let path = s.path("creds/token");
                let status = Command::new("mkfifo").arg(&path).status().unwrap();
                assert!(status.success());
            },
            "not a regular file",
        ),
    ];
    for (name, setup_case, problem) in cases {
        let mut setup = Setup::new();
        std::fs::create_dir(setup.dir.path().join("creds")).unwrap();
        let creds = setup.path("creds");
        setup.set("CREDENTIALS_DIRECTORY", &creds);
        setup_case(&setup);
        let (code, stdout, stderr) = setup.check();
        assert_eq!(code, Some(78), "{name}: {stdout}{stderr}");
        assert!(stdout.is_empty(), "{name}: {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
        let source = format!("systemd credential {}/token", creds);
        assert!(stderr.contains(&source), "{name}: {stderr}");
        assert!(stderr.contains(problem), "{name}: {stderr}");
        assert!(!stderr.contains(TOKEN), "{name}: {stderr}");
    }
}

#[test]
fn a_credentials_directory_that_is_not_a_directory_is_a_warning() {
    let mut setup = Setup::new();
    setup.use_source(Source::Env);
    let file = setup.write("not-a-dir", b"x", 0o600);
    setup.set("CREDENTIALS_DIRECTORY", &file);
    let (code, stdout, stderr) = setup.check();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "# warning: CREDENTIALS_DIRECTORY {file} is not a directory"
        )),
        "{stdout}"
    );
}

/// A token file or credential readable by group/others: the agent runs,
/// and says so once (not once per reconnect).
async fn loose_token_warned_once(source: Source) {
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    let (dir, _) = Agent::prepare(&options);
    let warned_path = match source {
        Source::File => {
            set_mode(&dir.path().join("token"), 0o644);
            dir.path().join("token")
        }
        _ => {
            std::fs::write(dir.path().join("token"), format!("{DECOY}\n")).unwrap();
            let creds = dir.path().join("creds");
            std::fs::create_dir(&creds).unwrap();
            std::fs::write(creds.join("token"), format!("{TOKEN}\n")).unwrap();
            set_mode(&creds.join("token"), 0o640);
            options
                .env
                .push(("CREDENTIALS_DIRECTORY".into(), creds.display().to_string()));
            creds.join("token")
        }
    };
    let mut agent = Agent::spawn(dir, options).await;
    let first = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    dashboard.close(first.conn(), 1011, "restarting");
    dashboard.wait_frame("register", 2, 10 * SECOND).await;
    agent.signal(15);
    assert_eq!(agent.wait_exit(10 * SECOND).await, Some(0));
    let stderr = agent.stderr();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("is accessible by group or others"))
        .collect();
    assert_eq!(warnings.len(), 1, "{source:?}: {stderr}");
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(
        warnings[0].contains(&warned_path.display().to_string()),
        "{}",
        warnings[0]
    );
    assert!(!stderr.contains(TOKEN) && !stderr.contains(DECOY));
}

#[tokio::test]
async fn a_token_file_readable_by_others_is_warned_about_once() {
    loose_token_warned_once(Source::File).await;
}

#[tokio::test]
async fn a_token_credential_readable_by_others_is_warned_about_once() {
    loose_token_warned_once(Source::Credential).await;
}
