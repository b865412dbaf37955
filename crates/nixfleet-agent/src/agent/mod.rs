//! The agent: its tasks started and wired together, and the core that owns
//! "what is running".
//!
//! ```text
//!  dashboard ⇄ Connection ──inbound──▶ Core ──spawns──▶ command task
//!                 ▲   ▲                 │  ▲                 │
//!                 │   └──replies────────┘  └──progress───────┘
//!                 └──────── Outbox ◀──── output lines, progress
//!                 └──────── command state (watch) for heartbeats
//! ```

mod activation_lock;
mod adopt;
mod confirm;
mod core;
mod finish;
mod requests;
mod safe_deploy;
mod systemd_report;
#[cfg(test)]
mod tests;

use self::core::{Core, CoreInputs, CoreLinks, Ending};
use self::systemd_report::report_to_systemd;
use crate::commands::Runner;
use crate::config::Config;
use crate::connection::{Connection, Control, LinkCounts, LinkState, Links};
use crate::footprint;
use crate::heartbeat::{AgentIdentity, CommandState, Reporter};
use crate::observe::{CommandHistory, History, Observer, Watched};
use crate::outbox::Outbox;
use crate::shutdown;
use crate::status::{Compartments, LockAnswer};
use crate::systemd::Systemd;
use crate::watchdog::{Prober, probe_channel};
use std::process::ExitCode;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info};

