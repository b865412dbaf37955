//! The task that owns the [`Snapshot`]: it follows the other tasks'
//! `watch`es, writes the state file when the snapshot changed, and the
//! metrics file (when configured) on the heartbeat's grid when its text
//! changed. What it follows is latest-wins or cumulative (counts kept by
//! the task that counts), so however far behind its file writes leave it,
//! it misses no count and nobody waits for it.

use super::exposition::MetricsFile;
use super::flake_lock::FlakeLock;
use super::history::CommandHistory;
use super::snapshot::{AgentInfo, Counters, Link, RunningCommand, Snapshot, unix_now, unix_secs};
use crate::config::Config;
use crate::connection::{LinkCounts, LinkState};
use crate::heartbeat::{AGENT_VERSION, CommandState};
use crate::outbox::Outbox;
use crate::protocol::UpdateStatus;
use crate::reboot;
use crate::shutdown;
use crate::ticker::Ticker;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::warn;

/// What the observer follows of the other tasks' state.
pub struct Watched {
    pub link: watch::Receiver<LinkState>,
    /// Connections made and lost, counted by the connection.
    pub link_counts: watch::Receiver<LinkCounts>,
    pub command: watch::Receiver<CommandState>,
    /// Commands' logs, results and counts, kept by the core.
    pub history: watch::Receiver<CommandHistory>,
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
    link_counts: watch::Receiver<LinkCounts>,
    command: watch::Receiver<CommandState>,
    history: watch::Receiver<CommandHistory>,
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
            link_counts,
            command,
            history,
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
            link_counts,
            command,
            history,
            compartments,
            reboot,
            outbox,
        }
    }

    /// Runs until shutdown, then records that the agent stopped.
    pub async fn run(mut self, interval: Duration, mut shutdown: shutdown::Listener) {
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
                Ok(()) = self.link.changed() => self.on_link(true),
                Ok(()) = self.link_counts.changed() => {
                    let state_too = self.link.has_changed().unwrap_or(false);
                    self.on_link(state_too);
                }
                // Either way both are read: one write for a command's end.
                Ok(()) = self.command.changed() => self.on_commands(),
                Ok(()) = self.history.changed() => self.on_commands(),
                Ok(()) = self.compartments.changed() => self.on_compartments(),
                Ok(()) = self.reboot.changed() => self.on_compartments(),
                Ok(()) = async { beat.as_mut().expect("guarded").tick().await }, if beat.is_some() => {
                    self.write_metrics();
                }
                // Marks the lock file due; it is read at the next write.
                () = lock_changed(self.flake_lock.as_mut()) => {}
            }
        }
        // Whatever the other tasks counted that this task had not read yet
        // (nothing is counted after a shutdown request: the core has
        // stopped, and a session ended by shutdown is not a disconnect).
        self.on_link(false);
        self.on_commands();
        self.snapshot.link = Link::Stopped { since: unix_now() };
        self.dirty = true;
        self.save_if_dirty();
        self.write_metrics();
    }

    /// The connection's counts, and its state when that changed too.
    fn on_link(&mut self, state_changed: bool) {
        let counts = self.link_counts.borrow_and_update().clone();
        let counters = &mut self.snapshot.counters;
        let disconnects = counts
            .disconnects
            .iter()
            .map(|(reason, n)| ((*reason).to_owned(), *n))
            .collect();
        if counters.connects != counts.connects || counters.disconnects != disconnects {
            counters.connects = counts.connects;
            counters.disconnects = disconnects;
            self.dirty = true;
        }
        if state_changed {
            self.on_link_state();
        }
    }

    fn on_link_state(&mut self) {
        let state = self.link.borrow_and_update().clone();
        let now = unix_now();
        let next = match state {
            LinkState::Connected => Link::Connected { since: now },
            // Connecting after a connection was closed on purpose, to
            // register again at once, stays "connected" for a person.
            LinkState::Connecting => return,
            LinkState::Reconnecting {
                delay,
                error,
                reason,
            } => {
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

    /// The running command (its state, and its log once launched) and
    /// what the finished ones left: results and counts.
    fn on_commands(&mut self) {
        let state = self.command.borrow_and_update().clone();
        let history = self.history.borrow_and_update().clone();
        let running = state.name.map(|command| RunningCommand {
            command,
            pid: state.pid,
            started: state.since.map_or_else(unix_now, unix_secs),
            log: history.log.clone(),
        });
        if running != self.snapshot.running {
            self.snapshot.running = running;
            self.dirty = true;
        }
        let counters = &mut self.snapshot.counters;
        if history.finished != counters.commands {
            counters.commands = history.finished;
            if let Some(lock) = &mut self.flake_lock {
                lock.command_ended();
            }
            self.dirty = true;
        }
        if history.rollbacks != counters.rollbacks {
            counters.rollbacks = history.rollbacks;
            self.dirty = true;
        }
        if history.last_results != self.snapshot.last_results
            || history.last_switch != self.snapshot.last_switch
        {
            self.snapshot.last_results = history.last_results;
            self.snapshot.last_switch = history.last_switch;
            self.dirty = true;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::CommandState;

    /// Reconnects faster than the observer runs (here: all before it gets
    /// a turn on this runtime's one thread) are all counted: the link's
    /// state alone would show only the last one.
    #[tokio::test]
    async fn reconnects_the_observer_did_not_see_one_by_one_are_all_counted() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let config = crate::config::for_test(dir.path(), &state_dir);
        let (link_tx, link) = watch::channel(LinkState::Connecting);
        let (counts_tx, link_counts) = watch::channel(LinkCounts::default());
        let (_command_tx, command) = watch::channel(CommandState::default());
        let (_history_tx, history) = watch::channel(CommandHistory::default());
        let (_compartments_tx, compartments) = watch::channel(UpdateStatus::default());
        let (_reboot_tx, reboot) = watch::channel(Vec::new());
        let watched = Watched {
            link,
            link_counts,
            command,
            history,
            compartments,
            outbox: Arc::new(Outbox::default()),
            reboot,
        };
        let (shutdown_tx, shutdown_rx) = shutdown::channel();
        let observer = Observer::new(&config, None, watched);
        let observer = tokio::spawn(observer.run(config.interval, shutdown_rx));

        // As the connection does it: count, then say so.
        for _ in 0..5 {
            counts_tx.send_modify(|counts| counts.connects += 1);
            link_tx.send_replace(LinkState::Connected);
            counts_tx.send_modify(|counts| *counts.disconnects.entry("silent").or_default() += 1);
            link_tx.send_replace(LinkState::Reconnecting {
                delay: Duration::ZERO,
                error: "silent".to_owned(),
                reason: "silent",
            });
        }
        counts_tx.send_modify(|counts| counts.connects += 1);
        link_tx.send_replace(LinkState::Connected);
        tokio::task::yield_now().await;
        shutdown_tx.send_replace(true);
        observer.await.unwrap();

        let counters = Snapshot::load(&state_dir)
            .unwrap()
            .expect("a record")
            .counters;
        assert_eq!(counters.connects, 6);
        assert_eq!(
            counters.disconnects,
            BTreeMap::from([("silent".to_owned(), 5)])
        );
    }
}
