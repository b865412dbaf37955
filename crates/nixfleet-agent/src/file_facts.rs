//! What heartbeats report from small files: the repository's commit, the
//! NixOS version, the lock file's hash, and whether the host needs a
//! reboot. Each value is computed again only when one of its files changed
//! (`file_cache`), and the files are looked at only when the inotify watch
//! on their directories (`file_watch`) saw something happen.

use crate::file_cache::Derived;
use crate::file_watch::ChangeWatch;
use crate::host_facts::{generation_in, lock_hash_in, read_trimmed};
use crate::reboot::RebootNeed;
use std::path::{Path, PathBuf};

/// What the agent reports from small files: the repository's commit, the
/// NixOS version, the lock file's hash, the reboot need. Each is read again
/// only when one of its files changed, and the files' metadata is looked
/// at only when something happened in their directories.
pub struct FileFacts {
    repo_dir: PathBuf,
    nixos_version_file: PathBuf,
    generation: Derived<String>,
    nixpkgs_version: Derived<String>,
    /// sha256 of `flake.lock`.
    lock_hash: Derived<Option<String>>,
    /// The booted and current systems' boot entries, when followed.
    reboot: Option<RebootNeed>,
    /// Whether any file behind the values may have changed.
    inputs_watch: ChangeWatch,
    /// The values' computations when their inputs were last watched.
    watched_computations: u64,
}

impl FileFacts {
    pub fn new(repo_dir: PathBuf, nixos_version_file: PathBuf) -> Self {
        FileFacts {
            repo_dir,
            nixos_version_file,
            generation: Derived::default(),
            nixpkgs_version: Derived::default(),
            lock_hash: Derived::default(),
            reboot: None,
            inputs_watch: ChangeWatch::new(),
            watched_computations: 0,
        }
    }

    /// Also follows whether the system links `booted` and `current` differ
    /// in what only a boot loads.
    pub fn with_reboot_need(mut self, booted: PathBuf, current: PathBuf) -> Self {
        self.reboot = Some(RebootNeed::new(booted, current));
        self
    }

    pub fn repo_dir(&self) -> &Path {
        &self.repo_dir
    }

    /// The boot entries in which the booted and current systems differ
    /// (empty: no reboot needed, or not followed).
    pub fn reboot_entries(&self) -> &[&'static str] {
        self.reboot.as_ref().map_or(&[], RebootNeed::entries)
    }

    pub fn generation(&self) -> &str {
        self.generation.value().map_or("", String::as_str)
    }

    pub fn nixpkgs_version(&self) -> &str {
        self.nixpkgs_version.value().map_or("", String::as_str)
    }

    pub fn lock_hash(&self) -> Option<&str> {
        self.lock_hash.value().and_then(Option::as_deref)
    }

    /// Grows whenever a value is computed again: equal revisions, equal
    /// values.
    pub fn revision(&self) -> u64 {
        self.watched_computations
    }

    /// Up to date at the cost of one `read` when nothing happened.
    pub fn refresh_if_changed(&mut self) {
        let maybe_changed = self.inputs_watch.maybe_changed();
        self.refresh(maybe_changed);
    }

    /// Brings the values up to date (looking at their files only if
    /// `maybe_changed`), and watches the files a value was just read from.
    pub fn refresh(&mut self, maybe_changed: bool) {
        let repo_dir = &self.repo_dir;
        self.generation
            .refresh(maybe_changed, |reads| generation_in(repo_dir, reads));
        self.nixpkgs_version.refresh(maybe_changed, |reads| {
            read_trimmed(reads, &self.nixos_version_file).unwrap_or_default()
        });
        self.lock_hash
            .refresh(maybe_changed, |reads| lock_hash_in(repo_dir, reads));
        if let Some(reboot) = &mut self.reboot {
            reboot.refresh(maybe_changed);
        }
        let reboot = self.reboot.as_ref().map(RebootNeed::derived);
        let computations = self.generation.computations()
            + self.nixpkgs_version.computations()
            + self.lock_hash.computations()
            + reboot.map_or(0, Derived::computations);
        if computations != self.watched_computations {
            self.watched_computations = computations;
            self.inputs_watch.watch(
                self.generation
                    .inputs()
                    .chain(self.nixpkgs_version.inputs())
                    .chain(self.lock_hash.inputs())
                    .chain(reboot.into_iter().flat_map(Derived::inputs)),
            );
        }
    }
}
