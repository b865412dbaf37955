//! What v3 dashboards need, end to end: a fresh `register` after every
//! successful switch, a heartbeat right after every status, the status
//! compartments, `operation_progress`, and the v3 commands.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Two fake NixOS systems and a `current-system` symlink to the first, for
/// `NIXFLEET_TEST_CURRENT_SYSTEM`.
fn fake_systems(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let make = |name: &str, version: &str| {
        let sys = dir.join(name);
        std::fs::create_dir_all(&sys).unwrap();
        std::fs::write(sys.join("nixos-version"), format!("{version}\n")).unwrap();
        sys
    };
    let old = make("system-old", "25.05.20250601.aaaaaaa");
    let new = make("system-new", "25.11.20251120.bbbbbbb");
    let link = dir.join("current-system");
    std::os::unix::fs::symlink(&old, &link).unwrap();
    (link, old, new)
}

/// A committed repo in `repo` with a flake.lock.
fn commit_repo(repo: &Path) -> String {
    git(repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("flake.nix"), "{ }\n").unwrap();
    std::fs::write(
        repo.join("flake.lock"),
        r#"{"nodes":{"root":{"inputs":{"nixfleet":"nixfleet"}}},"root":"root","version":7}"#,
    )
    .unwrap();
    git(repo, &["add", "."]);
    git(repo, &["commit", "-q", "-m", "one"]);
    git(repo, &["rev-parse", "HEAD"])
}

struct Host {
    agent: Agent,
    link: PathBuf,
    new_system: PathBuf,
}

/// An agent with a committed repo, fake systems, and stand-ins: a
/// `nixos-rebuild` running `rebuild` (with `$NEW_SYSTEM` and `$LINK`
/// set), plus any `(name, body)` in `more`.
async fn host(
    dashboard: &Dashboard,
    rebuild: &str,
    more: &[(&str, &str)],
    tweak: impl FnOnce(&mut AgentOptions),
) -> Host {
    let mut options = AgentOptions::new(dashboard.url());
    tweak(&mut options);
    let (dir, bin) = Agent::prepare(&options);
    let (link, _old, new_system) = fake_systems(dir.path());
    commit_repo(&dir.path().join("repo"));
    options.env.push((
        "NIXFLEET_TEST_CURRENT_SYSTEM".into(),
        link.display().to_string(),
    ));
    let prelude = format!(
        "LINK={:?}\nNEW_SYSTEM={:?}\n",
        link.display().to_string(),
        new_system.display().to_string()
    );
    script(&bin, "nixos-rebuild", &format!("{prelude}{rebuild}"));
    for (name, body) in more {
        script(&bin, name, &format!("{prelude}{body}"));
    }
    let agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    Host {
        agent,
        link,
        new_system,
    }
}

/// Switches the fake current-system link to the new system.
const SWITCH_TO_NEW: &str = "echo building\nln -sfn \"$NEW_SYSTEM\" \"$LINK\"\necho activated";

fn send(dashboard: &Dashboard, command: &str) {
    dashboard.command(dashboard.current_conn().unwrap(), command);
}

async fn status_of(dashboard: &Dashboard, n: usize) -> Value {
    dashboard
        .wait_frame("status", n, 30 * SECOND)
        .await
        .payload()
        .clone()
}

/// The first heartbeat after `after` on `conn` satisfying `cond`.
async fn heartbeat_where(
    dashboard: &Dashboard,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    dashboard
        .wait_frame_where("heartbeat", 10 * SECOND, |p| cond(p))
        .await
        .payload()
        .clone()
        .get("update_status")
        .cloned()
        .unwrap_or_else(|| panic!("no update_status while waiting for {what}"))
}

fn progress_frames(dashboard: &Dashboard, phase: &str) -> Vec<Value> {
    dashboard
        .frames("operation_progress")
        .iter()
        .filter_map(|f| f.payload()["progress"].get(phase).cloned())
        .collect()
}

