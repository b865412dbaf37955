//! Flow control: output batches written and not yet acknowledged. Each
//! batch is followed by a numbered ping; the dashboard's pong, which it
//! sends only once it has read everything before the ping, acknowledges
//! the batch.

use crate::outbox::Outbox;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Output bytes written and not yet acknowledged by a pong. A heartbeat
/// waits behind at most this much (about 50 ms at 20,000 frames/s), and it
/// bounds what is sent twice after a broken connection.
pub const UNACKNOWLEDGED_WINDOW: u64 = 128 * 1024;

/// The highest numbered ping the dashboard answered, shared by the reader
/// (which sees pongs) and the writer (which waits for them).
#[derive(Default)]
pub(super) struct Pongs {
    highest: AtomicU64,
    arrived: tokio::sync::Notify,
}

impl Pongs {
    pub(super) fn answered(&self, number: u64) {
        self.highest.fetch_max(number, Ordering::Relaxed);
        self.arrived.notify_one();
    }

    /// Completes when a pong arrives (or has arrived since the last wait).
    pub(super) fn arrived(&self) -> tokio::sync::futures::Notified<'_> {
        self.arrived.notified()
    }

    pub(super) fn highest(&self) -> u64 {
        self.highest.load(Ordering::Relaxed)
    }
}

/// Output batches written and not yet acknowledged.
pub(super) struct Window {
    next_ping: u64,
    /// Oldest first: the ping's number, the last frame's outbox `seq`, the
    /// output bytes written up to it, and when it was sent.
    pending: std::collections::VecDeque<(u64, u64, u64, Instant)>,
    written: u64,
    acknowledged: u64,
}

impl Window {
    pub(super) fn new() -> Self {
        Window {
            next_ping: 1,
            pending: Default::default(),
            written: 0,
            acknowledged: 0,
        }
    }

    pub(super) fn open(&self) -> bool {
        self.written - self.acknowledged < UNACKNOWLEDGED_WINDOW
    }

    /// Counts an output frame of `bytes` as written.
    pub(super) fn count(&mut self, bytes: u64) {
        self.written += bytes;
    }

    /// The number of the ping that closes the batch being written.
    pub(super) fn next_ping(&mut self) -> u64 {
        let number = self.next_ping;
        self.next_ping += 1;
        number
    }

    /// The batch up to outbox `last_seq` went out with ping `number`.
    pub(super) fn sent(&mut self, number: u64, last_seq: u64) {
        self.pending
            .push_back((number, last_seq, self.written, Instant::now()));
    }

    /// Acknowledges every batch up to ping `number`.
    pub(super) fn answered(&mut self, number: u64, outbox: &Outbox) {
        let mut last = None;
        while let Some(&(ping, seq, written, _)) = self.pending.front() {
            if ping > number {
                break;
            }
            self.pending.pop_front();
            last = Some((seq, written));
        }
        if let Some((seq, written)) = last {
            self.acknowledged = written;
            outbox.acknowledge(seq);
        }
    }

    /// When the oldest unanswered ping is overdue: the dashboard read none
    /// of the output written since for `patience`.
    pub(super) fn overdue_at(&self, patience: Duration) -> Option<Instant> {
        self.pending.front().map(|&(_, _, _, sent)| sent + patience)
    }
}
