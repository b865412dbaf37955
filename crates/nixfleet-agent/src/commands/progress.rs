//! What a running command tells the agent core: the events behind the
//! running-command record, the heartbeat's pid, the status compartments
//! and, last, the status.

use super::handover::CommandRecord;
use crate::protocol::Status;
use crate::status::LockAnswer;

#[derive(Debug)]
pub enum Progress {
    /// The supervisor runs: the record a next agent takes over (already
    /// saved in `state_dir` by launch.rs).
    Launched(CommandRecord),
    /// A process of the command started (pull-switch and test run several).
    Started {
        pid: u32,
    },
    /// The result of a `test` command, for the tests compartment.
    Tested {
        passed: u32,
        total: u32,
        stopped: bool,
        /// The scripts that failed, by name.
        failed: Vec<String>,
    },
    /// A fresh answer for the lock compartment.
    Lock(LockAnswer),
    /// The verdict of the dry-run system check: does the repo build the
    /// running system?
    System(Result<bool, String>),
    /// `nixos-rebuild` ran to its end (successfully or not).
    Rebuilt {
        ok: bool,
    },
    Finished(Status),
}
