//! `nixfleet_agent_flake_lock_age_seconds`: how old the newest locked input
//! of `repo_dir/flake.lock` is.
//!
//! The age is now − the newest `lastModified` among the root's direct
//! inputs. `nix flake update` locks each input at its upstream's latest
//! commit and records that commit's time as `lastModified`, so after an
//! update the newest input (nixpkgs on most hosts, which moves daily) is
//! hours old, and the age then grows until the next update: "how long since
//! the lock file last moved forward". The oldest input would not do: an
//! input its upstream no longer changes (flake-utils) would make every
//! lock look stale. Inputs that `follows` another (arrays in the root's
//! `inputs`) are that other input, already counted; inputs without
//! `lastModified` (some `path:` inputs) are skipped.
//!
//! The file is read only when it may have changed: an inotify watch on
//! `repo_dir` marks it due, and it is read at the next metrics write (so a
//! checkout that deletes and recreates it is read once, whole). Without a
//! watch (no inotify, or `repo_dir` not cloned yet) it is due after every
//! command instead, since only a command or a person changes it.

use crate::file_cache::{Derived, Reads};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

/// A larger file is not read (a big flake's lock is a few hundred KiB).
const MAX_LOCK_BYTES: u64 = 16 * 1024 * 1024;

/// Why there is no age to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockProblem {
    /// No `flake.lock` (not cloned yet, or not a flake with inputs).
    Missing,
    /// Unreadable, not JSON, or no direct input with `lastModified`.
    Bad(String),
}

/// The newest `lastModified` (Unix seconds) among the root's direct inputs
/// of a `flake.lock`.
pub fn newest_last_modified(text: &[u8]) -> Result<u64, String> {
    #[derive(Deserialize)]
    struct Lock {
        nodes: BTreeMap<String, Node>,
        #[serde(default = "root")]
        root: String,
    }
    #[derive(Deserialize)]
    struct Node {
        #[serde(default)]
        inputs: BTreeMap<String, serde_json::Value>,
        #[serde(default)]
        locked: Option<Locked>,
    }
    #[derive(Deserialize)]
    struct Locked {
        #[serde(rename = "lastModified")]
        last_modified: Option<u64>,
    }
    fn root() -> String {
        "root".to_owned()
    }
    // serde_json's messages name a line and column, never the content.
    let lock: Lock = serde_json::from_slice(text).map_err(|e| format!("not a flake.lock: {e}"))?;
    let root = lock
        .nodes
        .get(&lock.root)
        .ok_or_else(|| format!("no root node {:?}", lock.root))?;
    root.inputs
        .values()
        .filter_map(|target| lock.nodes.get(target.as_str()?))
        .filter_map(|node| node.locked.as_ref()?.last_modified)
        .max()
        .ok_or_else(|| "no direct input with a lastModified time".to_owned())
}

/// The lock file's newest input time, kept until the file changes.
pub struct FlakeLock {
    repo_dir: PathBuf,
    path: PathBuf,
    /// The inotify descriptor watching `repo_dir`, once `watch` ran.
    events: Option<AsyncFd<OwnedFd>>,
    /// Whether a watch on `repo_dir` is in place.
    watching: bool,
    /// The file may have changed since it was last looked at.
    due: bool,
    newest: Derived<Result<u64, LockProblem>>,
    /// The problem last logged, so that each is logged once.
    told: Option<LockProblem>,
}

impl FlakeLock {
    pub fn new(repo_dir: &Path) -> FlakeLock {
        FlakeLock {
            repo_dir: repo_dir.to_owned(),
            path: repo_dir.join("flake.lock"),
            events: None,
            watching: false,
            due: true,
            newest: Derived::default(),
            told: None,
        }
    }

    /// Starts the inotify watch (inside the runtime: the descriptor is
    /// registered with it).
    pub fn watch(&mut self) {
        use rustix::fs::inotify;
        let flags = inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK;
        let Ok(fd) = inotify::init(flags) else {
            return;
        };
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open, the
        // same descriptor, until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
        self.events = fd.ok();
        self.place_watch();
    }

