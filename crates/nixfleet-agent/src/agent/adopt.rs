//! A command a previous agent started: the record it left is adopted, and
//! the command followed from where its delivery stood (or, for a command
//! of an agent older than the supervisor, watched until it ends).

use super::core::{Core, Running};
use crate::commands::follow::follow;
use crate::commands::handover::{self, CommandRecord, follow_legacy};
use crate::commands::launch::Followed;
use crate::commands::{CommandKind, Progress, StopRequest};
use crate::outbox::DeliveryCursor;
use std::path::PathBuf;
use std::time::SystemTime;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

impl Core {
    /// Takes over a command that a previous instance started and that may
    /// still be running (or ended without its status being delivered); a
    /// rollback the timer runs is taken over once it ended (the lock:
    /// activation_lock.rs).
    pub(super) fn adopt_previous(&mut self) {
        let Some(record) = CommandRecord::load(&self.state_dir) else {
            return;
        };
        let Some(kind) = CommandKind::parse(&record.command) else {
            CommandRecord::clear(&self.state_dir, None);
            return;
        };
        let running = record.is_running();
        if running {
            info!(
                command = kind.name(),
                pid = record.pid,
                "following a command started by a previous agent"
            );
        } else {
            info!(
                command = kind.name(),
                pid = record.pid,
                "a command recorded by a previous agent is no longer running (or not ours); sending its status"
            );
        }
        // Never report (nor let kill_command name) a pid that is not ours.
        let ours = running.then_some(record.pid);
        // The supervisor's pid, even once it is gone, names the record to
        // clear once the status is out (not a step's pid from the log).
        let (legacy_pid, supervisor_pid) = if record.supervised {
            (None, Some(record.pid))
        } else {
            (ours, None)
        };
        let (stop_tx, stop_rx) = watch::channel(None);
        let (progress_tx, progress_rx) = mpsc::channel(8);
        match (record.supervised, record.log.clone()) {
            (true, Some(log)) => {
                // A supervisor that is not ours (or gone) is never waited
                // for: its log is read to the end, no further.
                let supervisor = running.then_some((record.pid, record.pid_start));
                if !self.follow_adopted(kind, log, supervisor, progress_tx, stop_rx) {
                    return;
                }
            }
            _ => self.watch_legacy(kind, record, progress_tx, stop_rx),
        }
        self.running = Some(Running {
            kind,
            since: SystemTime::now(),
            pid: legacy_pid,
            supervisor: supervisor_pid,
            stop: stop_tx,
            progress: progress_rx,
            rebuilt: None,
            adopted: true,
        });
        self.compartments
            .start_working(kind.compartments(), &format!("{} in progress", kind.name()));
        self.publish_state();
    }

    /// Follows a supervised command's log from the stored delivery cursor
    /// on; false when the cursor cannot be opened (the record is dropped).
    fn follow_adopted(
        &mut self,
        kind: CommandKind,
        log: PathBuf,
        supervisor: Option<(u32, u64)>,
        progress: mpsc::Sender<Progress>,
        mut stop: watch::Receiver<Option<StopRequest>>,
    ) -> bool {
        let (cursor, resume_at) = match DeliveryCursor::resume(&handover::sent_path(
            &self.state_dir,
        )) {
            Ok(resumed) => resumed,
            Err(error) => {
                warn!(error = %error, "cannot open the delivery cursor; not following the command");
                CommandRecord::clear(&self.state_dir, None);
                return false;
            }
        };
        let followed = Followed {
            kind,
            log,
            supervisor,
            resume_at,
            log_id: self.outbox.track(cursor),
            stop_file: handover::stop_path(&self.state_dir),
            repo_dir: self.repo_dir.clone(),
            branch: self.branch.clone(),
            relay: crate::commands::relay::RelayIn::new(None),
        };
        let outbox = self.outbox.clone();
        tokio::spawn(async move {
            let status = follow(followed, &outbox, &progress, &mut stop).await;
            let _ = progress.send(Progress::Finished(status)).await;
        });
        true
    }

    /// Watches a command of an older agent (no supervisor, no log records)
    /// until it ends.
    fn watch_legacy(
        &mut self,
        kind: CommandKind,
        record: CommandRecord,
        progress: mpsc::Sender<Progress>,
        mut stop: watch::Receiver<Option<StopRequest>>,
    ) {
        let (repo_dir, grace) = (self.repo_dir.clone(), self.stop_grace);
        tokio::spawn(async move {
            let status = follow_legacy(record, kind, repo_dir, grace, &mut stop).await;
            let _ = progress.send(Progress::Finished(status)).await;
        });
    }
}
