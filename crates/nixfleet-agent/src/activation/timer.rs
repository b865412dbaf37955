//! The rollback that does not depend on the new system's agent: a
//! transient systemd timer, armed with the switch's countdown, that runs
//! the binary of the agent that armed it (its store path stays valid: the
//! old generation roots it) in the hidden `--rollback-if-unconfirmed`
//! mode. Only the argv is built here; no shell is involved anywhere.
//!
//! Who rolls back is decided by one lock: a running agent holds
//! [`LOCK_FILE`] for its whole life and counts down itself; the hidden mode
//! rolls back only when it gets the lock, i.e. when no agent runs (it
//! could not start in the new system, or died).

use std::ffi::OsString;
use std::fs::File;
use std::path::Path;

/// The hidden mode the timer runs.
pub const ROLLBACK_ARG: &str = "--rollback-if-unconfirmed";
/// Held by the running agent, and by the hidden mode while it rolls back.
pub const LOCK_FILE: &str = "activation.lock";
/// Prefix of the transient units (`<prefix><id>.timer` and `.service`).
pub const UNIT_PREFIX: &str = "nixfleet-rollback-";

/// Whether systemd runs the host (sd_booted(3)'s test): only then can a
/// timer outlive the agent.
pub fn systemd_is_init() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The transient unit's name for one armed switch: unique per deadline.
pub fn unit_name(deadline: u64) -> String {
    format!("{UNIT_PREFIX}{deadline}")
}

/// `systemd-run` arming the timer: `after_secs` from now, run `exe` in the
/// hidden mode on `state_dir`.
pub fn arm_argv(unit: &str, after_secs: u64, exe: &Path, state_dir: &Path) -> Vec<OsString> {
    let mut argv: Vec<OsString> = [
        "systemd-run".to_owned(),
        format!("--unit={unit}"),
        format!("--on-active={after_secs}s"),
        // Fire on the second, not within systemd's default minute.
        "--timer-property=AccuracySec=1s".to_owned(),
        "--description=NixFleet: roll back an unconfirmed switch".to_owned(),
        "--quiet".to_owned(),
        "--".to_owned(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    argv.push(exe.as_os_str().to_owned());
    argv.push(ROLLBACK_ARG.into());
    argv.push(state_dir.as_os_str().to_owned());
    argv
}

/// `systemctl stop` of the timer, once the switch is confirmed.
pub fn cancel_argv(unit: &str) -> Vec<OsString> {
    ["systemctl", "stop", &format!("{unit}.timer")]
        .into_iter()
        .map(OsString::from)
        .collect()
}

/// Opens (creating, 0600) the lock file and takes the lock: waiting for it
/// when `wait`, else `None` when someone holds it.
pub fn lock(state_dir: &Path, wait: bool) -> std::io::Result<Option<File>> {
    use rustix::fs::{FlockOperation, flock};
    crate::state_file::private_dir(state_dir)?;
    let path = state_dir.join(LOCK_FILE);
    if !path.exists() {
        crate::state_file::private_file(
            &path,
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false),
        )?;
    }
    // Held read-only: the agent holds it for its whole life, and a file
    // open for writing would keep the state file system from being
    // remounted read-only ("busy"). flock needs no write access.
    let file = File::open(&path)?;
    let operation = if wait {
        FlockOperation::LockExclusive
    } else {
        FlockOperation::NonBlockingLockExclusive
    };
    match flock(&file, operation) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timer_runs_this_binary_in_the_hidden_mode_without_a_shell() {
        let argv = arm_argv(
            &unit_name(1_700_000_300),
            300,
            Path::new("/nix/store/abc-nixfleet-agent/bin/nixfleet-agent"),
            Path::new("/var/lib/nixfleet"),
        );
        let argv: Vec<&str> = argv.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            argv,
            [
                "systemd-run",
                "--unit=nixfleet-rollback-1700000300",
                "--on-active=300s",
                "--timer-property=AccuracySec=1s",
                "--description=NixFleet: roll back an unconfirmed switch",
                "--quiet",
                "--",
                "/nix/store/abc-nixfleet-agent/bin/nixfleet-agent",
                "--rollback-if-unconfirmed",
                "/var/lib/nixfleet",
            ]
        );
        assert_eq!(
            cancel_argv("nixfleet-rollback-1"),
            ["systemctl", "stop", "nixfleet-rollback-1.timer"].map(OsString::from)
        );
    }

    #[test]
    fn one_holder_of_the_lock_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path(), false).unwrap().expect("free");
        assert!(lock(dir.path(), false).unwrap().is_none());
        drop(held);
        assert!(lock(dir.path(), false).unwrap().is_some());
    }
}
