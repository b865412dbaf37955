//! The decisions of the hidden `--rollback-if-unconfirmed <state_dir>`
//! mode the systemd timer runs when the countdown ends: it rolls back only
//! if the switch is still unconfirmed, on the same boot, and no agent runs
//! (an agent that runs holds the lock and counts down itself). The
//! rollback itself runs as a command, under its supervisor, with its log
//! (`commands::unattended`); its report goes into the record, and the next
//! agent sends the log's lines and then the report to the dashboard once.

use super::decide::{expired, rollback_report};
use super::host::boot_id;
use super::record::{Phase, Record};
use super::timer::lock;
use std::fs::File;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// What the hidden mode does.
pub enum Begin {
    /// Nothing: why, for the journal.
    Nothing(String),
    /// Roll back to `record.system`, holding `lock` until done (so that an
    /// agent starting meanwhile waits, then adopts the rollback whole).
    RollBack { record: Record, lock: File },
}

/// Takes the lock and decides; when rolling back, the record is marked
/// rolling back (with one more attempt) before anything runs.
pub fn begin(state_dir: &Path) -> Result<Begin, String> {
    let Some(lock) = lock(state_dir, false).map_err(|e| format!("cannot take the lock: {e}"))?
    else {
        return Ok(nothing(
            "the agent runs and counts down itself: nothing to do",
        ));
    };
    let Some(mut record) = Record::load(state_dir) else {
        return Ok(nothing("no activation record: the switch was confirmed"));
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if record.phase != Phase::Armed {
        return Ok(Begin::Nothing(format!(
            "the activation record is {:?}: nothing to do",
            record.phase
        )));
    }
    if boot_id().is_some_and(|id| id != record.boot_id) {
        return Ok(nothing(
            "the record is from another boot: the next agent reports it",
        ));
    }
    if !expired(&record, now) {
        return Ok(nothing("the countdown has not ended: nothing to do"));
    }
    record.phase = Phase::RollingBack;
    record.attempts += 1;
    record.save(state_dir).map_err(|e| e.to_string())?;
    Ok(Begin::RollBack { record, lock })
}

fn nothing(why: &str) -> Begin {
    Begin::Nothing(why.to_owned())
}

/// The rollback ended with `outcome` (its exit code and words on
/// failure): the record says so, for the next agent to report. Returns
/// the report.
pub fn finish(
    state_dir: &Path,
    mut record: Record,
    outcome: Result<(), (i32, String)>,
) -> Result<String, String> {
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
