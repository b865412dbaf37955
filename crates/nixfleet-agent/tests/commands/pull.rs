//! `pull` against real git repositories: an isolated clone that follows
//! upstream, and failures that name the git step and quote git's error.

use super::*;

#[tokio::test]
async fn pull_in_isolated_mode_clones_then_follows_upstream() {
    let upstream = tempfile::tempdir().unwrap();
    let work = upstream.path().join("work");
    std::fs::create_dir(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("flake.nix"), "{ }\n").unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "one"]);
    let first = git(&work, &["rev-parse", "--short=7", "HEAD"]);

    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options.follow(&work);
    // The repo dir does not exist yet: the agent clones it.
    let (dir, _) = Agent::prepare_to_clone(&options);
    let agent = Agent::spawn(dir, options).await;
    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    assert_eq!(register.payload()["repo_url"], work.display().to_string());
    dashboard.command(register.conn(), "pull");
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok", "{:?}", status.payload());
    assert_eq!(status.payload()["generation"], first.as_str());
    assert!(agent.repo_dir.join("flake.nix").exists());

    // Upstream moves on; local junk is cleaned away.
    std::fs::write(work.join("flake.nix"), "{ outputs = _: { }; }\n").unwrap();
    git(&work, &["commit", "-qam", "two"]);
    let second = git(&work, &["rev-parse", "--short=7", "HEAD"]);
    std::fs::write(agent.repo_dir.join("junk"), "x").unwrap();
    dashboard.command(register.conn(), "pull");
    let status = dashboard.wait_frame("status", 2, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok", "{:?}", status.payload());
    assert_eq!(status.payload()["generation"], second.as_str());
    assert!(!agent.repo_dir.join("junk").exists(), "git clean -fd ran");
    dashboard
        .wait_frame_where("heartbeat", 5 * SECOND, |p| {
            p["generation"] == second.as_str()
        })
        .await;
}

#[tokio::test]
async fn pull_failure_names_the_git_step() {
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options
        .extra_toml
        .push("repo_url = \"/nonexistent/upstream\"".into());
    let (dir, _) = Agent::prepare_to_clone(&options);
    let _agent = Agent::spawn(dir, options).await;
    dashboard.command_first("pull-switch").await;
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    let p = status.payload();
    assert_eq!(p["status"], "error");
    assert_eq!(p["command"], "pull-switch");
    assert!(
        p["message"]
            .as_str()
            .unwrap()
            .starts_with("git clone failed: "),
        "{p}"
    );
}

/// Runs `pull` in plain mode (`git pull --ff-only` in `repo_dir`) and
/// returns the status message; `prepare` may set up the repo and a
/// stand-in `git` in the bin directory.
async fn plain_pull_message(prepare: impl FnOnce(&std::path::Path, &std::path::Path)) -> String {
    let dashboard = Dashboard::start().await;
    let options = AgentOptions::new(dashboard.url());
    let (dir, bin) = Agent::prepare(&options);
    prepare(&dir.path().join("repo"), &bin);
    let _agent = Agent::spawn(dir, options).await;
    dashboard.command_first("pull").await;
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    let p = status.payload();
    assert_eq!(p["status"], "error", "{p}");
    p["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn pull_failure_quotes_gits_error_not_its_hint() {
    let message = plain_pull_message(|_, bin| {
        script(
            bin,
            "git",
            "echo 'fatal: unable to access the remote' >&2\n\
             echo 'hint: see git help remote' >&2\nexit 128",
        );
    })
    .await;
    assert_eq!(
        message,
        "git pull failed: fatal: unable to access the remote"
    );
}

#[tokio::test]
async fn pull_without_upstream_quotes_gits_lead_sentence() {
    // A repository with no remote, as a newcomer's first try has: git
    // prints no "fatal:" line, only a sentence and then hints.
    let message = plain_pull_message(|repo, _| {
        git(repo, &["init", "-q", "-b", "main"]);
        git(repo, &["commit", "-q", "--allow-empty", "-m", "one"]);
    })
    .await;
    assert!(message.starts_with("git pull failed: "), "{message}");
    assert!(!message.contains("set-upstream-to"), "{message}");
    assert!(!message.contains("git pull <remote>"), "{message}");
}
