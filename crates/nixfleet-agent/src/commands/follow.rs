//! Follows a command log (log.rs) as its supervisor writes it, and hands
//! what each record turns into (summary.rs) to the outbox and the core.
//!
//! The same code serves a command this agent started and one a previous
//! agent started: records before the delivery cursor are replayed without
//! sending, the rest is sent. Reading waits for room in the outbox, so a
//! slow dashboard costs disk, not memory, and never slows the command,
//! whose output goes to the supervisor, not to us.
//!
//! When the disk refused the log, the records after its last one come on
//! the supervisor's stdout (relay.rs), for the agent that started it: they
//! are read only once the log is read to its end, so they follow it in
//! order (the supervisor relays nothing before it stops writing the log).

use super::handover::process_start_ticks;
use super::launch::Followed;
use super::log::{Record, end_path, parse};
use super::progress::Progress;
use super::relay::RelayIn;
use super::summary::{Emit, Summary};
use super::table::StopRequest;
use crate::host_facts::generation;
use crate::outbox::{Item, Outbox};
use crate::protocol::Status;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// Bytes read from the log at once; a record is at most 64 KiB + 3.
const READ_CHUNK: usize = 128 * 1024;
/// Log bytes handled between two turns given to the socket writer (the
/// agent has one thread).
const YIELD_EVERY_BYTES: usize = 16 * 1024;
/// How often the supervisor's life is checked while the log is quiet.
const LIVENESS_POLL: Duration = Duration::from_millis(250);
/// Without inotify, how often the log is read for new records.
const FALLBACK_POLL: Duration = Duration::from_millis(20);

/// Follows the command until its supervisor is done (or gone) and every
/// record was queued; returns its status, which the caller queues next.
pub async fn follow(
    mut followed: Followed,
    outbox: &Outbox,
    progress: &mpsc::Sender<Progress>,
    stop: &mut watch::Receiver<Option<StopRequest>>,
) -> Status {
    let stop_file = followed.stop_file.clone();
    let relay = std::mem::replace(&mut followed.relay, RelayIn::new(None));
    // Only a supervisor this agent started (this very binary) knows the
    // stop signals; for any other the default action would end it.
    let ours = followed.supervisor.filter(|_| relay.open());
    tokio::select! {
        status = read_log(&followed, relay, outbox, progress) => status,
        () = forward_stops(stop, &stop_file, ours) => unreachable!("forward_stops never ends"),
    }
}

/// Hands stop requests to the supervisor, which signals the step's group
/// (and keeps doing so should this agent die).
async fn forward_stops(
    stop: &mut watch::Receiver<Option<StopRequest>>,
    stop_file: &Path,
    ours: Option<(u32, u64)>,
) {
    loop {
        let request = *stop.borrow_and_update();
        if let Some(request) = request {
            hand_over_stop(request, stop_file, ours);
        }
        if stop.changed().await.is_err() {
            // The core is gone (the agent is exiting): nothing more to forward.
            std::future::pending::<()>().await;
        }
    }
}

/// The stop file (for any supervisor, this agent's or a predecessor's),
/// and a signal to a supervisor of ours (which a full or read-only state
/// disk cannot stop).
fn hand_over_stop(request: StopRequest, stop_file: &Path, ours: Option<(u32, u64)>) {
    let word: &[u8] = match request {
        StopRequest::Terminate => b"TERM",
        StopRequest::Kill => b"KILL",
    };
    let filed = crate::state_file::write_private(stop_file, word);
    let signalled = match ours {
        // The same process, not a recycled pid.
        Some((pid, start)) if process_start_ticks(pid) == Some(start) => {
            super::stop_signal::send(pid, request).is_ok()
        }
        _ => false,
    };
    if let Err(error) = filed
        && !signalled
    {
        warn!(error = %error, "cannot hand the stop request to the command's supervisor");
    }
}

/// Where the follower is in the log, and what it hands on.
struct Reader<'a> {
    followed: &'a Followed,
    outbox: &'a Outbox,
    progress: &'a mpsc::Sender<Progress>,
    file: Option<File>,
    buf: Vec<u8>,
    relay: RelayIn,
    /// Log offset of buf[0].
    base: u64,
    since_yield: usize,
    emitted: Vec<Emit>,
}

/// The supervisor is gone, but what it relayed last may still be in the
/// pipe: read on to its end (false once there is nothing more).
async fn relay_read_on(relay: &mut RelayIn) -> bool {
    if !relay.open() {
        return false;
    }
    if tokio::time::timeout(RELAY_WAIT, relay.read())
        .await
        .is_err()
    {
        warn!("the supervisor is gone but its stdout is still open");
        return false;
    }
    true
}

