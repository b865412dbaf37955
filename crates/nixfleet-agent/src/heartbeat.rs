//! What the agent tells the dashboard about its host: the `register`
//! payload, and the `heartbeat` payload built afresh for every beat.
//!
//! Everything here is read from small files, never by spawning a process:
//! a heartbeat every second must cost next to nothing.

use crate::config::Config;
use crate::metrics::Sampler;
use crate::protocol::{Heartbeat, Register};
use std::path::{Path, PathBuf};

const NIXOS_VERSION_FILE: &str = "/run/current-system/nixos-version";

/// What a heartbeat says about the running command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandState {
    pub name: Option<String>,
    pub pid: Option<u32>,
    /// When it started (for systemd's status line).
    pub since: Option<std::time::SystemTime>,
}

/// Facts about the running agent that do not change while it runs.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub host_type: String,
    pub store_path: Option<String>,
    pub binary_hash: Option<String>,
}

impl AgentIdentity {
    pub fn detect() -> Self {
        let exe = std::fs::read_link("/proc/self/exe").ok();
        AgentIdentity {
            host_type: host_type(Path::new("/etc/NIXOS")).into(),
            store_path: exe.as_deref().and_then(store_path_of),
            binary_hash: exe.as_deref().and_then(sha256_hex_of_file),
        }
    }
}

/// Builds `register` and `heartbeat` payloads.
pub struct Reporter {
    hostname: String,
    repo_dir: PathBuf,
    repo_url: Option<String>,
    interval_secs: u64,
    identity: AgentIdentity,
    nixos_version_file: PathBuf,
    sampler: Sampler,
}

impl Reporter {
    pub fn new(config: &Config, identity: AgentIdentity) -> Self {
        Reporter {
            hostname: config.hostname.clone(),
            repo_dir: config.repo_dir.clone(),
            // Shown without credentials (redact.rs).
            repo_url: config.repo_url.as_deref().map(crate::redact::redact_url),
            interval_secs: config.interval.as_secs(),
            identity,
            nixos_version_file: NIXOS_VERSION_FILE.into(),
            sampler: Sampler::new(config.metrics, config.stasysmo_dir.clone()),
        }
    }

    pub fn register(&self) -> Register {
        let nixpkgs_version = self.nixpkgs_version();
        Register {
            hostname: self.hostname.clone(),
            host_type: self.identity.host_type.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            os_version: os_version(&nixpkgs_version),
            nixpkgs_version,
            generation: generation(&self.repo_dir),
            heartbeat_interval: self.interval_secs,
            repo_url: self.repo_url.clone(),
            repo_dir: Some(self.repo_dir.display().to_string()),
            store_path: self.identity.store_path.clone(),
            binary_hash: self.identity.binary_hash.clone(),
            theme_color: None,
            location: None,
            device_type: None,
            source_commit: None,
        }
    }

    pub fn heartbeat(&mut self, command: &CommandState) -> Heartbeat {
        Heartbeat {
            generation: generation(&self.repo_dir),
            nixpkgs_version: self.nixpkgs_version(),
            pending_command: command.name.clone(),
            command_pid: command.pid,
            metrics: self.sampler.sample(),
            update_status: None,
            source_commit: None,
            store_path: None,
            binary_hash: None,
            lock_hash: None,
        }
    }

    fn nixpkgs_version(&self) -> String {
        read_trimmed(&self.nixos_version_file).unwrap_or_default()
    }
}

fn host_type(nixos_marker: &Path) -> &'static str {
    if nixos_marker.exists() {
        "nixos"
    } else if cfg!(target_os = "macos") {
        "macos"
    } else {
        "linux"
    }
}

/// `"25.11"` from `"25.11.20251120.abc1234"`; off NixOS, os-release's
/// `VERSION_ID`.
fn os_version(nixpkgs_version: &str) -> String {
    let mut parts = nixpkgs_version.split('.');
    if let (Some(major), Some(minor)) = (parts.next(), parts.next())
        && !major.is_empty()
        && !minor.is_empty()
    {
        return format!("{major}.{minor}");
    }
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                line.strip_prefix("VERSION_ID=")
                    .map(|v| v.trim_matches('"').to_owned())
            })
        })
        .unwrap_or_default()
}

/// `/nix/store/<hash>-<name>` when the binary runs from the Nix store.
fn store_path_of(exe: &Path) -> Option<String> {
    let rest = exe.to_str()?.strip_prefix("/nix/store/")?;
    let entry = rest.split('/').next().filter(|e| !e.is_empty())?;
    Some(format!("/nix/store/{entry}"))
}

