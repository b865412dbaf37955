//! The short, ordered queue of command frames on their way to the socket:
//! output lines, test progress and statuses.
//!
//! It is not where a backlog lives: that is the command log on disk
//! (command_log.rs). The follower reading the log waits for room here
//! ([`Outbox::wait_room`]), so this queue stays a few hundred KiB however
//! far behind the dashboard is, while the command itself, writing to its
//! supervisor, never waits at all. Nothing is ever dropped here.
//!
//! Frames that come from the command log carry the log offset just past
//! their record. When the writer confirms a batch written to the socket,
//! the last such offset is stored in the delivery cursor: a restarted
//! agent resumes the log there (the kernel still sends what a dead agent
//! had written to its socket).
//!
//! When a connection ends, what the writer took but could not confirm goes
//! back to the front, and so do the log frames confirmed last (up to
//! [`REWIND_BYTES`], never back past a status): bytes the kernel accepted
//! may still have been in the socket buffers when the peer or the network
//! went away. The dashboard may see those frames twice, never a gap.
//!
//! Heartbeats, `register` and rejections do not go through here: the
//! connection sends those itself, ahead of anything queued.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use tokio::sync::Notify;

/// Frame bytes queued before the follower waits: a few write batches, so
/// the writer never runs dry while the follower refills.
pub const MAX_QUEUED_BYTES: usize = 256 * 1024;

/// Log frames kept after they were written, to send again after a broken
/// connection: about what the socket buffers hold (the agent asks for a
/// 128 KiB send buffer, which the kernel doubles).
pub const REWIND_BYTES: usize = 256 * 1024;

/// One frame, already serialised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub frame: String,
    /// Position in the order of pushes (set by the outbox).
    seq: u64,
    /// If the frame came from a command log: which one (the id
    /// [`Outbox::track`] gave it) and the offset just past its record.
    pub log_offset: Option<(u64, u64)>,
}

impl Item {
    /// A frame that is not part of a command log (a status).
    pub fn new(frame: String) -> Self {
        Item {
            frame,
            seq: 0,
            log_offset: None,
        }
    }

    /// A frame read from a command log.
    pub fn from_log(frame: String, log_id: u64, offset: u64) -> Self {
        Item {
            frame,
            seq: 0,
            log_offset: Some((log_id, offset)),
        }
    }
}

pub struct Outbox {
    queue: Mutex<Queue>,
    ready: Notify,
    /// Fired whenever frames are confirmed written or room frees up.
    delivered: Notify,
    max_bytes: usize,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    bytes: usize,
    /// Frames ever queued, and the highest `seq` confirmed written.
    queued: u64,
    confirmed: u64,
    /// What the writer took and has not confirmed yet.
    in_flight: Vec<Item>,
    /// Log frames confirmed last, oldest first, and their bytes.
    recent: VecDeque<Item>,
    recent_bytes: usize,
    /// The cursor of the log being followed, with its id.
    cursor: Option<(u64, DeliveryCursor)>,
    last_log_id: u64,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new(MAX_QUEUED_BYTES)
    }
}

