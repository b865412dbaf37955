//! Process groups: every step of a command leads its own (its own session,
//! so a signal meant for the agent reaches neither it nor the deployment),
//! and a stop signals the whole group, so no process a command started
//! survives a stop. One mechanism for the supervisor and for the agent that
//! follows a command of an older agent.

use super::table::StopRequest;
use rustix::process::{Pid, Signal, kill_process_group, test_kill_process_group};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// How often a stop looks whether the group is gone.
pub const GROUP_POLL: Duration = Duration::from_millis(50);

/// A stop in progress: the requested signal, SIGKILL once `grace` has
/// passed (or at once when a later request says so). Asked again on every
/// poll, it sends what is due.
#[derive(Debug)]
pub struct GroupStop {
    group: Option<Pid>,
    grace: Duration,
    /// The last signal sent, and when the stop began.
    sent: Option<(Signal, Instant)>,
}

impl GroupStop {
    /// The group led by `pid`.
    pub fn new(pid: u32, grace: Duration) -> Self {
        GroupStop {
            group: Pid::from_raw(pid as i32),
            grace,
            sent: None,
        }
    }

    /// Sends what `request` calls for now; returns true when that was
    /// SIGKILL after the grace period ran out (the group ignored SIGTERM).
    pub fn request(&mut self, request: StopRequest) -> bool {
        let now = Instant::now();
        let grace_over = self
            .sent
            .is_some_and(|(_, since)| now.duration_since(since) >= self.grace);
        let signal = if request == StopRequest::Kill || grace_over {
            Signal::KILL
        } else {
            Signal::TERM
        };
        if self.sent.is_some_and(|(sent, _)| sent == signal) {
            return false;
        }
        if let Some(group) = self.group {
            let _ = kill_process_group(group, signal);
        }
        let since = self.sent.map_or(now, |(_, since)| since);
        self.sent = Some((signal, since));
        grace_over && request != StopRequest::Kill
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.sent.is_some()
    }

    /// Whether no process of the group is left.
    pub fn group_gone(&self) -> bool {
        self.group
            .is_none_or(|group| test_kill_process_group(group).is_err())
    }
}

/// In the child, before exec: nice 19 and the idle IO class. Best effort:
/// failing leaves the normal priority.
pub fn lower_priority() {
    // IOPRIO_WHO_PROCESS, this process, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT.
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_IDLE: libc::c_long = 3 << 13;
    // SAFETY: both are plain syscalls on the calling process, which is
    // async-signal-safe (pre_exec runs between fork and exec).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, IOPRIO_IDLE);
    }
}

pub fn exit_code_of(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "ended abnormally".to_owned(),
    }
}
