//! The WebSocket link to the dashboard: connect, register, heartbeat,
//! ping, forward inbound messages, drain the outbox — and reconnect with
//! backoff whenever any of that fails, for as long as the agent runs.
//!
//! Within a session three things run side by side: the reader (which also
//! notes when the peer was last heard from), the writer, and the dead-peer
//! timer. Running them concurrently means a write stuck on a frozen network
//! cannot hide the silence that proves the peer gone.
//!
//! The writer puts heartbeats, `register`, rejections and pings ahead of
//! queued command output, and takes output in bounded batches, so a
//! heartbeat waits for at most one batch however much output is queued.
//!
//! Flow control: each output batch is followed by a WebSocket ping whose
//! payload numbers it; the dashboard's pong, which it sends only once it
//! has read everything before the ping, acknowledges the batch (the outbox
//! then counts it delivered). At most [`UNACKNOWLEDGED_WINDOW`] bytes of
//! output are written and not yet acknowledged. Without that, a dashboard
//! that reads slowly would have megabytes of output waiting in the socket
//! buffers, and every heartbeat would wait behind them.
//!
//! A dashboard can also stay loud but stop reading: it pings, so the
//! silence check never fires, while the socket fills and a write waits
//! forever. So every write has a deadline too: a peer that accepts no byte
//! for `ping_timeout` while a write waits is dead. While it waits, the
//! writer still answers the watchdog's probes and a shutdown request.
//!
//! The parts, from the bottom up (each imports only parts before it):
//! `links` (what the connection shares with the rest of the agent), `end`
//! (why a session ended), `backoff` (the reconnect delay),
//! `write_progress` (when the socket last accepted bytes), `window` (the
//! flow-control window and the pongs that move it), `connect` (TCP, TLS
//! and the WebSocket upgrade), `reader` and `writer` (one session's two
//! directions), `session` (both, the dead-peer timer, and the close); here,
//! the loop that connects and reconnects.

mod backoff;
mod connect;
mod end;
mod links;
mod reader;
mod session;
mod window;
mod write_progress;
mod writer;

pub use backoff::{Backoff, TEST_FIRST_BACKOFF_ENV};
pub use connect::MAX_INBOUND_FRAME;
pub use links::{Control, LinkCounts, LinkState, Links};
pub use window::UNACKNOWLEDGED_WINDOW;

use crate::config::Config;
use crate::heartbeat::Reporter;
use crate::shutdown;
use crate::watchdog::answering_probes;
use connect::{ConnectError, Dialer, Socket};
use end::SessionEnd;
use session::Session;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};
use write_progress::WriteProgress;

/// A connection that stayed up this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(60);

pub struct Connection {
    config: Arc<Config>,
    reporter: Reporter,
    links: Links,
    dialer: Dialer,
    /// When the current socket last accepted bytes.
    written: Arc<WriteProgress>,
}

impl Connection {
    pub fn new(config: Arc<Config>, reporter: Reporter, links: Links) -> Self {
        let written = Arc::new(WriteProgress::new());
        Connection {
            dialer: Dialer::new(config.clone(), written.clone()),
            config,
            reporter,
            links,
            written,
        }
    }

    /// Runs until shutdown is requested.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(self.config.backoff_max);
        loop {
            if *self.links.shutdown.borrow() {
                return;
            }
            self.links.link_state.send_replace(LinkState::Connecting);
            let links = &mut self.links;
            let connected = self
                .dialer
                .connect(&links.shutdown, &mut links.probes)
                .await;
            let (error, reason) = match connected {
                Err(ConnectError::Shutdown) => return,
                Err(ConnectError::Failed(error)) => (error, "connect_failed"),
                Ok(socket) => match self.session(socket, &mut backoff).await {
                    SessionEnd::Shutdown | SessionEnd::ShutdownMidWrite => return,
                    SessionEnd::Reregister => {
                        info!("registering again on a fresh connection");
                        backoff.reset();
                        continue;
                    }
                    failed => {
                        if failed.announces_restart() {
                            backoff.spread_after_restart();
                        }
                        failed.reason_with_label(self.config.ping_timeout)
                    }
                },
            };
            if self.wait_to_reconnect(&mut backoff, error, reason).await {
                return;
            }
        }
    }

    /// One session on a fresh socket. Output it did not get acknowledged
    /// is queued again; a session that registered or lasted resets the
    /// backoff.
    async fn session(&mut self, socket: Socket, backoff: &mut Backoff) -> SessionEnd {
        let started = Instant::now();
        let registered = AtomicBool::new(false);
        let session = Session {
            config: &self.config,
            reporter: &mut self.reporter,
            links: &mut self.links,
            written: &self.written,
        };
        let end = session.run(socket, &registered).await;
        if !matches!(end, SessionEnd::Shutdown | SessionEnd::ShutdownMidWrite) {
            let reason = end.label();
            self.links
                .link_counts
                .send_modify(|counts| *counts.disconnects.entry(reason).or_default() += 1);
        }
        self.links.outbox.requeue_in_flight();
        if registered.load(Ordering::Relaxed) || started.elapsed() >= STABLE_CONNECTION {
            backoff.reset();
        }
        end
    }

    /// Reports the failure and waits out the next delay; true when shutdown
    /// was requested meanwhile.
    async fn wait_to_reconnect(
        &mut self,
        backoff: &mut Backoff,
        error: String,
        reason: &'static str,
    ) -> bool {
        let delay = backoff.next_delay();
        warn!(url = %self.config.url, error = %error, "reconnecting in {:.1}s", delay.as_secs_f64());
        self.links.link_state.send_replace(LinkState::Reconnecting {
            delay,
            error,
            reason,
        });
        let mut shutdown = self.links.shutdown.clone();
        let wait = async {
            tokio::select! {
                _ = tokio::time::sleep(delay) => false,
                () = shutdown::requested(&mut shutdown) => true,
            }
        };
        answering_probes(wait, &mut self.links.probes).await
    }
}
