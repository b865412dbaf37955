//! The steps of each command, decided from the configuration before any of
//! them runs, and the agent's notes about them (written into the command
//! log ahead of the first step).

use super::log::Step;
use super::table::{Check, CommandKind};
use crate::child_env::ChildEnv;
use crate::config::Config;
use crate::git_credentials::clean_url;
use crate::host_facts::current_system;
use crate::redact::redact_url;
use crate::signature::{HEAD_LABEL, PULL_LABEL, SigningKeys, Subject};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

/// This very binary, as the supervisor that runs a step sees it (the
/// supervisor is the agent's binary, whatever replaced the file since).
const SELF_EXE: &str = "/proc/self/exe";
/// The dry-run system check gives up after this long.
pub const SYSTEM_CHECK_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the lock check's `git log` may take.
const LOCK_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Nix needs these for `nix build`/`nix flake` where the host has not
/// enabled them (every NixOS flake host has; the flag is harmless then).
const NIX_FEATURES: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];
/// `nixos-rebuild` flags for Nix's structured log, which the agent turns
/// back into plain lines plus build progress (see nix_log.rs). Both are
/// common flags of nixos-rebuild (the Python `nixos-rebuild-ng` and the
/// older shell script), passed on to every `nix` build it runs.
const STRUCTURED_LOG_ARGS: [&str; 3] = ["--log-format", "internal-json", "-v"];

/// A command's steps and the agent's notes about them.
#[derive(Debug, Default)]
pub struct Planned {
    pub steps: Vec<Step>,
    pub notes: Vec<String>,
}

/// Plans commands from the configuration.
pub struct Planner {
    config: Arc<Config>,
    child_env: ChildEnv,
}

impl Planner {
    pub fn new(config: Arc<Config>, child_env: ChildEnv) -> Self {
        Planner { config, child_env }
    }

    /// The processes a command runs, decided before any of them starts,
    /// and the agent's notes about them.
    pub async fn plan(&self, kind: CommandKind) -> Result<Planned, String> {
        let mut planned = Planned::default();
        let steps = match kind {
            CommandKind::Pull => self.pull_steps(&mut planned.notes).await?,
            CommandKind::PullSwitch => {
                let mut steps = self.pull_steps(&mut planned.notes).await?;
                steps.extend(self.build(&["switch"]));
                steps
            }
            CommandKind::Switch => self.build(&["switch"]),
            CommandKind::Boot => self.build(&["boot"]),
            CommandKind::Rollback => vec![self.rebuild(&["switch", "--rollback"], false)],
            CommandKind::Test => self.test_steps(),
            CommandKind::Update => vec![self.flake_update(None)],
            CommandKind::BumpFlake => vec![self.flake_update(Some("nixfleet"))],
            CommandKind::ForceUpdate | CommandKind::ForceRebuild => {
                self.force_update_steps(&mut planned.notes).await?
            }
            CommandKind::RefreshGit
            | CommandKind::RefreshLock
            | CommandKind::RefreshSystem
            | CommandKind::RefreshAll => self.check_steps(kind),
        };
        planned.steps = steps;
        Ok(planned)
    }

    /// The automatic rollback of an unconfirmed switch (safe deployments):
    /// the profile pointed back at exactly the recorded system (a new
    /// generation), then that system's own activation. Both paths come from
    /// the agent's record, never from the dashboard.
    pub fn rollback_to(&self, system: &str, profile: &Path, notes: Vec<String>) -> Planned {
        let steps = rollback_steps(system, profile, &self.working_dir());
        Planned { steps, notes }
    }

    /// Pull, bump the `nixfleet` input when the flake has one, then switch
    /// with the negative narinfo cache off, so that a freshly pushed agent
    /// is fetched or built rather than assumed missing. Whether the input
    /// exists is read from the lock as it is now, before the pull: an input
    /// added by this very pull is bumped by the next force-update.
    async fn force_update_steps(&self, notes: &mut Vec<String>) -> Result<Vec<Step>, String> {
        let mut steps = self.pull_steps(notes).await?;
        if flake_has_input(&self.config.repo_dir, "nixfleet") {
            steps.push(self.flake_update(Some("nixfleet")));
        } else {
            notes.push(
                "[nixfleet] the flake has no input named nixfleet; not bumping it".to_owned(),
            );
        }
        steps.extend(self.build(&["switch", "--option", "narinfo-cache-negative-ttl", "0"]));
        Ok(steps)
    }

