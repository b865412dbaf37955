//! The ordered queue of command traffic waiting for the dashboard: output
//! lines, the "lines dropped" notices, test progress and statuses.
//!
//! It sits between command processes and the socket so that a child never
//! blocks on a full pipe because the dashboard is slow or gone: pushing never
//! waits. When output lines exceed the caps, new lines are dropped and
//! counted, and a single notice line says so once there is room again (or
//! just before the command's status). Statuses, progress and notices are
//! never dropped; they are bounded by the number of commands, tests and
//! gaps, not by the volume of output.
//!
//! Heartbeats, `register` and rejections do not go through here: the
//! connection sends those itself, ahead of anything queued.

use crate::protocol::{Outbound, OutputLine, Stream};
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

/// Default cap on queued output lines.
pub const MAX_QUEUED_LINES: usize = 8 * 1024;
/// Default cap on the bytes of queued output frames (2 MiB): with the
/// per-line overhead this keeps a stalled dashboard from costing the agent
/// more than a few MiB.
pub const MAX_QUEUED_BYTES: usize = 2 * 1024 * 1024;

/// One frame, already serialised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub frame: String,
    /// Output lines may be dropped under pressure; nothing else may.
    pub droppable: bool,
    /// An intermediate progress report: a newer one replaces it while it
    /// is queued, and it is not sent again after a broken connection.
    pub replaceable: bool,
}

pub struct Outbox {
    queue: Mutex<Queue>,
    ready: Notify,
    /// Fired whenever reliable frames are confirmed written.
    delivered: Notify,
    max_lines: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    /// Droppable lines currently queued, and their frame bytes.
    lines: usize,
    line_bytes: usize,
    /// Lines dropped (or lost on a broken connection) and not yet reported,
    /// with the command they belonged to.
    dropped: u64,
    dropped_command: String,
    /// Every line ever dropped, for logs and benchmarks.
    dropped_total: u64,
    /// The command whose lines were queued last: lines lost on a broken
    /// connection are reported against it.
    last_command: String,
    /// Reliable frames ever queued, and how many of them were written out
    /// (in order: requeued ones go back to the front).
    reliable_queued: u64,
    reliable_delivered: u64,
    /// What the writer took and has not confirmed yet: copies of the
    /// reliable frames (to put back if the connection fails) and a count of
    /// the lines (to report as lost).
    in_flight_reliable: Vec<Item>,
    in_flight_lines: u64,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new(MAX_QUEUED_LINES, MAX_QUEUED_BYTES)
    }
}

