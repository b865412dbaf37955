//! The agent's own unit file and binary, as they were at start. When a
//! successful switch changed either, the agent delivers the status and
//! exits so that systemd starts the new version. A switch the agent did
//! not run (a manual `nixos-rebuild switch`, `system.autoUpgrade`) is
//! noticed the same way, by comparing with the snapshot while idle.

use std::path::{Path, PathBuf};

/// Test-only: watch this file as the agent's own unit file instead of the
/// one systemd started it from.
pub const TEST_UNIT_FILE_ENV: &str = "NIXFLEET_TEST_UNIT_FILE";

/// The agent's own unit file and binary as they were at start.
#[derive(Debug, Clone)]
pub struct SelfImage {
    unit: Option<UnitSnapshot>,
    exe: Option<PathBuf>,
    /// The unit's `ExecStart=` already named another program than this one
    /// when the snapshot was taken (a wrapper script, or a unit file edited
    /// but not yet reloaded): not a sign of a new version by itself.
    started_elsewhere: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct UnitSnapshot {
    path: PathBuf,
    resolved: Option<PathBuf>,
    content: Option<Vec<u8>>,
}

impl UnitSnapshot {
    fn take(path: &Path) -> Self {
        UnitSnapshot {
            path: path.to_owned(),
            resolved: std::fs::canonicalize(path).ok(),
            content: std::fs::read(path).ok(),
        }
    }
}

impl SelfImage {
    /// Snapshot at start. Outside systemd (no unit to find) there is nothing
    /// to compare later, and the agent never restarts itself.
    pub fn capture() -> Self {
        let unit_file = std::env::var_os(TEST_UNIT_FILE_ENV)
            .map(PathBuf::from)
            .or_else(own_unit_file);
        SelfImage::new(
            unit_file.as_deref().map(UnitSnapshot::take),
            std::fs::read_link("/proc/self/exe").ok(),
        )
    }

    fn new(unit: Option<UnitSnapshot>, exe: Option<PathBuf>) -> Self {
        let mut image = SelfImage {
            unit,
            exe,
            started_elsewhere: false,
        };
        image.started_elsewhere = image
            .unit
            .as_ref()
            .is_some_and(|unit| image.starts_another_program(unit).is_some());
        image
    }

    /// The same image with the unit file as it is now: what the agent
    /// compares with from here on.
    pub fn rebased(&self) -> Self {
        SelfImage::new(
            self.unit
                .as_ref()
                .map(|unit| UnitSnapshot::take(&unit.path)),
            self.exe.clone(),
        )
    }

    pub fn watches_a_unit(&self) -> bool {
        self.unit.is_some()
    }

    /// Why the agent should restart to become the new version, if it should:
    /// asked after a successful switch the agent ran itself.
    pub fn changed(&self) -> Option<String> {
        let unit = self.unit.as_ref()?;
        let now = UnitSnapshot::take(&unit.path);
        self.unit_changed(unit, &now)
            .or_else(|| self.binary_replaced())
            .or_else(|| self.starts_another_program(&now))
    }

    /// What changed since the snapshot, if anything: asked while idle, to
    /// notice a switch the agent did not run. A few syscalls (resolving the
    /// unit's symlinks, reading it, resolving two program paths), so cheap
    /// enough for every heartbeat. Unlike [`SelfImage::changed`] it ignores
    /// an `ExecStart=` that named another program from the start.
    pub fn replaced_since_start(&self) -> Option<String> {
        let unit = self.unit.as_ref()?;
        let now = UnitSnapshot::take(&unit.path);
        self.unit_changed(unit, &now)
            .or_else(|| self.binary_replaced())
            .or_else(|| {
                (!self.started_elsewhere)
                    .then(|| self.starts_another_program(&now))
                    .flatten()
            })
    }

    fn unit_changed(&self, unit: &UnitSnapshot, now: &UnitSnapshot) -> Option<String> {
        if now.resolved != unit.resolved {
            return Some(format!(
                "its unit file {} now points to {}",
                unit.path.display(),
                now.resolved
                    .as_deref()
                    .unwrap_or(Path::new("(nothing)"))
                    .display()
            ));
        }
        (now.content != unit.content)
            .then(|| format!("its unit file {} changed", unit.path.display()))
    }

    fn binary_replaced(&self) -> Option<String> {
        self.exe
            .as_deref()?
            .to_string_lossy()
            .ends_with(" (deleted)")
            .then(|| "its binary was replaced".to_owned())
    }

    /// The unit's `ExecStart=` program, all symlinks resolved, is not this
    /// process's binary (the symlinks may have moved: ExecStart= through
    /// /run/current-system).
    fn starts_another_program(&self, now: &UnitSnapshot) -> Option<String> {
        let exe = self.exe.as_deref()?;
        let started_from = now.content.as_deref().and_then(exec_start_program)?;
        let started_from = std::fs::canonicalize(&started_from).unwrap_or(started_from);
        let exe = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_owned());
        (started_from != exe).then(|| {
            format!(
                "its unit now starts {} instead of {}",
                started_from.display(),
                exe.display()
            )
        })
    }
}

