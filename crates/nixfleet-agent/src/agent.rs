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

use crate::commands::{CommandKind, Progress, Runner, StopRequest};
use crate::config::Config;
use crate::connection::{Connection, LinkState, Links};
use crate::handover::{CommandRecord, SelfImage, follow_adopted};
use crate::heartbeat::{AgentIdentity, CommandState, Reporter};
use crate::outbox::Outbox;
use crate::protocol::{CommandRejected, Inbound, KillSignal, Outbound, Outcome, Status};
use crate::shutdown;
use crate::systemd::{CommandStatus, ConnectionStatus, StatusLine, Systemd};
use crate::watchdog::{Probe, Prober, probe_channel};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// Exit code when the agent restarts itself to become the version a switch
/// installed (EX_TEMPFAIL): non-zero, so `Restart=on-failure` would restart
/// it too, and easy to tell apart in the journal.
pub const EXIT_RESTART: u8 = 75;
/// How long a restart after a switch waits for the status to reach the
/// dashboard. If it cannot, the record in `state_dir` lets the next
/// instance send it.
const RESTART_DELIVERY_WAIT: Duration = Duration::from_secs(30);

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

    let reporter = Reporter::new(&config, AgentIdentity::detect());
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
        },
    );
    let connection = tokio::spawn(connection.run());
    let shutdown_tx = Arc::new(shutdown_tx);
    tokio::spawn(shutdown::on_signals(shutdown_tx.clone()));

    let self_image = SelfImage::capture();
    if self_image.watches_a_unit() {
        info!("will restart after a switch that changes this agent's unit or binary");
    }
    let mut core = Core {
        runner: Arc::new(Runner::new(config.clone(), outbox.clone())),
        outbox,
        replies: replies_tx,
        command_state: command_state_tx,
        running: None,
        state_dir: config.state_dir.clone(),
        repo_dir: config.repo_dir.clone(),
        stop_grace: config.stop_grace,
        self_image,
        restart: None,
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
    let ending = core.run(inbound_rx, shutdown_rx.clone(), core_probes).await;
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
    let mut watchdog =
        tokio::time::interval(watchdog_interval.unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            _ = watchdog.tick(), if watchdog_interval.is_some() => {
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
    stop_grace: Duration,
    self_image: SelfImage,
    /// Set after a switch that replaced this agent: exit once the status
    /// with this delivery ticket has reached the dashboard.
    restart: Option<u64>,
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
    pid: Option<u32>,
    stop: watch::Sender<Option<StopRequest>>,
    progress: mpsc::Receiver<Progress>,
}

impl Core {
    async fn run(
        &mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut shutdown: shutdown::Listener,
        mut probes: mpsc::Receiver<Probe>,
    ) -> Ending {
        let ending = loop {
            tokio::select! {
                () = shutdown::requested(&mut shutdown) => break Ending::Shutdown,
                () = restart_due(&self.outbox, self.restart) => break Ending::Restart,
                Some(message) = inbound.recv() => self.handle(message),
                progress = next_progress(&mut self.running) => match progress {
                    Some(progress) => self.on_progress(progress),
                    None => self.runner_vanished(),
                },
                Some(probe) = probes.recv() => probe.answer(),
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
        let (progress_tx, progress_rx) = mpsc::channel(1);
        let (repo_dir, grace, pid) = (self.repo_dir.clone(), self.stop_grace, record.pid);
        tokio::spawn(async move {
            let status = follow_adopted(record, kind, repo_dir, grace, &mut stop_rx).await;
            let _ = progress_tx.send(Progress::Finished(status)).await;
        });
        self.running = Some(Running {
            kind,
            since: SystemTime::now(),
            // Never report (nor let kill_command name) a pid that is not ours.
            pid: running.then_some(pid),
            stop: stop_tx,
            progress: progress_rx,
        });
        self.publish_state();
    }

    fn handle(&mut self, message: Inbound) {
        match message {
            Inbound::Command { command } if command == "stop" => self.stop(StopRequest::Terminate),
            Inbound::Command { command } => self.start(&command),
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
            self.reject("the agent is restarting to run its new version".to_owned());
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
            stop: stop_tx,
            progress: progress_rx,
        });
        self.publish_state();
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
            Progress::Started { pid, log } => {
                let Some(running) = &mut self.running else {
                    return;
                };
                running.pid = Some(pid);
                match CommandRecord::new(running.kind.name(), pid, log) {
                    Some(record) => record.save(&self.state_dir),
                    // Already gone: the record of this command's previous
                    // process must not outlive it (the status would be
                    // cleared for this pid only, and sent again later).
                    None => CommandRecord::clear(&self.state_dir, None),
                }
                self.publish_state();
            }
            Progress::Finished(status) => self.finish(status),
        }
    }

    fn finish(&mut self, status: Status) {
        let finished = self.running.take();
        self.publish_state();
        info!(command = %status.command, exit_code = status.exit_code, "finished: {}", status.message);
        // Every output line of the command is already queued: the status
        // goes after them.
        let ticket = self
            .outbox
            .push_reliable(Outbound::Status(&status).to_json());
        // The record stays until the status is out, so that an agent that
        // dies in between leaves it for the next one to send.
        let pid = finished.as_ref().and_then(|r| r.pid);
        let (outbox, state_dir) = (self.outbox.clone(), self.state_dir.clone());
        tokio::spawn(async move {
            outbox.wait_delivered(ticket).await;
            CommandRecord::clear(&state_dir, pid);
        });
        let activated = finished.is_some_and(|r| r.kind.activates());
        if activated
            && status.status == Outcome::Ok
            && let Some(why) = self.self_image.changed()
        {
            info!("the switch updated this agent ({why}); restarting once the status is delivered");
            self.restart = Some(ticket);
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
            generation: crate::heartbeat::generation(&self.repo_dir),
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
