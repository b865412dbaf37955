//! Whether the host needs a reboot to run what it has switched to: the
//! booted system (`/run/booted-system`) and the current one
//! (`/run/current-system`) differ in their kernel, initrd or kernel
//! modules. A switch activates everything else in place; these three only
//! take effect at the next boot.
//!
//! The answer is a [`Derived`] value (`file_cache`): it is computed again
//! only when one of the links or entries it looked at changed, which the
//! heartbeat's file watch (`file_watch`) tells it, never on every beat.

use crate::file_cache::{Derived, Reads};
use crate::protocol::Check;
use std::path::{Path, PathBuf};

pub const BOOTED_SYSTEM: &str = "/run/booted-system";
/// Test-only: a stand-in for `/run/booted-system` (as
/// `host_facts::TEST_CURRENT_SYSTEM_ENV` is for `/run/current-system`).
pub const TEST_BOOTED_SYSTEM_ENV: &str = "NIXFLEET_TEST_BOOTED_SYSTEM";

/// The entries of a NixOS system that only a boot brings into effect.
pub const BOOT_ENTRIES: [&str; 3] = ["kernel", "initrd", "kernel-modules"];

/// `/run/booted-system`, or its test stand-in.
pub fn booted_system_link() -> PathBuf {
    std::env::var_os(TEST_BOOTED_SYSTEM_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BOOTED_SYSTEM))
}

/// The boot entries in which `booted` and `current` (two system links)
/// differ. An entry counts only when both systems have it: with a link or
/// an entry missing (not NixOS, a container without a kernel) nothing can
/// be told, and nothing is claimed.
pub fn differing_entries(
    reads: &mut Reads<'_>,
    booted: &Path,
    current: &Path,
) -> Vec<&'static str> {
    // The links themselves are inputs too: a switch or a reboot replaces
    // them, and the value is then computed again whatever the entries say.
    reads.metadata(booted);
    reads.metadata(current);
    BOOT_ENTRIES
        .into_iter()
        .filter(|entry| {
            let booted = reads.canonical(&booted.join(entry));
            let current = reads.canonical(&current.join(entry));
            matches!((booted, current), (Some(b), Some(c)) if b != c)
        })
        .collect()
}