impl Outbox {
    pub fn new(max_lines: usize, max_bytes: usize) -> Self {
        Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            delivered: Notify::new(),
            max_lines,
            max_bytes,
        }
    }

    /// Queues one output line. Never waits: if the caps are reached the line
    /// is dropped and counted. Returns whether it was queued.
    pub fn push_line(&self, command: &str, stream: Stream, line: &str) -> bool {
        let frame = Outbound::Output(OutputLine::new(command, stream, line)).to_json();
        let mut q = self.lock();
        if q.lines >= self.max_lines || q.line_bytes + frame.len() > self.max_bytes {
            q.note_dropped(command, 1);
            return false;
        }
        q.flush_drop_notice();
        if q.last_command != command {
            q.last_command.clear();
            q.last_command.push_str(command);
        }
        q.lines += 1;
        q.line_bytes += frame.len();
        q.items.push_back(Item {
            frame,
            droppable: true,
            replaceable: false,
        });
        drop(q);
        self.ready.notify_one();
        true
    }

    /// Queues a frame that must not be dropped (status, test progress). Any
    /// pending "lines dropped" notice goes first, so that it stays with the
    /// command it belongs to. Returns a ticket for [`Outbox::wait_delivered`].
    pub fn push_reliable(&self, frame: String) -> u64 {
        let mut q = self.lock();
        q.flush_drop_notice();
        q.items.push_back(Item {
            frame,
            droppable: false,
            replaceable: false,
        });
        q.reliable_queued += 1;
        let ticket = q.reliable_queued;
        drop(q);
        self.ready.notify_one();
        ticket
    }

    /// Queues an intermediate progress report, of which only the newest
    /// matters: one still queued is removed and the new one goes to the
    /// back, so that a report never overtakes the lines it describes and
    /// an absent dashboard costs one queued report, not one per interval.
    /// A command's final report goes through [`Outbox::push_reliable`].
    pub fn push_progress(&self, frame: String) {
        let mut q = self.lock();
        if let Some(stale) = q.items.iter().rposition(|item| item.replaceable) {
            q.items.remove(stale);
        }
        q.items.push_back(Item {
            frame,
            droppable: false,
            replaceable: true,
        });
        drop(q);
        self.ready.notify_one();
    }

    /// The writer confirms that everything it took was flushed to the socket.
    pub fn confirm_delivered(&self) {
        let mut q = self.lock();
        let reliable = q.in_flight_reliable.len() as u64;
        q.in_flight_reliable.clear();
        q.in_flight_lines = 0;
        if reliable > 0 {
            q.reliable_delivered += reliable;
            drop(q);
            self.delivered.notify_waiters();
        }
    }

    /// Waits until the reliable frame with this ticket (and everything
    /// queued before it) has been written to a connection.
    pub async fn wait_delivered(&self, ticket: u64) {
        loop {
            let notified = self.delivered.notified();
            if self.lock().reliable_delivered >= ticket {
                return;
            }
            notified.await;
        }
    }

    /// Takes up to `max_bytes` of frames (at least one if any is queued).
    pub fn take_batch(&self, max_bytes: usize, batch: &mut Vec<Item>) {
        let mut q = self.lock();
        let mut bytes = 0;
        while let Some(item) = q.items.front() {
            if !batch.is_empty() && bytes + item.frame.len() > max_bytes {
                break;
            }
            bytes += item.frame.len();
            let item = q.items.pop_front().expect("front was Some");
            if item.droppable {
                q.lines -= 1;
                q.line_bytes -= item.frame.len();
                q.in_flight_lines += 1;
            } else if item.replaceable {
                // Superseded by the next report; nothing to account for.
            } else {
                q.in_flight_reliable.push(item.clone());
            }
            batch.push(item);
        }
    }

    /// After a connection ended: what the writer took but could not confirm
    /// goes back. Frames that must not be lost return to the front, in
    /// order; lines are counted as dropped, since sending them again could
    /// duplicate lines the dashboard already has.
    pub fn requeue_in_flight(&self) {
        let mut q = self.lock();
        let reliable = std::mem::take(&mut q.in_flight_reliable);
        for item in reliable.into_iter().rev() {
            q.items.push_front(item);
        }
        let lost_lines = std::mem::take(&mut q.in_flight_lines);
        if lost_lines > 0 {
            let command = std::mem::take(&mut q.last_command);
            q.note_dropped(&command, lost_lines);
            q.last_command = command;
        }
        let has_items = !q.items.is_empty();
        drop(q);
        if has_items {
            self.ready.notify_one();
        }
    }

    /// Waits until something is queued.
    pub async fn wait_ready(&self) {
        loop {
            // Register interest before checking, so a push in between is
            // not missed.
            let notified = self.ready.notified();
            if !self.lock().items.is_empty() {
                return;
            }
            notified.await;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    pub fn dropped_total(&self) -> u64 {
        self.lock().dropped_total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock would be a bug in the few lines
        // above; the queue itself stays consistent, so keep going.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Queue {
    fn note_dropped(&mut self, command: &str, count: u64) {
        if self.dropped == 0 || self.dropped_command != command {
            self.flush_drop_notice();
            self.dropped_command.clear();
            self.dropped_command.push_str(command);
        }
        self.dropped += count;
        self.dropped_total += count;
    }

    fn flush_drop_notice(&mut self) {
        if self.dropped == 0 {
            return;
        }
        let text = format!("[nixfleet] {} lines dropped", self.dropped);
        let frame = Outbound::Output(OutputLine::new(
            &self.dropped_command,
            Stream::Stderr,
            &text,
        ))
        .to_json();
        self.items.push_back(Item {
            frame,
            droppable: false,
            replaceable: false,
        });
        self.reliable_queued += 1;
        self.dropped = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn lines_of(batch: &[Item]) -> Vec<String> {
        batch
            .iter()
            .map(|i| {
                let v: Value = serde_json::from_str(&i.frame).unwrap();
                match v["type"].as_str().unwrap() {
                    "output" => v["payload"]["line"].as_str().unwrap().to_owned(),
                    other => format!("<{other}>"),
                }
            })
            .collect()
    }

    fn drain(outbox: &Outbox) -> Vec<Item> {
        let mut batch = Vec::new();
        outbox.take_batch(usize::MAX, &mut batch);
        batch
    }

    #[test]
    fn keeps_order_and_drops_past_the_line_cap_with_one_notice() {
        let outbox = Outbox::new(3, usize::MAX);
        for i in 0..10 {
            outbox.push_line("switch", Stream::Stdout, &format!("line {i}"));
        }
        assert_eq!(outbox.dropped_total(), 7);
        let first = drain(&outbox);
        assert_eq!(lines_of(&first), ["line 0", "line 1", "line 2"]);
        // Room again: the notice goes out before the next line.
        outbox.push_line("switch", Stream::Stdout, "line 10");
        outbox.push_reliable(r#"{"type":"status","payload":{}}"#.into());
        assert_eq!(
            lines_of(&drain(&outbox)),
            ["[nixfleet] 7 lines dropped", "line 10", "<status>"]
        );
    }

    #[test]
    fn only_the_newest_progress_waits_and_it_never_overtakes_lines() {
        let outbox = Outbox::default();
        let progress = |n: u32| format!(r#"{{"type":"operation_progress","payload":{{"n":{n}}}}}"#);
        outbox.push_line("switch", Stream::Stderr, "a");
        outbox.push_progress(progress(1));
        outbox.push_line("switch", Stream::Stderr, "b");
        outbox.push_progress(progress(2));
        outbox.push_progress(progress(3));
        outbox.push_line("switch", Stream::Stderr, "c");
        let batch = drain(&outbox);
        assert_eq!(lines_of(&batch), ["a", "b", "<operation_progress>", "c"]);
        assert!(batch[2].frame.contains(r#""n":3"#));
        // Progress is neither a reliable frame to wait for nor resent.
        let ticket = outbox.push_reliable(r#"{"type":"status","payload":{}}"#.into());
        outbox.push_progress(progress(4));
        let mut batch = Vec::new();
        outbox.take_batch(usize::MAX, &mut batch);
        outbox.requeue_in_flight();
        assert_eq!(lines_of(&drain(&outbox)), ["<status>"]);
        outbox.confirm_delivered();
        assert_eq!(outbox.lock().reliable_delivered, ticket);
    }

    #[test]
    fn notice_precedes_the_status_when_nothing_else_came() {
        let outbox = Outbox::new(1, usize::MAX);
        outbox.push_line("pull", Stream::Stdout, "a");
        outbox.push_line("pull", Stream::Stderr, "b");
        outbox.push_reliable(r#"{"type":"status","payload":{}}"#.into());
        let batch = drain(&outbox);
        assert_eq!(
            lines_of(&batch),
            ["a", "[nixfleet] 1 lines dropped", "<status>"]
        );
        assert!(!batch[1].droppable && !batch[2].droppable);
    }

    #[test]
    fn byte_cap_applies_and_reliable_frames_ignore_caps() {
        let outbox = Outbox::new(usize::MAX, 200);
        assert!(outbox.push_line("switch", Stream::Stdout, "short"));
        assert!(!outbox.push_line("switch", Stream::Stdout, &"x".repeat(500)));
        for _ in 0..100 {
            outbox.push_reliable("{}".into());
        }
        assert_eq!(drain(&outbox).len(), 1 + 1 + 100);
    }

    #[test]
    fn batches_respect_the_byte_budget_but_always_take_one() {
        let outbox = Outbox::new(100, usize::MAX);
        for i in 0..10 {
            outbox.push_line("switch", Stream::Stdout, &format!("{i}"));
        }
        let mut batch = Vec::new();
        outbox.take_batch(1, &mut batch);
        assert_eq!(batch.len(), 1);
        batch.clear();
        let one = batch_frame_len(&outbox);
        outbox.take_batch(one * 3, &mut batch);
        assert_eq!(batch.len(), 3);
    }

    fn batch_frame_len(outbox: &Outbox) -> usize {
        outbox.lock().items.front().unwrap().frame.len()
    }

    #[test]
    fn requeue_keeps_reliable_frames_in_order_and_counts_lost_lines() {
        let outbox = Outbox::new(100, usize::MAX);
        outbox.push_line("switch", Stream::Stdout, "a");
        outbox.push_reliable(r#"{"type":"status","payload":{}}"#.into());
        let mut batch = Vec::new();
        outbox.take_batch(usize::MAX, &mut batch);
        // The connection broke before the writer could confirm the batch.
        drop(batch);
        outbox.requeue_in_flight();
        outbox.push_line("test", Stream::Stdout, "after");
        assert_eq!(
            lines_of(&drain(&outbox)),
            ["<status>", "[nixfleet] 1 lines dropped", "after"]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn delivery_tickets_complete_in_order() {
        let outbox = std::sync::Arc::new(Outbox::new(1, usize::MAX));
        outbox.push_line("switch", Stream::Stdout, "a");
        outbox.push_line("switch", Stream::Stdout, "dropped");
        // The notice counts as a reliable frame ahead of the status.
        let ticket = outbox.push_reliable("{}".into());
        assert_eq!(ticket, 2);
        let waiter = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.wait_delivered(ticket).await })
        };
        let mut batch = Vec::new();
        outbox.take_batch(1, &mut batch);
        assert_eq!(batch.len(), 1, "only the line");
        outbox.confirm_delivered();
        batch.clear();
        outbox.take_batch(1, &mut batch);
        outbox.confirm_delivered();
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "the notice is out, the status is not"
        );
        batch.clear();
        outbox.take_batch(1, &mut batch);
        outbox.confirm_delivered();
        waiter.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn wait_ready_wakes_on_push() {
        let outbox = std::sync::Arc::new(Outbox::default());
        let waiter = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.wait_ready().await })
        };
        tokio::task::yield_now().await;
        outbox.push_line("pull", Stream::Stdout, "x");
        waiter.await.unwrap();
    }
}
