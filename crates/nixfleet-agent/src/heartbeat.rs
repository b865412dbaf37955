//! What the agent tells the dashboard about its host: the `register`
//! payload, and the `heartbeat` payload built afresh for every beat.
//!
//! Everything here is read from small files, never by spawning a process:
//! a heartbeat every second must cost next to nothing.

use crate::config::Config;
use crate::file_facts::FileFacts;
use crate::host_facts::{CURRENT_SYSTEM, TEST_CURRENT_SYSTEM_ENV, sha256_hex_of_file};
use crate::metrics::Sampler;
use crate::protocol::{Heartbeat, Register, UpdateStatus};
use crate::reboot;
use std::path::{Path, PathBuf};
use tokio::sync::watch;

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
    /// The commit to report: the setting `source_commit` (the flake's
    /// module writes the flake's revision there), else the one this binary
    /// was built from (see build.rs).
    pub source_commit: Option<String>,
    /// What `register.agent_version` says: the setting
    /// `report_agent_version`, else [`AGENT_VERSION`].
    pub reported_version: String,
}

/// This agent's version (the crate's).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit the flake (`self.rev`/`self.dirtyRev`) or `git` at build time
/// said this binary was built from; `None` when neither knew.
pub fn source_commit() -> Option<String> {
    option_env!("NIXFLEET_SOURCE_COMMIT")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
}

impl AgentIdentity {
    /// `configured_commit` is the setting `source_commit`, which wins over
    /// the commit recorded at build time: the Nix package is built without
    /// the revision, so that it stays one derivation per source.
    /// `reported_version` is the setting `report_agent_version`.
    pub fn detect(configured_commit: Option<String>, reported_version: Option<String>) -> Self {
        let exe = std::fs::read_link("/proc/self/exe").ok();
        AgentIdentity {
            host_type: HOST_TYPE.into(),
            store_path: exe.as_deref().and_then(store_path_of),
            binary_hash: exe.as_deref().and_then(sha256_hex_of_file),
            source_commit: configured_commit.or_else(source_commit),
            reported_version: reported_version.unwrap_or_else(|| AGENT_VERSION.to_owned()),
        }
    }
}

/// Builds `register` and `heartbeat` payloads. What they report from files
/// is re-read only when the files changed (see [`crate::file_cache`]), and
/// their metadata is looked at only when inotify saw something happen in
/// their directories (see [`crate::file_watch`]): an idle heartbeat costs
/// one `read` that finds no events.
pub struct Reporter {
    hostname: String,
    repo_url: Option<String>,
    interval_secs: u64,
    identity: AgentIdentity,
    sampler: Sampler,
    files: FileFacts,
    theme_color: Option<String>,
    location: Option<String>,
    device_type: Option<String>,
    update_status: Option<watch::Receiver<UpdateStatus>>,
    /// The same channel, for waking the writer when the compartments
    /// change (see [`Reporter::update_status_changed`]); a second receiver
    /// so that waking does not mark the change as already reported.
    update_status_wake: Option<watch::Receiver<UpdateStatus>>,
    /// The compartments as of the last heartbeat: heartbeats borrow them.
    update_status_now: Option<UpdateStatus>,
    /// Grows whenever `update_status_now` is replaced.
    update_status_revision: u64,
    /// The boot entries that differ from the booted system's, as last
    /// taken from `files` (and written into the system compartment).
    reboot_now: Vec<&'static str>,
    /// Grows whenever `reboot_now` changes; what `update_status_now` was
    /// last annotated with.
    reboot_revision: u64,
    update_status_reboot: u64,
    reboot_watch: Option<watch::Sender<Vec<&'static str>>>,
    /// What the last heartbeat was built from.
    last_built_from: Option<BuiltFrom>,
}

impl Reporter {
    pub fn new(config: &Config, identity: AgentIdentity) -> Self {
        // The test stand-in for /run/current-system brings its own files.
        let current = std::env::var_os(TEST_CURRENT_SYSTEM_ENV)
            .map_or_else(|| PathBuf::from(CURRENT_SYSTEM), PathBuf::from);
        Reporter {
            hostname: config.hostname.clone(),
            // Shown without credentials (redact.rs).
            repo_url: config.repo_url.as_deref().map(crate::redact::redact_url),
            interval_secs: config.interval.as_secs(),
            identity,
            sampler: Sampler::new(config.metrics, config.stasysmo_dir.clone()),
            files: FileFacts::new(config.repo_dir.clone(), current.join("nixos-version"))
                .with_reboot_need(reboot::booted_system_link(), current),
            theme_color: config.theme_color.clone(),
            location: config.location.clone(),
            device_type: config.device_type.clone(),
            update_status: None,
            update_status_wake: None,
            update_status_now: None,
            update_status_revision: 0,
            reboot_now: Vec::new(),
            reboot_revision: 0,
            update_status_reboot: 0,
            reboot_watch: None,
            last_built_from: None,
        }
    }

