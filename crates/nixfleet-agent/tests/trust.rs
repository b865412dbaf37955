//! Signed commits only (`allowed_signers_file`, `gpg_keyring`), end to
//! end with the real `git`, `ssh-keygen` and `gpg` and keys made here: a
//! tip signed by a listed key is deployed; any other tip is refused before
//! the checkout moves, and a HEAD changed by hand is never built.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether `tool` runs here; a test needing it says why it is skipped.
fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: {tool} is not installed (scripts/test.sh installs it)");
    }
    found
}

/// An SSH key pair made with ssh-keygen; returns the private key's path
/// and its allowed-signers line.
fn ssh_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, format!("t@t namespaces=\"git\" {}", public.trim()))
}

/// The key allowed to sign, the only one its allowed-signers file (in
/// `dir`) lists: the key's path and the file's.
fn allowed_key(dir: &Path) -> (PathBuf, PathBuf) {
    let (key, line) = ssh_key(dir, "allowed");
    let signers = dir.join("allowed_signers");
    std::fs::write(&signers, format!("{line}\n")).unwrap();
    (key, signers)
}

/// The configuration line naming `signers` as the allowed-signers file.
fn signers_config(signers: &Path) -> String {
    format!("allowed_signers_file = {:?}", signers.display().to_string())
}

