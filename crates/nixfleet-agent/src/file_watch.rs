//! Tells the heartbeat whether any file its cached values were read from
//! may have changed, for one `read` of an inotify descriptor instead of a
//! `statx` per file.
//!
//! The answer errs on the side of "maybe": any event in a watched directory
//! (a `git status` rewriting `.git/index`, a file created in `/run`) makes
//! the caller check the files' metadata as it would without the watch
//! (see [`crate::file_cache`]), and that check decides. Only "nothing
//! happened" is trusted, and it is only given while every directory that
//! could hold a change is watched: when inotify is unavailable or a watch
//! cannot be placed, the answer is always "maybe".
//!
//! Which directories: for a file `p`, the directory it is in; when part of
//! its path does not exist yet, the deepest directory that does (the
//! missing part appears there first); and for every symlink on the path,
//! the directory holding the link, since replacing a link (a NixOS switch
//! replaces `/run/current-system`) changes nothing in the directory it
//! pointed to. Not covered: a symlink inside a link's target, and changes
//! the local kernel does not see (a network file system written from
//! another host).

use rustix::fs::inotify;
use rustix::io::Errno;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// What happens in a watched directory that can change a file in it.
fn interesting() -> inotify::WatchFlags {
    use inotify::WatchFlags as W;
    W::MODIFY
        | W::ATTRIB
        | W::CLOSE_WRITE
        | W::CREATE
        | W::DELETE
        | W::MOVED_FROM
        | W::MOVED_TO
        | W::DELETE_SELF
        | W::MOVE_SELF
        | W::ONLYDIR
}

pub struct ChangeWatch {
    /// `None` when inotify is unavailable: every look says "maybe".
    inotify: Option<OwnedFd>,
    /// The watches placed by the last [`ChangeWatch::watch`].
    watches: Vec<i32>,
    /// A look is answered "maybe" whatever the queue holds: nothing is
    /// watched yet, a watch could not be placed, or watches were just
    /// placed (a change between reading a file and watching its directory
    /// left no event).
    check_due: bool,
    /// The last [`ChangeWatch::watch`] could not place every watch.
    incomplete: bool,
}

impl ChangeWatch {
    pub fn new() -> Self {
        ChangeWatch {
            inotify: inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
                .ok(),
            ..ChangeWatch::disabled()
        }
    }

    /// A watch that never rules anything out, as when inotify is missing.
    pub fn disabled() -> Self {
        ChangeWatch {
            inotify: None,
            watches: Vec::new(),
            check_due: true,
            incomplete: true,
        }
    }

    /// Whether a watched file may have changed since the last call: `false`
    /// only when nothing happened in any watched directory. Drains the
    /// events, so each change is reported once.
    pub fn maybe_changed(&mut self) -> bool {
        let Some(fd) = &self.inotify else {
            return true;
        };
        let mut changed = std::mem::take(&mut self.check_due) || self.incomplete;
        // Room for several events at once; one event with the longest name
        // (16 + NAME_MAX + 1 bytes) always fits.
        let mut events = [0u8; 1024];
        loop {
            match rustix::io::read(fd, &mut events) {
                Ok(0) => break,
                Ok(_) => changed = true,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => break,
                // Unexpected: trust nothing rather than miss a change.
                Err(_) => {
                    changed = true;
                    break;
                }
            }
        }
        changed
    }

    /// Watches the directories where a change to any of `files` would show,
    /// and drops the watches no longer needed. The next look answers
    /// "maybe", so that a change made before the watches were in place is
    /// not missed.
    pub fn watch<'a>(&mut self, files: impl IntoIterator<Item = &'a Path>) {
        let Some(fd) = &self.inotify else {
            return;
        };
        let mut directories: Vec<PathBuf> = Vec::new();
        for file in files {
            for directory in directories_to_watch(file) {
                if !directories.contains(&directory) {
                    directories.push(directory);
                }
            }
        }
        let mut watches = Vec::with_capacity(directories.len());
        let mut incomplete = false;
        for directory in &directories {
            // Placing a watch that exists returns its descriptor: two paths
            // to one directory share a watch.
            match inotify::add_watch(fd, directory, interesting()) {
                Ok(wd) if !watches.contains(&wd) => watches.push(wd),
                Ok(_) => {}
                // Gone since it was looked at, no permission, or the
                // per-user limit on watches: fall back to checking.
                Err(_) => incomplete = true,
            }
        }
        for old in &self.watches {
            if !watches.contains(old) {
                let _ = inotify::remove_watch(fd, *old);
            }
        }
        self.watches = watches;
        self.incomplete = incomplete;
        self.check_due = true;
    }
}

impl Default for ChangeWatch {
    fn default() -> Self {
        Self::new()
    }
}

