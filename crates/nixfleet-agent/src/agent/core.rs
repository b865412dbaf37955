//! The agent core: the one task that owns "what is running" and decides
//! on every request from the dashboard. Adopting a predecessor's command
//! (adopt.rs), a command's end (finish.rs) and the agent's own requests
//! (requests.rs) are its other rooms.

use super::confirm::Confirmation;
use super::systemd_report::tick_if_any;
use crate::activation::Record;
use crate::commands::plan::Planned;
use crate::commands::{CommandKind, Progress, Request, Runner, StopRequest};
use crate::config::Config;
use crate::connection::{Control, LinkState};
use crate::heartbeat::{AgentIdentity, CommandState};
use crate::observe::History;
use crate::outbox::Outbox;
use crate::protocol::{CommandRejected, Inbound, KillSignal, Outbound};
use crate::self_image::SelfImage;
use crate::shutdown;
use crate::status::{Compartments, LockAnswer};
use crate::ticker::Ticker;
use crate::watchdog::Probe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// How long a restart after a switch waits for the status to reach the
/// dashboard. If it cannot, the record in `state_dir` lets the next
/// instance send it.
const RESTART_DELIVERY_WAIT: Duration = Duration::from_secs(30);
/// How often the status compartments are re-read from their files.
const COMPARTMENT_TICK: Duration = Duration::from_secs(60);

/// The other tasks the core works with.
pub(super) struct CoreLinks {
    pub(super) runner: Arc<Runner>,
    pub(super) outbox: Arc<Outbox>,
    pub(super) replies: mpsc::Sender<String>,
    pub(super) command_state: watch::Sender<CommandState>,
    pub(super) compartments: Compartments,
    pub(super) control: mpsc::Sender<Control>,
    pub(super) identity: AgentIdentity,
    pub(super) history: History,
    pub(super) link_state: watch::Receiver<LinkState>,
}

/// What the core listens to.
pub(super) struct CoreInputs {
    pub(super) inbound: mpsc::Receiver<Inbound>,
    pub(super) lock_answers: mpsc::Receiver<LockAnswer>,
    pub(super) shutdown: shutdown::Listener,
    pub(super) probes: mpsc::Receiver<Probe>,
}

pub(super) struct Core {
    pub(super) runner: Arc<Runner>,
    pub(super) outbox: Arc<Outbox>,
    /// Frames for the connection to send ahead of output.
    pub(super) replies: mpsc::Sender<String>,
    pub(super) command_state: watch::Sender<CommandState>,
    pub(super) running: Option<Running>,
    pub(super) state_dir: PathBuf,
    pub(super) repo_dir: PathBuf,
    pub(super) branch: String,
    pub(super) stop_grace: Duration,
    pub(super) self_image: SelfImage,
    /// How often an idle agent compares itself with `self_image` (the
    /// heartbeat interval).
    pub(super) self_check_every: Duration,
    /// What the last idle comparison found changed; a restart needs the
    /// same finding twice in a row.
    pub(super) suspected_replacement: Option<String>,
    /// Delivery ticket of the last status queued.
    pub(super) last_status: Option<u64>,
    /// Set after a switch that replaced this agent, or on `restart`: exit
    /// once the status with this delivery ticket has reached the dashboard.
    pub(super) restart: Option<u64>,
    /// `restart` arrived while a command ran: restart when it has ended.
    pub(super) restart_after_command: bool,
    pub(super) compartments: Compartments,
    /// Asks the connection for a heartbeat or a fresh register.
    pub(super) control: mpsc::Sender<Control>,
    pub(super) identity: AgentIdentity,
    pub(super) allow_reboot: bool,
    /// Commands' logs, results and counts, for `status` and the metrics
    /// (the observer reads it when it gets to it).
    pub(super) history: History,
    /// Safe deployments: the activation recorded, armed or rolled back
    /// (mirrors the record in `state_dir`; see `safe_deploy.rs`).
    pub(super) activation: Option<Record>,
    pub(super) confirm_timeout: Duration,
    /// Waits for a connection that confirms an armed activation.
    pub(super) confirmation: Confirmation,
    /// The deadline passed while a command ran: roll back when it ends.
    pub(super) rollback_due: bool,
    /// `rollback_on_failed_tests`.
    pub(super) rollback_on_failed_tests: bool,
    /// A switch succeeded: run the tests once it has ended.
    pub(super) test_after_switch: bool,
    /// The running `test` command checks a switch.
    pub(super) testing_activation: bool,
    /// The scripts the last `test` command found failing.
    pub(super) failed_tests: Vec<String>,
    /// Held for the agent's life (see `activation::timer`).
    pub(super) activation_lock: Option<std::fs::File>,
    /// The take-over at start waits for the rollback timer's lock
    /// (activation_lock.rs).
    pub(super) lock_wait: Option<LockWait>,
    /// Whether "no systemd timer" was logged already.
    pub(super) told_no_timer: bool,
}

/// Why the core stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    Shutdown,
    Restart,
}