fn sha256_hex_of_file(path: &Path) -> Option<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut hasher = Sha256::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Some(
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Length of the short commit id the dashboard shows.
const SHORT_COMMIT_LEN: usize = 7;

/// The short commit of the repository's HEAD, or `""` when there is no
/// repository (yet). Reads `.git` directly: HEAD, then the loose ref, then
/// `packed-refs`; follows `gitdir:` files (worktrees, submodules) and
/// `commondir`.
pub fn generation(repo_dir: &Path) -> String {
    head_commit(repo_dir)
        .map(|id| id[..SHORT_COMMIT_LEN].to_owned())
        .unwrap_or_default()
}

fn head_commit(repo_dir: &Path) -> Option<String> {
    let git_dir = git_dir(repo_dir)?;
    let common_dir = read_trimmed(&git_dir.join("commondir"))
        .map(|c| git_dir.join(c))
        .unwrap_or_else(|| git_dir.clone());
    let head = read_trimmed(&git_dir.join("HEAD"))?;
    let Some(reference) = head.strip_prefix("ref:").map(str::trim) else {
        return valid_commit(&head);
    };
    if !reference.starts_with("refs/") || reference.split('/').any(|c| c == "..") {
        return None;
    }
    for dir in [&git_dir, &common_dir] {
        if let Some(id) = read_trimmed(&dir.join(reference)) {
            return valid_commit(&id);
        }
    }
    let packed = std::fs::read_to_string(common_dir.join("packed-refs")).ok()?;
    packed.lines().find_map(|line| {
        let (id, name) = line.split_once(' ')?;
        (name == reference).then(|| valid_commit(id)).flatten()
    })
}

fn git_dir(repo_dir: &Path) -> Option<PathBuf> {
    let dot_git = repo_dir.join(".git");
    let meta = std::fs::metadata(&dot_git).ok()?;
    if meta.is_dir() {
        return Some(dot_git);
    }
    let text = read_trimmed(&dot_git)?;
    let target = text.strip_prefix("gitdir:")?.trim();
    Some(repo_dir.join(target))
}

fn valid_commit(id: &str) -> Option<String> {
    let id = id.trim();
    (id.len() >= 40 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    #[test]
    fn generation_matches_git_for_loose_packed_and_detached_heads() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        assert_eq!(generation(repo), "");
        git(repo, &["init", "-q", "-b", "main"]);
        assert_eq!(generation(repo), "", "no commit yet");
        git(repo, &["commit", "-q", "--allow-empty", "-m", "one"]);
        let short = |r: &Path| git(r, &["rev-parse", "--short=7", "HEAD"]);
        assert_eq!(generation(repo), short(repo));
        git(repo, &["commit", "-q", "--allow-empty", "-m", "two"]);
        git(repo, &["pack-refs", "--all", "--prune"]);
        assert_eq!(generation(repo), short(repo));
        git(repo, &["checkout", "-q", "--detach", "HEAD~1"]);
        assert_eq!(generation(repo), short(repo));
    }

    #[test]
    fn generation_follows_worktree_gitdir_files() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("main");
        std::fs::create_dir(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        git(&repo, &["commit", "-q", "--allow-empty", "-m", "one"]);
        let wt = dir.path().join("wt");
        git(
            &repo,
            &["worktree", "add", "-q", "-b", "other", wt.to_str().unwrap()],
        );
        git(&wt, &["commit", "-q", "--allow-empty", "-m", "two"]);
        assert_eq!(
            generation(&wt),
            git(&wt, &["rev-parse", "--short=7", "HEAD"])
        );
    }

    #[test]
    fn hostile_head_contents_yield_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let git_dir = dir.path().join(".git");
        std::fs::create_dir(&git_dir).unwrap();
        std::fs::write(git_dir.join("HEAD"), "ref: ../../../etc/passwd").unwrap();
        assert_eq!(generation(dir.path()), "");
        std::fs::write(git_dir.join("HEAD"), "not-a-commit").unwrap();
        assert_eq!(generation(dir.path()), "");
    }

    #[test]
    fn store_path_and_host_facts() {
        assert_eq!(
            store_path_of(Path::new(
                "/nix/store/abc-nixfleet-agent-0.1.0/bin/nixfleet-agent"
            )),
            Some("/nix/store/abc-nixfleet-agent-0.1.0".into())
        );
        assert_eq!(store_path_of(Path::new("/usr/bin/nixfleet-agent")), None);
        assert_eq!(os_version("25.11.20251120.abc1234"), "25.11");
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(host_type(&dir.path().join("NIXOS")), "linux");
        std::fs::write(dir.path().join("NIXOS"), "").unwrap();
        assert_eq!(host_type(&dir.path().join("NIXOS")), "nixos");
    }

    #[test]
    fn binary_hash_is_sha256_hex() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "abc").unwrap();
        assert_eq!(
            sha256_hex_of_file(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
