//! Process-wide protections the agent applies to itself at start-up.

/// Marks the process not dumpable (`PR_SET_DUMPABLE` 0), before the token
/// is read: no core dump is written when it crashes or the watchdog aborts
/// it, and other processes of the same user can neither ptrace it nor read
/// its memory through `/proc`. The unit's `LimitCORE=0` says the same to
/// systemd; this holds wherever the agent runs.
pub fn forbid_core_dumps() -> Result<(), String> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|error| format!("cannot disable core dumps (PR_SET_DUMPABLE): {error}"))
}
