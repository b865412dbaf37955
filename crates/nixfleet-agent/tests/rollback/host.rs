//! The fake host of tests/rollback.rs: two systems, the `current-system`
//! link, the system profile, the boot id, a committed repository, the
//! stand-ins, and waiting for what they leave behind.

use crate::common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the fake host keeps things (all under the agent's directory,
/// which is `$HOME` for the stand-ins).
#[derive(Clone)]
pub struct Paths {
    pub home: PathBuf,
    pub link: PathBuf,
    pub old: PathBuf,
    pub profile: PathBuf,
    pub state: PathBuf,
    pub commit: String,
}

impl Paths {
    pub fn record(&self) -> PathBuf {
        self.state.join("activation.json")
    }
    pub fn short_commit(&self) -> &str {
        &self.commit[..7]
    }
}

/// `nixos-rebuild switch`: the link to the new system, then, when the test
/// asks for it (`cut-first`), a wait until it has cut the dashboard off.
pub const SWITCH: &str = r#"ln -sfn "$NEW_SYSTEM" "$LINK"
if [ -e "$HOME/cut-first" ]; then
  : > "$HOME/activated"
  while [ ! -e "$HOME/cut" ]; do sleep 0.05; done
fi
echo activated"#;

/// The recorded system's activation: the link back, and a line per run;
/// with `hold-rollback`, it waits for `go` first.
pub const OLD_ACTIVATION: &str = r#"if [ -e "$HOME/hold-rollback" ]; then
  : > "$HOME/rolling"
  while [ ! -e "$HOME/go" ]; do sleep 0.05; done
fi
ln -sfn "$OLD_SYSTEM" "$LINK"
echo "activating the old system"
echo "$1 $(date +%s)" >> "$HOME/rolled-back"
exit "$(cat "$HOME/old-exit" 2>/dev/null || echo 0)""#;

pub fn commit_repo(repo: &Path) -> String {
    git(repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("flake.nix"), "{ }\n").unwrap();
    git(repo, &["add", "."]);
    git(repo, &["commit", "-q", "-m", "one"]);
    git(repo, &["rev-parse", "HEAD"])
}

/// A prepared agent directory with two fake systems (the link at the old
/// one), the system profile at generation 7, boot id `boot-a`, a committed
/// repository and the stand-ins; the options point the agent at them.
pub fn prepare(url: String, confirm_timeout: u64) -> (tempfile::TempDir, Paths, AgentOptions) {
    let mut options = AgentOptions::new(url);
    options
        .extra_toml
        .push(format!("confirm_timeout = {confirm_timeout}"));
    let (dir, bin) = Agent::prepare(&options);
    let home = dir.path().to_owned();
    let (old, new) = (home.join("system-old"), home.join("system-new"));
    std::fs::create_dir_all(old.join("bin")).unwrap();
    std::fs::create_dir_all(&new).unwrap();
    let link = home.join("current-system");
    std::os::unix::fs::symlink(&old, &link).unwrap();
    std::fs::create_dir_all(home.join("profiles")).unwrap();
    let profile = home.join("profiles/system");
    std::os::unix::fs::symlink("system-7-link", &profile).unwrap();
    std::fs::write(home.join("boot_id"), "boot-a\n").unwrap();
    let commit = commit_repo(&home.join("repo"));
    let prelude = format!(
        "LINK={:?}\nNEW_SYSTEM={:?}\nOLD_SYSTEM={:?}\n",
        link.display().to_string(),
        new.display().to_string(),
        old.display().to_string()
    );
    script(&bin, "nixos-rebuild", &format!("{prelude}{SWITCH}"));
    script(
        &bin,
        "nix-env",
        r#"echo "$@" > "$HOME/nix-env-args"
echo "nix-env stand-in: profile set""#,
    );
    let activation = format!("{prelude}{OLD_ACTIVATION}");
    script(&old.join("bin"), "switch-to-configuration", &activation);
    for (var, path) in [
        ("NIXFLEET_TEST_CURRENT_SYSTEM", &link),
        ("NIXFLEET_TEST_SYSTEM_PROFILE", &profile),
        ("NIXFLEET_TEST_BOOT_ID_FILE", &home.join("boot_id")),
    ] {
        options.env.push((var.into(), path.display().to_string()));
    }
    let state = home.join("state");
    let paths = Paths {
        home,
        link,
        old,
        profile,
        state,
        commit,
    };
    (dir, paths, options)
}

/// [`prepare`] with `rollback_on_failed_tests` on, and the host's tests
/// directory created in the repository; returns that directory too.
pub fn prepare_with_tests(
    url: String,
    confirm_timeout: u64,
) -> (tempfile::TempDir, Paths, AgentOptions, PathBuf) {
    let (dir, paths, mut options) = prepare(url, confirm_timeout);
    options
        .extra_toml
        .push("rollback_on_failed_tests = true".to_owned());
    let tests = paths.home.join("repo/hosts/test-host/tests");
    std::fs::create_dir_all(&tests).unwrap();
    (dir, paths, options, tests)
}

/// Sends `switch` and, once the stand-in has switched, kills the dashboard
/// (it refuses connections from then on) before letting the switch end.
pub async fn switch_then_cut_off(dashboard: &mut Dashboard, paths: &Paths) {
    std::fs::write(paths.home.join("cut-first"), "").unwrap();
    dashboard.command(dashboard.current_conn().unwrap(), "switch");
    wait_for_file_created(&paths.home.join("activated")).await;
    dashboard.kill();
    std::fs::write(paths.home.join("cut"), "").unwrap();
}

/// Waits for a file to exist (it may stay empty).
pub async fn wait_for_file_created(path: &Path) {
    let deadline = tokio::time::Instant::now() + 30 * SECOND;
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the activation record is gone.
pub async fn wait_for_no_record(paths: &Paths) {
    let deadline = tokio::time::Instant::now() + 30 * SECOND;
    while paths.record().exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the activation record stayed: {}",
            std::fs::read_to_string(paths.record()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the activation record in `phase` and returns it.
pub async fn wait_for_record(paths: &Paths, phase: &str) -> Value {
    let deadline = tokio::time::Instant::now() + 30 * SECOND;
    loop {
        let text = std::fs::read_to_string(paths.record()).unwrap_or_default();
        if let Ok(record) = serde_json::from_str::<Value>(&text)
            && record["phase"] == phase
        {
            return record;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {phase} record; last: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn rollback_status(dashboard: &Dashboard) -> Value {
    dashboard
        .wait_frame_where("status", 30 * SECOND, |p| p["command"] == "rollback")
        .await
        .payload()
        .clone()
}

pub fn rollback_runs(paths: &Paths) -> Vec<String> {
    std::fs::read_to_string(paths.home.join("rolled-back"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}
