//! The agent core: the one task that owns "what is running", decides on
//! every command from the dashboard, and wires the other parts together.
//!
//! ```text
//!  dashboard ⇄ Connection ──inbound──▶ Core ──spawns──▶ command task
//!                 ▲   ▲                 │  ▲                 │
//!                 │   └──replies────────┘  └──progress───────┘
//!                 └──────── Outbox ◀──── output lines, progress
//!                 └──────── command state (watch) for heartbeats
//! ```

use crate::commands::follow::follow;
use crate::commands::handover::{self, CommandRecord, follow_legacy};
use crate::commands::launch::Followed;
use crate::commands::{CommandKind, Progress, Runner, StopRequest, output_frame};
use crate::config::Config;
use crate::connection::{Connection, Control, LinkState, Links};
use crate::footprint;
use crate::heartbeat::{AgentIdentity, CommandState, Reporter};
use crate::outbox::DeliveryCursor;
use crate::outbox::Outbox;
use crate::protocol::{CommandRejected, Inbound, KillSignal, Outbound, Outcome, Status, Stream};
use crate::self_image::SelfImage;
use crate::shutdown;
use crate::status::{Compartments, LockAnswer};
use crate::systemd::{CommandStatus, ConnectionStatus, StatusLine, Systemd};
use crate::ticker::Ticker;
use crate::watchdog::{Probe, Prober, probe_channel};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Exit code when the agent restarts itself to become the version a switch
/// installed (EX_TEMPFAIL): non-zero, so `Restart=on-failure` would restart
/// it too, and easy to tell apart in the journal.
pub const EXIT_RESTART: u8 = 75;
/// How long a restart after a switch waits for the status to reach the
/// dashboard. If it cannot, the record in `state_dir` lets the next
/// instance send it.
const RESTART_DELIVERY_WAIT: Duration = Duration::from_secs(30);
/// Between accepting `reboot` and asking systemd for it: time for the
/// status to reach the dashboard.
const REBOOT_DELAY: Duration = Duration::from_secs(3);
/// How often the status compartments are re-read from their files.
const COMPARTMENT_TICK: Duration = Duration::from_secs(60);
/// The message of every stopped command's status.
const STOPPED_BY_USER: &str = "Stopped by user";

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(config: Config) -> ExitCode {
    let config = Arc::new(config);
    let outbox = Arc::new(Outbox::default());
    let (inbound_tx, inbound_rx) = mpsc::channel(64);
    let (replies_tx, replies_rx) = mpsc::channel(64);
    let (command_state_tx, command_state_rx) = watch::channel(CommandState::default());
    let (link_state_tx, link_state_rx) = watch::channel(LinkState::Connecting);
    let (shutdown_tx, shutdown_rx) = shutdown::channel();
    let (core_prober, core_probes) = probe_channel("core");
    let (connection_prober, connection_probes) = probe_channel("connection");
    let (control_tx, control_rx) = mpsc::channel(16);
    let (lock_answers_tx, lock_answers_rx) = mpsc::channel(4);

    let runner = Arc::new(Runner::new(config.clone(), outbox.clone()));
    let (compartments, update_status) = Compartments::new(
        config.repo_dir.clone(),
        config.branch.clone(),
        config.state_dir.clone(),
        runner.shared_child_env(),
        lock_answers_tx,
    );
    let identity = AgentIdentity::detect();
    let reporter = Reporter::new(&config, identity.clone()).with_update_status(update_status);
    let connection = Connection::new(
        config.clone(),
        reporter,
        Links {
            inbound: inbound_tx,
            replies: replies_rx,
            outbox: outbox.clone(),
            command_state: command_state_rx.clone(),
            link_state: link_state_tx,
            probes: connection_probes,
            shutdown: shutdown_rx.clone(),
            control: control_rx,
        },
    );
    let connection = tokio::spawn(connection.run());
    tokio::spawn(release_startup_memory_once_connected(link_state_rx.clone()));
    let shutdown_tx = Arc::new(shutdown_tx);
    tokio::spawn(shutdown::on_signals(shutdown_tx.clone()));

    let self_image = SelfImage::capture();
    if self_image.watches_a_unit() {
        info!("will restart after a switch that changes this agent's unit or binary");
    }
    let mut core = Core {
        runner,
        outbox,
        replies: replies_tx,
        command_state: command_state_tx,
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
        compartments,
        control: control_tx,
        identity,
        allow_reboot: config.allow_reboot,
    };
    core.adopt_previous();
    let systemd = tokio::spawn(report_to_systemd(
        Systemd::from_env(),
        config.url.clone(),
        link_state_rx,
        command_state_rx,
        [core_prober, connection_prober],
        shutdown_rx.clone(),
    ));
    let ending = core
        .run(
            inbound_rx,
            lock_answers_rx,
            shutdown_rx.clone(),
            core_probes,
        )
        .await;
    // A restart stops the connection the same way as a shutdown (close
    // 1000); after a signal this is already set.
    shutdown_tx.send_replace(true);
    // The connection sends the close frame and waits for the answer.
    let _ = connection.await;
    let _ = systemd.await;
    match ending {
        Ending::Shutdown => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Ending::Restart => {
            info!("exiting so that systemd starts the new version");
            ExitCode::from(EXIT_RESTART)
        }
    }
}

