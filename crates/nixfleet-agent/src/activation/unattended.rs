//! The hidden `--rollback-if-unconfirmed <state_dir>` mode the systemd
//! timer runs when the countdown ends: it rolls back only if the switch is
//! still unconfirmed, on the same boot, and no agent runs (an agent that
//! runs holds the lock and counts down itself). The rollback's output goes
//! to the journal; the report goes into the record, and the next agent
//! sends it to the dashboard once.

use super::decide::{expired, rollback_report};
use super::host::{boot_id, system_profile};
use super::record::{Phase, Record};
use super::timer::{ROLLBACK_ARG, lock};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

/// Bad arguments (EX_USAGE).
const EXIT_USAGE: u8 = 64;

pub fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(2).collect();
    let [state_dir] = args.as_slice() else {
        eprintln!("nixfleet-agent {ROLLBACK_ARG}: expected <state_dir>");
        return ExitCode::from(EXIT_USAGE);
    };
    let state_dir = Path::new(state_dir);
    match roll_back_if_unconfirmed(state_dir) {
        Ok(said) => {
            println!("{said}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("nixfleet-agent {ROLLBACK_ARG}: {error}");
            ExitCode::FAILURE
        }
    }
}

fn roll_back_if_unconfirmed(state_dir: &Path) -> Result<String, String> {
    let Some(_lock) = lock(state_dir, false).map_err(|e| format!("cannot take the lock: {e}"))?
    else {
        return Ok("the agent runs and counts down itself: nothing to do".to_owned());
    };
    let Some(mut record) = Record::load(state_dir) else {
        return Ok("no activation record: the switch was confirmed".to_owned());
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if record.phase != Phase::Armed {
        return Ok(format!(
            "the activation record is {:?}: nothing to do",
            record.phase
        ));
    }
    if boot_id().is_some_and(|id| id != record.boot_id) {
        return Ok("the record is from another boot: the next agent reports it".to_owned());
    }
    if !expired(&record, now) {
        return Ok("the countdown has not ended: nothing to do".to_owned());
    }
    record.phase = Phase::RollingBack;
    record.save(state_dir).map_err(|e| e.to_string())?;
    let outcome = run_steps(&record.system, &system_profile());
    let report = match &outcome {
        Ok(()) => rollback_report(&record, Ok(())),
        Err((code, why)) => rollback_report(&record, Err((*code, why))),
    };
    record.exit_code = outcome.as_ref().err().map_or(0, |(code, _)| *code);
    record.phase = Phase::RolledBack;
    record.report = Some(report.clone());
    record.reported = false;
    record.save(state_dir).map_err(|e| e.to_string())?;
    Ok(report)
}

/// `nix-env --profile <profile> --set <system>`, then
/// `<system>/bin/switch-to-configuration switch`; the second only if the
/// first succeeded. The old system's own `nix-env` is preferred: a service
/// started by systemd has no NixOS `PATH`.
fn run_steps(system: &str, profile: &Path) -> Result<(), (i32, String)> {
    let own = PathBuf::from(system).join("sw/bin/nix-env");
    let nix_env = if own.exists() {
        own
    } else {
        PathBuf::from("nix-env")
    };
    let mut set = Command::new(&nix_env);
    set.arg("--profile").arg(profile).arg("--set").arg(system);
    run(set, "nix-env")?;
    let mut activate = Command::new(PathBuf::from(system).join("bin/switch-to-configuration"));
    activate.arg("switch");
    run(activate, "switch-to-configuration")
}

fn run(mut command: Command, what: &str) -> Result<(), (i32, String)> {
    let status = command
        .stdin(Stdio::null())
        .status()
        .map_err(|e| (127, format!("cannot run {what}: {e}")))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err((code, format!("{what} failed"))),
        None => Err((-1, format!("{what} was killed by a signal"))),
    }
}