async fn read_log(
    followed: &Followed,
    relay: RelayIn,
    outbox: &Outbox,
    progress: &mpsc::Sender<Progress>,
) -> Status {
    let mut summary = Summary::new(
        followed.kind,
        followed.repo_dir.clone(),
        followed.branch.clone(),
    );
    let watch = LogWatch::new(&followed.log);
    // (A log the disk did not let anyone create has nothing to watch.)
    if watch.is_none() && followed.log.exists() {
        warn!("inotify unavailable; polling the command log");
    }
    let mut reader = Reader::open(followed, relay, outbox, progress);
    let mut supervisor_gone = false;
    loop {
        let read = reader.read_more();
        reader.handle_records(&mut summary).await;
        if read > 0 || reader.handle_relayed(&mut summary).await {
            continue;
        }
        if summary.done() {
            break;
        }
        if supervisor_gone {
            if !relay_read_on(&mut reader.relay).await {
                break;
            }
            continue;
        }
        if !supervisor_alive(followed) {
            // Read once more: the supervisor may have written its last
            // records just before it ended.
            supervisor_gone = true;
            continue;
        }
        wait_for_more(watch.as_ref(), &mut reader.relay, &summary).await;
        if let Some(emit) = summary.held_back_progress() {
            reader.send(emit, reader.base).await;
        }
    }
    if summary.done() {
        // The log (or the relay) holds the end: its end file, unused, goes.
        let _ = std::fs::remove_file(end_path(&followed.log));
    } else if !reader.relay.used {
        reader.read_end_records(&mut summary).await;
    }
    ended(followed, &summary)
}

/// How long the supervisor's stdout may stay open once it is gone (only
/// a process it leaked could hold it).
const RELAY_WAIT: Duration = Duration::from_secs(5);

/// The records the log could not keep (log_writer.rs), from the end file,
/// whose space was taken at start: for a supervisor whose relay this
/// agent could not read.
fn end_records(log: &Path) -> Option<Vec<u8>> {
    let bytes = std::fs::read(end_path(log)).ok()?;
    bytes
        .split(|b| *b == b'\n')
        .any(|record| parse(record) == Record::Done)
        .then_some(bytes)
}

fn supervisor_alive(followed: &Followed) -> bool {
    followed
        .supervisor
        .is_some_and(|(pid, start)| process_start_ticks(pid) == Some(start))
}

/// A quiet log: wakes for new records, relayed ones, the supervisor's
/// end, or a build progress report the throttle held back.
async fn wait_for_more(watch: Option<&LogWatch>, relay: &mut RelayIn, summary: &Summary) {
    let poll = match summary.progress_due() {
        Some(due) => due
            .saturating_duration_since(Instant::now())
            .min(LIVENESS_POLL),
        None => LIVENESS_POLL,
    };
    let log_changed = async {
        match watch {
            Some(watch) => watch.changed().await,
            None => tokio::time::sleep(FALLBACK_POLL).await,
        }
    };
    tokio::select! {
        () = log_changed => {}
        () = relay.read() => {}
        () = tokio::time::sleep(poll) => {}
    }
}

/// The status, once the log says no more.
fn ended(followed: &Followed, summary: &Summary) -> Status {
    if !summary.done() {
        warn!(
            command = followed.kind.name(),
            "the command's supervisor ended without recording the end"
        );
    }
    let status = summary.status(generation(&followed.repo_dir));
    info!(
        command = followed.kind.name(),
        exit_code = status.exit_code,
        "the command log ends: {}",
        status.message
    );
    status
}

impl<'a> Reader<'a> {
    fn open(
        followed: &'a Followed,
        relay: RelayIn,
        outbox: &'a Outbox,
        progress: &'a mpsc::Sender<Progress>,
    ) -> Self {
        let file = match File::open(&followed.log) {
            Ok(file) => Some(file),
            Err(error) => {
                warn!(error = %error, log = %followed.log.display(), "cannot read the command log");
                None
            }
        };
        Reader {
            followed,
            outbox,
            progress,
            file,
            buf: Vec::with_capacity(READ_CHUNK),
            relay,
            base: 0,
            since_yield: 0,
            emitted: Vec::new(),
        }
    }

    /// Appends what the file has beyond what was read; returns the byte
    /// count.
    fn read_more(&mut self) -> usize {
        match self.file.as_mut() {
            Some(file) => read_more(file, &mut self.buf),
            None => 0,
        }
    }

