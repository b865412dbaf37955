//! What systemd hears from the agent: READY, a STATUS= line that follows
//! the connection and the command, the watchdog pings (only while the core
//! and the connection answer probes), STOPPING at the end.

use crate::connection::LinkState;
use crate::heartbeat::CommandState;
use crate::shutdown;
use crate::systemd::{CommandStatus, ConnectionStatus, StatusLine, Systemd};
use crate::ticker::Ticker;
use crate::watchdog::Prober;
use std::time::SystemTime;
use tokio::sync::watch;
use tracing::warn;

/// The next tick of a ticker that may not exist (then never).
pub(super) async fn tick_if_any(ticker: &mut Option<Ticker>) -> std::io::Result<()> {
    match ticker {
        Some(ticker) => ticker.tick().await,
        None => std::future::pending().await,
    }
}

/// Tells systemd the truth about the agent: READY once the loops run (not
/// waiting for the dashboard, which may be down at boot), a STATUS= line
/// that follows the connection and the command, WATCHDOG=1 only while the
/// core and the connection answer probes, STOPPING=1 at the end.
pub(super) async fn report_to_systemd(
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
                    LinkState::Reconnecting { delay, error, .. } => ConnectionStatus::reconnecting(*delay, error.clone()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watchdog::probe_channel;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

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
