//! The read-only checks and refreshes behind the status compartments:
//! `check-version`, the `refresh-*` commands, and `update`,
//! `force-update` and `bump-flake` with a stand-in `nix`.

use super::*;

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
    // No wait for the running-command record: it is on disk before the
    // supervisor gets its plan, so surely once the check runs.
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
