//! Shutdown signalling, shared by the core and the connection.
//!
//! One `watch` channel carries "stop now": SIGTERM/SIGINT set it, and so
//! does the core when it decides to restart. Everything that must wind
//! down (the connection sends its close frame, the systemd reporter says
//! STOPPING) waits on [`requested`]. Living here rather than in either
//! user keeps the core and the connection from importing each other.

use std::sync::Arc;
use tokio::sync::watch;
use tracing::{info, warn};

/// The sending side: `send_replace(true)` asks every listener to stop.
pub type Trigger = watch::Sender<bool>;
/// The receiving side, cloned into every task that must wind down.
pub type Listener = watch::Receiver<bool>;

/// A fresh "not yet" channel.
pub fn channel() -> (Trigger, Listener) {
    watch::channel(false)
}

/// Completes once shutdown is requested (or whoever could request it is
/// gone). Returns `()` so that no lock guard of the channel is held across
/// the awaits of a `select!`.
pub async fn requested(listener: &mut Listener) {
    let _ = listener.wait_for(|stop| *stop).await;
}

/// Turns the first SIGTERM or SIGINT into a shutdown request.
pub async fn on_signals(trigger: Arc<Trigger>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot listen for SIGTERM/SIGINT");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received, shutting down"),
        _ = int.recv() => info!("SIGINT received, shutting down"),
    }
    trigger.send_replace(true);
}