    /// The git steps of a pull. In isolated mode (`repo_url` set): a clone
    /// when there is no repository yet, else `origin` pointed at
    /// `repo_url` if it differs, an explicit-refspec fetch, a forced
    /// checkout of the branch at origin's commit, and a clean. git is
    /// given `repo_url` without its credentials, on its argv and so in
    /// `.git/config`; the steps that talk to it get them in their
    /// environment (git_credentials.rs).
    async fn pull_steps(&self, notes: &mut Vec<String>) -> Result<Vec<Step>, String> {
        let repo = self.config.repo_dir.as_path();
        let Some(url) = self.config.repo_url.as_deref() else {
            return Ok(self.shared_pull_steps());
        };
        let url = clean_url(url);
        if !repo.join(".git").exists() {
            return self.clone_steps(&url);
        }
        let mut steps = self.origin_steps(&url, notes).await;
        steps.extend(self.sync_steps(notes).await);
        Ok(steps)
    }

    /// `git pull --ff-only` on whatever the branch tracks; with signed
    /// commits required, its fetch and merge as two steps with the check
    /// of the fetched tip between them.
    fn shared_pull_steps(&self) -> Vec<Step> {
        let repo = self.config.repo_dir.as_path();
        let Some(keys) = self.config.signing_keys() else {
            return vec![git("git pull", repo, &["pull", "--ff-only"])];
        };
        vec![
            git("git fetch", repo, &["fetch"]),
            self.verify_step(&keys, Subject::Tip, "@{upstream}"),
            git("git merge", repo, &["merge", "--ff-only", "@{upstream}"]),
        ]
    }

    /// The first pull in isolated mode: a clone of the configured branch.
    /// With signed commits required, the clone checks nothing out until
    /// its tip is verified.
    fn clone_steps(&self, url: &str) -> Result<Vec<Step>, String> {
        let Some(keys) = self.config.signing_keys() else {
            return self.clone_step(url, false).map(|step| vec![step]);
        };
        let branch = self.config.branch.as_str();
        let remote_branch = format!("refs/remotes/origin/{branch}");
        let checkout = ["checkout", "--force", "-B", branch, &remote_branch, "--"];
        Ok(vec![
            self.clone_step(url, true)?,
            self.verify_step(&keys, Subject::Tip, &remote_branch),
            git("git checkout", &self.config.repo_dir, &checkout),
        ])
    }