/// Once the first connection is up, start-up is over: what runs from here
/// on is the idle loop (see `footprint`).
async fn release_startup_memory_once_connected(mut link_state: watch::Receiver<LinkState>) {
    if link_state
        .wait_for(|state| matches!(state, LinkState::Connected))
        .await
        .is_err()
    {
        return;
    }
    match footprint::release_startup_memory() {
        Ok(released) => debug!(
            mappings = released.mappings,
            resident_kib = released.resident_kib,
            "released the pages only start-up used"
        ),
        Err(error) => debug!(%error, "cannot release start-up memory"),
    }
}

/// The next tick of a ticker that may not exist (then never).
async fn tick_if_any(ticker: &mut Option<Ticker>) -> std::io::Result<()> {
    match ticker {
        Some(ticker) => ticker.tick().await,
        None => std::future::pending().await,
    }
}

/// Tells systemd the truth about the agent: READY once the loops run (not
/// waiting for the dashboard, which may be down at boot), a STATUS= line
/// that follows the connection and the command, WATCHDOG=1 only while the
/// core and the connection answer probes, STOPPING=1 at the end.
async fn report_to_systemd(
    systemd: Systemd,
    url: String,
    mut link_state: watch::Receiver<LinkState>,
    mut command_state: watch::Receiver<CommandState>,
    loops: [Prober; 2],
    mut shutdown: shutdown::Listener,
) {
    let mut line = StatusLine::new(url.clone());
    line.publish(&systemd);
    systemd.ready();
    let watchdog_interval = systemd.watchdog_interval();
    let mut watchdog = watchdog_interval.map(Ticker::new);
    loop {
        tokio::select! {
            () = shutdown::requested(&mut shutdown) => break,
            Ok(()) = link_state.changed() => {
                let connection = match &*link_state.borrow_and_update() {
                    LinkState::Connecting => ConnectionStatus::Connecting { url: url.clone() },
                    LinkState::Connected => ConnectionStatus::Connected { url: url.clone() },
                    LinkState::Reconnecting { delay, error } => ConnectionStatus::reconnecting(*delay, error.clone()),
                };
                line.set_connection(connection);
            }
            Ok(()) = command_state.changed() => {
                let state = command_state.borrow_and_update();
                line.set_command(state.name.as_ref().map(|name| CommandStatus {
                    name: name.clone(),
                    since: state.since.unwrap_or_else(SystemTime::now),
                    pid: state.pid,
                }));
            }
            Ok(()) = tick_if_any(&mut watchdog) => {
                let patience = watchdog_interval.unwrap_or_default() / 2;
                let answers = futures_util::future::join_all(loops.iter().map(|l| l.check(patience))).await;
                match answers.iter().find_map(|a| a.err()) {
                    None => systemd.watchdog_ping(),
                    Some(stuck) => warn!("the {stuck} loop did not answer; withholding the watchdog ping"),
                }
            }
        }
        line.publish(&systemd);
    }
    line.set_stopping();
    line.publish(&systemd);
    systemd.stopping();
}