    /// The boot entries that need a reboot are published here whenever
    /// they change (for the observer).
    pub fn with_reboot_watch(mut self, watch: watch::Sender<Vec<&'static str>>) -> Self {
        self.reboot_watch = Some(watch);
        self
    }

    /// Takes in the reboot need as the files last said, and publishes it
    /// when it changed.
    fn take_reboot_need(&mut self) {
        if self.files.reboot_entries() == self.reboot_now.as_slice() {
            return;
        }
        self.reboot_now = self.files.reboot_entries().to_vec();
        self.reboot_revision += 1;
        if let Some(watch) = &self.reboot_watch {
            watch.send_replace(self.reboot_now.clone());
        }
    }

    /// Heartbeats carry the compartments published here.
    pub fn with_update_status(mut self, status: watch::Receiver<UpdateStatus>) -> Self {
        self.update_status_wake = Some(status.clone());
        self.update_status = Some(status);
        self
    }

    /// Resolves when the compartments changed since it last resolved, so a
    /// heartbeat carries the change at once: the lock's answer comes a few
    /// milliseconds after the first heartbeat, and waiting for the next
    /// beat left a v3 page's lock unknown for a whole interval. Compartments
    /// change a few times a day, never on the heartbeat path.
    pub async fn update_status_changed(&mut self) {
        let (Some(wake), Some(reported)) = (
            self.update_status_wake.as_mut(),
            self.update_status.as_ref(),
        ) else {
            return std::future::pending().await;
        };
        loop {
            if wake.changed().await.is_err() {
                // The core is gone (shutting down): nothing will change.
                return std::future::pending().await;
            }
            // A change a heartbeat already carried (one sent by the timer
            // meanwhile) needs no other.
            if reported.has_changed().unwrap_or(false) {
                return;
            }
        }
    }

    pub fn register(&mut self) -> Register {
        // A new connection: look at the files whatever the watch says.
        self.files.refresh(true);
        self.take_reboot_need();
        let nixpkgs_version = self.files.nixpkgs_version().to_owned();
        Register {
            hostname: self.hostname.clone(),
            host_type: self.identity.host_type.clone(),
            agent_version: self.identity.reported_version.clone(),
            os_version: os_version(&nixpkgs_version),
            nixpkgs_version,
            generation: self.files.generation().to_owned(),
            heartbeat_interval: self.interval_secs,
            repo_url: self.repo_url.clone(),
            repo_dir: Some(self.files.repo_dir().display().to_string()),
            store_path: self.identity.store_path.clone(),
            binary_hash: self.identity.binary_hash.clone(),
            theme_color: self.theme_color.clone(),
            location: self.location.clone(),
            device_type: self.device_type.clone(),
            source_commit: self.identity.source_commit.clone(),
            real_agent_version: AGENT_VERSION.to_owned(),
        }
    }

    /// The heartbeat, borrowing from the reporter's cached values and from
    /// `command`: building one allocates nothing. With it, whether it says
    /// exactly what the previous one said (then the previous frame can be
    /// sent again instead of serialising this one).
    pub fn heartbeat<'a>(&'a mut self, command: &'a CommandState) -> (Heartbeat<'a>, bool) {
        self.files.refresh_if_changed();
        self.take_reboot_need();
        // The compartments change a few times a day: copy them only then,
        // or when the reboot need their system message carries changed.
        if let Some(published) = self.update_status.as_mut()
            && (self.update_status_now.is_none()
                || published.has_changed().unwrap_or(false)
                || self.update_status_reboot != self.reboot_revision)
        {
            let mut status = published.borrow_and_update().clone();
            reboot::annotate(&mut status.system, &self.reboot_now);
            self.update_status_now = Some(status);
            self.update_status_revision += 1;
            self.update_status_reboot = self.reboot_revision;
        }
        let metrics = self.sampler.sample();
        let unchanged = self.last_built_from.as_ref().is_some_and(|last| {
            last.files == self.files.revision()
                && last.update_status == self.update_status_revision
                && last.metrics == metrics
                && last.command_name.as_deref() == command.name.as_deref()
                && last.command_pid == command.pid
        });
        if !unchanged {
            self.last_built_from = Some(BuiltFrom {
                files: self.files.revision(),
                update_status: self.update_status_revision,
                metrics,
                command_name: command.name.clone(),
                command_pid: command.pid,
            });
        }
        let heartbeat = Heartbeat {
            metrics,
            generation: self.files.generation(),
            nixpkgs_version: self.files.nixpkgs_version(),
            pending_command: command.name.as_deref(),
            command_pid: command.pid,
            update_status: self.update_status_now.as_ref(),
            source_commit: self.identity.source_commit.as_deref(),
            store_path: self.identity.store_path.as_deref(),
            binary_hash: self.identity.binary_hash.as_deref(),
            lock_hash: self.files.lock_hash(),
            needs_reboot: !self.reboot_now.is_empty(),
        };
        (heartbeat, unchanged)
    }
}