    fn clone_step(&self, url: &str, no_checkout: bool) -> Result<Step, String> {
        let repo = self.config.repo_dir.as_path();
        if repo.exists()
            && std::fs::read_dir(repo)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            return Err(format!(
                "repo_dir {} exists and is not a git repository",
                repo.display()
            ));
        }
        let parent = repo.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        let repo_arg = repo.as_os_str().to_str().unwrap_or_default();
        let branch = self.config.branch.as_str();
        let mut args = vec!["clone", "--branch", branch, "--single-branch"];
        if no_checkout {
            args.push("--no-checkout");
        }
        args.extend(["--", url, repo_arg]);
        Ok(remote_git("git clone", parent, &args))
    }

    /// `origin` must be repo_url, whatever it was before: a host moving
    /// away from a compromised repository must not keep pulling from it.
    /// `url` is without credentials, so an origin that holds them (written
    /// by an older agent) is rewritten without them.
    async fn origin_steps(&self, url: &str, notes: &mut Vec<String>) -> Vec<Step> {
        let repo = self.config.repo_dir.as_path();
        match self
            .git_query(repo, &["config", "--get", "remote.origin.url"])
            .await
        {
            Some(current) if current == url => Vec::new(),
            Some(current) if clean_url(&current) == url => {
                notes.push(
                    "[nixfleet] origin in .git/config holds repo_url's credentials: \
                     rewriting it without them"
                        .to_owned(),
                );
                let args = ["remote", "set-url", "origin", url];
                vec![git("git remote set-url", repo, &args)]
            }
            Some(current) => {
                notes.push(format!(
                    "[nixfleet] origin is {}, but repo_url is {}: pointing origin at repo_url",
                    redact_url(&current),
                    redact_url(url)
                ));
                let args = ["remote", "set-url", "origin", url];
                vec![git("git remote set-url", repo, &args)]
            }
            None => {
                notes.push(format!(
                    "[nixfleet] the repository has no origin: adding repo_url {}",
                    redact_url(url)
                ));
                vec![git(
                    "git remote add",
                    repo,
                    &["remote", "add", "origin", url],
                )]
            }
        }
    }

    /// Fetch, verify the fetched tip when signed commits are required,
    /// force-checkout the branch at origin's commit, clean.
    async fn sync_steps(&self, notes: &mut Vec<String>) -> Vec<Step> {
        let repo = self.config.repo_dir.as_path();
        let branch = self.config.branch.as_str();
        let remote_branch = format!("refs/remotes/origin/{branch}");
        // An explicit refspec: a clone made for another branch (or with
        // --single-branch) would not update origin/<branch> otherwise.
        let refspec = format!("+refs/heads/{branch}:{remote_branch}");
        if let Some(previous) = self
            .git_query(repo, &["symbolic-ref", "--short", "-q", "HEAD"])
            .await
            .filter(|previous| previous != branch)
        {
            notes.push(format!(
                "[nixfleet] branch changed from {previous} to {branch}: checking out {branch}"
            ));
        }
        let checkout = ["checkout", "--force", "-B", branch, &remote_branch, "--"];
        let fetch = ["fetch", "origin", &refspec];
        let mut steps = vec![remote_git("git fetch", repo, &fetch)];
        if let Some(keys) = self.config.signing_keys() {
            steps.push(self.verify_step(&keys, Subject::Tip, &remote_branch));
        }
        steps.push(git("git checkout", repo, &checkout));
        steps.push(git("git clean", repo, &["clean", "-fd"]));
        steps
    }

    /// The signature check of `rev` (see signature.rs): this very binary
    /// in its hidden mode, run by the supervisor like any step.
    fn verify_step(&self, keys: &SigningKeys, subject: Subject, rev: &str) -> Step {
        let label = match subject {
            Subject::Tip => PULL_LABEL,
            Subject::Head => HEAD_LABEL,
        };
        let config = &self.config;
        let args = keys.step_args(subject, &config.repo_dir, rev, &config.state_dir);
        step(label.to_owned(), SELF_EXE, args, self.working_dir())
    }

    /// A build of the repository's configuration: with signed commits
    /// required, HEAD is checked first (it may have been committed or
    /// edited by hand since the pull checked the tip).
    fn build(&self, op: &[&str]) -> Vec<Step> {
        let check = self
            .config
            .signing_keys()
            .map(|keys| self.verify_step(&keys, Subject::Head, "HEAD"));
        check.into_iter().chain([self.rebuild(op, true)]).collect()
    }

    /// The trimmed stdout of a quick git query, not shown anywhere; `None`
    /// when git fails or prints nothing.
    async fn git_query(&self, repo: &Path, args: &[&str]) -> Option<String> {
        let output = tokio::process::Command::new("git")
            .args(args)
            .current_dir(repo)
            .env_clear()
            .envs(self.child_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        (output.status.success() && !text.is_empty()).then_some(text)
    }

    /// `nix flake update [input]` (the lock compartment's step).
    fn flake_update(&self, input: Option<&str>) -> Step {
        let mut args: Vec<String> = NIX_FEATURES.map(str::to_owned).to_vec();
        args.extend(["flake".to_owned(), "update".to_owned()]);
        args.extend(input.map(str::to_owned));
        let label = match input {
            Some(input) => format!("nix flake update {input}"),
            None => "nix flake update".to_owned(),
        };
        step(label, "nix", args, self.working_dir())
    }

    /// `nixos-rebuild <op> [--flake <repo_dir>#<hostname>]`; with the
    /// flake (a build), Nix's structured log for build progress. A rollback
    /// builds nothing and runs plain.
    fn rebuild(&self, op: &[&str], flake: bool) -> Step {
        let mut args: Vec<String> = op.iter().map(|a| (*a).to_owned()).collect();
        if flake {
            args.push("--flake".to_owned());
            args.push(format!(
                "{}#{}",
                self.config.repo_dir.display(),
                self.config.hostname
            ));
            args.extend(STRUCTURED_LOG_ARGS.map(str::to_owned));
        }
        let label = format!("nixos-rebuild {}", op.join(" "));
        step(label, "nixos-rebuild", args, self.working_dir())
    }

    /// Every executable `hosts/<hostname>/tests/T*.sh`, in name order.
    fn test_steps(&self) -> Vec<Step> {
        let config = &self.config;
        let dir = config
            .repo_dir
            .join("hosts")
            .join(&config.hostname)
            .join("tests");
        let cwd = self.working_dir();
        find_test_scripts(&dir)
            .into_iter()
            .map(|script| {
                let name = script.file_name().unwrap_or_default();
                let label = name.to_string_lossy().into_owned();
                let program = script.to_string_lossy().into_owned();
                Step {
                    stop_on_failure: false,
                    trusted_within: Some(config.repo_dir.clone()),
                    ..step(label, &program, Vec::new(), cwd.clone())
                }
            })
            .collect()
    }

    /// The steps of a command's checks. A check with nothing to look at
    /// (no repository, no `flake.lock`, no running NixOS system) has no
    /// step: its verdict says so (see checks.rs). In `refresh-all` a
    /// failing check does not keep the next from running.
    fn check_steps(&self, kind: CommandKind) -> Vec<Step> {
        let repo = &self.config.repo_dir;
        kind.checks()
            .iter()
            .filter_map(|&check| {
                let step = match check {
                    Check::Git if repo.join(".git").exists() => self.fetch_check(),
                    Check::Lock if repo.join("flake.lock").exists() => self.lock_check(),
                    Check::System if current_system().is_some() => self.system_check(),
                    _ => return None,
                };
                Some(Step {
                    stop_on_failure: false,
                    ..step
                })
            })
            .collect()
    }

    /// `git fetch origin <branch>`: the git check compares HEAD with it.
    fn fetch_check(&self) -> Step {
        let args = ["fetch", "origin", self.config.branch.as_str()];
        remote_git(Check::Git.label(), &self.config.repo_dir, &args)
    }

    /// When `flake.lock` was last committed.
    fn lock_check(&self) -> Step {
        let args = ["log", "-1", "--format=%ct", "--", "flake.lock"];
        Step {
            timeout_ms: Some(LOCK_CHECK_TIMEOUT.as_millis() as u64),
            ..git(Check::Lock.label(), &self.config.repo_dir, &args)
        }
    }

    /// A dry-run build of the host's toplevel, at the lowest CPU and IO
    /// priority and with a timeout.
    fn system_check(&self) -> Step {
        let attr = format!(
            "{}#nixosConfigurations.{}.config.system.build.toplevel",
            self.config.repo_dir.display(),
            self.config.hostname
        );
        let mut args: Vec<String> = NIX_FEATURES.map(str::to_owned).to_vec();
        args.extend(["build", "--dry-run", "--json", "--no-link", &attr].map(str::to_owned));
        Step {
            low_priority: true,
            timeout_ms: Some(SYSTEM_CHECK_TIMEOUT.as_millis() as u64),
            ..step(
                Check::System.label().to_owned(),
                "nix",
                args,
                self.working_dir(),
            )
        }
    }

    /// Commands run in the repository when it exists, else in `/` (so that
    /// `rollback` works before the first pull).
    fn working_dir(&self) -> PathBuf {
        let repo = &self.config.repo_dir;
        if repo.is_dir() {
            repo.clone()
        } else {
            PathBuf::from("/")
        }
    }
}

