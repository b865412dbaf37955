//! The decisions about an activation, as pure functions of the record and
//! what the host says now: whether to arm, whether the deadline passed,
//! what a starting agent does with a record it finds, and the words the
//! dashboard gets.

use super::record::{Phase, Record};
use std::time::Duration;

/// A rollback cut short (the agent or the host stopped while it ran) is
/// started at most this many times in all: its steps are idempotent, so
/// once more is safe; a loop is what must never happen.
pub const MAX_ROLLBACK_ATTEMPTS: u32 = 2;

/// What a starting agent took over from the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopted {
    Nothing,
    /// A command other than the automatic rollback (the switch, its tests).
    Command,
    /// The rollback: its supervisor still runs, or it ended and its log
    /// says how.
    Rollback,
    /// The rollback, cut short: no supervisor, and its log ends without
    /// the supervisor's end.
    RollbackCutShort,
}

/// What a starting agent does with the record a previous one left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Nothing was recorded.
    Nothing,
    /// A recorded command changed nothing and no longer runs: forget it.
    Forget,
    /// The command or rollback the record is about is adopted: decide when
    /// it ends.
    Wait,
    /// The running system changed while no agent watched: arm now.
    Arm,
    /// Go on counting down to the recorded deadline (passed: roll back).
    Countdown,
    /// The rollback ended; its report stands (and is sent if it was not).
    Report,
    /// The record is from another boot: discarded, and the dashboard told.
    OtherBoot { message: String },
    /// A rollback was cut short, but the recorded system runs: it got far
    /// enough. Reported as rolled back, with this report.
    AlreadyBack { report: String },
    /// A rollback was cut short (or never got started) and the recorded
    /// system does not run: start it (again).
    RollBackAgain,
    /// A rollback was cut short as often as it may be: reported as failed,
    /// not retried.
    Interrupted { message: String },
}

/// What to do with `record` at start, given this boot's id, the running
/// system and what was adopted from the agent before.
pub fn resume(
    record: Option<&Record>,
    boot_id: Option<&str>,
    current_system: Option<&str>,
    adopted: Adopted,
) -> Resume {
    let Some(record) = record else {
        return Resume::Nothing;
    };
    if record.phase == Phase::RolledBack {
        return Resume::Report;
    }
    // An unknown boot id (no /proc) cannot tell boots apart: same boot.
    let other_boot = boot_id.is_some_and(|id| id != record.boot_id);
    if other_boot && adopted == Adopted::Nothing {
        return Resume::OtherBoot {
            message: other_boot_message(record, current_system),
        };
    }
    match record.phase {
        Phase::RollingBack if adopted == Adopted::Rollback => Resume::Wait,
        Phase::RollingBack => cut_short(record, current_system),
        Phase::Recorded if adopted != Adopted::Nothing => Resume::Wait,
        Phase::Recorded if current_system.is_some_and(|c| c != record.system) => Resume::Arm,
        Phase::Recorded => Resume::Forget,
        Phase::Armed => Resume::Countdown,
        Phase::RolledBack => Resume::Report,
    }
}

/// A record left rolling back with no rollback to follow.
fn cut_short(record: &Record, current_system: Option<&str>) -> Resume {
    if current_system == Some(record.system.as_str()) {
        return Resume::AlreadyBack {
            report: rollback_report(record, Ok(())),
        };
    }
    if record.attempts < MAX_ROLLBACK_ATTEMPTS {
        return Resume::RollBackAgain;
    }
    Resume::Interrupted {
        message: format!(
            "the rollback to {} was cut short {} times (the agent or the host stopped while it ran) after {}; not retried",
            short_path(&record.system),
            record.attempts,
            switch_words(record)
        ),
    }
}

fn other_boot_message(record: &Record, current_system: Option<&str>) -> String {
    let now = current_system.map_or_else(|| "an unknown system".to_owned(), short_path);
    let what = match record.phase {
        Phase::RollingBack => format!("during the rollback to {}", short_path(&record.system)),
        Phase::Recorded => format!("during {}", record.command),
        _ => format!("before {} was confirmed", switch_words(record)),
    };
    format!("not rolling back: the host rebooted {what}; it runs {now}")
}

fn switch_words(record: &Record) -> String {
    if record.commit.is_empty() {
        record.command.clone()
    } else {
        format!("{} {}", record.command, record.commit)
    }
}