/// What a heartbeat was built from. The identity never changes, and the
/// values read from files change only when they are computed again.
#[derive(Debug)]
struct BuiltFrom {
    files: u64,
    update_status: u64,
    metrics: Option<crate::protocol::Metrics>,
    command_name: Option<String>,
    command_pid: Option<u32>,
}

/// `register.host_type` as upstream's contract and the v3 dashboard know
/// it: `"macos"` on Darwin, else `"nixos"` — the only two values they have
/// (a Linux host without `/etc/NIXOS` is still a Nix host to them); what
/// the system really is goes into `os_version`.
const HOST_TYPE: &str = if cfg!(target_os = "macos") {
    "macos"
} else {
    "nixos"
};

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

    fn backdate_tree(path: &Path) {
        if path.is_dir() {
            for entry in std::fs::read_dir(path).unwrap().flatten() {
                backdate_tree(&entry.path());
            }
        }
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::open(path)
            .unwrap()
            .set_modified(past)
            .unwrap();
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
    fn cached_generation_follows_commits_packing_and_checkouts() {
        let dir = tempfile::tempdir().unwrap();
        let repo = &repo_with_a_commit(dir.path());
        let short = |r: &Path| git(r, &["rev-parse", "--short=7", "HEAD"]);
        let mut facts = FileFacts::new(repo.to_owned(), repo.join("nixos-version"));
        let mut generation = || {
            facts.refresh_if_changed();
            facts.generation().to_owned()
        };
        // Each step but the packing moves HEAD; the packing moves the
        // branch's ref from its own file into packed-refs.
        let steps: [&[&str]; 5] = [
            &["commit", "-q", "--allow-empty", "-m", "two"],
            &["pack-refs", "--all", "--prune"],
            &["checkout", "-q", "--detach", "HEAD~1"],
            &["checkout", "-q", "main"],
            &["commit", "-q", "--allow-empty", "-m", "three"],
        ];
        for step in steps {
            backdate_tree(&repo.join(".git"));
            let before = short(repo);
            assert_eq!(generation(), before);
            assert_eq!(generation(), before);
            git(repo, step);
            assert_eq!(generation(), short(repo), "{step:?}");
        }
    }

    #[test]
    fn an_idle_heartbeat_looks_at_no_file_and_a_change_is_still_seen() {
        use crate::file_cache::METADATA_LOOKS;
        let looks = || METADATA_LOOKS.with(std::cell::Cell::get);
        let dir = tempfile::tempdir().unwrap();
        let repo = repo_with_a_commit(&dir.path().join("repo"));
        std::fs::write(repo.join("flake.lock"), "{}").unwrap();
        // As /run/current-system: a link replaced by a switch.
        for system in ["system-1", "system-2"] {
            std::fs::create_dir(dir.path().join(system)).unwrap();
            std::fs::write(dir.path().join(system).join("nixos-version"), system).unwrap();
        }
        let current = dir.path().join("current-system");
        std::os::unix::fs::symlink(dir.path().join("system-1"), &current).unwrap();
        backdate_tree(dir.path());
        // With the reboot check too (no booted system: a missing input).
        let mut facts = FileFacts::new(repo.clone(), current.join("nixos-version"))
            .with_reboot_need(dir.path().join("booted-system"), current.clone());
        facts.refresh_if_changed();
        facts.refresh_if_changed();
        assert_eq!(facts.nixpkgs_version(), "system-1");

        let before = looks();
        for _ in 0..3 {
            facts.refresh_if_changed();
        }
        assert_eq!(looks(), before, "idle beats look at no file's metadata");

        git(&repo, &["commit", "-q", "--allow-empty", "-m", "two"]);
        facts.refresh_if_changed();
        assert_eq!(
            facts.generation(),
            git(&repo, &["rev-parse", "--short=7", "HEAD"])
        );

        let next = dir.path().join("current-system.new");
        std::os::unix::fs::symlink(dir.path().join("system-2"), &next).unwrap();
        std::fs::rename(&next, &current).unwrap();
        facts.refresh_if_changed();
        assert_eq!(facts.nixpkgs_version(), "system-2", "the switch is seen");

        std::fs::write(repo.join("flake.lock"), "{\"nodes\":{}}").unwrap();
        let old_hash = facts.lock_hash().map(str::to_owned);
        facts.refresh_if_changed();
        assert_ne!(facts.lock_hash().map(str::to_owned), old_hash);
    }

    /// A reporter of metrics from StaSysMo files (written here) in
    /// `stasysmo`, for the repository `repo`; and the sender of its
    /// compartments.
    fn stasysmo_reporter(
        repo: &std::path::Path,
        stasysmo: &std::path::Path,
    ) -> (Reporter, watch::Sender<UpdateStatus>) {
        let env: std::collections::HashMap<&str, String> = [
            ("NIXFLEET_URL", "ws://127.0.0.1:9/ws".to_owned()),
            ("NIXFLEET_TOKEN", "test-token".to_owned()),
            ("NIXFLEET_REPO_DIR", repo.display().to_string()),
            ("NIXFLEET_HOSTNAME", "h".to_owned()),
            ("NIXFLEET_METRICS", "stasysmo".to_owned()),
            ("NIXFLEET_STASYSMO_DIR", stasysmo.display().to_string()),
        ]
        .into();
        for (gauge, value) in [("cpu", "5"), ("ram", "40"), ("swap", "0"), ("load", "0.5")] {
            std::fs::write(stasysmo.join(gauge), value).unwrap();
        }
        let config = crate::config::load_with(&crate::config::Cli::default(), |name| {
            env.get(name).cloned()
        })
        .unwrap();
        let identity = AgentIdentity {
            host_type: "nixos".into(),
            store_path: None,
            binary_hash: None,
            source_commit: None,
            reported_version: AGENT_VERSION.to_owned(),
        };
        let (status_tx, status_rx) = watch::channel(UpdateStatus::default());
        let reporter = Reporter::new(&config, identity).with_update_status(status_rx);
        (reporter, status_tx)
    }

    #[test]
    fn a_heartbeat_is_unchanged_until_what_it_says_changes() {
        // Fresh StaSysMo files (outside the tree the test backdates).
        let stasysmo = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let repo = repo_with_a_commit(&dir.path().join("repo"));
        backdate_tree(dir.path());
        let (mut reporter, status_tx) = stasysmo_reporter(&repo, stasysmo.path());
        let idle = CommandState::default();
        let unchanged =
            |reporter: &mut Reporter, command: &CommandState| reporter.heartbeat(command).1;
        assert!(!unchanged(&mut reporter, &idle), "the first one is new");
        assert!(unchanged(&mut reporter, &idle));
        assert!(unchanged(&mut reporter, &idle));

        let running = CommandState {
            name: Some("switch".into()),
            pid: Some(42),
            since: None,
        };
        assert!(!unchanged(&mut reporter, &running), "a command started");
        assert!(unchanged(&mut reporter, &running));
        let restarted = CommandState {
            pid: Some(43),
            ..running.clone()
        };
        assert!(!unchanged(&mut reporter, &restarted), "another pid");
        let renamed = CommandState {
            name: Some("boot".into()),
            ..restarted.clone()
        };
        assert!(!unchanged(&mut reporter, &renamed), "another command");
        assert!(!unchanged(&mut reporter, &idle), "it ended");

        git(&repo, &["commit", "-q", "--allow-empty", "-m", "two"]);
        // Settled (a file written within 2 s is read again on every beat).
        backdate_tree(dir.path());
        assert!(!unchanged(&mut reporter, &idle), "a new generation");
        assert!(unchanged(&mut reporter, &idle));

        let mut status = UpdateStatus::default();
        status.git.message = "behind origin".into();
        status_tx.send_replace(status);
        assert!(!unchanged(&mut reporter, &idle), "the compartments changed");
        assert!(unchanged(&mut reporter, &idle));

        std::fs::write(stasysmo.path().join("cpu"), "75").unwrap();
        assert!(!unchanged(&mut reporter, &idle), "new metrics");
        assert!(unchanged(&mut reporter, &idle));
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
    }

    #[test]
    fn lock_hash_follows_the_file_and_its_absence() {
        const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("flake.lock");
        let mut facts = FileFacts::new(dir.path().to_owned(), dir.path().join("nixos-version"));
        let mut lock_hash = || {
            facts.refresh_if_changed();
            facts.lock_hash().map(str::to_owned)
        };
        assert_eq!(lock_hash(), None);
        std::fs::write(&lock, "abc").unwrap();
        assert_eq!(lock_hash().as_deref(), Some(ABC));
        std::fs::write(&lock, "abcd").unwrap();
        assert_ne!(lock_hash().as_deref(), Some(ABC));
        std::fs::remove_file(&lock).unwrap();
        assert_eq!(lock_hash(), None);
    }
}