/// The automatic rollback's steps: `nix-env --profile <profile> --set
/// <system>` (a new generation pointing at exactly the recorded system),
/// then `<system>/bin/switch-to-configuration switch`. The recorded
/// system's own `nix-env` is preferred: the rollback timer's service,
/// started by systemd, has no NixOS `PATH`. Shared by the agent's own
/// countdown and the timer's hidden mode (unattended.rs).
pub fn rollback_steps(system: &str, profile: &Path, cwd: &Path) -> Vec<Step> {
    let own_nix_env = Path::new(system).join("sw/bin/nix-env");
    let nix_env = match own_nix_env.to_str() {
        Some(own) if own_nix_env.exists() => own.to_owned(),
        _ => "nix-env".to_owned(),
    };
    let profile = profile.to_string_lossy().into_owned();
    let set = ["--profile", profile.as_str(), "--set", system].map(str::to_owned);
    let label = format!("nix-env --profile {profile} --set {system}");
    let activate = format!("{system}/bin/switch-to-configuration");
    vec![
        step(label, &nix_env, set.to_vec(), cwd.to_owned()),
        step(
            format!("{activate} switch"),
            &activate,
            vec!["switch".to_owned()],
            cwd.to_owned(),
        ),
    ]
}

/// A step that ends the command when it fails.
fn step(label: String, program: &str, args: Vec<String>, cwd: PathBuf) -> Step {
    Step {
        label,
        program: program.to_owned(),
        args,
        cwd,
        stop_on_failure: true,
        trusted_within: None,
        low_priority: false,
        timeout_ms: None,
        repo_credentials: false,
    }
}

