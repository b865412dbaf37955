//! A command's events as they reach the core, and its end: the status
//! queued after its output, the compartments told what it changed, the
//! running-command record cleared once the status is out, and a restart
//! when a switch replaced this agent.

use super::core::{Core, Running};
use crate::commands::handover::CommandRecord;
use crate::commands::{CommandKind, Progress};
use crate::connection::Control;
use crate::observe::CommandEnd;
use crate::protocol::{Outbound, Outcome, Status};
use tracing::info;

/// The message of every stopped command's status.
const STOPPED_BY_USER: &str = "Stopped by user";

impl Core {
    pub(super) fn on_progress(&mut self, progress: Progress) {
        match progress {
            Progress::Launched(record) => {
                // The record is on disk already (launch.rs saves it before
                // the supervisor gets its plan): only the core's view here.
                if let Some(running) = &mut self.running {
                    running.supervisor = Some(record.pid);
                }
                self.history
                    .send_modify(|history| history.launched(record.log));
            }
            Progress::Started { pid } => {
                let Some(running) = &mut self.running else {
                    return;
                };
                running.pid = Some(pid);
                self.publish_state();
            }
            Progress::Tested {
                passed,
                total,
                stopped,
                failed,
            } => {
                self.compartments.tested(passed, total, stopped);
                self.failed_tests = failed;
            }
            Progress::Lock(answer) => self.compartments.on_lock_answer(answer),
            Progress::System(verdict) => self.compartments.system_verified(verdict),
            Progress::Rebuilt { ok } => {
                if let Some(running) = &mut self.running {
                    running.rebuilt = Some(ok);
                }
            }
            Progress::Finished(status) => self.finish(status),
        }
    }

    /// A safe deployment rolled back, for `rollbacks_total`: the rollback's
    /// own result (its status says `error` either way, as the switch was
    /// undone).
    pub(super) fn count_rollback(&self, ok: bool) {
        self.history.send_modify(|history| history.rolled_back(ok));
    }

    fn finish(&mut self, status: Status) {
        self.end_command(status);
        // What waited for the command: a rollback, the tests of a switch.
        self.rollback_if_due();
        if self.restart.is_none() {
            self.test_if_due();
        }
    }

    fn end_command(&mut self, status: Status) {
        let finished = self.running.take();
        self.publish_state();
        let (status, rolled_back) =
            self.activation_ended(finished.as_ref().map(|r| r.kind), status);
        let Some(status) = status else {
            return self.superseded(&finished);
        };
        info!(command = %status.command, exit_code = status.exit_code, "finished: {}", status.message);
        let activated = finished.as_ref().is_some_and(|r| r.kind.activates());
        let succeeded = status.status == Outcome::Ok;
        self.remember_end(finished.as_ref(), &status);
        if let Some(running) = finished.as_ref().filter(|r| r.kind.activates()) {
            self.record_activation(running, &status);
        }
        if let Some(report) = &rolled_back {
            self.compartments.rolled_back(report);
        }
        self.compartments.stop_working();
        let self_changed = if activated && succeeded {
            self.self_image.changed()
        } else {
            None
        };
        let then = if activated && succeeded && self_changed.is_none() {
            Control::Reregister
        } else {
            Control::Heartbeat
        };
        // Every output line of the command is already queued: the status
        // goes after them.
        let ticket = self.send_status(status, then);
        if self.restart_after_command {
            self.restart_after_command = false;
            self.restart = Some(ticket);
        }
        self.clear_record_once_delivered(&finished, ticket);
        if !activated {
            return;
        }
        if let Some(why) = self_changed {
            info!("the switch updated this agent ({why}); restarting once the status is delivered");
            self.restart = Some(ticket);
        } else if !succeeded {
            // A failed switch never restarts the agent, not even later when
            // idle: the running agent stays to report and to roll back.
            // Whatever the switch left in place becomes the new baseline.
            self.self_image = self.self_image.rebased();
            self.suspected_replacement = None;
        }
    }

    /// The command's end in the history `status` and the metrics read.
    fn remember_end(&self, finished: Option<&Running>, status: &Status) {
        let end = CommandEnd {
            command: status.command.clone(),
            ok: status.status == Outcome::Ok,
            exit_code: status.exit_code,
            message: status.message.clone(),
            activates: finished.is_some_and(|r| r.kind.activates()),
            started: finished.map(|r| r.since),
        };
        let now = std::time::SystemTime::now();
        self.history
            .send_modify(|history| history.finished(end, now));
    }

    /// What an activating command changed, for the system compartment. An
    /// adopted command reports no `Rebuilt`: its status decides. Otherwise
    /// only a rebuild that ran and failed counts (a pull-switch whose pull
    /// failed changed nothing).
    fn record_activation(&mut self, running: &Running, status: &Status) {
        let succeeded = status.status == Outcome::Ok;
        match (running.rebuilt, succeeded) {
            (_, true) => self
                .compartments
                .activated(running.kind == CommandKind::Rollback),
            (Some(false), false) => self.compartments.activation_failed(&status.message),
            (None, false) if running.adopted && status.message != STOPPED_BY_USER => {
                self.compartments.activation_failed(&status.message)
            }
            _ => {}
        }
    }

    /// A rollback cut short, started again next: no status of its own, and
    /// its record makes way for the new run's.
    fn superseded(&mut self, finished: &Option<Running>) {
        let pid = finished.as_ref().and_then(|r| r.supervisor.or(r.pid));
        CommandRecord::clear(&self.state_dir, pid);
        self.history.send_modify(|history| history.idle());
        self.compartments.stop_working();
    }

    /// The record stays until the status is out, so that an agent that
    /// dies in between leaves it for the next one to send.
    fn clear_record_once_delivered(&self, finished: &Option<Running>, ticket: u64) {
        let pid = finished.as_ref().and_then(|r| r.supervisor.or(r.pid));
        let (outbox, state_dir) = (self.outbox.clone(), self.state_dir.clone());
        tokio::spawn(async move {
            outbox.wait_delivered(ticket).await;
            CommandRecord::clear(&state_dir, pid);
        });
    }

    /// The command's task ended without a status (it can only have
    /// panicked): still answer with exactly one status.
    pub(super) fn runner_vanished(&mut self) {
        let Some(running) = &self.running else { return };
        let status = Status {
            status: Outcome::Error,
            command: running.kind.name().to_owned(),
            exit_code: -1,
            message: "internal error: the command's task ended unexpectedly".to_owned(),
            generation: crate::host_facts::generation(&self.repo_dir),
        };
        self.finish(status);
    }

    /// Queues a status after everything queued so far, and once it is
    /// delivered asks the connection for `then` (a heartbeat, or a fresh
    /// register). Returns its delivery ticket.
    pub(super) fn send_status(&mut self, status: Status, then: Control) -> u64 {
        let ticket = self.outbox.push_frame(Outbound::Status(&status).to_json());
        // An idle restart (a switch this agent did not run) waits for it.
        self.last_status = Some(ticket);
        let (outbox, control) = (self.outbox.clone(), self.control.clone());
        tokio::spawn(async move {
            outbox.wait_delivered(ticket).await;
            let _ = control.send(then).await;
        });
        ticket
    }
}
