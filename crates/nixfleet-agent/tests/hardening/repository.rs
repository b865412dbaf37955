//! The repository the agent pulls: a changed `repo_url` or branch is
//! followed and said, and credentials in `repo_url` never leave the host.

use super::*;

/// A repository with one commit on `main` (and `other` when asked), for
/// the agent to clone; returns its work tree and that commit.
fn upstream(
    root: &std::path::Path,
    name: &str,
    with_other_branch: bool,
) -> (std::path::PathBuf, String) {
    let work = root.join(name);
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("flake.nix"), format!("# {name}\n{{ }}\n")).unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", name]);
    if with_other_branch {
        git(&work, &["checkout", "-q", "-b", "other"]);
        std::fs::write(work.join("flake.nix"), format!("# {name} other\n{{ }}\n")).unwrap();
        git(&work, &["commit", "-qam", "other"]);
        git(&work, &["checkout", "-q", "main"]);
    }
    let head = git(&work, &["rev-parse", "--short=7", "main"]);
    (work, head)
}

/// Starts an agent in isolated mode on `dir`, runs one `pull` and returns
/// its status and every output line, then stops the agent.
async fn pull_once(
    dir: tempfile::TempDir,
    repo_url: &str,
    branch: &str,
) -> (serde_json::Value, Vec<String>, tempfile::TempDir) {
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options.extra_toml.push(format!("repo_url = {repo_url:?}"));
    options.extra_toml.push(format!("branch = {branch:?}"));
    let agent = Agent::spawn(dir, options).await;
    dashboard.command_first("pull").await;
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    let lines = dashboard
        .frames("output")
        .iter()
        .map(|f| f.payload()["line"].as_str().unwrap_or_default().to_owned())
        .collect();
    // The record goes once the status is delivered; a next agent must not
    // find it (it would send that status again).
    let record = agent.state_dir.join("running-command.json");
    let deadline = Instant::now() + 5 * SECOND;
    while record.exists() {
        assert!(
            Instant::now() < deadline,
            "record not cleared: {:?} {:?}\n{}",
            std::fs::read_to_string(&record),
            status.payload(),
            agent.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (status.payload().clone(), lines, agent.crash().await)
}

#[tokio::test]
async fn a_changed_repo_url_or_branch_is_followed_and_said() {
    let root = tempfile::tempdir().unwrap();
    let (a, a_head) = upstream(root.path(), "a", false);
    let (b, b_head) = upstream(root.path(), "b", true);
    let b_other = git(&b, &["rev-parse", "--short=7", "other"]);
    let (a, b) = (a.display().to_string(), b.display().to_string());
    let (dir, _) = Agent::prepare_to_clone(&AgentOptions::new(String::new()));
    let repo = dir.path().join("repo");

    let (status, _, dir) = pull_once(dir, &a, "main").await;
    assert_eq!(status["status"], "ok", "{status}");
    assert_eq!(status["generation"], a_head.as_str());

    // Moving away from repository A: the next pull must come from B.
    let (status, lines, dir) = pull_once(dir, &b, "main").await;
    assert_eq!(status["status"], "ok", "{status}");
    assert_eq!(status["generation"], b_head.as_str(), "{lines:#?}");
    assert_eq!(git(&repo, &["config", "--get", "remote.origin.url"]), b);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("origin is {a}, but repo_url is {b}"))),
        "{lines:#?}"
    );

    // And to another branch of B.
    let (status, lines, _dir) = pull_once(dir, &b, "other").await;
    assert_eq!(status["status"], "ok", "{status}");
    assert_eq!(status["generation"], b_other.as_str(), "{lines:#?}");
    assert_eq!(git(&repo, &["symbolic-ref", "--short", "HEAD"]), "other");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("branch changed from main to other")),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn credentials_in_repo_url_never_reach_logs_frames_or_messages() {
    const SECRET: &str = "s3cr3t-REPO-password";
    let url = format!("https://deploy:{SECRET}@127.0.0.1:9/fleet.git");
    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options.extra_toml.push(format!("repo_url = {url:?}"));
    let (dir, bin) = Agent::prepare_to_clone(&options);
    // A git that echoes its arguments (which hold the URL without its
    // credentials: trust_credentials.rs) and the URL with the credentials
    // it got in its environment, as git's own errors may quote the URL; it
    // fails, so the failure message is built from its words.
    script(
        &bin,
        "git",
        r#"echo "git was asked: $*"
echo "fatal: cannot reach https://$NIXFLEET_GIT_USERNAME:$NIXFLEET_GIT_PASSWORD@127.0.0.1:9/fleet.git" >&2
exit 128"#,
    );
    let agent = Agent::spawn(dir, options).await;
    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    assert_eq!(
        register.payload()["repo_url"],
        "https://<redacted>@127.0.0.1:9/fleet.git"
    );
    dashboard.command(register.conn(), "pull");
    let status = dashboard.wait_frame("status", 1, 20 * SECOND).await;
    assert_eq!(status.payload()["status"], "error");
    let lines: Vec<_> = dashboard
        .frames("output")
        .iter()
        .map(|f| f.payload()["line"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("https://<redacted>@127.0.0.1:9/fleet.git")),
        "the child's output arrives, scrubbed: {lines:#?}"
    );
    for seen in dashboard.log() {
        if let Seen::Frame { raw, .. } = seen {
            assert!(!raw.contains(SECRET), "a frame carries the secret: {raw}");
        }
    }
    let logs = agent.state_dir.join("logs");
    let mut log_text = String::new();
    for entry in std::fs::read_dir(&logs).unwrap() {
        log_text.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    assert!(
        log_text
            .lines()
            .any(|l| l.starts_with("# start 0 ") && l.ends_with(" git clone")),
        "{log_text}"
    );
    assert!(!log_text.contains(SECRET), "the command log:\n{log_text}");
    assert!(!agent.stderr().contains(SECRET), "{}", agent.stderr());

    // --check-config, and a configuration error about the URL.
    let config = agent.dir.path().join("agent.toml");
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"))
        .args(["--check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&checked.stdout);
    assert!(
        shown.contains("repo_url = \"https://<redacted>@127.0.0.1:9/fleet.git\""),
        "{shown}"
    );
    assert!(!shown.contains(SECRET), "{shown}");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"))
        .args(["--check-config", "--config"])
        .arg(&config)
        .args(["--repo-url", &format!("{url}\u{7}")])
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(78), "{error}");
    assert!(error.contains("repo_url"), "{error}");
    assert!(!error.contains(SECRET), "{error}");
}