#[tokio::test]
async fn a_successful_switch_registers_again_with_the_new_versions() {
    let dashboard = Dashboard::start().await;
    let h = host(&dashboard, SWITCH_TO_NEW, &[], |_| {}).await;
    let first = dashboard.frames("register")[0].clone();
    assert_eq!(first.payload()["nixpkgs_version"], "25.05.20250601.aaaaaaa");
    send(&dashboard, "switch");
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok");
    let (code, reason, closed_at) = dashboard.wait_close(5 * SECOND).await;
    assert_eq!((code, reason.as_str()), (Some(1000), "re-register"));
    assert!(closed_at >= status.at());
    let again = dashboard.wait_frame("register", 2, 2 * SECOND).await;
    assert!(
        again.at().duration_since(status.at()) < 2 * SECOND,
        "registered again {:?} after the status",
        again.at().duration_since(status.at())
    );
    assert_ne!(again.conn(), status.conn(), "on a fresh connection");
    assert_eq!(again.payload()["nixpkgs_version"], "25.11.20251120.bbbbbbb");
    assert_eq!(again.payload()["os_version"], "25.11");
    // The switch is recorded: the system compartment is ok.
    let status = heartbeat_where(&dashboard, "system ok", |p| {
        p["update_status"]["system"]["status"] == "ok"
    })
    .await;
    assert_eq!(status["tests"]["status"], "outdated", "{status}");
    assert!(h.agent.state_dir.join("system-record.json").exists());
    assert_eq!(
        std::fs::canonicalize(&h.link).unwrap(),
        std::fs::canonicalize(&h.new_system).unwrap()
    );
}

#[tokio::test]
async fn a_failed_switch_does_not_register_again() {
    let dashboard = Dashboard::start().await;
    let _h = host(&dashboard, "echo broken >&2\nexit 3", &[], |_| {}).await;
    send(&dashboard, "switch");
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "error");
    let system = heartbeat_where(&dashboard, "system error", |p| {
        p["update_status"]["system"]["status"] == "error"
    })
    .await;
    assert!(
        system["system"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Switch failed: "),
        "{system}"
    );
    // Nothing closes and nothing registers for a while (3 heartbeats).
    let quiet_until = status.at() + 3 * SECOND;
    dashboard
        .wait_for(10 * SECOND, "a heartbeat 3 s after the status", |log| {
            log.iter()
                .find(|s| s.kind() == Some("heartbeat") && s.at() > quiet_until)
                .map(|_| ())
        })
        .await;
    assert_eq!(dashboard.frames("register").len(), 1);
    assert_eq!(dashboard.current_conn(), Some(status.conn()));
}

#[tokio::test]
async fn a_heartbeat_follows_every_status_within_100ms() {
    let dashboard = Dashboard::start().await;
    // A long interval: only the heartbeat after the status can be that close.
    let _h = host(&dashboard, "echo ok", &[], |o| o.interval = 30).await;
    let commands = ["boot", "check-version", "refresh-lock", "switch", "test"];
    for (i, command) in commands.iter().enumerate() {
        send(&dashboard, command);
        let status = dashboard.wait_frame("status", i + 1, 20 * SECOND).await;
        let next = dashboard
            .wait_for(5 * SECOND, "the heartbeat after the status", |log| {
                log.iter()
                    .find(|s| {
                        s.kind() == Some("heartbeat")
                            && s.conn() == status.conn()
                            && s.at() >= status.at()
                    })
                    .cloned()
            })
            .await;
        let gap = next.at().duration_since(status.at());
        assert!(gap <= Duration::from_millis(100), "{command}: {gap:?}");
        assert_eq!(next.payload()["pending_command"], Value::Null);
        if *command == "switch" {
            dashboard.wait_frame("register", 2, 5 * SECOND).await;
        }
    }
}

