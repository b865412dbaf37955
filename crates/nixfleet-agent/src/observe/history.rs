//! What the core tells the observer of commands, kept by the core itself
//! and published through a `watch` ([`History`]).
//!
//! Not as messages: the observer writes files (fsynced, on a disk that
//! may be slow, full or read-only) and may lag behind a burst of commands.
//! A queue would then either drop an event, and with it a count the
//! metrics must not miss, or make the core wait, or grow without bound.
//! Here the counts are cumulative and the rest is "latest wins", so a
//! lagging observer reads everything it missed when it next looks, the
//! core never waits, and the record stays the size of the command table.

use super::snapshot::{CommandResult, unix_secs};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;
use tokio::sync::watch;

/// The core's end of the record (the observer holds the receiver).
pub type History = watch::Sender<CommandHistory>;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommandHistory {
    /// The running command's log once it is launched; `None` when idle.
    pub log: Option<PathBuf>,
    /// The last result of each command kind that ran, by name.
    pub last_results: BTreeMap<String, CommandResult>,
    /// The last command that activated a system (switch, boot, rollback, …).
    pub last_switch: Option<CommandResult>,
    /// Commands finished since the agent started, by command, then
    /// `ok` / `error`.
    pub finished: BTreeMap<String, BTreeMap<String, u64>>,
    /// Safe deployments rolled back, by result (`ok` / `failed`).
    pub rollbacks: BTreeMap<String, u64>,
}

/// A command's end as the core saw it.
#[derive(Debug)]
pub struct CommandEnd {
    pub command: String,
    pub ok: bool,
    pub exit_code: i32,
    pub message: String,
    /// A switch, boot or rollback: counts as the last switch.
    pub activates: bool,
    /// When it started.
    pub started: Option<SystemTime>,
}

impl CommandHistory {
    pub fn launched(&mut self, log: Option<PathBuf>) {
        self.log = log;
    }

    /// The command ended without a result of its own (cut short, to run
    /// again): its log is no longer the running one.
    pub fn idle(&mut self) {
        self.log = None;
    }

    /// A command ended (at `now`): its result, counted.
    pub fn finished(&mut self, end: CommandEnd, now: SystemTime) {
        let duration_secs = end
            .started
            .and_then(|started| now.duration_since(started).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        let result = CommandResult {
            command: end.command.clone(),
            finished: unix_secs(now),
            ok: end.ok,
            exit_code: end.exit_code,
            message: end.message,
            duration_secs,
        };
        let outcome = if end.ok { "ok" } else { "error" };
        *self
            .finished
            .entry(end.command.clone())
            .or_default()
            .entry(outcome.to_owned())
            .or_default() += 1;
        if end.activates {
            self.last_switch = Some(result.clone());
        }
        self.last_results.insert(end.command, result);
        self.log = None;
    }

    /// A safe deployment was rolled back (by the agent or, reported by the
    /// next agent, by the timer), or the rollback ended in an error.
    pub fn rolled_back(&mut self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        *self.rollbacks.entry(result.to_owned()).or_default() += 1;
    }
}
