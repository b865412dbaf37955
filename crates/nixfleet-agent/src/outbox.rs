//! The short, ordered queue of command frames on their way to the socket:
//! output lines, test progress and statuses.
//!
//! It is not where a backlog lives: that is the command log on disk
//! (`commands::log`). The follower reading the log waits for room here
//! ([`Outbox::wait_room`]), so this queue stays a few hundred KiB however
//! far behind the dashboard is, while the command itself, writing to its
//! supervisor, never waits at all. Nothing is ever dropped here.
//!
//! Frames that come from the command log carry the log offset just past
//! their record. A frame is *delivered* when the dashboard has read it:
//! the connection follows each write batch with a WebSocket ping and the
//! dashboard's pong (which it can only send after reading everything before
//! the ping) acknowledges the batch ([`Outbox::acknowledge`]). Then the
//! last offset is stored in the delivery cursor, where a restarted agent
//! resumes the log. Frames written but not yet acknowledged are kept; when
//! the connection ends they go back to the front, ahead of the rest, and
//! are sent again. So the dashboard may see the frames in flight on a
//! broken connection twice (at most the connection's unacknowledged
//! window), and never misses one.
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

/// One frame, already serialised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub frame: String,
    /// Position in the order of pushes (set by the outbox), for
    /// [`Outbox::acknowledge`].
    pub seq: u64,
    /// If the frame came from a command log: which one (the id
    /// [`Outbox::track`] gave it) and the offset just past its record.
    pub log_offset: Option<(u64, u64)>,
    /// An intermediate progress report: a newer one replaces it while it
    /// is queued, and it is not sent again after a broken connection.
    pub replaceable: bool,
    /// A line of the command's output (not a progress, test or status
    /// frame, nor a notice of the agent's own): counted when delivered.
    pub output_line: bool,
}

impl Item {
    /// A frame that is not part of a command log (a status).
    pub fn new(frame: String) -> Self {
        Item {
            frame,
            seq: 0,
            log_offset: None,
            replaceable: false,
            output_line: false,
        }
    }

    /// A frame read from a command log.
    pub fn from_log(frame: String, log_id: u64, offset: u64) -> Self {
        Item {
            frame,
            seq: 0,
            log_offset: Some((log_id, offset)),
            replaceable: false,
            output_line: false,
        }
    }
}

/// Lines of command output since the agent started, for the metrics
/// (`nixfleet_agent_output_lines_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineCounts {
    /// Acknowledged by the dashboard (a line sent again after a broken
    /// connection is counted once: when its batch is acknowledged).
    pub delivered: u64,
    /// Not kept by the command log's cap (`log_max_bytes`), as the log's
    /// `dropped` records said when the follower reached them.
    pub dropped: u64,
}

pub struct Outbox {
    queue: Mutex<Queue>,
    ready: Notify,
    /// Fired whenever frames are acknowledged or room frees up.
    delivered: Notify,
    max_bytes: usize,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    bytes: usize,
    /// Frames ever queued, and the highest `seq` acknowledged.
    queued: u64,
    acknowledged: u64,
    /// What the writer took and has not confirmed written yet.
    in_flight: Vec<Item>,
    /// Written, not yet acknowledged, oldest first.
    unacknowledged: VecDeque<Item>,
    /// The cursor of the log being followed, with its id.
    cursor: Option<(u64, DeliveryCursor)>,
    last_log_id: u64,
    lines: LineCounts,
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

    /// Queues an intermediate progress report, of which only the newest
    /// matters: one still queued is removed and the new one goes to the
    /// back, so that a report never overtakes the lines it describes and
    /// an absent dashboard costs one queued report, not one per interval.
    /// A final report goes through [`Outbox::push`].
    pub fn push_progress(&self, mut item: Item) -> u64 {
        item.replaceable = true;
        {
            let mut q = self.lock();
            if let Some(stale) = q.items.iter().rposition(|i| i.replaceable)
                && let Some(stale) = q.items.remove(stale)
            {
                q.bytes -= stale.frame.len();
            }
        }
        self.push(item)
    }

    /// Queues a frame that is not part of a command log.
    pub fn push_frame(&self, frame: String) -> u64 {
        self.push(Item::new(frame))
    }

    /// Frame bytes queued (written or not).
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
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

    /// The writer confirms that everything it took was flushed to the
    /// socket; it stays kept until acknowledged.
    pub fn confirm_written(&self) {
        let mut q = self.lock();
        let in_flight = std::mem::take(&mut q.in_flight);
        q.unacknowledged.extend(in_flight);
        drop(q);
        // take_batch made room.
        self.delivered.notify_waiters();
    }

    /// The dashboard has read every frame up to `seq`.
    pub fn acknowledge(&self, seq: u64) {
        let mut q = self.lock();
        let tracked = q.cursor.as_ref().map(|(id, _)| *id);
        let mut offset = None;
        while q.unacknowledged.front().is_some_and(|i| i.seq <= seq) {
            let item = q.unacknowledged.pop_front().expect("front was Some");
            q.lines.delivered += u64::from(item.output_line);
            if let Some((log, end)) = item.log_offset
                && Some(log) == tracked
            {
                offset = Some(end);
            }
        }
        q.acknowledged = q.acknowledged.max(seq);
        if let (Some(offset), Some((_, cursor))) = (offset, q.cursor.as_mut()) {
            cursor.store(offset);
        }
        drop(q);
        self.delivered.notify_waiters();
    }

    /// Counts lines the command log's cap did not keep. They never reach
    /// the queue; it is where the other half of the count is kept.
    pub fn count_dropped(&self, lines: u64) {
        self.lock().lines.dropped += lines;
    }