impl Outbox {
    pub fn new(max_bytes: usize) -> Self {
        Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            delivered: Notify::new(),
            max_bytes,
        }
    }

    /// Queues a frame. Never waits and never drops; producers of many
    /// frames call [`Outbox::wait_room`] first. Returns a ticket for
    /// [`Outbox::wait_delivered`].
    pub fn push(&self, mut item: Item) -> u64 {
        let mut q = self.lock();
        q.bytes += item.frame.len();
        q.queued += 1;
        let ticket = q.queued;
        item.seq = ticket;
        q.items.push_back(item);
        drop(q);
        self.ready.notify_one();
        ticket
    }

    /// Queues a frame that is not part of a command log.
    pub fn push_frame(&self, frame: String) -> u64 {
        self.push(Item::new(frame))
    }

    /// Waits until the queue has room (less than its byte budget queued).
    pub async fn wait_room(&self) {
        loop {
            let notified = self.delivered.notified();
            if self.lock().bytes < self.max_bytes {
                return;
            }
            notified.await;
        }
    }

    /// From now on, confirmed offsets of frames tagged with the returned
    /// id are stored in `cursor`. Frames of an earlier log still queued
    /// then no longer move any cursor.
    pub fn track(&self, cursor: DeliveryCursor) -> u64 {
        let mut q = self.lock();
        q.last_log_id += 1;
        let id = q.last_log_id;
        q.cursor = Some((id, cursor));
        id
    }

    /// The writer confirms that everything it took was flushed to the socket.
    pub fn confirm_delivered(&self) {
        let mut q = self.lock();
        let in_flight = std::mem::take(&mut q.in_flight);
        let Some(last) = in_flight.last() else { return };
        q.confirmed = q.confirmed.max(last.seq);
        let tracked = q.cursor.as_ref().map(|(id, _)| *id);
        let offset = in_flight
            .iter()
            .rev()
            .find_map(|i| i.log_offset.filter(|(log, _)| Some(*log) == tracked));
        if let (Some((_, offset)), Some((_, cursor))) = (offset, q.cursor.as_mut()) {
            cursor.store(offset);
        }
        for item in in_flight {
            if item.log_offset.is_none() {
                // Never send anything from before a status again.
                q.recent.clear();
                q.recent_bytes = 0;
                continue;
            }
            q.recent_bytes += item.frame.len();
            q.recent.push_back(item);
        }
        while q.recent_bytes > REWIND_BYTES {
            let Some(old) = q.recent.pop_front() else {
                break;
            };
            q.recent_bytes -= old.frame.len();
        }
        drop(q);
        {
            self.delivered.notify_waiters();
        }
    }

    /// Waits until the frame with this ticket (and everything queued
    /// before it) has been written to a connection.
    pub async fn wait_delivered(&self, ticket: u64) {
        loop {
            let notified = self.delivered.notified();
            if self.lock().confirmed >= ticket {
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
            q.bytes -= item.frame.len();
            q.in_flight.push(item.clone());
            batch.push(item);
        }
    }

    /// After a connection ended: what the writer took but could not
    /// confirm, and the log frames confirmed last, go back to the front in
    /// order, to be sent again.
    pub fn requeue_in_flight(&self) {
        let mut q = self.lock();
        let in_flight = std::mem::take(&mut q.in_flight);
        let recent = std::mem::take(&mut q.recent);
        q.recent_bytes = 0;
        for item in recent.into_iter().chain(in_flight).rev() {
            q.bytes += item.frame.len();
            q.items.push_front(item);
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock would be a bug in the few lines
        // above; the queue itself stays consistent, so keep going.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How far the running command's log has been delivered, kept in a small
/// file under `state_dir` and overwritten in place after every confirmed
/// batch (one `pwrite`, no rename: cheap enough for every batch, which is
/// what bounds the duplicates after a crash to one batch).
#[derive(Debug)]
pub struct DeliveryCursor {
    file: File,
}

/// Width of the stored number: fixed, so an overwrite never leaves digits
/// of a longer old value behind.
const CURSOR_WIDTH: usize = 20;

impl DeliveryCursor {
    /// Opens (creating, 0600) the cursor at `path`, starting at zero.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = crate::command_log::private_file(
            path,
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true),
        )?;
        let mut cursor = DeliveryCursor { file };
        cursor.store(0);
        Ok(cursor)
    }

    /// Opens an existing cursor and reads where it stands (0 when missing
    /// or unreadable: sending a log again beats skipping it).
    pub fn resume(path: &Path) -> std::io::Result<(Self, u64)> {
        let offset = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        let file = crate::command_log::private_file(
            path,
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
        )?;
        Ok((DeliveryCursor { file }, offset))
    }

    pub fn store(&mut self, offset: u64) {
        let text = format!("{offset:0CURSOR_WIDTH$}\n");
        // Best effort: a cursor that lags only means duplicates after a
        // crash, never a gap.
        let _ = self.file.write_all_at(text.as_bytes(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(batch: &[Item]) -> Vec<&str> {
        batch.iter().map(|i| i.frame.as_str()).collect()
    }

    fn drain(outbox: &Outbox) -> Vec<Item> {
        let mut batch = Vec::new();
        outbox.take_batch(usize::MAX, &mut batch);
        batch
    }

    fn logged(frame: &str, offset: u64) -> Item {
        Item::from_log(frame.into(), 1, offset)
    }

    #[test]
    fn batches_respect_the_byte_budget_but_always_take_one() {
        let outbox = Outbox::default();
        for i in 0..10 {
            outbox.push_frame(format!("{i}"));
        }
        let mut batch = Vec::new();
        outbox.take_batch(1, &mut batch);
        assert_eq!(frames(&batch), ["0"]);
        batch.clear();
        outbox.take_batch(3, &mut batch);
        assert_eq!(frames(&batch), ["1", "2", "3"]);
    }

    #[test]
    fn requeue_sends_recent_and_unconfirmed_frames_again_in_order() {
        let outbox = Outbox::default();
        outbox.push(logged("a", 10));
        outbox.push(logged("b", 20));
        let mut batch = Vec::new();
        outbox.take_batch(1, &mut batch);
        outbox.confirm_delivered();
        batch.clear();
        outbox.take_batch(usize::MAX, &mut batch);
        // The connection broke before the writer could confirm the batch.
        outbox.requeue_in_flight();
        outbox.push_frame("status".into());
        assert_eq!(frames(&drain(&outbox)), ["a", "b", "status"]);
        outbox.confirm_delivered();
        // Nothing from before a confirmed status is sent again.
        outbox.push(logged("c", 30));
        drain(&outbox);
        outbox.requeue_in_flight();
        assert_eq!(frames(&drain(&outbox)), ["c"]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn frames_sent_again_do_not_advance_delivery_tickets() {
        let outbox = std::sync::Arc::new(Outbox::default());
        for i in 0..3 {
            outbox.push(logged(&format!("{i}"), i));
        }
        drain(&outbox);
        outbox.confirm_delivered();
        let ticket = outbox.push_frame("status".into());
        outbox.requeue_in_flight();
        // Three lines again, then the status: sending the lines again must
        // not count as delivering the status.
        let mut batch = Vec::new();
        outbox.take_batch(3, &mut batch);
        assert_eq!(frames(&batch), ["0", "1", "2"]);
        outbox.confirm_delivered();
        let waiter = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.wait_delivered(ticket).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drain(&outbox);
        outbox.confirm_delivered();
        waiter.await.unwrap();
    }

    #[test]
    fn confirmed_offsets_reach_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sent");
        let outbox = Outbox::default();
        assert_eq!(outbox.track(DeliveryCursor::create(&path).unwrap()), 1);
        outbox.push(logged("a", 7));
        outbox.push_frame("progress".into());
        outbox.push(logged("b", 1234));
        let mut batch = Vec::new();
        outbox.take_batch(1, &mut batch);
        assert_eq!(
            DeliveryCursor::resume(&path).unwrap().1,
            0,
            "not confirmed yet"
        );
        outbox.confirm_delivered();
        assert_eq!(DeliveryCursor::resume(&path).unwrap().1, 7);
        batch.clear();
        outbox.take_batch(usize::MAX, &mut batch);
        outbox.confirm_delivered();
        assert_eq!(DeliveryCursor::resume(&path).unwrap().1, 1234);
        // Frames of an earlier log do not move a newer log's cursor.
        outbox.track(DeliveryCursor::resume(&path).unwrap().0);
        outbox.push(logged("old", 99999));
        drain(&outbox);
        outbox.confirm_delivered();
        assert_eq!(DeliveryCursor::resume(&path).unwrap().1, 1234);
        // A shorter number overwrites a longer one cleanly.
        let (mut cursor, _) = DeliveryCursor::resume(&path).unwrap();
        cursor.store(5);
        assert_eq!(DeliveryCursor::resume(&path).unwrap().1, 5);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn room_and_delivery_are_awaited() {
        let outbox = std::sync::Arc::new(Outbox::new(4));
        outbox.push_frame("12".into());
        let ticket = outbox.push_frame("34".into());
        let waiter = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                outbox.wait_room().await;
                outbox.wait_delivered(ticket).await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "full");
        let mut batch = Vec::new();
        outbox.take_batch(2, &mut batch);
        outbox.confirm_delivered();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "room, but the ticket is not out");
        batch.clear();
        outbox.take_batch(2, &mut batch);
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
        outbox.push_frame("x".into());
        waiter.await.unwrap();
    }
}