/// Whether a finished command arms the countdown: it succeeded, changed
/// the running system, and the countdown is on.
pub fn should_arm(
    record: &Record,
    succeeded: bool,
    current_system: Option<&str>,
    timeout: Duration,
) -> bool {
    succeeded && !timeout.is_zero() && current_system.is_some_and(|c| c != record.system)
}

/// The record armed at `now` (seconds since the epoch).
pub fn arm(record: &Record, commit: String, timeout: Duration, now: u64) -> Record {
    Record {
        phase: Phase::Armed,
        commit,
        deadline: now.saturating_add(timeout.as_secs()),
        timeout_secs: timeout.as_secs(),
        ..record.clone()
    }
}

/// Time left until the deadline (zero once it passed).
pub fn remaining(record: &Record, now: u64) -> Duration {
    Duration::from_secs(record.deadline.saturating_sub(now))
}

pub fn expired(record: &Record, now: u64) -> bool {
    record.phase == Phase::Armed && now >= record.deadline
}

/// The status message of the rollback (and the system compartment's
/// until the next successful switch).
pub fn rollback_report(record: &Record, outcome: Result<(), (i32, &str)>) -> String {
    let why = if record.failed_tests.is_empty() {
        format!(
            "the dashboard was unreachable for {} s after {}",
            record.timeout_secs,
            switch_words(record)
        )
    } else {
        format!(
            "the host's tests failed after {}: {}",
            switch_words(record),
            record.failed_tests.join(", ")
        )
    };
    let to = short_path(&record.system);
    match outcome {
        Ok(()) => format!("rolled back to {to}: {why}"),
        Err((code, error)) => {
            format!("rollback to {to} failed (exit {code}: {error}): {why}; not retried")
        }
    }
}

/// The agent's line at the top of the rollback's log: why, to what, and
/// which attempt.
pub fn rollback_note(record: &Record) -> String {
    let why = if record.failed_tests.is_empty() {
        format!("was not confirmed within {} s", record.timeout_secs)
    } else {
        format!(
            "failed the host's tests ({})",
            record.failed_tests.join(", ")
        )
    };
    let generation = record
        .generation
        .map(|g| format!(" (generation {g} before the switch)"))
        .unwrap_or_default();
    let again = if record.attempts > 1 {
        format!(
            "; attempt {} of {MAX_ROLLBACK_ATTEMPTS}: the one before was cut short",
            record.attempts
        )
    } else {
        String::new()
    };
    format!(
        "[nixfleet] {} {} {why}: rolling back to {}{generation}{again}",
        record.command, record.commit, record.system
    )
}

/// Why a second activation is refused while one is unconfirmed.
pub fn refusal(record: &Record, now: u64) -> String {
    match record.phase {
        Phase::Armed => format!(
            "{} is not confirmed yet: it is rolled back in {} s unless the agent completes a register with the dashboard first",
            switch_words(record),
            remaining(record, now).as_secs()
        ),
        _ => format!("a rollback to {} is under way", short_path(&record.system)),
    }
}

