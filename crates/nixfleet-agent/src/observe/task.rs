//! The task that owns the [`Snapshot`]: it hears of every change, writes
//! the state file when the snapshot changed, and the metrics file (when
//! configured) on the heartbeat's grid when its text changed.

use super::exposition::MetricsFile;
use super::flake_lock::FlakeLock;
use super::snapshot::{
    AgentInfo, CommandResult, Counters, Link, RunningCommand, Snapshot, unix_now, unix_secs,
};
use crate::config::Config;
use crate::connection::LinkState;
use crate::heartbeat::{AGENT_VERSION, CommandState};
use crate::outbox::Outbox;
use crate::protocol::UpdateStatus;
use crate::reboot;
use crate::shutdown;
use crate::ticker::Ticker;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tracing::warn;

/// What the core tells the observer (the link and the running command it
/// reads from their `watch`es).
#[derive(Debug)]
pub enum Observation {
    /// The running command's log.
    Launched { log: Option<PathBuf> },
    /// A command ended.
    Finished {
        command: String,
        ok: bool,
        exit_code: i32,
        message: String,
        /// A switch, boot or rollback: counts as the last switch.
        activates: bool,
        /// When it started (the command's `watch` may say idle already).
        started: Option<SystemTime>,
    },
    /// A safe deployment was rolled back (by the agent or, reported by
    /// the next agent, by the timer), or the rollback ended in an error.
    RolledBack { ok: bool },
}

/// What the observer follows of the other tasks' state.
pub struct Watched {
    pub link: watch::Receiver<LinkState>,
    pub command: watch::Receiver<CommandState>,
    /// The core's compartments, as published for heartbeats (they change
    /// a few times a day).
    pub compartments: watch::Receiver<UpdateStatus>,
    /// Where output lines are counted as they are acknowledged.
    pub outbox: Arc<Outbox>,
    /// The boot entries that differ from the booted system's, as the
    /// heartbeat's file facts last found them.
    pub reboot: watch::Receiver<Vec<&'static str>>,
}

pub struct Observer {
    snapshot: Snapshot,
    state_dir: PathBuf,
    metrics: Option<MetricsFile>,
    /// `repo_dir/flake.lock`, followed only for the metrics file.
    flake_lock: Option<FlakeLock>,
    /// Whether the state file is behind the snapshot.
    dirty: bool,
    /// A failed write is reported once, not at every change.
    write_failed: bool,
    metrics_failed: bool,
    link: watch::Receiver<LinkState>,
    command: watch::Receiver<CommandState>,
    compartments: watch::Receiver<UpdateStatus>,
    reboot: watch::Receiver<Vec<&'static str>>,
    /// Read when the metrics are written, not kept in the snapshot, so the
    /// state file is not rewritten for every batch a command sends.
    outbox: Arc<Outbox>,
}

impl Observer {
    pub fn new(config: &Config, source_commit: Option<String>, watched: Watched) -> Observer {
        let Watched {
            link,
            command,
            mut compartments,
            outbox,
            reboot,
        } = watched;
        let now = unix_now();
        let binary = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let snapshot = Snapshot {
            agent: AgentInfo {
                version: AGENT_VERSION.to_owned(),
                source_commit,
                binary,
                pid: std::process::id(),
                started: now,
            },
            url: config.url.clone(),
            interval_secs: config.interval.as_secs(),
            link: Link::Starting { since: now },
            running: None,
            last_results: BTreeMap::new(),
            last_switch: None,
            counters: Counters::default(),
            compartments: Some(compartments.borrow_and_update().clone()),
            needs_reboot: false,
            reboot_entries: Vec::new(),
        };
        Observer {
            snapshot,
            state_dir: config.state_dir.clone(),
            metrics: config.metrics_textfile.clone().map(MetricsFile::new),
            flake_lock: config
                .metrics_textfile
                .is_some()
                .then(|| FlakeLock::new(&config.repo_dir)),
            dirty: true,
            write_failed: false,
            metrics_failed: false,
            link,
            command,
            compartments,
            reboot,
            outbox,
        }
    }

    /// Runs until shutdown, then records that the agent stopped.
    pub async fn run(
        mut self,
        interval: Duration,
        mut observations: mpsc::Receiver<Observation>,
        mut shutdown: shutdown::Listener,
    ) {
        // On the heartbeat's grid, so a metrics write shares its wake-up;
        // no timer at all without a metrics file.
        let mut beat = self.metrics.is_some().then(|| Ticker::new(interval));
        if let Some(lock) = &mut self.flake_lock {
            lock.watch();
        }
        loop {
            self.save_if_dirty();
            tokio::select! {
                () = shutdown::requested(&mut shutdown) => break,
                Ok(()) = self.link.changed() => self.on_link(),
                Ok(()) = self.command.changed() => self.on_command(),
                Ok(()) = self.compartments.changed() => self.on_compartments(),
                Ok(()) = self.reboot.changed() => self.on_compartments(),
                Some(observation) = observations.recv() => self.on_observation(observation),
                Ok(()) = async { beat.as_mut().expect("guarded").tick().await }, if beat.is_some() => {
                    self.write_metrics();
                }
                // Marks the lock file due; it is read at the next write.
                () = lock_changed(self.flake_lock.as_mut()) => {}
            }
        }
        self.snapshot.link = Link::Stopped { since: unix_now() };
        self.dirty = true;
        self.save_if_dirty();
        self.write_metrics();
    }