/// "kernel and initrd", for the messages.
fn list(entries: &[&str]) -> String {
    match entries {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// What the system compartment and `status` say: `None` when no reboot is
/// needed.
pub fn describe(entries: &[&str]) -> Option<String> {
    (!entries.is_empty()).then(|| format!("reboot needed: {} changed since boot", list(entries)))
}

/// Adds the reboot need to the system compartment's message (its verdict
/// stays: the running system is what was switched to, it only waits for a
/// boot to be complete).
pub fn annotate(system: &mut Check, entries: &[&str]) {
    let Some(note) = describe(entries) else {
        return;
    };
    system.message = if system.message.is_empty() {
        note
    } else {
        format!("{}; {note}", system.message)
    };
}

/// The reboot need of two system links, kept until a link or entry changes.
pub struct RebootNeed {
    booted: PathBuf,
    current: PathBuf,
    entries: Derived<Vec<&'static str>>,
}

impl RebootNeed {
    pub fn new(booted: PathBuf, current: PathBuf) -> Self {
        RebootNeed {
            booted,
            current,
            entries: Derived::default(),
        }
    }

    /// Up to date, looking at the links only if `maybe_changed`.
    pub fn refresh(&mut self, maybe_changed: bool) {
        let (booted, current) = (&self.booted, &self.current);
        self.entries.refresh(maybe_changed, |reads| {
            differing_entries(reads, booted, current)
        });
    }

    /// The differing entries as last computed (empty before the first).
    pub fn entries(&self) -> &[&'static str] {
        self.entries.value().map_or(&[], Vec::as_slice)
    }

    pub fn derived(&self) -> &Derived<Vec<&'static str>> {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake NixOS system `name` under `dir` whose boot entries link to
    /// `dir/store/<target>` (created), as a real system's link into the
    /// Nix store.
    fn system(dir: &Path, name: &str, kernel: &str, initrd: &str, modules: &str) -> PathBuf {
        let store = dir.join("store");
        let system = dir.join(name);
        std::fs::create_dir_all(&system).unwrap();
        for (entry, target) in [("kernel", kernel), ("initrd", initrd)] {
            std::fs::create_dir_all(store.join(target)).unwrap();
            let file = store.join(target).join(entry);
            std::fs::write(&file, target).unwrap();
            symlink(&file, system.join(entry)).unwrap();
        }
        std::fs::create_dir_all(store.join(modules).join("lib/modules")).unwrap();
        symlink(store.join(modules), system.join("kernel-modules")).unwrap();
        system
    }

    fn link(dir: &Path, name: &str, to: &Path) -> PathBuf {
        let link = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        symlink(to, &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
        link
    }

    fn need(dir: &Path, booted: &Path, current: &Path) -> Vec<&'static str> {
        let mut need = RebootNeed::new(dir.join(booted), dir.join(current));
        need.refresh(true);
        need.entries().to_vec()
    }

    #[test]
    fn the_same_boot_entries_need_no_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Two systems that differ in everything but what a boot loads.
        let one = system(d, "system-1", "linux-6.6", "initrd-1", "modules-1");
        let two = system(d, "system-2", "linux-6.6", "initrd-1", "modules-1");
        std::fs::write(two.join("nixos-version"), "other").unwrap();
        link(d, "booted-system", &one);
        link(d, "current-system", &two);
        assert_eq!(
            need(d, "booted-system".as_ref(), "current-system".as_ref()),
            [] as [&str; 0]
        );
    }

    #[test]
    fn a_different_kernel_or_initrd_needs_a_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let one = system(d, "system-1", "linux-6.6", "initrd-1", "modules-1");
        let kernel = system(d, "system-2", "linux-6.12", "initrd-1", "modules-2");
        let initrd = system(d, "system-3", "linux-6.6", "initrd-2", "modules-1");
        link(d, "booted-system", &one);
        link(d, "current-system", &kernel);
        let (booted, current): (&Path, &Path) =
            ("booted-system".as_ref(), "current-system".as_ref());
        assert_eq!(need(d, booted, current), ["kernel", "kernel-modules"]);
        link(d, "current-system", &initrd);
        assert_eq!(need(d, booted, current), ["initrd"]);
        let mut check = Check::default();
        annotate(&mut check, &["kernel", "initrd", "kernel-modules"]);
        assert_eq!(
            check.message,
            "reboot needed: kernel, initrd and kernel-modules changed since boot"
        );
    }

    #[test]
    fn missing_links_or_entries_claim_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let one = system(d, "system-1", "linux-6.6", "initrd-1", "modules-1");
        let two = system(d, "system-2", "linux-6.12", "initrd-2", "modules-2");
        link(d, "current-system", &two);
        let (booted, current): (&Path, &Path) =
            ("booted-system".as_ref(), "current-system".as_ref());
        assert_eq!(
            need(d, booted, current),
            [] as [&str; 0],
            "no booted-system"
        );
        link(d, "booted-system", &one);
        std::fs::remove_file(two.join("kernel")).unwrap();
        std::fs::remove_file(one.join("initrd")).unwrap();
        assert_eq!(
            need(d, booted, current),
            ["kernel-modules"],
            "only entries both have"
        );
        assert_eq!(
            need(d, "nowhere".as_ref(), "nothing".as_ref()),
            [] as [&str; 0]
        );
    }

    /// Sets every modification time under `path` an hour back, as if
    /// written long ago (a fresh input is read again until it settles).
    fn backdate_tree(path: &Path) {
        if path.is_dir() && !path.is_symlink() {
            for entry in std::fs::read_dir(path).unwrap().flatten() {
                backdate_tree(&entry.path());
            }
        }
        if !path.is_symlink() {
            let past = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
            let file = std::fs::File::open(path).unwrap();
            file.set_modified(past).unwrap();
        }
    }

    #[test]
    fn computed_again_only_when_a_link_changes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let one = system(d, "system-1", "linux-6.6", "initrd-1", "modules-1");
        let two = system(d, "system-2", "linux-6.12", "initrd-1", "modules-1");
        link(d, "booted-system", &one);
        link(d, "current-system", &one);
        backdate_tree(d);
        let mut need = RebootNeed::new(d.join("booted-system"), d.join("current-system"));
        need.refresh(true);
        assert!(need.entries().is_empty());
        for _ in 0..3 {
            need.refresh(true);
        }
        assert_eq!(need.derived().computations(), 1, "nothing changed");
        link(d, "current-system", &two);
        // The file watch says nothing happened: the links are not looked at.
        need.refresh(false);
        assert!(need.entries().is_empty());
        assert_eq!(need.derived().computations(), 1);
        need.refresh(true);
        assert_eq!(need.entries(), ["kernel"]);
        assert_eq!(need.derived().computations(), 2);
    }
}