/// Runs git in `dir` with a fixed identity and no user configuration, plus
/// `extra` environment; returns its stdout.
fn git_env(dir: &Path, args: &[&str], extra: &[(&str, &Path)]) -> String {
    let mut command = Command::new("git");
    command
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t");
    for (k, v) in extra {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Commits everything in `repo` signed with the SSH key `key` (or
/// unsigned); returns the short id.
fn commit_ssh(repo: &Path, message: &str, key: Option<&Path>) -> String {
    git_env(repo, &["add", "-A"], &[]);
    match key {
        Some(key) => {
            let signing = format!("user.signingkey={}", key.display());
            git_env(
                repo,
                &[
                    "-c",
                    "gpg.format=ssh",
                    "-c",
                    &signing,
                    "commit",
                    "-q",
                    "-S",
                    "--allow-empty",
                    "-m",
                    message,
                ],
                &[],
            );
        }
        None => {
            git_env(
                repo,
                &[
                    "commit",
                    "-q",
                    "--no-gpg-sign",
                    "--allow-empty",
                    "-m",
                    message,
                ],
                &[],
            );
        }
    }
    git_env(repo, &["rev-parse", "--short=7", "HEAD"], &[])
}

/// The upstream repository of an isolated-mode host: `work`, with a first
/// commit signed by `key`.
fn upstream(dir: &Path, key: &Path) -> (PathBuf, String) {
    let work = dir.join("upstream");
    std::fs::create_dir(&work).unwrap();
    git_env(&work, &["init", "-q", "-b", "main"], &[]);
    std::fs::write(work.join("flake.nix"), "{ }\n").unwrap();
    let first = commit_ssh(&work, "one", Some(key));
    (work, first)
}

/// An agent in isolated mode cloning `work`, with `keys` as extra config.
async fn isolated_host(dashboard: &Dashboard, work: &Path, keys: Vec<String>) -> Agent {
    let mut options = AgentOptions::new(dashboard.url());
    options.follow(work);
    options.extra_toml.extend(keys);
    let (dir, _) = Agent::prepare_to_clone(&options);
    let agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    agent
}

async fn command_status(dashboard: &Dashboard, command: &str, n: usize) -> Value {
    dashboard.command(dashboard.current_conn().unwrap(), command);
    dashboard
        .wait_frame("status", n, 30 * SECOND)
        .await
        .payload()
        .clone()
}

fn head(repo: &Path) -> String {
    git_env(repo, &["rev-parse", "--short=7", "HEAD"], &[])
}

/// The compartment's words for an unsigned commit (else: signed by a key
/// not listed).
const UNSIGNED: &str = "unsigned commit";

/// A pull refused: status `error` naming the commit and `why`, the
/// checkout still at `kept`, the git compartment `error` with the words
/// for `compartment`.
async fn assert_refused(
    dashboard: &Dashboard,
    agent: &Agent,
    n: usize,
    (refused, why, compartment): (&str, &str, &str),
    kept: &str,
) {
    let p = command_status(dashboard, "pull", n).await;
    assert_eq!(p["status"], "error", "{p}");
    let message = p["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("commit {refused} {why}")),
        "{message}"
    );
    assert_eq!(head(&agent.repo_dir), kept, "the checkout stayed");
    let wanted = if compartment == UNSIGNED {
        format!("unsigned commit {refused}")
    } else {
        format!("commit {refused} not signed by an allowed key")
    };
    dashboard
        .wait_frame_where("heartbeat", 10 * SECOND, |p| {
            let git = &p["update_status"]["git"];
            git["status"] == "error" && git["message"] == wanted.as_str()
        })
        .await;
}

#[tokio::test]
async fn only_a_tip_signed_by_a_listed_ssh_key_is_checked_out() {
    if !have("ssh-keygen") {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let (allowed, signers) = allowed_key(keys.path());
    let (other, _) = ssh_key(keys.path(), "other");
    let (work, first) = upstream(keys.path(), &allowed);

    let dashboard = Dashboard::start().await;
    let config = vec![signers_config(&signers)];
    let agent = isolated_host(&dashboard, &work, config).await;
    let p = command_status(&dashboard, "pull", 1).await;
    assert_eq!(p["status"], "ok", "{p}");
    assert_eq!(head(&agent.repo_dir), first);

    // Unsigned on top: refused, the checkout stays.
    std::fs::write(work.join("flake.nix"), "{ outputs = _: { }; }\n").unwrap();
    let unsigned = commit_ssh(&work, "unsigned", None);
    let why = ("is not signed", UNSIGNED);
    assert_refused(&dashboard, &agent, 2, (&unsigned, why.0, why.1), &first).await;
    assert_eq!(
        std::fs::read_to_string(agent.repo_dir.join("flake.nix")).unwrap(),
        "{ }\n"
    );

    // Signed, but by a key not listed.
    let stranger = commit_ssh(&work, "stranger", Some(&other));
    let why = ("is not signed by a key", "listed");
    assert_refused(&dashboard, &agent, 3, (&stranger, why.0, why.1), &first).await;

    // A listed key signs on top: deployed (only the tip is checked).
    let good = commit_ssh(&work, "vouched", Some(&allowed));
    let p = command_status(&dashboard, "pull", 4).await;
    assert_eq!(p["status"], "ok", "{p}");
    assert_eq!(head(&agent.repo_dir), good);
    dashboard
        .wait_frame_where("heartbeat", 10 * SECOND, |p| {
            p["update_status"]["git"]["status"] == "ok"
        })
        .await;

    // A force-pushed unsigned history replaces everything: refused.
    git_env(&work, &["checkout", "-q", "--orphan", "rewritten"], &[]);
    std::fs::write(work.join("evil"), "x\n").unwrap();
    let forced = commit_ssh(&work, "rewritten", None);
    git_env(&work, &["branch", "-q", "-f", "main", "rewritten"], &[]);
    let why = ("is not signed", UNSIGNED);
    assert_refused(&dashboard, &agent, 5, (&forced, why.0, why.1), &good).await;
    assert!(!agent.repo_dir.join("evil").exists());
}

#[tokio::test]
async fn a_first_clone_of_an_unsigned_tip_checks_nothing_out() {
    if !have("ssh-keygen") {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let (allowed, signers) = allowed_key(keys.path());
    let (work, _) = upstream(keys.path(), &allowed);
    let unsigned = commit_ssh(&work, "unsigned", None);

    let dashboard = Dashboard::start().await;
    let config = vec![signers_config(&signers)];
    let agent = isolated_host(&dashboard, &work, config).await;
    let p = command_status(&dashboard, "pull-switch", 1).await;
    assert_eq!(p["status"], "error", "{p}");
    let message = p["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("commit {unsigned} is not signed")),
        "{message}"
    );
    assert!(
        !agent.repo_dir.join("flake.nix").exists(),
        "nothing checked out"
    );
}

/// A plain-mode host whose `repo_dir` holds a commit signed by `key`, with
/// a stand-in `nixos-rebuild` that leaves a mark when it runs.
async fn plain_host(dashboard: &Dashboard, key: &Path, signers: &Path) -> Agent {
    let mut options = AgentOptions::new(dashboard.url());
    options.extra_toml.push(signers_config(signers));
    let (dir, bin) = Agent::prepare(&options);
    let repo = dir.path().join("repo");
    git_env(&repo, &["init", "-q", "-b", "main"], &[]);
    std::fs::write(repo.join("flake.nix"), "{ }\n").unwrap();
    std::fs::write(repo.join("flake.lock"), "{}\n").unwrap();
    commit_ssh(&repo, "signed", Some(key));
    let mark = dir.path().join("rebuilt");
    script(
        &bin,
        "nixos-rebuild",
        &format!("touch {:?}", mark.display().to_string()),
    );
    let agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    agent
}

#[tokio::test]
async fn switch_refuses_a_head_changed_by_hand() {
    if !have("ssh-keygen") {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let (allowed, signers) = allowed_key(keys.path());
    let dashboard = Dashboard::start().await;
    let agent = plain_host(&dashboard, &allowed, &signers).await;
    let mark = agent.dir.path().join("rebuilt");

    // The lock the agent itself updates may differ; the build runs.
    std::fs::write(agent.repo_dir.join("flake.lock"), "{ \"v\": 1 }\n").unwrap();
    let p = command_status(&dashboard, "switch", 1).await;
    assert_eq!(p["status"], "ok", "{p}");
    assert!(mark.exists());
    std::fs::remove_file(&mark).unwrap();
    // A successful switch registers again; commands go to the new link.
    dashboard.wait_frame("register", 2, 10 * SECOND).await;

    // An edit by hand in a tracked file: refused, nothing built.
    std::fs::write(agent.repo_dir.join("flake.nix"), "{ evil = 1; }\n").unwrap();
    let p = command_status(&dashboard, "switch", 2).await;
    assert_eq!(p["status"], "error", "{p}");
    let message = p["message"].as_str().unwrap();
    assert!(message.contains("flake.nix"), "{message}");
    assert!(
        message.contains("changes not in the signed commit"),
        "{message}"
    );
    assert!(!mark.exists(), "nixos-rebuild ran on an edited tree");

    // Committed by hand, unsigned: refused, nothing built.
    let by_hand = commit_ssh(&agent.repo_dir, "by hand", None);
    let p = command_status(&dashboard, "boot", 3).await;
    assert_eq!(p["status"], "error", "{p}");
    let message = p["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("commit {by_hand} is not signed")),
        "{message}"
    );
    assert!(!mark.exists(), "nixos-rebuild ran on an unsigned HEAD");
}

#[tokio::test]
async fn the_users_own_git_config_and_keyring_are_never_consulted() {
    if !have("ssh-keygen") || !have("gpg") {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let (allowed, signers) = allowed_key(keys.path());
    let (other, other_line) = ssh_key(keys.path(), "other");
    let (work, first) = upstream(keys.path(), &allowed);

    // A commit signed with a GPG key that only the user's own keyring
    // (the agent's HOME) knows and trusts.
    let home_gnupg = keys.path().join("home-gnupg");
    let user_key = gpg_key(&home_gnupg, "user@t");
    let signed_by_user = commit_gpg(&work, "user's key", &home_gnupg, &user_key);

    let dashboard = Dashboard::start().await;
    let mut options = AgentOptions::new(dashboard.url());
    options.follow(&work);
    options.extra_toml.push(signers_config(&signers));
    options
        .env
        .push(("GNUPGHOME".into(), home_gnupg.display().to_string()));
    let (dir, _) = Agent::prepare_to_clone(&options);
    // The user's gitconfig (HOME is the test directory) allows the other
    // SSH key and every GPG key.
    let user_signers = dir.path().join("user_signers");
    std::fs::write(&user_signers, format!("{other_line}\n")).unwrap();
    std::fs::write(
        dir.path().join(".gitconfig"),
        format!(
            "[gpg \"ssh\"]\n\tallowedSignersFile = {}\n[gpg]\n\tminTrustLevel = never\n",
            user_signers.display()
        ),
    )
    .unwrap();
    git_env(&work, &["reset", "-q", "--hard", &first], &[]);
    let agent = Agent::spawn(dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    let p = command_status(&dashboard, "pull", 1).await;
    assert_eq!(p["status"], "ok", "{p}");

    git_env(&work, &["reset", "-q", "--hard", &signed_by_user], &[]);
    let why = ("is not signed by a key", "listed");
    assert_refused(
        &dashboard,
        &agent,
        2,
        (&signed_by_user, why.0, why.1),
        &first,
    )
    .await;

    let by_other = commit_ssh(&work, "other", Some(&other));
    assert_refused(&dashboard, &agent, 3, (&by_other, why.0, why.1), &first).await;
    stop_gpg_agent(&home_gnupg);
}

#[tokio::test]
async fn a_tip_signed_by_a_key_of_gpg_keyring_is_checked_out() {
    if !have("gpg") {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let signer_home = keys.path().join("signer-gnupg");
    let signer = gpg_key(&signer_home, "signer@t");
    let other_home = keys.path().join("other-gnupg");
    let other = gpg_key(&other_home, "other@t");
    let keyring = keys.path().join("keyring");
    std::fs::create_dir(&keyring).unwrap();
    let out = Command::new("gpg")
        .args(["--batch", "--armor", "--export", &signer])
        .env("GNUPGHOME", &signer_home)
        .output()
        .unwrap();
    assert!(out.status.success() && !out.stdout.is_empty(), "{out:?}");
    std::fs::write(keyring.join("signer.asc"), &out.stdout).unwrap();

    let work = keys.path().join("upstream");
    std::fs::create_dir(&work).unwrap();
    git_env(&work, &["init", "-q", "-b", "main"], &[]);
    std::fs::write(work.join("flake.nix"), "{ }\n").unwrap();
    git_env(&work, &["add", "-A"], &[]);
    let first = commit_gpg(&work, "one", &signer_home, &signer);

    let dashboard = Dashboard::start().await;
    let config = vec![format!("gpg_keyring = {:?}", keyring.display().to_string())];
    let agent = isolated_host(&dashboard, &work, config).await;
    let p = command_status(&dashboard, "pull", 1).await;
    assert_eq!(p["status"], "ok", "{p}");
    assert_eq!(head(&agent.repo_dir), first);

    let stranger = commit_gpg(&work, "stranger", &other_home, &other);
    let why = ("is not signed by a key", "listed");
    assert_refused(&dashboard, &agent, 2, (&stranger, why.0, why.1), &first).await;
    let unsigned = commit_ssh(&work, "unsigned", None);
    let why = ("is not signed", UNSIGNED);
    assert_refused(&dashboard, &agent, 3, (&unsigned, why.0, why.1), &first).await;
    stop_gpg_agent(&signer_home);
    stop_gpg_agent(&other_home);
}

/// A fresh GPG signing key for `email` in the home `home`; its
/// fingerprint.
fn gpg_key(home: &Path, email: &str) -> String {
    std::fs::create_dir_all(home).unwrap();
    set_mode(home, 0o700);
    let out = Command::new("gpg")
        .args(["--batch", "--passphrase", "", "--quick-gen-key"])
        .args([&format!("T <{email}>"), "ed25519", "sign", "never"])
        .env("GNUPGHOME", home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new("gpg")
        .args(["--batch", "--with-colons", "--list-secret-keys", email])
        .env("GNUPGHOME", home)
        .output()
        .unwrap();
    let listing = String::from_utf8(out.stdout).unwrap();
    listing
        .lines()
        .find_map(|l| l.strip_prefix("fpr:"))
        .map(|l| l.trim_matches(':').to_owned())
        .expect("a fingerprint")
}

/// Commits (possibly empty) in `repo` signed with GPG key `key`; the short
/// id.
fn commit_gpg(repo: &Path, message: &str, home: &Path, key: &str) -> String {
    let signing = format!("user.signingkey={key}");
    git_env(
        repo,
        &[
            "-c",
            "gpg.format=openpgp",
            "-c",
            &signing,
            "commit",
            "-q",
            "-S",
            "--allow-empty",
            "-m",
            message,
        ],
        &[("GNUPGHOME", home)],
    );
    git_env(repo, &["rev-parse", "--short=7", "HEAD"], &[])
}

/// Ends the gpg-agent that signing started in `home`.
fn stop_gpg_agent(home: &Path) {
    let _ = Command::new("gpgconf")
        .args(["--kill", "gpg-agent"])
        .env("GNUPGHOME", home)
        .output();
}