    /// Output lines delivered and dropped so far.
    pub fn line_counts(&self) -> LineCounts {
        self.lock().lines
    }

    /// Waits until the frame with this ticket (and everything queued
    /// before it) has been read by the dashboard.
    pub async fn wait_delivered(&self, ticket: u64) {
        loop {
            let notified = self.delivered.notified();
            if self.lock().acknowledged >= ticket {
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

    /// After a connection ended: everything not acknowledged goes back to
    /// the front, in order, to be sent again.
    pub fn requeue_in_flight(&self) {
        let mut q = self.lock();
        let in_flight = std::mem::take(&mut q.in_flight);
        let unacknowledged = std::mem::take(&mut q.unacknowledged);
        // Progress reports are not sent again: a newer one follows.
        for item in unacknowledged
            .into_iter()
            .chain(in_flight)
            .rev()
            .filter(|i| !i.replaceable)
        {
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
        let file = crate::state_file::private_file(
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
        let file = crate::state_file::private_file(
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

    /// Writes and acknowledges everything queued.
    fn deliver(outbox: &Outbox) -> Vec<Item> {
        let batch = drain(outbox);
        outbox.confirm_written();
        if let Some(last) = batch.last() {
            outbox.acknowledge(last.seq);
        }
        batch
    }

    #[test]
    fn unacknowledged_frames_are_sent_again_in_order() {
        let outbox = Outbox::default();
        outbox.push(logged("a", 10));
        outbox.push(logged("b", 20));
        let mut batch = Vec::new();
        outbox.take_batch(1, &mut batch);
        outbox.confirm_written();
        outbox.acknowledge(batch[0].seq);
        batch.clear();
        outbox.take_batch(usize::MAX, &mut batch);
        outbox.push_frame("status".into());
        outbox.take_batch(usize::MAX, &mut batch);
        outbox.confirm_written();
        // The connection broke before the dashboard's pong.
        outbox.requeue_in_flight();
        assert_eq!(frames(&deliver(&outbox)), ["b", "status"]);
        outbox.requeue_in_flight();
        assert!(outbox.is_empty(), "nothing acknowledged is sent again");
    }

    #[test]
    fn output_lines_count_once_when_acknowledged() {
        let outbox = Outbox::default();
        let line = |frame: &str, offset| Item {
            output_line: true,
            ..logged(frame, offset)
        };
        outbox.push(line("a", 1));
        outbox.push(logged("progress", 2));
        outbox.push(line("b", 3));
        drain(&outbox);
        outbox.confirm_written();
        assert_eq!(outbox.line_counts().delivered, 0, "written is not read");
        // Broken before the pong: sent again, acknowledged once.
        outbox.requeue_in_flight();
        deliver(&outbox);
        outbox.count_dropped(5);
        assert_eq!(
            outbox.line_counts(),
            LineCounts {
                delivered: 2,
                dropped: 5
            }
        );
    }

    #[test]
    fn only_the_newest_progress_waits_and_it_is_not_sent_again() {
        let outbox = Outbox::default();
        outbox.push(logged("a", 1));
        outbox.push_progress(logged("p1", 2));
        outbox.push(logged("b", 3));
        outbox.push_progress(logged("p2", 4));
        outbox.push_progress(logged("p3", 5));
        outbox.push(logged("c", 6));
        assert_eq!(frames(&drain(&outbox)), ["a", "b", "p3", "c"]);
        outbox.confirm_written();
        outbox.requeue_in_flight();
        assert_eq!(frames(&drain(&outbox)), ["a", "b", "c"]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tickets_complete_when_acknowledged() {
        let outbox = std::sync::Arc::new(Outbox::default());
        let ticket = outbox.push_frame("status".into());
        let waiter = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.wait_delivered(ticket).await })
        };
        let batch = drain(&outbox);
        outbox.confirm_written();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "written is not read");
        outbox.acknowledge(batch[0].seq);
        waiter.await.unwrap();
    }

    #[test]
    fn acknowledged_offsets_reach_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sent");
        let outbox = Outbox::default();
        assert_eq!(outbox.track(DeliveryCursor::create(&path).unwrap()), 1);
        outbox.push(logged("a", 7));
        outbox.push_frame("progress".into());
        outbox.push(logged("b", 1234));
        let mut batch = Vec::new();
        outbox.take_batch(1, &mut batch);
        outbox.confirm_written();
        assert_eq!(
            DeliveryCursor::resume(&path).unwrap().1,
            0,
            "not acknowledged yet"
        );
        outbox.acknowledge(batch[0].seq);
        assert_eq!(DeliveryCursor::resume(&path).unwrap().1, 7);
        deliver(&outbox);
        assert_eq!(DeliveryCursor::resume(&path).unwrap().1, 1234);
        // Frames of an earlier log do not move a newer log's cursor.
        outbox.track(DeliveryCursor::resume(&path).unwrap().0);
        outbox.push(logged("old", 99999));
        deliver(&outbox);
        assert_eq!(DeliveryCursor::resume(&path).unwrap().1, 1234);
        // A shorter number overwrites a longer one cleanly.
        let (mut cursor, _) = DeliveryCursor::resume(&path).unwrap();
        cursor.store(5);
        assert_eq!(DeliveryCursor::resume(&path).unwrap().1, 5);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn room_is_awaited() {
        let outbox = std::sync::Arc::new(Outbox::new(4));
        outbox.push_frame("12".into());
        outbox.push_frame("34".into());
        let waiter = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.wait_room().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "full");
        let mut batch = Vec::new();
        outbox.take_batch(2, &mut batch);
        outbox.confirm_written();
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