/// The unit file systemd started this process from, found through the
/// cgroup (`0::/system.slice/nixfleet.service`).
fn own_unit_file() -> Option<PathBuf> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let unit = cgroup.lines().find_map(|line| {
        let path = line.rsplit(':').next()?;
        path.rsplit('/')
            .find(|c| c.ends_with(".service"))
            .map(str::to_owned)
    })?;
    [
        "/etc/systemd/system",
        "/run/systemd/system",
        "/usr/lib/systemd/system",
        "/lib/systemd/system",
    ]
    .iter()
    .map(|dir| Path::new(dir).join(&unit))
    .find(|p| p.exists())
}

/// The program of the unit's `ExecStart=` (without systemd's `@-:+!`
/// prefixes).
fn exec_start_program(unit: &[u8]) -> Option<PathBuf> {
    let text = String::from_utf8_lossy(unit);
    let value = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ExecStart="))
        .rfind(|v| !v.trim().is_empty())?;
    let program = value.trim().trim_start_matches(['@', '-', ':', '+', '!']);
    let program = program.split_whitespace().next()?;
    Some(PathBuf::from(program.trim_matches('"')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_start_programs_are_found() {
        let unit = b"[Service]\nType=notify\nExecStart=\nExecStart=@/nix/store/abc-agent/bin/nixfleet-agent --config /x\n";
        assert_eq!(
            exec_start_program(unit),
            Some(PathBuf::from("/nix/store/abc-agent/bin/nixfleet-agent"))
        );
        assert_eq!(exec_start_program(b"[Service]\n"), None);
    }

    #[test]
    fn self_image_notices_retargeted_and_edited_units() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let old = dir.path().join("old.service");
        std::fs::write(
            &old,
            format!("[Service]\nExecStart={} --config x\n", exe.display()),
        )
        .unwrap();
        let link = dir.path().join("nixfleet.service");
        std::os::unix::fs::symlink(&old, &link).unwrap();
        let image = SelfImage::new(Some(UnitSnapshot::take(&link)), Some(exe.clone()));
        assert_eq!(image.changed(), None);
        assert_eq!(image.replaced_since_start(), None);

        let new = dir.path().join("new.service");
        std::fs::write(
            &new,
            format!("[Service]\nExecStart={} --config x\n", exe.display()),
        )
        .unwrap();
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&new, &link).unwrap();
        assert!(image.changed().unwrap().contains("now points to"));
        assert!(
            image
                .replaced_since_start()
                .unwrap()
                .contains("now points to")
        );

        let image = image.rebased();
        assert_eq!(
            image.replaced_since_start(),
            None,
            "rebased on the new unit"
        );
        std::fs::write(
            &new,
            "[Service]\nExecStart=/nix/store/other/bin/nixfleet-agent\n",
        )
        .unwrap();
        assert!(image.changed().unwrap().contains("changed"));
        assert!(image.replaced_since_start().unwrap().contains("changed"));
        let no_unit = SelfImage::new(None, None);
        assert_eq!(no_unit.changed(), None);
        assert_eq!(no_unit.replaced_since_start(), None);
    }

    #[test]
    fn a_unit_that_starts_a_wrapper_is_not_a_replacement_while_idle() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let unit = dir.path().join("nixfleet.service");
        std::fs::write(&unit, "[Service]\nExecStart=/usr/local/bin/agent-wrapper\n").unwrap();
        let image = SelfImage::new(Some(UnitSnapshot::take(&unit)), Some(exe));
        assert!(image.changed().is_some(), "after a switch: restart anyway");
        assert_eq!(
            image.replaced_since_start(),
            None,
            "while idle: nothing changed since start"
        );
    }

    #[test]
    fn a_moved_exec_start_symlink_is_a_replacement() {
        // ExecStart= through a symlink that a switch moves, with the unit
        // file itself unchanged (as with /run/current-system/sw/bin).
        let dir = tempfile::tempdir().unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let current = dir.path().join("current-agent");
        std::os::unix::fs::symlink(&exe, &current).unwrap();
        let unit = dir.path().join("nixfleet.service");
        std::fs::write(
            &unit,
            format!("[Service]\nExecStart={}\n", current.display()),
        )
        .unwrap();
        let image = SelfImage::new(Some(UnitSnapshot::take(&unit)), Some(exe));
        assert_eq!(image.replaced_since_start(), None);
        std::fs::remove_file(&current).unwrap();
        std::os::unix::fs::symlink("/nix/store/new-agent/bin/nixfleet-agent", &current).unwrap();
        assert!(image.replaced_since_start().unwrap().contains("instead of"));
    }
}
