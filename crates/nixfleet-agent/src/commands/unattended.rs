//! The hidden `--rollback-if-unconfirmed <state_dir>` mode the systemd
//! timer runs when a switch's countdown ends (see `activation::timer`).
//! When `activation::unattended` decides to roll back, the rollback runs
//! the way the agent's own countdown runs it: the same steps (plan.rs),
//! under a supervisor, into a command log, with the running-command record
//! a next agent adopts (launch.rs, handover.rs). This mode waits for the
//! supervisor to end, holding the activation lock meanwhile, so that an
//! agent starting then (the old system's activation starts it) waits too
//! and adopts the ended rollback whole: the dashboard gets its lines, then
//! one `rollback` status. The lines also go to this mode's stdout, i.e.
//! the journal of the timer's service.

use super::launch::{LogSettings, start};
use super::log::{Record, replay};
use super::plan::{Planned, rollback_steps};
use super::summary::Summary;
use super::table::CommandKind;
use crate::activation::timer::ROLLBACK_ARG;
use crate::activation::unattended::{Begin, begin, finish};
use crate::activation::{self, Record as Activation};
use crate::child_env::child_environment;
use crate::protocol::Outcome;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Bad arguments (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// The rollback's log cap here, without a configuration: an activation
/// prints a few hundred lines; this keeps a runaway one from filling the
/// state disk the next agent needs.
const LOG_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// All logs together: no budget of its own (the agent's next command
/// prunes to the configured one), only the count of kept logs applies.
const LOGS_MAX_BYTES: u64 = u64::MAX;
/// Nobody stops this rollback (not even the dashboard): the default.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(2).collect();
    let [state_dir] = args.as_slice() else {
        eprintln!("nixfleet-agent {ROLLBACK_ARG}: expected <state_dir>");
        return ExitCode::from(EXIT_USAGE);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("nixfleet-agent {ROLLBACK_ARG}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(roll_back_if_unconfirmed(Path::new(state_dir))) {
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

async fn roll_back_if_unconfirmed(state_dir: &Path) -> Result<String, String> {
    let (record, _lock) = match begin(state_dir)? {
        Begin::Nothing(why) => return Ok(why),
        Begin::RollBack { record, lock } => (record, lock),
    };
    let outcome = roll_back(state_dir, &record).await;
    finish(state_dir, record, outcome)
}

/// Runs the rollback to its end; its exit code and words on failure.
async fn roll_back(state_dir: &Path, record: &Activation) -> Result<(), (i32, String)> {
    let planned = Planned {
        steps: rollback_steps(
            &record.system,
            &activation::system_profile(),
            Path::new("/"),
        ),
        notes: vec![activation::decide::rollback_note(record)],
    };
    let settings = LogSettings {
        state_dir: state_dir.to_owned(),
        max_bytes: LOG_MAX_BYTES,
        logs_max_bytes: LOGS_MAX_BYTES,
        stop_grace: STOP_GRACE,
        scrub_url: None,
    };
    let env = child_environment(std::env::vars_os(), None);
    let started = start(&settings, &env, CommandKind::Rollback, planned)
        .await
        .map_err(|e| (-1, format!("cannot start the rollback: {e}")))?;
    // The next agent adopts it from its record (saved by `start`), as any
    // command an agent left behind.
    // Its stdout closes when it ends; what it relayed there (the records
    // a full or read-only disk refused) is kept, its last part only.
    let tail = read_tail(started.relay).await;
    let status = summarize(&started.log, &tail);
    match status {
        (Outcome::Ok, ..) => Ok(()),
        (_, code, message) => Err((code, message)),
    }
}

/// Most bytes of the supervisor's stdout kept: its last records (the step
/// events and exit codes a status is made of) fit many times over.
const TAIL_MAX_BYTES: usize = 64 * 1024;

/// Reads the supervisor's stdout to its end — it must be read all along,
/// or a supervisor with events still to relay would wait for room — and
/// keeps the last whole records of at most `TAIL_MAX_BYTES`.
async fn read_tail(mut stdout: tokio::process::ChildStdout) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut tail = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    while let Ok(n @ 1..) = stdout.read(&mut chunk).await {
        tail.extend_from_slice(&chunk[..n]);
        if tail.len() > TAIL_MAX_BYTES {
            let cut = tail.len() - TAIL_MAX_BYTES;
            let whole = tail[cut..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(tail.len(), |i| cut + i + 1);
            tail.drain(..whole);
        }
    }
    tail
}

/// The ended rollback's outcome, read from its log as the agent reads it
/// (summary.rs); its lines go to stdout on the way.
fn summarize(log: &Path, tail: &[u8]) -> (Outcome, i32, String) {
    let mut summary = Summary::new(CommandKind::Rollback, PathBuf::new(), String::new());
    let mut stdout = std::io::stdout().lock();
    // Nothing is sent from here: the next agent sends the lines.
    let mut unsent = Vec::new();
    let mut each = |record: Record<'_>| {
        if let Record::Line { raw, .. } = record {
            let _ = stdout.write_all(raw);
            let _ = stdout.write_all(b"\n");
        }
        summary.on_record(record, false, &mut unsent);
        unsent.clear();
    };
    if !replay(log, &mut each) {
        // The disk kept neither in the log nor in the end file: what the
        // supervisor printed.
        for record in tail.split(|b| *b == b'\n').filter(|r| !r.is_empty()) {
            each(super::log::parse(record));
        }
    }
    drop(stdout);
    let status = summary.status(String::new());
    (status.status, status.exit_code, status.message)
}
