//! Facts about the host that both the heartbeat and the commands report:
//! the repository's HEAD (the "generation"), where a ref points, the lock
//! file's hash, the running NixOS system, the boot's id.
//!
//! Everything here is read from small files, never by spawning a process:
//! the heartbeat calls it every second. The git facts read `.git` directly
//! (HEAD, the loose ref, then `packed-refs`), through [`Reads`], so that a
//! cached value is recomputed when any file it looked at changes.

use crate::file_cache::{Derived, Reads};
use std::path::{Path, PathBuf};

/// The symlink to the running NixOS system.
pub const CURRENT_SYSTEM: &str = "/run/current-system";
/// Test-only: a stand-in for `/run/current-system`.
pub const TEST_CURRENT_SYSTEM_ENV: &str = "NIXFLEET_TEST_CURRENT_SYSTEM";

/// The running system's store path, when there is one.
pub fn current_system() -> Option<String> {
    let link = std::env::var_os(TEST_CURRENT_SYSTEM_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(CURRENT_SYSTEM));
    let target = std::fs::canonicalize(link).ok()?;
    target.to_str().map(str::to_owned)
}

/// The kernel's id of this boot. A process's start time counts from boot,
/// and a rollback's countdown belongs to one boot: both compare it.
pub const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";
/// Test-only: a stand-in for [`BOOT_ID_FILE`].
pub const TEST_BOOT_ID_ENV: &str = "NIXFLEET_TEST_BOOT_ID_FILE";

/// This boot's id, when the kernel (or the test's stand-in) tells it. The
/// kernel's is read once per process (it cannot change while the process
/// lives); a stand-in is read at every call, so a test can reboot the fake
/// host under a running agent.
pub fn boot_id() -> Option<String> {
    if let Some(stand_in) = std::env::var_os(TEST_BOOT_ID_ENV).filter(|v| !v.is_empty()) {
        return read_boot_id(Path::new(&stand_in));
    }
    static BOOT_ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| read_boot_id(Path::new(BOOT_ID_FILE)))
        .clone()
}

fn read_boot_id(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let id = text.trim();
    (!id.is_empty() && id.len() <= 64).then(|| id.to_owned())
}

/// sha256 hex of the repository's `flake.lock` (hashed again only when the
/// file changed).
pub(crate) fn lock_hash_in(repo_dir: &Path, reads: &mut Reads<'_>) -> Option<String> {
    let mut file = reads.open(&repo_dir.join("flake.lock"))?;
    sha256_hex_of_reader(&mut file)
}

pub fn sha256_hex_of_file(path: &Path) -> Option<String> {
    sha256_hex_of_reader(&mut std::fs::File::open(path).ok()?)
}