/// The command in progress.
pub(super) struct Running {
    pub(super) kind: CommandKind,
    pub(super) since: SystemTime,
    /// The process the command runs now (reported in heartbeats).
    pub(super) pid: Option<u32>,
    /// The command's supervisor, which the running-command record names.
    pub(super) supervisor: Option<u32>,
    pub(super) stop: watch::Sender<Option<StopRequest>>,
    pub(super) progress: mpsc::Receiver<Progress>,
    /// Whether `nixos-rebuild` ran and succeeded (for the system
    /// compartment: a pull-switch whose pull failed changed nothing).
    pub(super) rebuilt: Option<bool>,
    /// Started by a previous instance: no `Rebuilt` report will come.
    pub(super) adopted: bool,
}

impl Core {
    pub(super) fn new(config: &Config, links: CoreLinks) -> Self {
        let self_image = SelfImage::capture();
        if self_image.watches_a_unit() {
            info!("will restart after a switch that changes this agent's unit or binary");
        }
        Core {
            runner: links.runner,
            outbox: links.outbox,
            replies: links.replies,
            command_state: links.command_state,
            running: None,
            state_dir: config.state_dir.clone(),
            repo_dir: config.repo_dir.clone(),
            branch: config.branch.clone(),
            stop_grace: config.stop_grace,
            self_image,
            self_check_every: config.interval,
            suspected_replacement: None,
            last_status: None,
            restart: None,
            restart_after_command: false,
            compartments: links.compartments,
            control: links.control,
            identity: links.identity,
            allow_reboot: config.allow_reboot,
            history: links.history,
            activation: None,
            confirm_timeout: config.confirm_timeout,
            confirmation: Confirmation::new(links.link_state),
            rollback_due: false,
            rollback_on_failed_tests: config.rollback_on_failed_tests,
            test_after_switch: false,
            testing_activation: false,
            failed_tests: Vec::new(),
            activation_lock: None,
            lock_wait: None,
            told_no_timer: false,
        }
    }

    pub(super) async fn run(&mut self, inputs: CoreInputs) -> Ending {
        let CoreInputs {
            mut inbound,
            mut lock_answers,
            mut shutdown,
            mut probes,
        } = inputs;
        // On the heartbeat's grid (ticker.rs): checks share its wake-ups.
        // The self-check only exists where there is a unit to compare with.
        let mut self_check = self
            .self_image
            .watches_a_unit()
            .then(|| Ticker::on_grid(self.self_check_every));
        let mut tick = Ticker::on_grid(COMPARTMENT_TICK);
        let ending = loop {
            let armed = self.armed_deadline();
            let idle_and_watching = self.running.is_none()
                && self.restart.is_none()
                && self.self_image.watches_a_unit();
            tokio::select! {
                () = shutdown::requested(&mut shutdown) => break Ending::Shutdown,
                () = restart_due(&self.outbox, self.restart) => break Ending::Restart,
                Some(message) = inbound.recv() => self.handle(message),
                progress = next_progress(&mut self.running) => match progress {
                    Some(progress) => self.on_progress(progress),
                    None => self.runner_vanished(),
                },
                Some(answer) = lock_answers.recv() => self.compartments.on_lock_answer(answer),
                Ok(()) = tick.tick() => self.compartments.reevaluate(),
                Some(probe) = probes.recv() => probe.answer(),
                Ok(()) = tick_if_any(&mut self_check), if idle_and_watching => self.check_self_image(),
                verdict = self.confirmation.next(armed) => self.on_verdict(verdict),
                lock = lock_wait_ended(&mut self.lock_wait) => self.lock_waited(lock),
            }
        };
        if let Some(running) = &self.running {
            // Deliberately left running: a switch must not be cut short
            // because the agent restarts (the unit uses KillMode=process).
            // The record in state_dir lets the next instance follow it.
            info!(
                command = running.kind.name(),
                pid = running.pid,
                "leaving the running command to finish on its own"
            );
        }
        ending
    }

    /// Notices a switch this agent did not run (a manual `nixos-rebuild
    /// switch`, `system.autoUpgrade`): its unit or binary differs from the
    /// snapshot taken at start. It restarts the way it does after its own
    /// switch (a status still queued is delivered first), once the same
    /// change is seen at two checks in a row: the switch's activation then
    /// had an interval to reload systemd, so the restart starts the new
    /// version.
    fn check_self_image(&mut self) {
        let now = self.self_image.replaced_since_start();
        if let Some(why) = &now
            && self.suspected_replacement.as_ref() == Some(why)
        {
            info!(
                "this agent was replaced by a switch it did not run ({why}); restarting to run the new version"
            );
            self.restart = Some(self.last_status.unwrap_or(0));
        }
        self.suspected_replacement = now;
    }