/// Exit code when the agent restarts itself to become the version a switch
/// installed (EX_TEMPFAIL): non-zero, so `Restart=on-failure` would restart
/// it too, and easy to tell apart in the journal.
pub const EXIT_RESTART: u8 = 75;

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(config: Config) -> ExitCode {
    let config = Arc::new(config);
    let activation_lock = activation_lock::wait_for_the_timers_rollback(&config.state_dir).await;
    let (mut core, inputs, tasks) = start(&config, activation_lock);
    tokio::spawn(shutdown::on_signals(tasks.shutdown.clone()));
    let ending = core.run(inputs).await;
    // A restart stops the connection the same way as a shutdown (close
    // 1000); after a signal this is already set.
    tasks.shutdown.send_replace(true);
    // The connection sends the close frame and waits for the answer.
    let (connection, systemd, observer) = tasks.tasks;
    let _ = connection.await;
    let _ = systemd.await;
    let _ = observer.await;
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

/// The tasks beside the core (the connection, the systemd reporter, the
/// observer), ended after it.
struct Tasks {
    shutdown: Arc<shutdown::Trigger>,
    tasks: (JoinHandle<()>, JoinHandle<()>, JoinHandle<()>),
}

/// Starts every task and builds the core (which has adopted a command a
/// predecessor left, if any).
fn start(
    config: &Arc<Config>,
    activation_lock: Option<std::fs::File>,
) -> (Core, CoreInputs, Tasks) {
    let outbox = Arc::new(Outbox::default());
    let (links, inputs, ends) = wire(outbox.clone());
    let runner = Arc::new(Runner::new(config.clone(), outbox.clone()));
    let (compartments, reporter, identity) = reporting(config, &runner, ends.lock_answers);
    let (reboot_tx, reboot_rx) = watch::channel(Vec::new());
    let reporter = reporter.with_reboot_watch(reboot_tx);
    let watched = Watched {
        link: ends.link_state.clone(),
        link_counts: ends.link_counts,
        command: ends.command_state_rx.clone(),
        history: ends.history.subscribe(),
        compartments: compartments.subscribe(),
        outbox: outbox.clone(),
        reboot: reboot_rx,
    };
    let observer = Observer::new(config, identity.source_commit.clone(), watched);
    let observer = tokio::spawn(observer.run(config.interval, inputs.shutdown.clone()));
    let connection = tokio::spawn(Connection::new(config.clone(), reporter, links).run());
    tokio::spawn(release_startup_memory_once_connected(
        ends.link_state.clone(),
    ));
    let shutdown = Arc::new(ends.shutdown);

    let core = build_core(
        config,
        CoreLinks {
            runner,
            outbox,
            replies: ends.replies,
            command_state: ends.command_state,
            compartments,
            control: ends.control,
            identity,
            history: ends.history,
            link_state: ends.link_state.clone(),
        },
        activation_lock,
    );
    let systemd = tokio::spawn(report_to_systemd(
        Systemd::from_env(),
        config.url.clone(),
        ends.link_state,
        ends.command_state_rx,
        ends.probers,
        inputs.shutdown.clone(),
    ));
    let tasks = (connection, systemd, observer);
    (core, inputs, Tasks { shutdown, tasks })
}

/// The ends of the channels that belong neither to the connection's
/// [`Links`] nor to what the core listens to ([`CoreInputs`]): the core's
/// senders, the watchers' receivers, the shutdown switch and the probers.
struct Ends {
    replies: mpsc::Sender<String>,
    command_state: watch::Sender<CommandState>,
    command_state_rx: watch::Receiver<CommandState>,
    link_state: watch::Receiver<LinkState>,
    link_counts: watch::Receiver<LinkCounts>,
    control: mpsc::Sender<Control>,
    lock_answers: mpsc::Sender<LockAnswer>,
    history: History,
    shutdown: shutdown::Trigger,
    probers: [Prober; 2],
}

/// Every channel between the tasks, made in one place so that their
/// capacities can be read together; each end is handed to its owner.
fn wire(outbox: Arc<Outbox>) -> (Links, CoreInputs, Ends) {
    let (inbound_tx, inbound_rx) = mpsc::channel(64);
    let (replies_tx, replies_rx) = mpsc::channel(64);
    let (command_state_tx, command_state_rx) = watch::channel(CommandState::default());
    let (link_state_tx, link_state_rx) = watch::channel(LinkState::Connecting);
    let (link_counts_tx, link_counts_rx) = watch::channel(LinkCounts::default());
    let (shutdown_tx, shutdown_rx) = shutdown::channel();
    let (core_prober, core_probes) = probe_channel("core");
    let (connection_prober, connection_probes) = probe_channel("connection");
    let (control_tx, control_rx) = mpsc::channel(16);
    let (lock_answers_tx, lock_answers_rx) = mpsc::channel(4);
    let links = Links {
        inbound: inbound_tx,
        replies: replies_rx,
        outbox,
        command_state: command_state_rx.clone(),
        link_state: link_state_tx,
        link_counts: link_counts_tx,
        probes: connection_probes,
        shutdown: shutdown_rx.clone(),
        control: control_rx,
    };
    let inputs = CoreInputs {
        inbound: inbound_rx,
        lock_answers: lock_answers_rx,
        shutdown: shutdown_rx,
        probes: core_probes,
    };
    let ends = Ends {
        replies: replies_tx,
        command_state: command_state_tx,
        command_state_rx,
        link_state: link_state_rx,
        link_counts: link_counts_rx,
        control: control_tx,
        lock_answers: lock_answers_tx,
        // Kept by the core, read by the observer when it gets to it: no
        // queue between them to drop a count or to wait on.
        history: watch::Sender::new(CommandHistory::default()),
        shutdown: shutdown_tx,
        probers: [core_prober, connection_prober],
    };
    (links, inputs, ends)
}

/// The core, once it has taken over what an earlier agent left (or, while
/// the rollback timer holds the activation lock, waiting to: see
/// `Core::take_over`).
fn build_core(config: &Arc<Config>, links: CoreLinks, lock: Option<std::fs::File>) -> Core {
    let mut core = Core::new(config, links);
    core.activation_lock = lock;
    core.take_over();
    core
}

/// The status compartments, and the reporter that puts them (and the
/// agent's identity) into heartbeats.
fn reporting(
    config: &Config,
    runner: &Runner,
    lock_answers: mpsc::Sender<LockAnswer>,
) -> (Compartments, Reporter, AgentIdentity) {
    let (compartments, update_status) = Compartments::new(
        config.repo_dir.clone(),
        config.branch.clone(),
        config.state_dir.clone(),
        runner.shared_child_env(),
        lock_answers,
    );
    let identity = AgentIdentity::detect(
        config.source_commit.clone(),
        config.report_agent_version.clone(),
    );
    if let Some(reported) = &config.report_agent_version {
        // The dashboard will show this version, not ours: say so once.
        tracing::info!(
            "reporting agent_version {reported} to the dashboard (report_agent_version); \
             this agent is nixfleet-agent {}",
            crate::heartbeat::AGENT_VERSION
        );
    }
    let reporter = Reporter::new(config, identity.clone()).with_update_status(update_status);
    (compartments, reporter, identity)
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