    fn on_link(&mut self) {
        let state = self.link.borrow_and_update().clone();
        let now = unix_now();
        let was_connected = self.snapshot.link.is_connected();
        let next = match state {
            LinkState::Connected => {
                self.snapshot.counters.connects += 1;
                Link::Connected { since: now }
            }
            LinkState::Connecting if was_connected => {
                // Closed on purpose to register again at once.
                self.count_disconnect("reregister");
                return;
            }
            LinkState::Connecting => return,
            LinkState::Reconnecting {
                delay,
                error,
                reason,
            } => {
                if was_connected {
                    self.count_disconnect(reason);
                }
                let since = match self.snapshot.link {
                    Link::Disconnected { since, .. } => since,
                    _ => now,
                };
                Link::Disconnected {
                    since,
                    error,
                    reason: reason.to_owned(),
                    next_retry: now + delay.as_secs_f64().ceil() as u64,
                }
            }
        };
        self.snapshot.link = next;
        self.dirty = true;
    }

    /// The compartments as heartbeats carry them: the core's, with the
    /// reboot need in the system compartment's message.
    fn on_compartments(&mut self) {
        let entries = self.reboot.borrow_and_update().clone();
        let mut status = self.compartments.borrow_and_update().clone();
        reboot::annotate(&mut status.system, &entries);
        self.snapshot.compartments = Some(status);
        self.snapshot.needs_reboot = !entries.is_empty();
        self.snapshot.reboot_entries = entries.into_iter().map(str::to_owned).collect();
        self.dirty = true;
    }

    fn count_disconnect(&mut self, reason: &str) {
        *self
            .snapshot
            .counters
            .disconnects
            .entry(reason.to_owned())
            .or_default() += 1;
        self.dirty = true;
    }

    fn on_command(&mut self) {
        let state = self.command.borrow_and_update().clone();
        let running = state.name.map(|command| {
            let log = self
                .snapshot
                .running
                .as_ref()
                .filter(|r| r.command == command)
                .and_then(|r| r.log.clone());
            RunningCommand {
                command,
                pid: state.pid,
                started: state.since.map_or_else(unix_now, unix_secs),
                log,
            }
        });
        if running != self.snapshot.running {
            self.snapshot.running = running;
            self.dirty = true;
        }
    }

    fn on_observation(&mut self, observation: Observation) {
        match observation {
            Observation::Launched { log } => {
                if let Some(running) = &mut self.snapshot.running {
                    running.log = log;
                    self.dirty = true;
                }
            }
            finished @ Observation::Finished { .. } => self.on_finished(finished),
            Observation::RolledBack { ok } => {
                let result = if ok { "ok" } else { "failed" };
                *self
                    .snapshot
                    .counters
                    .rollbacks
                    .entry(result.to_owned())
                    .or_default() += 1;
                self.dirty = true;
            }
        }
    }

    fn on_finished(&mut self, finished: Observation) {
        let Observation::Finished {
            command,
            ok,
            exit_code,
            message,
            activates,
            started,
        } = finished
        else {
            return;
        };
        let now = SystemTime::now();
        let duration_secs = started
            .and_then(|started| now.duration_since(started).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        let result = CommandResult {
            command: command.clone(),
            finished: unix_secs(now),
            ok,
            exit_code,
            message,
            duration_secs,
        };
        let outcome = if ok { "ok" } else { "error" };
        let counters = &mut self.snapshot.counters.commands;
        *counters
            .entry(command.clone())
            .or_default()
            .entry(outcome.to_owned())
            .or_default() += 1;
        if activates {
            self.snapshot.last_switch = Some(result.clone());
        }
        self.snapshot.last_results.insert(command, result);
        self.dirty = true;
        if let Some(lock) = &mut self.flake_lock {
            lock.command_ended();
        }
    }

    fn save_if_dirty(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        match self.snapshot.save(&self.state_dir) {
            Ok(()) => self.write_failed = false,
            Err(error) if !self.write_failed => {
                self.write_failed = true;
                warn!(%error, dir = %self.state_dir.display(), "cannot write the status record");
            }
            Err(_) => {}
        }
    }

    fn write_metrics(&mut self) {
        let Some(metrics) = &mut self.metrics else {
            return;
        };
        let lock = self.flake_lock.as_mut().and_then(FlakeLock::newest);
        match metrics.refresh(&self.snapshot, self.outbox.line_counts(), lock) {
            Ok(_) => self.metrics_failed = false,
            Err(error) if !self.metrics_failed => {
                self.metrics_failed = true;
                warn!(%error, "cannot write the metrics file (metrics_textfile)");
            }
            Err(_) => {}
        }
    }
}

/// Something happened beside the lock file; never without one.
async fn lock_changed(lock: Option<&mut FlakeLock>) {
    match lock {
        Some(lock) => lock.changed().await,
        None => std::future::pending().await,
    }
}