struct Core {
    runner: Arc<Runner>,
    outbox: Arc<Outbox>,
    /// Frames for the connection to send ahead of output.
    replies: mpsc::Sender<String>,
    command_state: watch::Sender<CommandState>,
    running: Option<Running>,
    state_dir: PathBuf,
    repo_dir: PathBuf,
    branch: String,
    stop_grace: Duration,
    self_image: SelfImage,
    /// How often an idle agent compares itself with `self_image` (the
    /// heartbeat interval).
    self_check_every: Duration,
    /// What the last idle comparison found changed; a restart needs the
    /// same finding twice in a row.
    suspected_replacement: Option<String>,
    /// Delivery ticket of the last status queued.
    last_status: Option<u64>,
    /// Set after a switch that replaced this agent, or on `restart`: exit
    /// once the status with this delivery ticket has reached the dashboard.
    restart: Option<u64>,
    /// `restart` arrived while a command ran: restart when it has ended.
    restart_after_command: bool,
    compartments: Compartments,
    /// Asks the connection for a heartbeat or a fresh register.
    control: mpsc::Sender<Control>,
    identity: AgentIdentity,
    allow_reboot: bool,
}

/// Why the core stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Shutdown,
    Restart,
}

/// The command in progress.
struct Running {
    kind: CommandKind,
    since: SystemTime,
    /// The process the command runs now (reported in heartbeats).
    pid: Option<u32>,
    /// The command's supervisor, which the running-command record names.
    supervisor: Option<u32>,
    stop: watch::Sender<Option<StopRequest>>,
    progress: mpsc::Receiver<Progress>,
    /// Whether `nixos-rebuild` ran and succeeded (for the system
    /// compartment: a pull-switch whose pull failed changed nothing).
    rebuilt: Option<bool>,
    /// Started by a previous instance: no `Rebuilt` report will come.
    adopted: bool,
}