#[tokio::test]
async fn pull_reports_each_git_step_as_progress() {
    let upstream = tempfile::tempdir().unwrap();
    let work = upstream.path().join("work");
    std::fs::create_dir(&work).unwrap();
    commit_repo(&work);
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options
        .extra_toml
        .push(format!("repo_url = {:?}", work.display().to_string()));
    let (dir, _) = Agent::prepare(&options);
    std::fs::remove_dir(dir.path().join("repo")).unwrap();
    let _agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    send(&dashboard, "pull");
    assert_eq!(status_of(&dashboard, 1).await["status"], "ok");
    // A clone is one step; a pull into the clone three.
    send(&dashboard, "pull");
    assert_eq!(status_of(&dashboard, 2).await["status"], "ok");
    let steps: Vec<(u64, u64, String)> = progress_frames(&dashboard, "pull")
        .iter()
        .map(|p| {
            (
                p["current"].as_u64().unwrap(),
                p["total"].as_u64().unwrap(),
                p["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        (0, 1, "in_progress"),
        (1, 1, "complete"),
        (0, 3, "in_progress"),
        (1, 3, "in_progress"),
        (2, 3, "in_progress"),
        (3, 3, "complete"),
    ]
    .map(|(c, t, s)| (c, t, s.to_owned()));
    assert_eq!(steps, expected);
    // Progress goes out before the status of its command.
    let log = dashboard.log();
    let last_progress = log
        .iter()
        .rposition(|s| s.kind() == Some("operation_progress"))
        .unwrap();
    let last_status = log
        .iter()
        .rposition(|s| s.kind() == Some("status"))
        .unwrap();
    assert!(last_progress < last_status);
    // After a pull the git compartment knows origin/main.
    heartbeat_where(&dashboard, "git ok", |p| {
        p["update_status"]["git"]["status"] == "ok"
    })
    .await;
}

#[tokio::test]
async fn tests_report_per_test_results_and_the_tests_compartment() {
    let dashboard = Dashboard::start().await;
    let h = host(&dashboard, "true", &[], |_| {}).await;
    let tests = h.agent.repo_dir.join("hosts/test-host/tests");
    std::fs::create_dir_all(&tests).unwrap();
    script(&tests, "T01-ok.sh", "echo fine");
    script(&tests, "T02-bad.sh", "exit 1");
    send(&dashboard, "test");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["status"], "error");
    let frames = progress_frames(&dashboard, "tests");
    let shown: Vec<(u64, Vec<String>, String)> = frames
        .iter()
        .map(|p| {
            (
                p["current"].as_u64().unwrap(),
                p["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_owned())
                    .collect(),
                p["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        shown,
        [
            (0, s(&["pending", "pending"]), "in_progress".to_owned()),
            (1, s(&["pass", "pending"]), "in_progress".to_owned()),
            (2, s(&["pass", "fail"]), "error".to_owned()),
        ]
    );
    assert!(frames.iter().all(|p| p["total"] == 2));
    let compartments = heartbeat_where(&dashboard, "tests error", |p| {
        p["update_status"]["tests"]["status"] == "error"
    })
    .await;
    assert_eq!(compartments["tests"]["message"], "1/2 passed");
}

#[tokio::test]
async fn reboot_is_refused_unless_allowed() {
    let dashboard = Dashboard::start().await;
    let systemctl = "echo \"$@\" >> \"$HOME/systemctl-argv\"";
    let h = host(&dashboard, "true", &[("systemctl", systemctl)], |_| {}).await;
    send(&dashboard, "reboot");
    let rejected = dashboard
        .wait_frame("command_rejected", 1, 10 * SECOND)
        .await;
    let reason = rejected.payload()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("allow_reboot"), "{reason}");
    assert!(dashboard.frames("status").is_empty());
    assert!(!h.agent.dir.path().join("systemctl-argv").exists());
}

#[tokio::test]
async fn reboot_runs_systemctl_reboot_when_allowed() {
    let dashboard = Dashboard::start().await;
    let systemctl = "echo \"$@\" >> \"$HOME/systemctl-argv\"";
    let h = host(&dashboard, "true", &[("systemctl", systemctl)], |o| {
        o.extra_toml.push("allow_reboot = true".into())
    })
    .await;
    send(&dashboard, "reboot");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["command"], "reboot");
    assert_eq!(status["status"], "ok");
    let argv = wait_for_file(&h.agent.dir.path().join("systemctl-argv"), 10 * SECOND).await;
    assert_eq!(argv.trim(), "reboot");
}

#[tokio::test]
async fn kill_stops_the_running_command() {
    let dashboard = Dashboard::start().await;
    let _h = host(&dashboard, "echo started\nsleep 30", &[], |_| {}).await;
    send(&dashboard, "switch");
    dashboard
        .wait_frame_where("heartbeat", 10 * SECOND, |p| {
            p["pending_command"] == "switch"
        })
        .await;
    send(&dashboard, "kill");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["status"], "error");
    assert_eq!(status["message"], "Stopped by user");
    // A stopped switch changed nothing: no new register.
    assert_eq!(dashboard.frames("register").len(), 1);
}

#[tokio::test]
async fn restart_when_idle_exits_for_the_service_manager() {
    let dashboard = Dashboard::start().await;
    let mut h = host(&dashboard, "true", &[], |_| {}).await;
    send(&dashboard, "restart");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(
        (status["command"].as_str(), status["status"].as_str()),
        (Some("restart"), Some("ok"))
    );
    let (code, reason, _) = dashboard.wait_close(5 * SECOND).await;
    assert_eq!((code, reason.as_str()), (Some(1000), "shutdown"));
    assert_eq!(h.agent.wait_exit(10 * SECOND).await, Some(75));
}

#[tokio::test]
async fn restart_while_busy_waits_for_the_command() {
    let dashboard = Dashboard::start().await;
    let rebuild =
        "echo x > \"$HOME/started\"\nwhile [ ! -e \"$HOME/go\" ]; do sleep 0.05; done\necho done";
    let mut h = host(&dashboard, rebuild, &[], |_| {}).await;
    send(&dashboard, "boot");
    wait_for_file(&h.agent.dir.path().join("started"), 10 * SECOND).await;
    send(&dashboard, "restart");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["command"], "restart");
    assert_eq!(status["message"], "restarting once boot has ended");
    // Meanwhile the command runs on, and so does the agent.
    send(&dashboard, "pull");
    let rejected = dashboard
        .wait_frame("command_rejected", 1, 10 * SECOND)
        .await;
    assert_eq!(rejected.payload()["reason"], "command already running");
    assert!(h.agent.is_running());
    std::fs::write(h.agent.dir.path().join("go"), "").unwrap();
    let status = status_of(&dashboard, 2).await;
    assert_eq!(
        (status["command"].as_str(), status["status"].as_str()),
        (Some("boot"), Some("ok"))
    );
    assert_eq!(h.agent.wait_exit(10 * SECOND).await, Some(75));
}

#[tokio::test]
async fn check_version_reports_freshness_and_warns_when_the_unit_moved() {
    let dashboard = Dashboard::start().await;
    let unit_dir = tempfile::tempdir().unwrap();
    let unit = unit_dir.path().join("nixfleet.service");
    std::fs::write(
        &unit,
        format!(
            "[Service]\nExecStart={} --config x\n",
            env!("CARGO_BIN_EXE_nixfleet-agent")
        ),
    )
    .unwrap();
    let unit_path = unit.display().to_string();
    let _h = host(&dashboard, "true", &[], |o| {
        o.env.push(("NIXFLEET_TEST_UNIT_FILE".into(), unit_path))
    })
    .await;
    send(&dashboard, "check-version");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["status"], "ok", "{status}");
    assert_eq!(status["message"], "running the installed agent");
    let lines: Vec<String> = dashboard
        .frames("output")
        .iter()
        .map(|f| f.payload()["line"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        lines.iter().any(|l| l.starts_with("agent version ")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("binary sha256 ")),
        "{lines:?}"
    );
    std::fs::write(
        &unit,
        "[Service]\nExecStart=/nix/store/new-agent/bin/nixfleet-agent\n",
    )
    .unwrap();
    send(&dashboard, "check-version");
    let status = status_of(&dashboard, 2).await;
    assert_eq!(status["status"], "warning", "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("restart to run it"),
        "{status}"
    );
}

/// A read-only check printing without end (a broken git or Nix) to a slow
/// dashboard must not grow the agent's memory nor its disk: its log keeps
/// 1 MiB of output (the checks' cap, see `CHECK_LOG_MAX_BYTES`), past it
/// lines are counted, and the count is said before the status.
#[tokio::test]
async fn a_check_flooding_a_slow_dashboard_is_bounded_and_counted() {
    const LINES: u64 = 40_000;
    let dashboard = Dashboard::start().await;
    let real_git = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v git"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let git_standin = format!(
        "if [ \"$1\" = fetch ]; then\n\
           seq 1 {LINES} | sed 's/^/a fetch that prints far too much, line /'\n\
           exit 0\n\
         fi\n\
         exec {} \"$@\"\n",
        real_git.trim()
    );
    let h = host(&dashboard, "true", &[("git", &git_standin)], |_| {}).await;
    git(
        &h.agent.repo_dir,
        &[
            "remote",
            "add",
            "origin",
            h.agent.repo_dir.to_str().unwrap(),
        ],
    );
    dashboard.set_read_rate(Some(5_000));
    send(&dashboard, "refresh-git");
    let status = status_of(&dashboard, 1).await;
    dashboard.set_read_rate(None);
    assert_eq!(status["status"], "ok", "{status}");
    let lines: Vec<String> = dashboard
        .frames("output")
        .iter()
        .map(|f| f.payload()["line"].as_str().unwrap_or_default().to_owned())
        .collect();
    let delivered = lines
        .iter()
        .filter(|l| l.starts_with("a fetch that prints far too much"))
        .count() as u64;
    let notice = lines
        .iter()
        .find_map(|l| {
            l.strip_prefix("[nixfleet] ")?
                .strip_suffix(" lines dropped")?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no drop notice among {} lines", lines.len()));
    let connections = dashboard.frames("register").len();
    eprintln!(
        "figures: {delivered} lines delivered, {notice} counted, over {connections} connection(s)"
    );
    assert!(delivered < LINES, "all {LINES} lines were queued in memory");
    assert_eq!(delivered + notice, LINES, "every line delivered or counted");
}

#[tokio::test]
async fn refresh_git_and_lock_on_an_idle_host() {
    let dashboard = Dashboard::start().await;
    let h = host(&dashboard, "true", &[], |_| {}).await;
    // An origin for the repo, one commit ahead.
    let origin = tempfile::tempdir().unwrap();
    git(
        origin.path(),
        &["clone", "-q", h.agent.repo_dir.to_str().unwrap(), "o"],
    );
    let o = origin.path().join("o");
    git(&o, &["commit", "-q", "--allow-empty", "-m", "ahead"]);
    git(
        &h.agent.repo_dir,
        &["remote", "add", "origin", o.to_str().unwrap()],
    );

    send(&dashboard, "refresh-git");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["status"], "ok", "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .starts_with("git: outdated"),
        "{status}"
    );
    heartbeat_where(&dashboard, "git outdated", |p| {
        p["update_status"]["git"]["status"] == "outdated"
    })
    .await;

    send(&dashboard, "refresh-lock");
    let status = status_of(&dashboard, 2).await;
    assert_eq!(status["status"], "ok", "{status}");
    assert_eq!(status["message"], "lock: ok (Updated today)");
    let compartments = heartbeat_where(&dashboard, "lock ok", |p| {
        p["update_status"]["lock"]["status"] == "ok"
    })
    .await;
    assert_eq!(compartments["lock"]["message"], "Updated today");
    // The heartbeat carries the lock's hash.
    let beat = dashboard
        .frames("heartbeat")
        .last()
        .unwrap()
        .payload()
        .clone();
    assert_eq!(beat["lock_hash"].as_str().map(str::len), Some(64));
}

/// A stand-in `nix`: records its argv, niceness and IO class, and for a
/// dry run prints the JSON of a toplevel whose output is `$OUT`.
const NIX: &str = r#"printf '%s\n' "$@" > "$HOME/nix-argv"
nice > "$HOME/nix-nice"
ionice -p $$ > "$HOME/nix-ionice"
case "$*" in
  *--dry-run*) printf '[{"drvPath":"/nix/store/x.drv","outputs":{"out":"%s"}}]\n' "$(cat "$HOME/nix-out")";;
esac"#;

#[tokio::test]
async fn refresh_system_runs_a_low_priority_dry_run() {
    let dashboard = Dashboard::start().await;
    let h = host(&dashboard, "true", &[("nix", NIX)], |_| {}).await;
    let home = h.agent.dir.path();
    let current = std::fs::canonicalize(&h.link).unwrap();
    std::fs::write(home.join("nix-out"), current.display().to_string()).unwrap();
    send(&dashboard, "refresh-system");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["status"], "ok", "{status}");
    assert_eq!(
        status["message"],
        "system: ok (the repo builds the running system)"
    );
    let argv = std::fs::read_to_string(home.join("nix-argv")).unwrap();
    let attr = format!(
        "{}#nixosConfigurations.test-host.config.system.build.toplevel",
        h.agent.repo_dir.display()
    );
    assert!(argv.lines().any(|l| l == attr), "{argv}");
    assert!(argv.lines().any(|l| l == "--dry-run"), "{argv}");
    assert_eq!(
        std::fs::read_to_string(home.join("nix-nice"))
            .unwrap()
            .trim(),
        "19"
    );
    let io_class = std::fs::read_to_string(home.join("nix-ionice")).unwrap();
    assert_eq!(io_class.trim(), "idle");
    heartbeat_where(&dashboard, "system ok", |p| {
        p["update_status"]["system"]["status"] == "ok"
    })
    .await;

    // The repo builds something else now.
    std::fs::write(home.join("nix-out"), "/nix/store/other-system").unwrap();
    send(&dashboard, "refresh-all");
    let status = status_of(&dashboard, 2).await;
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("system: outdated"),
        "{status}"
    );
    heartbeat_where(&dashboard, "system outdated", |p| {
        p["update_status"]["system"]["status"] == "outdated"
    })
    .await;
}