/// The directories in which a change to `file` would show (see the module
/// documentation).
fn directories_to_watch(file: &Path) -> Vec<PathBuf> {
    let mut directories = Vec::new();
    let mut prefix = PathBuf::new();
    for component in file.components() {
        let parent = prefix.clone();
        prefix.push(component);
        if parent.as_os_str().is_empty() {
            continue;
        }
        match std::fs::symlink_metadata(&prefix) {
            Ok(meta) if meta.file_type().is_symlink() => directories.push(parent),
            Ok(_) => {}
            Err(_) => {
                // The deepest existing directory: the missing part appears
                // in it.
                directories.push(parent);
                return directories;
            }
        }
    }
    if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty())
        && !directories.iter().any(|d| d == parent)
    {
        directories.push(parent.to_owned());
    }
    directories
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A watch over `files`, with the look that follows placing it done.
    fn watching(files: &[&Path]) -> ChangeWatch {
        let mut watch = ChangeWatch::new();
        assert!(watch.inotify.is_some(), "inotify is available here");
        watch.watch(files.iter().copied());
        assert!(watch.maybe_changed(), "just placed: the first look checks");
        assert!(!watch.maybe_changed(), "nothing happened since");
        watch
    }

    #[test]
    fn a_file_written_in_place_replaced_or_removed_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("HEAD");
        std::fs::write(&file, "one").unwrap();
        let mut watch = watching(&[&file]);

        std::fs::write(&file, "two").unwrap();
        assert!(watch.maybe_changed(), "written in place");
        assert!(!watch.maybe_changed(), "each change is reported once");

        let new = dir.path().join("HEAD.lock");
        std::fs::write(&new, "three").unwrap();
        std::fs::rename(&new, &file).unwrap();
        assert!(watch.maybe_changed(), "replaced by rename");

        std::fs::remove_file(&file).unwrap();
        assert!(watch.maybe_changed(), "removed");
    }

    #[test]
    fn a_file_whose_directory_does_not_exist_yet_is_reported_when_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("repo/.git/HEAD");
        assert_eq!(directories_to_watch(&file), [dir.path().to_owned()]);
        let mut watch = watching(&[&file]);
        std::fs::create_dir(dir.path().join("repo")).unwrap();
        assert!(watch.maybe_changed(), "the clone begins");
    }

    #[test]
    fn replacing_a_symlink_on_the_path_is_reported() {
        // As /run/current-system/nixos-version across a switch.
        let dir = tempfile::tempdir().unwrap();
        for system in ["system-1", "system-2"] {
            std::fs::create_dir(dir.path().join(system)).unwrap();
            std::fs::write(dir.path().join(system).join("nixos-version"), system).unwrap();
        }
        let current = dir.path().join("current-system");
        symlink(dir.path().join("system-1"), &current).unwrap();
        let file = current.join("nixos-version");
        assert_eq!(
            directories_to_watch(&file),
            [dir.path().to_owned(), current.clone()]
        );
        let mut watch = watching(&[&file]);

        let next = dir.path().join("current-system.tmp");
        symlink(dir.path().join("system-2"), &next).unwrap();
        std::fs::rename(&next, &current).unwrap();
        assert!(watch.maybe_changed(), "the link was switched");
    }

    #[test]
    fn files_no_longer_watched_stop_reporting() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for d in [&a, &b] {
            std::fs::create_dir(d).unwrap();
        }
        let mut watch = watching(&[&a.join("f"), &b.join("f")]);
        watch.watch([b.join("f").as_path()]);
        // The look after re-watching checks (and drains the removal's
        // IN_IGNORED); from then on only b counts.
        assert!(watch.maybe_changed());
        assert!(!watch.maybe_changed());
        std::fs::write(a.join("f"), "x").unwrap();
        assert!(!watch.maybe_changed(), "a is no longer watched");
        std::fs::write(b.join("f"), "x").unwrap();
        assert!(watch.maybe_changed());
    }

    #[test]
    fn without_a_complete_watch_every_look_says_maybe() {
        let mut disabled = ChangeWatch::disabled();
        assert!(disabled.maybe_changed() && disabled.maybe_changed());

        let mut unwatched = ChangeWatch::new();
        assert!(unwatched.maybe_changed() && unwatched.maybe_changed());

        // A directory it may not watch (here: one that vanished between
        // the walk and the watch is simulated by a path that is a file).
        let dir = tempfile::tempdir().unwrap();
        let not_a_directory = dir.path().join("plain");
        std::fs::write(&not_a_directory, "").unwrap();
        let mut partial = ChangeWatch::new();
        partial.watch([not_a_directory.join("f").as_path()]);
        assert!(partial.maybe_changed() && partial.maybe_changed());
    }
}