fn git(label: &str, cwd: &Path, args: &[&str]) -> Step {
    let args = args.iter().map(|a| (*a).to_owned()).collect();
    step(label.to_owned(), "git", args, cwd.to_owned())
}

/// A git step that talks to `repo_url`, and so gets its credentials.
fn remote_git(label: &str, cwd: &Path, args: &[&str]) -> Step {
    Step {
        repo_credentials: true,
        ..git(label, cwd, args)
    }
}

/// Whether `flake.lock`'s root node has an input with this name.
fn flake_has_input(repo_dir: &Path, input: &str) -> bool {
    let Ok(text) = std::fs::read(repo_dir.join("flake.lock")) else {
        return false;
    };
    let Ok(lock) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return false;
    };
    let root = lock.get("root").and_then(|r| r.as_str()).unwrap_or("root");
    lock.pointer(&format!("/nodes/{root}/inputs/{input}"))
        .is_some()
}

fn find_test_scripts(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut scripts: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.as_encoded_bytes();
            name.starts_with(b"T") && name.ends_with(b".sh")
        })
        .filter(|entry| {
            std::fs::metadata(entry.path())
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .map(|entry| entry.path())
        .collect();
    scripts.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    scripts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flake_inputs_are_read_from_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!flake_has_input(dir.path(), "nixfleet"));
        std::fs::write(
            dir.path().join("flake.lock"),
            r#"{"nodes":{"root":{"inputs":{"nixfleet":"nixfleet","nixpkgs":"nixpkgs"}}},"root":"root","version":7}"#,
        )
        .unwrap();
        assert!(flake_has_input(dir.path(), "nixfleet"));
        assert!(!flake_has_input(dir.path(), "other"));
        std::fs::write(dir.path().join("flake.lock"), "{broken").unwrap();
        assert!(!flake_has_input(dir.path(), "nixfleet"));
    }

    #[test]
    fn test_scripts_are_executable_t_star_sh_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        make("T10-late.sh", 0o755);
        make("T02-early.sh", 0o755);
        make("T03-not-executable.sh", 0o644);
        make("X01-other.sh", 0o755);
        make("T04.txt", 0o755);
        std::fs::create_dir(dir.path().join("T05-dir.sh")).unwrap();
        let names: Vec<_> = find_test_scripts(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["T02-early.sh", "T10-late.sh"]);
        assert!(find_test_scripts(&dir.path().join("missing")).is_empty());
    }
}