#[tokio::test]
async fn refresh_system_shows_working_while_it_runs_and_heartbeats_go_on() {
    let dashboard = Dashboard::start().await;
    let slow_nix = "echo x > \"$HOME/nix-started\"\nwhile [ ! -e \"$HOME/nix-go\" ]; do sleep 0.05; done\necho '[]'";
    let h = host(&dashboard, "true", &[("nix", slow_nix)], |_| {}).await;
    send(&dashboard, "refresh-system");
    wait_for_file(&h.agent.dir.path().join("nix-started"), 10 * SECOND).await;
    heartbeat_where(&dashboard, "system working", |p| {
        p["update_status"]["system"]["status"] == "working"
            && p["pending_command"] == "refresh-system"
    })
    .await;
    std::fs::write(h.agent.dir.path().join("nix-go"), "").unwrap();
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["status"], "ok", "{status}");
    heartbeat_where(&dashboard, "system outdated", |p| {
        p["update_status"]["system"]["status"] == "outdated"
    })
    .await;
}

/// A check runs under its supervisor like every other command: the
/// agent's death does not cut it short, and the next agent adopts it,
/// sends its verdict line and status, and gives the system compartment
/// the verdict.
#[tokio::test]
async fn a_check_survives_the_agents_death_and_the_next_agent_reports_it() {
    let dashboard = Dashboard::start().await;
    let slow_nix = r#"echo $$ > "$HOME/nix-pid"
while [ ! -e "$HOME/nix-go" ]; do sleep 0.05; done
printf '[{"drvPath":"/nix/store/x.drv","outputs":{"out":"%s"}}]\n' "$(cat "$HOME/nix-out")""#;
    let h = host(&dashboard, "true", &[("nix", slow_nix)], |_| {}).await;
    let home = h.agent.dir.path().to_owned();
    let current = std::fs::canonicalize(&h.link).unwrap();
    std::fs::write(home.join("nix-out"), current.display().to_string()).unwrap();
    send(&dashboard, "refresh-system");
    wait_for_file(&home.join("nix-pid"), 20 * SECOND).await;
    let nix = read_pid(&home.join("nix-pid"));
    let dir = h.agent.crash().await;
    assert!(alive(nix), "the check died with the agent");

    let mut options = AgentOptions::new(dashboard.url());
    options.env.push((
        "NIXFLEET_TEST_CURRENT_SYSTEM".into(),
        h.link.display().to_string(),
    ));
    let _second = Agent::spawn(dir, options).await;
    let register = dashboard.wait_frame("register", 2, 10 * SECOND).await;
    dashboard
        .wait_for(5 * SECOND, "the new agent's heartbeat", |log| {
            log.iter()
                .find(|s| {
                    s.conn() == register.conn()
                        && s.kind() == Some("heartbeat")
                        && s.payload()["pending_command"] == "refresh-system"
                        && s.payload()["update_status"]["system"]["status"] == "working"
                })
                .map(|_| ())
        })
        .await;
    std::fs::write(home.join("nix-go"), "").unwrap();
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    assert_eq!(status.conn(), register.conn());
    let p = status.payload();
    assert_eq!(p["command"], "refresh-system");
    assert_eq!(p["status"], "ok", "{p}");
    assert_eq!(
        p["message"],
        "system: ok (the repo builds the running system)"
    );
    let verdict = dashboard
        .wait_frame_where("output", 5 * SECOND, |p| {
            p["line"] == "[nixfleet] system: ok (the repo builds the running system)"
        })
        .await;
    assert!(verdict.at() < status.at(), "the verdict line comes first");
    heartbeat_where(&dashboard, "system ok", |p| {
        p["update_status"]["system"]["status"] == "ok" && p["pending_command"].is_null()
    })
    .await;
    assert_eq!(dashboard.frames("status").len(), 1);
}