impl Core {
    async fn run(
        &mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut lock_answers: mpsc::Receiver<LockAnswer>,
        mut shutdown: shutdown::Listener,
        mut probes: mpsc::Receiver<Probe>,
    ) -> Ending {
        // On the heartbeat's grid (ticker.rs): checks share its wake-ups.
        // The self-check only exists where there is a unit to compare with.
        let mut self_check = self
            .self_image
            .watches_a_unit()
            .then(|| Ticker::on_grid(self.self_check_every));
        let mut tick = Ticker::on_grid(COMPARTMENT_TICK);
        let ending = loop {
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

    /// Takes over a command that a previous instance started and that may
    /// still be running (or ended without its status being delivered).
    fn adopt_previous(&mut self) {
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
        let (stop_tx, mut stop_rx) = watch::channel(None);
        let (progress_tx, progress_rx) = mpsc::channel(8);
        let (repo_dir, grace) = (self.repo_dir.clone(), self.stop_grace);
        // Never report (nor let kill_command name) a pid that is not ours.
        let ours = running.then_some(record.pid);
        let (legacy_pid, supervisor_pid) = if record.supervised {
            (None, ours)
        } else {
            (ours, None)
        };
        match (record.supervised, record.log.clone()) {
            (true, Some(log)) => {
                let (cursor, resume_at) = match DeliveryCursor::resume(&handover::sent_path(
                    &self.state_dir,
                )) {
                    Ok(resumed) => resumed,
                    Err(error) => {
                        warn!(error = %error, "cannot open the delivery cursor; not following the command");
                        CommandRecord::clear(&self.state_dir, None);
                        return;
                    }
                };
                let followed = Followed {
                    kind,
                    log,
                    // A supervisor that is not ours (or gone) is never
                    // waited for: its log is read to the end, no further.
                    supervisor: running.then_some((record.pid, record.pid_start)),
                    resume_at,
                    log_id: self.outbox.track(cursor),
                    stop_file: handover::stop_path(&self.state_dir),
                    repo_dir,
                    branch: self.branch.clone(),
                };
                let outbox = self.outbox.clone();
                tokio::spawn(async move {
                    let status = follow(followed, &outbox, &progress_tx, &mut stop_rx).await;
                    let _ = progress_tx.send(Progress::Finished(status)).await;
                });
            }
            _ => {
                tokio::spawn(async move {
                    let status = follow_legacy(record, kind, repo_dir, grace, &mut stop_rx).await;
                    let _ = progress_tx.send(Progress::Finished(status)).await;
                });
            }
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

    fn handle(&mut self, message: Inbound) {
        match message {
            Inbound::Command { command } => match command.as_str() {
                // `kill` is what a v3 dashboard's kill button sends.
                "stop" | "kill" => self.stop(StopRequest::Terminate),
                "restart" => self.restart_requested(),
                "reboot" => self.reboot(),
                "check-version" => self.check_version(),
                _ => self.start(&command),
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
            Inbound::Registered { .. } | Inbound::Unknown { .. } => {}
        }
    }

    fn start(&mut self, name: &str) {
        let Some(kind) = CommandKind::parse(name) else {
            let shown: String = name.chars().take(64).collect();
            warn!(command = ?shown, "rejecting an unknown command");
            self.reject(format!("unknown command: {shown}"));
            return;
        };
        if self.running.is_some() {
            self.reject("command already running".to_owned());
            return;
        }
        if self.restart.is_some() {
            self.reject("the agent is restarting".to_owned());
            return;
        }
        info!(command = kind.name(), "starting");
        let (stop_tx, mut stop_rx) = watch::channel(None);
        let (progress_tx, progress_rx) = mpsc::channel(8);
        let runner = self.runner.clone();
        tokio::spawn(async move {
            let status = runner.run(kind, &progress_tx, &mut stop_rx).await;
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

    /// `restart`: exit so that the service manager starts the agent again.
    /// A running command is never cut short: the command's output pipes
    /// end with this process, so it would die at its next line; the
    /// restart waits for it to end instead.
    fn restart_requested(&mut self) {
        let message = match &self.running {
            _ if self.restart.is_some() || self.restart_after_command => {
                "a restart is already under way".to_owned()
            }
            Some(running) => {
                self.restart_after_command = true;
                format!("restarting once {} has ended", running.kind.name())
            }
            None => "restarting".to_owned(),
        };
        info!("{message}");
        let ticket = self.send_status(
            Status {
                status: Outcome::Ok,
                command: "restart".to_owned(),
                exit_code: 0,
                message,
                generation: crate::host_facts::generation(&self.repo_dir),
            },
            Control::Heartbeat,
        );
        if self.running.is_none() && self.restart.is_none() {
            self.restart = Some(ticket);
        }
    }

    /// `reboot`, only where the configuration allows it: the status first,
    /// then `systemctl reboot` after a short delay.
    fn reboot(&mut self) {
        if !self.allow_reboot {
            warn!("refusing reboot: allow_reboot is off");
            self.reject(
                "reboot is not allowed on this host (set allow_reboot = true; NixOS: services.nixfleet.allowReboot)"
                    .to_owned(),
            );
            return;
        }
        warn!("reboot requested; rebooting in {}s", REBOOT_DELAY.as_secs());
        self.send_status(
            Status {
                status: Outcome::Ok,
                command: "reboot".to_owned(),
                exit_code: 0,
                message: format!("rebooting in {}s", REBOOT_DELAY.as_secs()),
                generation: crate::host_facts::generation(&self.repo_dir),
            },
            Control::Heartbeat,
        );
        let (outbox, runner) = (self.outbox.clone(), self.runner.clone());
        tokio::spawn(async move {
            tokio::time::sleep(REBOOT_DELAY).await;
            let result = tokio::process::Command::new("systemctl")
                .arg("reboot")
                .env_clear()
                .envs(runner.child_env().iter().map(|(k, v)| (k, v)))
                .stdin(std::process::Stdio::null())
                .output()
                .await;
            let failure = match result {
                Ok(out) if out.status.success() => None,
                Ok(out) => Some(format!(
                    "systemctl reboot failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                Err(error) => Some(format!("cannot run systemctl: {error}")),
            };
            if let Some(why) = failure {
                warn!("{why}");
                outbox.push_frame(output_frame(
                    "reboot",
                    Stream::Stderr,
                    &format!("[nixfleet] {why}"),
                ));
            }
        });
    }

    /// `check-version`: which agent runs, and whether the installed one is
    /// a different one (then `warning`: a restart would change it).
    fn check_version(&mut self) {
        let identity = &self.identity;
        let exe = std::fs::read_link("/proc/self/exe")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let lines = [
            format!("agent version {}", env!("CARGO_PKG_VERSION")),
            format!(
                "source commit {}",
                identity.source_commit.as_deref().unwrap_or("unknown")
            ),
            format!("binary {exe}"),
            format!(
                "store path {}",
                identity
                    .store_path
                    .as_deref()
                    .unwrap_or("(not in the Nix store)")
            ),
            format!(
                "binary sha256 {}",
                identity.binary_hash.as_deref().unwrap_or("unknown")
            ),
        ];
        for line in &lines {
            self.outbox
                .push_frame(output_frame("check-version", Stream::Stdout, line));
        }
        let (status, message) = match self.self_image.changed() {
            Some(why) => (
                Outcome::Warning,
                format!("a different agent is installed ({why}); restart to run it"),
            ),
            None if self.self_image.watches_a_unit() => (
                Outcome::Ok,
                "running the installed agent".to_owned(),
            ),
            None => (
                Outcome::Ok,
                "running; not started by a systemd unit, so there is no installed agent to compare with"
                    .to_owned(),
            ),
        };
        self.send_status(
            Status {
                status,
                command: "check-version".to_owned(),
                exit_code: 0,
                message,
                generation: crate::host_facts::generation(&self.repo_dir),
            },
            Control::Heartbeat,
        );
    }

    /// Queues a status after everything queued so far, and once it is
    /// delivered asks the connection for `then` (a heartbeat, or a fresh
    /// register). Returns its delivery ticket.
    fn send_status(&mut self, status: Status, then: Control) -> u64 {
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

    fn stop(&mut self, request: StopRequest) {
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

    fn on_progress(&mut self, progress: Progress) {
        match progress {
            Progress::Launched(record) => {
                if let Some(running) = &mut self.running {
                    running.supervisor = Some(record.pid);
                }
                record.save(&self.state_dir);
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
            } => self.compartments.tested(passed, total, stopped),
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

    fn finish(&mut self, status: Status) {
        let finished = self.running.take();
        self.publish_state();
        info!(command = %status.command, exit_code = status.exit_code, "finished: {}", status.message);
        let activated = finished.as_ref().is_some_and(|r| r.kind.activates());
        let succeeded = status.status == Outcome::Ok;
        if let Some(running) = &finished
            && running.kind.activates()
        {
            // An adopted command reports no `Rebuilt`: its status decides.
            // Otherwise only a rebuild that ran and failed counts (a
            // pull-switch whose pull failed changed nothing).
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
        self.compartments.stop_working();
        let mut then = Control::Heartbeat;
        let self_changed = if activated && succeeded {
            self.self_image.changed()
        } else {
            None
        };
        if activated && succeeded && self_changed.is_none() {
            then = Control::Reregister;
        }
        // Every output line of the command is already queued: the status
        // goes after them.
        let ticket = self.send_status(status, then);
        if self.restart_after_command {
            self.restart_after_command = false;
            self.restart = Some(ticket);
        }
        // The record stays until the status is out, so that an agent that
        // dies in between leaves it for the next one to send.
        let pid = finished.as_ref().and_then(|r| r.supervisor.or(r.pid));
        let (outbox, state_dir) = (self.outbox.clone(), self.state_dir.clone());
        tokio::spawn(async move {
            outbox.wait_delivered(ticket).await;
            CommandRecord::clear(&state_dir, pid);
        });
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

    /// The command's task ended without a status (it can only have
    /// panicked): still answer with exactly one status.
    fn runner_vanished(&mut self) {
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

    fn reject(&self, reason: String) {
        let (current_command, current_pid) = match &self.running {
            Some(running) => (running.kind.name().to_owned(), running.pid.unwrap_or(0)),
            None => (String::new(), 0),
        };
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

    fn publish_state(&self) {
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

/// The next progress report of the running command; never ready when idle.
async fn next_progress(running: &mut Option<Running>) -> Option<Progress> {
    match running {
        Some(running) => running.progress.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// Everything systemd would have received so far.
    fn datagrams(socket: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    async fn run_reporter(core_answers: bool) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_nonblocking(true).unwrap();
        // WatchdogSec=0.2 s: a ping is due every 100 ms.
        let systemd = Systemd::new(Some(path), Some(200_000), None);
        let (_link_tx, link_rx) = watch::channel(LinkState::Connecting);
        let (command_tx, command_rx) = watch::channel(CommandState::default());
        let (shutdown_tx, shutdown_rx) = shutdown::channel();
        let (core, mut core_probes) = probe_channel("core");
        let (connection, mut connection_probes) = probe_channel("connection");
        let answering = tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(p) = connection_probes.recv() => p.answer(),
                    Some(p) = core_probes.recv(), if core_answers => p.answer(),
                    else => break,
                }
            }
        });
        let reporter = tokio::spawn(report_to_systemd(
            systemd,
            "ws://dash/ws".into(),
            link_rx,
            command_rx,
            [core, connection],
            shutdown_rx,
        ));
        command_tx.send_replace(CommandState {
            name: Some("switch".into()),
            pid: Some(42),
            since: Some(SystemTime::UNIX_EPOCH),
        });
        tokio::time::sleep(Duration::from_millis(450)).await;
        shutdown_tx.send_replace(true);
        reporter.await.unwrap();
        answering.abort();
        datagrams(&socket)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn systemd_hears_ready_status_pings_and_stopping() {
        let seen = run_reporter(true).await;
        assert_eq!(
            seen.first().map(String::as_str),
            Some("STATUS=connecting to ws://dash/ws")
        );
        assert!(seen.contains(&"READY=1".to_owned()), "{seen:?}");
        assert!(
            seen.contains(
                &"STATUS=running switch since 00:00:00 UTC, pid 42; connecting to ws://dash/ws"
                    .to_owned()
            ),
            "{seen:?}"
        );
        assert!(
            seen.iter().filter(|d| *d == "WATCHDOG=1").count() >= 2,
            "{seen:?}"
        );
        assert_eq!(seen.last().map(String::as_str), Some("STOPPING=1"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_wedged_loop_gets_no_watchdog_pings() {
        let seen = run_reporter(false).await;
        assert!(seen.contains(&"READY=1".to_owned()), "{seen:?}");
        assert!(!seen.iter().any(|d| d == "WATCHDOG=1"), "{seen:?}");
    }
}
