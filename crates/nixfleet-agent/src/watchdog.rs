//! systemd's watchdog must mean "the agent's loops are alive", not merely
//! "the process exists". A watchdog task therefore probes each long-lived
//! loop (the core and the connection) and pings systemd only when every loop
//! answered. Each loop answers probes at the points where it waits, and every
//! such wait is bounded (timers, timeouts, the dead-peer check), so a loop
//! that answers is one that is making progress.

use std::future::Future;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A question from the watchdog: "are you still turning?"
#[derive(Debug)]
pub struct Probe(oneshot::Sender<()>);

impl Probe {
    pub fn answer(self) {
        let _ = self.0.send(());
    }
}

/// The watchdog's handle on one loop.
#[derive(Debug, Clone)]
pub struct Prober {
    name: &'static str,
    probes: mpsc::Sender<Probe>,
}

/// A probe channel for one loop: the prober for the watchdog, the receiver
/// for the loop.
pub fn probe_channel(name: &'static str) -> (Prober, mpsc::Receiver<Probe>) {
    // One outstanding probe at a time is all the watchdog ever sends.
    let (tx, rx) = mpsc::channel(1);
    (Prober { name, probes: tx }, rx)
}

impl Prober {
    /// Asks the loop and waits at most `patience` for its answer.
    pub async fn check(&self, patience: Duration) -> Result<(), &'static str> {
        let (tx, rx) = oneshot::channel();
        if self.probes.try_send(Probe(tx)).is_err() {
            // The previous probe is still unanswered.
            return Err(self.name);
        }
        match tokio::time::timeout(patience, rx).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(self.name),
        }
    }
}

/// Runs `work` while answering probes, for loops that wait in places other
/// than their main `select!`.
pub async fn answering_probes<F: Future>(work: F, probes: &mut mpsc::Receiver<Probe>) -> F::Output {
    tokio::pin!(work);
    loop {
        tokio::select! {
            output = &mut work => return output,
            Some(probe) = probes.recv() => probe.answer(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_turning_loop_answers_and_a_stuck_one_does_not() {
        let (prober, mut probes) = probe_channel("turning");
        let turning = tokio::spawn(async move {
            answering_probes(tokio::time::sleep(Duration::from_secs(3600)), &mut probes).await;
        });
        assert_eq!(prober.check(Duration::from_secs(1)).await, Ok(()));
        assert_eq!(prober.check(Duration::from_secs(1)).await, Ok(()));
        turning.abort();

        let (stuck, _held_but_never_read) = probe_channel("stuck");
        assert_eq!(stuck.check(Duration::from_secs(1)).await, Err("stuck"));
        // The unanswered probe still fills the slot.
        assert_eq!(stuck.check(Duration::from_secs(1)).await, Err("stuck"));
    }
}