#[tokio::test]
async fn update_and_force_update_drive_nix_and_nixos_rebuild() {
    let dashboard = Dashboard::start().await;
    let rebuild =
        "printf '%s\\n' \"$@\" > \"$HOME/rebuild-argv\"\nln -sfn \"$NEW_SYSTEM\" \"$LINK\"";
    let h = host(&dashboard, rebuild, &[("nix", NIX)], |_| {}).await;
    let home = h.agent.dir.path();

    send(&dashboard, "update");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["status"], "ok", "{status}");
    let argv = std::fs::read_to_string(home.join("nix-argv")).unwrap();
    assert!(argv.ends_with("flake\nupdate\n"), "{argv}");
    let lock = progress_frames(&dashboard, "lock");
    assert_eq!(lock.last().unwrap()["status"], "complete");

    send(&dashboard, "bump-flake");
    assert_eq!(status_of(&dashboard, 2).await["status"], "ok");
    let argv = std::fs::read_to_string(home.join("nix-argv")).unwrap();
    assert!(argv.ends_with("flake\nupdate\nnixfleet\n"), "{argv}");

    // No origin: force-update's pull fails and nothing is rebuilt.
    send(&dashboard, "force-update");
    let status = status_of(&dashboard, 3).await;
    assert_eq!(status["status"], "error", "{status}");
    assert!(!home.join("rebuild-argv").exists());

    // With an origin it pulls, bumps and switches without the negative cache.
    let origin = tempfile::tempdir().unwrap();
    git(
        origin.path(),
        &["clone", "-q", h.agent.repo_dir.to_str().unwrap(), "o"],
    );
    let o = origin.path().join("o");
    git(
        &h.agent.repo_dir,
        &["remote", "add", "origin", o.to_str().unwrap()],
    );
    git(&h.agent.repo_dir, &["fetch", "-q", "origin"]);
    git(
        &h.agent.repo_dir,
        &["branch", "-q", "--set-upstream-to=origin/main"],
    );
    send(&dashboard, "force-update");
    let status = status_of(&dashboard, 4).await;
    assert_eq!(status["status"], "ok", "{status}");
    let argv = std::fs::read_to_string(home.join("rebuild-argv")).unwrap();
    assert!(
        argv.contains("switch\n") && argv.contains("narinfo-cache-negative-ttl\n0\n"),
        "{argv}"
    );
    // An activation: the agent registers again.
    dashboard.wait_frame("register", 2, 5 * SECOND).await;
}

#[tokio::test]
async fn a_pull_switch_whose_pull_failed_leaves_the_system_compartment_alone() {
    let dashboard = Dashboard::start().await;
    // No upstream: `git pull --ff-only` fails before any rebuild.
    let h = host(&dashboard, SWITCH_TO_NEW, &[], |_| {}).await;
    send(&dashboard, "pull-switch");
    let status = status_of(&dashboard, 1).await;
    assert_eq!(status["status"], "error", "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .starts_with("git pull failed"),
        "{status}"
    );
    let after = dashboard.frames("status")[0].at();
    let compartments = dashboard
        .wait_for(5 * SECOND, "a heartbeat after the status", |log| {
            log.iter()
                .find(|s| s.kind() == Some("heartbeat") && s.at() >= after)
                .map(|s| s.payload()["update_status"].clone())
        })
        .await;
    assert_eq!(
        compartments["system"]["status"], "unknown",
        "{compartments}"
    );
    assert_ne!(
        std::fs::canonicalize(&h.link).unwrap(),
        std::fs::canonicalize(&h.new_system).unwrap(),
        "nothing was rebuilt"
    );
}