/// ring's SHA-256 (already linked for TLS): assembly on x86_64 and
/// aarch64, so hashing the agent's own binary at start stays cheap whatever
/// the optimisation level the binary was built with.
pub(crate) fn sha256_hex_of_reader(file: &mut impl std::io::Read) -> Option<String> {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        context.update(&buf[..n]);
    }
    Some(
        context
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

pub(crate) fn read_trimmed(reads: &mut Reads<'_>, path: &Path) -> Option<String> {
    reads.read_to_string(path).map(|s| s.trim().to_owned())
}

/// Length of the short commit id the dashboard shows.
const SHORT_COMMIT_LEN: usize = 7;

/// The short commit of the repository's HEAD, or `""` when there is no
/// repository (yet). Reads `.git` directly: HEAD, then the loose ref, then
/// `packed-refs`; follows `gitdir:` files (worktrees, submodules) and
/// `commondir`.
pub fn generation(repo_dir: &Path) -> String {
    Derived::default()
        .get(|reads| generation_in(repo_dir, reads))
        .clone()
}

pub(crate) fn generation_in(repo_dir: &Path, reads: &mut Reads<'_>) -> String {
    short_commit(head_commit_in(repo_dir, reads))
}

fn short_commit(id: Option<String>) -> String {
    id.map(|id| id[..SHORT_COMMIT_LEN].to_owned())
        .unwrap_or_default()
}

/// The full commit id of the repository's HEAD, read afresh (for callers
/// outside the heartbeat path, which keeps its own cache).
pub fn head_commit(repo_dir: &Path) -> Option<String> {
    Derived::default()
        .get(|reads| head_commit_in(repo_dir, reads))
        .clone()
}

/// The commit a full ref name (`refs/remotes/origin/main`) points to.
pub fn resolve_ref(repo_dir: &Path, reference: &str) -> Option<String> {
    Derived::default()
        .get(|reads| resolve_in(&git_dir(repo_dir, reads)?, reference, reads))
        .clone()
}

/// Every file looked at goes through `reads`, so that a cached generation
/// is recomputed when any of them changes (a commit, a checkout, `git gc`
/// packing the refs).
fn head_commit_in(repo_dir: &Path, reads: &mut Reads<'_>) -> Option<String> {
    let git_dir = git_dir(repo_dir, reads)?;
    let head = read_trimmed(reads, &git_dir.join("HEAD"))?;
    let Some(reference) = head.strip_prefix("ref:").map(str::trim) else {
        return valid_commit(&head);
    };
    resolve_in(&git_dir, reference, reads)
}

fn resolve_in(git_dir: &Path, reference: &str, reads: &mut Reads<'_>) -> Option<String> {
    let common_dir = read_trimmed(reads, &git_dir.join("commondir"))
        .map(|c| git_dir.join(c))
        .unwrap_or_else(|| git_dir.to_owned());
    if !reference.starts_with("refs/") || reference.split('/').any(|c| c == "..") {
        return None;
    }
    for dir in [git_dir, common_dir.as_path()] {
        if let Some(id) = read_trimmed(reads, &dir.join(reference)) {
            return valid_commit(&id);
        }
    }
    let packed = reads.read_to_string(&common_dir.join("packed-refs"))?;
    packed.lines().find_map(|line| {
        let (id, name) = line.split_once(' ')?;
        (name == reference).then(|| valid_commit(id)).flatten()
    })
}

fn git_dir(repo_dir: &Path, reads: &mut Reads<'_>) -> Option<PathBuf> {
    let dot_git = repo_dir.join(".git");
    let meta = reads.metadata(&dot_git)?;
    if meta.is_dir() {
        return Some(dot_git);
    }
    let text = read_trimmed(reads, &dot_git)?;
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

    #[test]
    fn the_boot_id_is_the_files_trimmed_text_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("boot_id");
        assert_eq!(read_boot_id(&file), None);
        std::fs::write(&file, "6f1c-aa\n").unwrap();
        assert_eq!(read_boot_id(&file).as_deref(), Some("6f1c-aa"));
        std::fs::write(&file, " \n").unwrap();
        assert_eq!(read_boot_id(&file), None);
        std::fs::write(&file, "x".repeat(65)).unwrap();
        assert_eq!(read_boot_id(&file), None);
        // The kernel's, when there is a /proc to read.
        if Path::new(BOOT_ID_FILE).exists() && std::env::var_os(TEST_BOOT_ID_ENV).is_none() {
            assert_eq!(boot_id(), read_boot_id(Path::new(BOOT_ID_FILE)));
        }
    }

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

    /// `dir` (created if need be) as a git repository with one commit on
    /// `main`.
    fn repo_with_a_commit(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        git(dir, &["init", "-q", "-b", "main"]);
        git(dir, &["commit", "-q", "--allow-empty", "-m", "one"]);
        dir.to_owned()
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

    /// Backdates `path` and everything under it, so that a cached value
    /// read from there is settled and only a change in the metadata of its

    #[test]
    fn generation_follows_worktree_gitdir_files() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo_with_a_commit(&dir.path().join("main"));
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
    fn remote_refs_resolve_loose_and_packed() {
        let dir = tempfile::tempdir().unwrap();
        let repo = &repo_with_a_commit(dir.path());
        let head = git(repo, &["rev-parse", "HEAD"]);
        git(repo, &["update-ref", "refs/remotes/origin/main", &head]);
        assert_eq!(head_commit(repo).as_deref(), Some(head.as_str()));
        assert_eq!(
            resolve_ref(repo, "refs/remotes/origin/main").as_deref(),
            Some(head.as_str())
        );
        git(repo, &["pack-refs", "--all", "--prune"]);
        assert_eq!(
            resolve_ref(repo, "refs/remotes/origin/main").as_deref(),
            Some(head.as_str())
        );
        assert_eq!(resolve_ref(repo, "refs/remotes/origin/other"), None);
        assert_eq!(resolve_ref(repo, "refs/../../x"), None);
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