    fn handle(&mut self, message: Inbound) {
        match message {
            Inbound::Command { command } => match Request::parse(&command) {
                Some(Request::Stop) => self.stop(StopRequest::Terminate),
                Some(Request::Restart) => self.restart_requested(),
                Some(Request::Reboot) => self.reboot(),
                Some(Request::CheckVersion) => self.check_version(),
                Some(Request::Run(kind)) => self.start(kind),
                None => {
                    let shown: String = command.chars().take(64).collect();
                    warn!(command = ?shown, "rejecting an unknown command");
                    self.reject(format!("unknown command: {shown}"));
                }
            },
            Inbound::KillCommand { signal, pid } => {
                let request = match signal {
                    KillSignal::Term => StopRequest::Terminate,
                    KillSignal::Kill => StopRequest::Kill,
                };
                match &self.running {
                    Some(running) if pid != 0 && Some(pid) != running.pid => {
                        // Never signal a pid that is not our command's.
                        warn!(
                            pid,
                            current = running.pid,
                            "kill_command for a pid that is not the running command; ignored"
                        );
                        self.reject(format!("pid {pid} is not the running command"));
                    }
                    _ => self.stop(request),
                }
            }
            Inbound::Registered { .. } => self.confirm("the dashboard answered register"),
            Inbound::Unknown { .. } => {}
        }
    }

    fn start(&mut self, kind: CommandKind) {
        // First: it says more than "command already running" during the
        // rollback.
        if let Some(reason) = self
            .waiting_refusal()
            .or_else(|| self.activation_refusal(kind))
        {
            self.reject(reason);
            return;
        }
        if self.running.is_some() {
            self.reject("command already running".to_owned());
            return;
        }
        if self.restart.is_some() {
            self.reject("the agent is restarting".to_owned());
            return;
        }
        if kind.activates() {
            self.record_before(kind);
        }
        self.launch(kind, None);
    }

    /// Starts a command: its own plan, or `plan` (the automatic rollback).
    pub(super) fn launch(&mut self, kind: CommandKind, plan: Option<Planned>) {
        info!(command = kind.name(), "starting");
        let (stop_tx, mut stop_rx) = watch::channel(None);
        let (progress_tx, progress_rx) = mpsc::channel(8);
        let runner = self.runner.clone();
        tokio::spawn(async move {
            let status = runner.run(kind, plan, &progress_tx, &mut stop_rx).await;
            let _ = progress_tx.send(Progress::Finished(status)).await;
        });
        self.running = Some(Running {
            kind,
            since: SystemTime::now(),
            pid: None,
            supervisor: None,
            stop: stop_tx,
            progress: progress_rx,
            rebuilt: None,
            adopted: false,
        });
        self.compartments
            .start_working(kind.compartments(), &format!("{} in progress", kind.name()));
        self.publish_state();
    }

    fn stop(&mut self, request: StopRequest) {
        if self.rolling_back() {
            // Safe deployments: the dashboard cannot cancel the rollback.
            self.reject(
                "the automatic rollback of an unconfirmed switch cannot be stopped".to_owned(),
            );
            return;
        }
        match &self.running {
            Some(running) => {
                info!(
                    command = running.kind.name(),
                    pid = running.pid,
                    ?request,
                    "stop requested"
                );
                running.stop.send_replace(Some(request));
            }
            None => self.reject("no command running".to_owned()),
        }
    }

    pub(super) fn reject(&self, reason: String) {
        let (current_command, current_pid) = match &self.running {
            Some(running) => (running.kind.name().to_owned(), running.pid.unwrap_or(0)),
            None => (String::new(), 0),
        };
        // The agent's own log is where an operator looks for why a button
        // did nothing: every refusal is there, with its reason (quoted: it
        // may carry a name the dashboard sent, which must not forge lines).
        info!(reason = ?reason, current_command = %current_command, "rejected a command");
        let frame = Outbound::CommandRejected(&CommandRejected {
            reason,
            current_command,
            current_pid,
        })
        .to_json();
        if self.replies.try_send(frame).is_err() {
            warn!("dropping a command_rejected reply: the connection is not keeping up");
        }
    }

    pub(super) fn publish_state(&self) {
        let state = match &self.running {
            Some(running) => CommandState {
                name: Some(running.kind.name().to_owned()),
                pid: running.pid,
                since: Some(running.since),
            },
            None => CommandState::default(),
        };
        self.command_state.send_replace(state);
    }
}

/// Completes when a pending restart may go ahead: the status was delivered,
/// or waiting for that took too long. Never completes without a restart.
async fn restart_due(outbox: &Outbox, restart: Option<u64>) {
    match restart {
        Some(ticket) => {
            if tokio::time::timeout(RESTART_DELIVERY_WAIT, outbox.wait_delivered(ticket))
                .await
                .is_err()
            {
                warn!(
                    "the status did not reach the dashboard in time; the next agent will send it"
                );
            }
        }
        None => std::future::pending().await,
    }
}

/// The activation lock, awaited off the runtime's thread
/// (activation_lock.rs).
pub(super) type LockWait = tokio::task::JoinHandle<std::io::Result<Option<std::fs::File>>>;

/// Completes when the wait for the lock ends; never when there is none.
async fn lock_wait_ended(wait: &mut Option<LockWait>) -> std::io::Result<Option<std::fs::File>> {
    match wait {
        Some(wait) => wait.await.map_err(std::io::Error::other)?,
        None => std::future::pending().await,
    }
}

/// The next progress report of the running command; never ready when idle.
async fn next_progress(running: &mut Option<Running>) -> Option<Progress> {
    match running {
        Some(running) => running.progress.recv().await,
        None => std::future::pending().await,
    }
}