    /// Watches `repo_dir` itself (not its subdirectories: `.git` churns),
    /// for what replaces, writes or removes a file in it, or the directory.
    /// Placing a watch that exists is a no-op that returns the same one.
    fn place_watch(&mut self) {
        use rustix::fs::inotify::{WatchFlags as W, add_watch};
        let Some(events) = &self.events else {
            return;
        };
        let flags = W::CLOSE_WRITE
            | W::CREATE
            | W::DELETE
            | W::MOVED_FROM
            | W::MOVED_TO
            | W::DELETE_SELF
            | W::MOVE_SELF
            | W::ONLYDIR;
        self.watching = add_watch(events.get_ref(), &self.repo_dir, flags).is_ok();
    }

    /// Waits for something to happen in `repo_dir` and marks the file due.
    /// Never returns without a watch.
    pub async fn changed(&mut self) {
        let Some(events) = &self.events else {
            return std::future::pending().await;
        };
        let Ok(mut guard) = events.readable().await else {
            return std::future::pending().await;
        };
        let mut buf = [0u8; 1024];
        while let Ok(n) = rustix::io::read(events.get_ref(), &mut buf) {
            // A removed or moved `repo_dir` ends its watch (IN_IGNORED):
            // placed again when the file is next read.
            if n == 0 {
                break;
            }
        }
        guard.clear_ready();
        self.due = true;
    }

    /// A command ended: without a watch, it is the only sign of a change.
    pub fn command_ended(&mut self) {
        if !self.watching {
            self.due = true;
        }
    }

    /// The newest input's time, read again only when the file may have
    /// changed; `None` (logged once per problem) when there is none.
    pub fn newest(&mut self) -> Option<u64> {
        let due = std::mem::take(&mut self.due);
        if due {
            self.place_watch();
        }
        let path = &self.path;
        self.newest.refresh(due, |reads| read_newest(reads, path));
        let value = self.newest.value().cloned()?;
        match value {
            Ok(newest) => {
                self.told = None;
                Some(newest)
            }
            Err(problem) => {
                self.tell(problem);
                None
            }
        }
    }

    fn tell(&mut self, problem: LockProblem) {
        if self.told.as_ref() == Some(&problem) {
            return;
        }
        let path = self.path.display();
        match &problem {
            LockProblem::Missing => info!(
                "no {path}: the metric nixfleet_agent_flake_lock_age_seconds is left out until there is one"
            ),
            LockProblem::Bad(why) => warn!(
                "cannot read the inputs' times from {path}: {why}; the metric nixfleet_agent_flake_lock_age_seconds is left out until it changes"
            ),
        }
        self.told = Some(problem);
    }
}