    /// Every whole record read so far goes through the summary; what it
    /// turns into is handed on, tagged with the log offset after it.
    async fn handle_records(&mut self, summary: &mut Summary) {
        let mut consumed = 0;
        while let Some(newline) = memchr::memchr(b'\n', &self.buf[consumed..]) {
            let record = &self.buf[consumed..consumed + newline];
            consumed += newline + 1;
            let end = self.base + consumed as u64;
            let sending = end > self.followed.resume_at;
            let mut emitted = std::mem::take(&mut self.emitted);
            summary.on_record(parse(record), sending, &mut emitted);
            for emit in emitted.drain(..) {
                self.send(emit, end).await;
            }
            self.emitted = emitted;
            self.since_yield += newline + 1;
            if self.since_yield >= YIELD_EVERY_BYTES {
                self.since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        self.buf.drain(..consumed);
        self.base += consumed as u64;
    }

    /// Every whole record the supervisor relayed so far (read after the
    /// log's last record: see `read_log`); false if there was none.
    async fn handle_relayed(&mut self, summary: &mut Summary) -> bool {
        let mut consumed = 0;
        while let Some(newline) = memchr::memchr(b'\n', &self.relay.buf[consumed..]) {
            let record = &self.relay.buf[consumed..consumed + newline];
            consumed += newline + 1;
            let mut emitted = std::mem::take(&mut self.emitted);
            summary.on_record(parse(record), true, &mut emitted);
            for emit in emitted.drain(..) {
                // Past the log's end: delivering it moves no cursor.
                self.send(emit, self.base).await;
            }
            self.emitted = emitted;
            self.since_yield += newline + 1;
            if self.since_yield >= YIELD_EVERY_BYTES {
                self.since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        self.relay.buf.drain(..consumed);
        consumed > 0
    }

    /// The supervisor is gone and the log ends without `done`: the end
    /// records it could not write there, if it left them beside it.
    async fn read_end_records(&mut self, summary: &mut Summary) {
        let Some(bytes) = end_records(&self.followed.log) else {
            return;
        };
        info!(
            command = self.followed.kind.name(),
            "the command log ends early; its end was recorded beside it"
        );
        for record in bytes.split(|b| *b == b'\n') {
            let mut emitted = std::mem::take(&mut self.emitted);
            summary.on_record(parse(record), true, &mut emitted);
            for emit in emitted.drain(..) {
                self.send(emit, self.base).await;
            }
            self.emitted = emitted;
        }
    }

    /// Queues one frame (carrying its log position `end`) or passes an
    /// event to the core.
    async fn send(&self, emit: Emit, end: u64) {
        let item = Item::from_log(String::new(), self.followed.log_id, end);
        send(emit, item, self.outbox, self.progress).await;
    }
}

/// Queues one frame (as `item`, which carries its log position) or passes
/// an event to the core.
async fn send(emit: Emit, mut item: Item, outbox: &Outbox, progress: &mpsc::Sender<Progress>) {
    let event = match emit {
        Emit::Frame(frame) => {
            item.frame = frame;
            outbox.wait_room().await;
            outbox.push(item);
            return;
        }
        Emit::Line(frame) => {
            item.frame = frame;
            item.output_line = true;
            outbox.wait_room().await;
            outbox.push(item);
            return;
        }
        Emit::Progress(frame) => {
            item.frame = frame;
            outbox.push_progress(item);
            return;
        }
        Emit::Dropped(lines) => {
            outbox.count_dropped(lines);
            return;
        }
        Emit::Started(pid) => Progress::Started { pid },
        Emit::Tested {
            passed,
            total,
            stopped,
            failed,
        } => Progress::Tested {
            passed,
            total,
            stopped,
            failed,
        },
        Emit::Rebuilt(ok) => Progress::Rebuilt { ok },
        Emit::Lock(answer) => Progress::Lock(answer),
        Emit::System(verdict) => Progress::System(verdict),
    };
    let _ = progress.send(event).await;
}

/// Appends what the file has beyond what was read; returns the byte count.
fn read_more(file: &mut File, buf: &mut Vec<u8>) -> usize {
    if buf.len() >= READ_CHUNK {
        // Cannot happen with the supervisor's records (at most 64 KiB + 3);
        // a damaged log must not make the agent grow without bound.
        warn!("skipping an over-long record in the command log");
        buf.clear();
    }
    let start = buf.len();
    buf.resize(READ_CHUNK, 0);
    let n = loop {
        match file.read(&mut buf[start..]) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                warn!(error = %error, "reading the command log failed");
                break 0;
            }
        }
    };
    buf.truncate(start + n);
    n
}

/// Wakes the follower when the log changes.
struct LogWatch {
    fd: AsyncFd<OwnedFd>,
}

impl LogWatch {
    fn new(log: &Path) -> Option<Self> {
        use rustix::fs::inotify;
        let fd =
            inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK).ok()?;
        inotify::add_watch(
            &fd,
            log,
            inotify::WatchFlags::MODIFY | inotify::WatchFlags::CLOSE_WRITE,
        )
        .ok()?;
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open, the
        // same descriptor, until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
        Some(LogWatch { fd: fd.ok()? })
    }

    async fn changed(&self) {
        let Ok(mut guard) = self.fd.readable().await else {
            return std::future::pending().await;
        };
        let mut events = [0u8; 1024];
        // Drain: one wake-up is enough for any number of writes.
        while let Ok(n) = rustix::io::read(self.fd.get_ref(), &mut events) {
            if n == 0 {
                break;
            }
        }
        guard.clear_ready();
    }
}