/// A store path as people read it: the name, with the 32-character hash
/// cut to 7 (`/nix/store/abc…-nixos-system-web-25.05` →
/// `abcdefg-nixos-system-web-25.05`); other paths by their last part.
pub fn short_path(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or(path);
    match name.split_once('-') {
        Some((hash, rest))
            if hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            format!("{}-{rest}", &hash[..7])
        }
        _ => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(phase: Phase) -> Record {
        let mut r = Record::recorded("switch", "/nix/store/old".into(), Some(7), "boot-a".into());
        r.phase = phase;
        r.commit = "abc1234".into();
        r.timeout_secs = 300;
        r
    }

    #[test]
    fn a_starting_agent_decides_from_the_record() {
        let current = Some("/nix/store/new");
        let same = Some("boot-a");
        assert_eq!(
            resume(None, same, current, Adopted::Nothing),
            Resume::Nothing
        );
        let armed = record(Phase::Armed);
        assert_eq!(
            resume(Some(&armed), same, current, Adopted::Nothing),
            Resume::Countdown
        );
        assert_eq!(
            resume(Some(&armed), None, current, Adopted::Nothing),
            Resume::Countdown
        );
        let Resume::OtherBoot { message } =
            resume(Some(&armed), Some("boot-b"), current, Adopted::Nothing)
        else {
            panic!("another boot is discarded");
        };
        assert_eq!(
            message,
            "not rolling back: the host rebooted before switch abc1234 was confirmed; it runs new"
        );
        let recorded = record(Phase::Recorded);
        assert_eq!(
            resume(Some(&recorded), same, current, Adopted::Command),
            Resume::Wait
        );
        assert_eq!(
            resume(Some(&recorded), same, current, Adopted::Nothing),
            Resume::Arm
        );
        let unchanged = Some("/nix/store/old");
        assert_eq!(
            resume(Some(&recorded), same, unchanged, Adopted::Nothing),
            Resume::Forget
        );
        let done = record(Phase::RolledBack);
        assert_eq!(
            resume(Some(&done), Some("boot-b"), unchanged, Adopted::Nothing),
            Resume::Report
        );
    }

    #[test]
    fn a_rollback_cut_short_is_followed_reported_or_run_again_once() {
        let same = Some("boot-a");
        let (old, new) = (Some("/nix/store/old"), Some("/nix/store/new"));
        let mut rolling = record(Phase::RollingBack);
        rolling.attempts = 1;
        // Its supervisor runs, or its log has its end: that end decides.
        let r = |r: &Record, current, adopted| resume(Some(r), same, current, adopted);
        assert_eq!(r(&rolling, new, Adopted::Rollback), Resume::Wait);
        // Cut short, the recorded system runs: it is back.
        for adopted in [
            Adopted::Nothing,
            Adopted::RollbackCutShort,
            Adopted::Command,
        ] {
            assert_eq!(
                r(&rolling, old, adopted),
                Resume::AlreadyBack {
                    report: "rolled back to old: the dashboard was unreachable for 300 s after switch abc1234".into()
                }
            );
            assert_eq!(r(&rolling, new, adopted), Resume::RollBackAgain);
        }
        // Never started (the agent stopped a command first, then died).
        rolling.attempts = 0;
        assert_eq!(r(&rolling, new, Adopted::Nothing), Resume::RollBackAgain);
        rolling.attempts = MAX_ROLLBACK_ATTEMPTS;
        assert_eq!(
            r(&rolling, new, Adopted::RollbackCutShort),
            Resume::Interrupted {
                message: "the rollback to old was cut short 2 times (the agent or the host stopped while it ran) after switch abc1234; not retried".into()
            }
        );
        assert!(rollback_note(&rolling).ends_with(
            "rolling back to /nix/store/old (generation 7 before the switch); attempt 2 of 2: the one before was cut short"
        ));
    }

    #[test]
    fn only_a_successful_change_arms_and_the_deadline_is_wall_clock() {
        let r = record(Phase::Recorded);
        let t = Duration::from_secs(300);
        assert!(should_arm(&r, true, Some("/nix/store/new"), t));
        assert!(!should_arm(&r, false, Some("/nix/store/new"), t));
        assert!(!should_arm(&r, true, Some("/nix/store/old"), t));
        assert!(!should_arm(&r, true, None, t));
        assert!(!should_arm(
            &r,
            true,
            Some("/nix/store/new"),
            Duration::ZERO
        ));
        let armed = arm(&r, "def5678".into(), t, 1000);
        assert_eq!((armed.phase.clone(), armed.deadline), (Phase::Armed, 1300));
        assert!(!expired(&armed, 1299));
        assert!(expired(&armed, 1300));
        assert_eq!(remaining(&armed, 1200), Duration::from_secs(100));
        assert_eq!(remaining(&armed, 2000), Duration::ZERO);
        assert!(refusal(&armed, 1200).contains("rolled back in 100 s"));
    }

    #[test]
    fn reports_name_the_system_the_time_and_the_switch() {
        let r = record(Phase::RollingBack);
        assert_eq!(
            rollback_report(&r, Ok(())),
            "rolled back to old: the dashboard was unreachable for 300 s after switch abc1234"
        );
        assert_eq!(
            rollback_report(&r, Err((127, "nix-env not found"))),
            "rollback to old failed (exit 127: nix-env not found): the dashboard was unreachable \
             for 300 s after switch abc1234; not retried"
        );
        let mut tested = r.clone();
        tested.failed_tests = vec!["T2-net.sh".into(), "T5-dns.sh".into()];
        assert_eq!(
            rollback_report(&tested, Ok(())),
            "rolled back to old: the host's tests failed after switch abc1234: T2-net.sh, T5-dns.sh"
        );
        let store = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web-25.05";
        assert_eq!(short_path(store), "0123456-nixos-system-web-25.05");
        assert_eq!(short_path("/tmp/x/system-old"), "system-old");
    }
}