fn read_newest(reads: &mut Reads<'_>, path: &Path) -> Result<u64, LockProblem> {
    let Some(file) = reads.open(path) else {
        return Err(match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LockProblem::Missing,
            Err(e) => LockProblem::Bad(e.to_string()),
            Ok(_) => LockProblem::Bad("cannot open it".to_owned()),
        });
    };
    let mut text = Vec::new();
    file.take(MAX_LOCK_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| LockProblem::Bad(e.to_string()))?;
    if text.len() as u64 > MAX_LOCK_BYTES {
        return Err(LockProblem::Bad(format!(
            "larger than {MAX_LOCK_BYTES} bytes"
        )));
    }
    newest_last_modified(&text).map_err(LockProblem::Bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lock as `nix flake update` writes it (version 7): nixpkgs and
    /// home-manager direct, home-manager's nixpkgs following the root's,
    /// flake-utils not updated upstream for years, a path input without
    /// a time.
    const LOCK: &str = r#"{
  "nodes": {
    "flake-utils": {
      "locked": { "lastModified": 1731533236, "narHash": "sha256-x", "owner": "numtide", "repo": "flake-utils", "rev": "11707dc", "type": "github" },
      "original": { "owner": "numtide", "repo": "flake-utils", "type": "github" }
    },
    "home-manager": {
      "inputs": { "nixpkgs": [ "nixpkgs" ] },
      "locked": { "lastModified": 1764998000, "narHash": "sha256-y", "owner": "nix-community", "repo": "home-manager", "rev": "aa", "type": "github" },
      "original": { "owner": "nix-community", "repo": "home-manager", "type": "github" }
    },
    "local": {
      "locked": { "path": "./local", "type": "path" },
      "original": { "path": "./local", "type": "path" }
    },
    "nixpkgs": {
      "locked": { "lastModified": 1765000000, "narHash": "sha256-z", "owner": "NixOS", "repo": "nixpkgs", "rev": "bb", "type": "github" },
      "original": { "owner": "NixOS", "ref": "nixos-unstable", "repo": "nixpkgs", "type": "github" }
    },
    "old-nixpkgs": {
      "locked": { "lastModified": 1799999999, "type": "github" },
      "original": { "type": "github" }
    },
    "root": {
      "inputs": { "flake-utils": "flake-utils", "home-manager": "home-manager", "local": "local", "nixpkgs": "nixpkgs" }
    }
  },
  "root": "root",
  "version": 7
}"#;

    #[test]
    fn the_newest_direct_input_counts() {
        // old-nixpkgs is newer but no direct input of the root.
        assert_eq!(newest_last_modified(LOCK.as_bytes()), Ok(1765000000));
    }

    #[test]
    fn follows_and_inputs_without_times_are_skipped() {
        let lock = r#"{"nodes": {
            "a": {"locked": {"lastModified": 5}},
            "b": {"locked": {"type": "path"}},
            "root": {"inputs": {"a": "a", "b": "b", "c": ["a"]}}
        }, "root": "root", "version": 7}"#;
        assert_eq!(newest_last_modified(lock.as_bytes()), Ok(5));
        // The root's name comes from the file (old locks had no field).
        let renamed = r#"{"nodes": {"a": {"locked": {"lastModified": 9}},
            "top": {"inputs": {"a": "a"}}}, "root": "top"}"#;
        assert_eq!(newest_last_modified(renamed.as_bytes()), Ok(9));
        let default_root = r#"{"nodes": {"a": {"locked": {"lastModified": 3}},
            "root": {"inputs": {"a": "a"}}}}"#;
        assert_eq!(newest_last_modified(default_root.as_bytes()), Ok(3));
    }

    #[test]
    fn bad_locks_say_why_without_quoting_them() {
        for (text, why) in [
            ("", "not a flake.lock"),
            ("{\"nodes\": 3}", "not a flake.lock"),
            ("not json s3cr3t", "not a flake.lock"),
            (r#"{"nodes": {}, "root": "root"}"#, "no root node"),
            (
                r#"{"nodes": {"root": {"inputs": {}}}, "root": "root"}"#,
                "no direct input",
            ),
            (
                r#"{"nodes": {"root": {"inputs": {"x": "gone"}}}}"#,
                "no direct input",
            ),
            (
                r#"{"nodes": {"x": {"locked": {"lastModified": -4}}, "root": {"inputs": {"x": "x"}}}}"#,
                "not a flake.lock",
            ),
        ] {
            let error = newest_last_modified(text.as_bytes()).unwrap_err();
            assert!(error.starts_with(why), "{text}: {error}");
            assert!(!error.contains("s3cr3t"), "{error}");
        }
    }

    #[test]
    fn the_file_is_read_again_only_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let mut lock = FlakeLock::new(dir.path());
        assert_eq!(lock.newest(), None);
        assert_eq!(lock.told, Some(LockProblem::Missing));
        std::fs::write(dir.path().join("flake.lock"), LOCK).unwrap();
        // Not due: no watch told of the change, no command ended.
        assert_eq!(lock.newest(), None);
        lock.command_ended();
        assert_eq!(lock.newest(), Some(1765000000));
        assert_eq!(lock.told, None);
        std::fs::write(dir.path().join("flake.lock"), "{").unwrap();
        lock.command_ended();
        assert_eq!(lock.newest(), None);
        assert!(matches!(lock.told, Some(LockProblem::Bad(_))));
    }
}
