//! A stop request as a signal, beside the stop file: the file needs a
//! writable state disk with room for it, and a stop is wanted most when the
//! disk is full or read-only (a switch stuck on it). The agent signals a
//! supervisor it started itself (the same binary, so one that understands
//! the signals): SIGUSR1 asks for SIGTERM, SIGUSR2 for SIGKILL. The file
//! stays, for a supervisor of another agent and for one adopted after a
//! restart.
//!
//! The supervisor is started with both signals blocked (a signal's default
//! action would end it before it can catch them), catches them, then
//! unblocks them; its steps start with an empty mask (std resets it).

use super::table::StopRequest;
use std::sync::atomic::{AtomicU8, Ordering};

/// 0: none; 1: terminate; 2: kill. Written by the signal handler only.
static REQUESTED: AtomicU8 = AtomicU8::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    let value = if signal == libc::SIGUSR2 { 2 } else { 1 };
    REQUESTED.fetch_max(value, Ordering::SeqCst);
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        set
    }
}

/// In the supervisor's child before exec (async-signal-safe: no memory
/// allocated): blocks the stop signals until [`catch`] is ready for them.
pub fn block_in_child() -> std::io::Result<()> {
    let set = stop_signals();
    // SAFETY: sigprocmask is async-signal-safe; `set` is a valid set.
    match unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// In the supervisor, first thing: catches the stop signals, then lets
/// them (and any that came meanwhile) in.
pub fn catch() {
    let set = stop_signals();
    // SAFETY: the handler only stores into an atomic; the sigaction is
    // zeroed then filled in; `set` is a valid set.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut());
        libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut());
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// What a signal asked for, if one did.
pub fn requested() -> Option<StopRequest> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        1 => Some(StopRequest::Terminate),
        _ => Some(StopRequest::Kill),
    }
}

/// The agent's side: signals the supervisor `pid` (checked by the caller
/// to be the one it started).
pub fn send(pid: u32, request: StopRequest) -> std::io::Result<()> {
    use rustix::process::{Pid, Signal, kill_process};
    let signal = match request {
        StopRequest::Terminate => Signal::USR1,
        StopRequest::Kill => Signal::USR2,
    };
    let pid = Pid::from_raw(pid as i32).ok_or_else(|| std::io::Error::other("pid 0"))?;
    kill_process(pid, signal).map_err(Into::into)
}
