//! Follows a command log (command_log.rs) as its supervisor writes it and
//! turns it into frames for the dashboard: output lines, test progress, and
//! in the end the command's status, computed from the exit codes the
//! supervisor recorded.
//!
//! The same code serves a command this agent started and one a previous
//! agent started: records before the delivery cursor are replayed without
//! sending (to rebuild what the status needs: step results, the current
//! pid, the last stderr line), the rest is sent. Reading waits for room in
//! the outbox, so a slow dashboard costs disk, not memory, and never slows
//! the command, whose output goes to the supervisor, not to us.

use crate::command_log::{Record, parse};
use crate::commands::{
    CommandKind, ErrorDetail, PROGRESS_INTERVAL, Progress, StopRequest, line_text,
};
use crate::handover::process_start_ticks;
use crate::heartbeat::generation;
use crate::nix_log::{Effect, NixLog};
use crate::outbox::{Item, Outbox};
use crate::protocol::{
    OperationProgress, Outbound, Outcome, OutputLine, PhaseProgress, PhaseStatus, Phases, Status,
    Stream, TestProgress, TestResult, TestsProgress,
};
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
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

/// The command to follow.
pub struct Followed {
    pub kind: CommandKind,
    pub log: PathBuf,
    /// The supervisor: pid and start time (so a recycled pid is not it);
    /// `None` when it is gone or not ours.
    pub supervisor: Option<(u32, u64)>,
    /// Log offset up to which everything was delivered.
    pub resume_at: u64,
    /// The id the outbox gave this log's delivery cursor.
    pub log_id: u64,
    /// Where a stop request is written for the supervisor.
    pub stop_file: PathBuf,
    pub repo_dir: PathBuf,
}

/// Follows the command until its supervisor is done (or gone) and every
/// record was queued; returns its status, which the caller queues next.
pub async fn follow(
    followed: Followed,
    outbox: &Outbox,
    progress: &mpsc::Sender<Progress>,
    stop: &mut watch::Receiver<Option<StopRequest>>,
) -> Status {
    let stop_file = followed.stop_file.clone();
    tokio::select! {
        status = read_log(&followed, outbox, progress) => status,
        () = forward_stops(stop, &stop_file) => unreachable!("forward_stops never ends"),
    }
}

/// Hands stop requests to the supervisor, which signals the step's group
/// (and keeps doing so should this agent die).
async fn forward_stops(stop: &mut watch::Receiver<Option<StopRequest>>, stop_file: &Path) {
    loop {
        let request = *stop.borrow_and_update();
        if let Some(request) = request {
            let word: &[u8] = match request {
                StopRequest::Terminate => b"TERM",
                StopRequest::Kill => b"KILL",
            };
            if let Err(error) = crate::command_log::write_private(stop_file, word) {
                warn!(error = %error, "cannot hand the stop request to the command's supervisor");
            }
        }
        if stop.changed().await.is_err() {
            // The core is gone (the agent is exiting): nothing more to forward.
            std::future::pending::<()>().await;
        }
    }
}

async fn read_log(
    followed: &Followed,
    outbox: &Outbox,
    progress: &mpsc::Sender<Progress>,
) -> Status {
    let mut summary = Summary::new(followed.kind);
    let watch = LogWatch::new(&followed.log);
    if watch.is_none() {
        warn!("inotify unavailable; polling the command log");
    }
    let mut file = match File::open(&followed.log) {
        Ok(file) => Some(file),
        Err(error) => {
            warn!(error = %error, log = %followed.log.display(), "cannot read the command log");
            None
        }
    };
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // Log offset of buf[0].
    let mut base: u64 = 0;
    let mut since_yield = 0;
    let mut supervisor_gone = false;
    let mut emitted = Vec::new();
    loop {
        let read = match file.as_mut() {
            Some(file) => read_more(file, &mut buf),
            None => 0,
        };
        let mut consumed = 0;
        while let Some(newline) = memchr::memchr(b'\n', &buf[consumed..]) {
            let record = &buf[consumed..consumed + newline];
            consumed += newline + 1;
            let end = base + consumed as u64;
            let sending = end > followed.resume_at;
            summary.on_record(parse(record), sending, &mut emitted);
            for emit in emitted.drain(..) {
                let item = Item::from_log(String::new(), followed.log_id, end);
                send(emit, item, outbox, progress).await;
            }
            since_yield += newline + 1;
            if since_yield >= YIELD_EVERY_BYTES {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        buf.drain(..consumed);
        base += consumed as u64;
        if read > 0 {
            continue;
        }
        if summary.done || supervisor_gone {
            break;
        }
        let alive = followed
            .supervisor
            .is_some_and(|(pid, start)| process_start_ticks(pid) == Some(start));
        if !alive {
            // Read once more: the supervisor may have written its last
            // records just before it ended.
            supervisor_gone = true;
            continue;
        }
        // A quiet log: wake for new records, the supervisor's end, or a
        // build progress report the throttle held back.
        let poll = match summary.progress_due() {
            Some(due) => due
                .saturating_duration_since(Instant::now())
                .min(LIVENESS_POLL),
            None => LIVENESS_POLL,
        };
        match &watch {
            Some(watch) => {
                let _ = tokio::time::timeout(poll, watch.changed()).await;
            }
            None => tokio::time::sleep(FALLBACK_POLL.min(poll)).await,
        }
        if let Some(emit) = summary.held_back_progress() {
            let item = Item::from_log(String::new(), followed.log_id, base);
            send(emit, item, outbox, progress).await;
        }
    }
    if !summary.done {
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

/// Queues one frame (as `item`, which carries its log position) or passes
/// a pid to the core.
async fn send(emit: Emit, mut item: Item, outbox: &Outbox, progress: &mpsc::Sender<Progress>) {
    match emit {
        Emit::Frame(frame) => {
            item.frame = frame;
            outbox.wait_room().await;
            outbox.push(item);
        }
        Emit::Progress(frame) => {
            item.frame = frame;
            outbox.push_progress(item);
        }
        Emit::Started(pid) => {
            let _ = progress.send(Progress::Started { pid }).await;
        }
        Emit::Tested {
            passed,
            total,
            stopped,
        } => {
            let tested = Progress::Tested {
                passed,
                total,
                stopped,
            };
            let _ = progress.send(tested).await;
        }
        Emit::Rebuilt(ok) => {
            let _ = progress.send(Progress::Rebuilt { ok }).await;
        }
    }
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

/// A compartment whose steps are counted as dots.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Pull,
    Lock,
}

/// What a record turns into.
#[derive(Debug)]
enum Emit {
    Frame(String),
    /// An intermediate build progress report (a newer one replaces it).
    Progress(String),
    Started(u32),
    /// A `test` command's result, for the tests compartment.
    Tested {
        passed: u32,
        total: u32,
        stopped: bool,
    },
    /// A `nixos-rebuild` step ran to its end (ok or not).
    Rebuilt(bool),
}

/// The one place a line of the command's output becomes an `output` frame.
pub fn output_frame(command: &str, stream: Stream, text: &str) -> String {
    Outbound::Output(OutputLine::new(command, stream, text)).to_json()
}

#[derive(Debug, Clone)]
struct StepResult {
    label: String,
    code: i32,
    how: String,
    ok: bool,
    /// The stderr line that best says what went wrong (ErrorDetail).
    detail: String,
    not_started: bool,
}

/// What a step is, from its label: phases report their own progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepKind {
    Git,
    FlakeUpdate,
    Rebuild,
    Other,
}

impl StepKind {
    fn of(label: &str) -> Self {
        if label.starts_with("git ") {
            StepKind::Git
        } else if label.starts_with("nix flake update") {
            StepKind::FlakeUpdate
        } else if label.starts_with("nixos-rebuild") {
            StepKind::Rebuild
        } else {
            StepKind::Other
        }
    }
}

/// A rebuild's structured log and what was last reported of it.
struct BuildProgress {
    log: NixLog,
    /// Counts changed since the last report.
    dirty: bool,
    last_report: Option<Instant>,
    /// The last `system` step sent; reports never go backwards.
    sent: Option<PhaseProgress>,
}

impl BuildProgress {
    fn new() -> Self {
        BuildProgress {
            log: NixLog::new(),
            dirty: false,
            last_report: None,
            sent: None,
        }
    }

    /// The report for the counts now, or `None` when it would repeat the
    /// last one. `current`/`total` count builds plus downloaded paths; Nix
    /// may lower an expected total (a path it no longer needs), but the
    /// dots only move forward, so both are kept at their highest.
    fn report(&mut self, status: PhaseStatus) -> Option<OperationProgress> {
        let snapshot = self.log.snapshot();
        let (done, expected) = snapshot.steps();
        let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let (mut current, mut total) = (clamp(done), clamp(expected));
        if let Some(sent) = &self.sent {
            current = current.max(sent.current);
            total = total.max(sent.total);
        }
        if status == PhaseStatus::Complete {
            // Success means everything expected was done.
            current = current.max(total);
        }
        total = total.max(current);
        let step = PhaseProgress {
            current,
            total,
            status,
            detail: serde_json::to_value(&snapshot).ok(),
        };
        if self.sent.as_ref() == Some(&step) {
            return None;
        }
        self.sent = Some(step.clone());
        Some(OperationProgress {
            progress: Phases {
                system: Some(step),
                ..Phases::default()
            },
        })
    }

    /// An intermediate report when the counts changed and the last report
    /// is at least [`PROGRESS_INTERVAL`] old.
    fn throttled(&mut self) -> Option<String> {
        if !self.dirty || !self.log.is_structured() {
            return None;
        }
        let now = Instant::now();
        if self
            .last_report
            .is_some_and(|last| now.duration_since(last) < PROGRESS_INTERVAL)
        {
            return None;
        }
        self.dirty = false;
        self.last_report = Some(now);
        let report = self.report(PhaseStatus::InProgress)?;
        Some(Outbound::OperationProgress(&report).to_json())
    }
}

/// Everything the log said so far that the status and progress need.
struct Summary {
    kind: CommandKind,
    /// Every step's label, by index (from the `step` records).
    planned: Vec<String>,
    /// Git steps done, once the pull's first dot was sent.
    pull_done: Option<u32>,
    /// While a `nixos-rebuild` that builds runs: its structured log's state
    /// (rebuilt by replay after a restart, so counts stay right).
    build: Option<BuildProgress>,
    steps: usize,
    current_label: String,
    current_not_started: bool,
    error_detail: ErrorDetail,
    results: Vec<StepResult>,
    stopped: bool,
    done: bool,
    final_progress: bool,
}

impl Summary {
    fn new(kind: CommandKind) -> Self {
        Summary {
            kind,
            planned: Vec::new(),
            pull_done: None,
            build: None,
            steps: 0,
            current_label: String::new(),
            current_not_started: false,
            error_detail: ErrorDetail::default(),
            results: Vec::new(),
            stopped: false,
            done: false,
            final_progress: false,
        }
    }

    /// Updates the summary; adds to `out` what to send when `sending`
    /// (records before the delivery cursor are only replayed).
    fn on_record(&mut self, record: Record<'_>, sending: bool, out: &mut Vec<Emit>) {
        let command = self.kind.name();
        match record {
            Record::Line { stderr, cut, raw } => {
                let stream = if stderr {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                if self.build.is_none() && !stderr && !sending {
                    return;
                }
                let text = line_text(raw, cut);
                let error_detail = &mut self.error_detail;
                let mut line = |plain: &str| {
                    if stderr {
                        error_detail.note(plain);
                    }
                    if sending {
                        out.push(Emit::Frame(output_frame(command, stream, plain)));
                    }
                };
                // Where a line of the command becomes what the dashboard
                // gets: a rebuild's structured log is rendered to plain
                // lines and its counts reported; anything else goes as is.
                match self.build.as_mut() {
                    Some(build) => {
                        if build.log.feed(&text, &mut line) == Effect::Counts {
                            build.dirty = true;
                            if sending && let Some(report) = build.throttled() {
                                out.push(Emit::Progress(report));
                            }
                        }
                    }
                    None => line(&text),
                }
            }
            Record::Steps(n) => {
                self.steps = n;
                if self.kind == CommandKind::Test {
                    self.tests_phase(PhaseStatus::InProgress, sending, out);
                }
            }
            Record::Planned { index, label } => {
                if index == self.planned.len() {
                    self.planned.push(label.to_owned());
                }
            }
            Record::Start { index, pid, label } => {
                self.begin_step(index, label, sending, out);
                let builds =
                    StepKind::of(label) == StepKind::Rebuild && self.kind != CommandKind::Rollback;
                self.build = builds.then(BuildProgress::new);
                out.push(Emit::Started(pid));
            }
            Record::NotStarted { index, .. } => {
                let label = self.planned.get(index).cloned().unwrap_or_default();
                self.begin_step(index, &label, sending, out);
                self.current_not_started = true;
            }
            Record::Stopped => self.stopped = true,
            Record::End { code, how, .. } => {
                let ok = code == 0 && !self.stopped && !self.current_not_started;
                if let Some(mut build) = self.build.take()
                    && build.log.is_structured()
                {
                    // The final report, whatever the throttle says: it is
                    // what the dots end on.
                    let status = if ok {
                        PhaseStatus::Complete
                    } else {
                        PhaseStatus::Error
                    };
                    if let Some(report) = build.report(status)
                        && sending
                    {
                        out.push(Emit::Frame(Outbound::OperationProgress(&report).to_json()));
                    }
                }
                let label = std::mem::take(&mut self.current_label);
                let step = StepKind::of(&label);
                self.end_phase(step, ok, sending, out);
                if step == StepKind::Rebuild && !self.current_not_started && !self.stopped {
                    out.push(Emit::Rebuilt(ok));
                }
                self.results.push(StepResult {
                    label,
                    code,
                    how: how.to_owned(),
                    ok,
                    detail: self.error_detail.get().unwrap_or_default().to_owned(),
                    not_started: self.current_not_started,
                });
                if self.kind == CommandKind::Test {
                    let last = self.results.len() >= self.steps || self.stopped;
                    let status = match (last, self.passed() as usize == self.results.len()) {
                        (false, _) => PhaseStatus::InProgress,
                        (true, true) if !self.stopped => PhaseStatus::Complete,
                        (true, _) => PhaseStatus::Error,
                    };
                    self.tests_phase(status, sending, out);
                    let progress = self.test_progress();
                    self.progress_frame(progress, sending, out);
                }
            }
            Record::Dropped(n) => {
                if sending {
                    let notice = format!("[nixfleet] {n} lines dropped");
                    out.push(Emit::Frame(output_frame(command, Stream::Stderr, &notice)));
                }
            }
            Record::Done => {
                self.done = true;
                if self.kind == CommandKind::Test {
                    out.push(Emit::Tested {
                        passed: self.passed(),
                        total: self.steps as u32,
                        stopped: self.stopped,
                    });
                }
                if self.kind == CommandKind::Test && !self.final_progress {
                    if self.steps == 0 {
                        self.tests_phase(PhaseStatus::Complete, sending, out);
                    }
                    let passed = self.passed();
                    let progress = TestProgress {
                        current: self.results.len() as u32,
                        total: self.steps as u32,
                        passed,
                        running: false,
                        result: format!("{passed}/{} passed", self.steps),
                    };
                    self.progress_frame(progress, sending, out);
                }
            }
            Record::Cut | Record::Unknown => {}
        }
    }

    /// A step starts (or could not start): the first git step opens the
    /// pull's dots, a flake update the lock's.
    fn begin_step(&mut self, index: usize, label: &str, sending: bool, out: &mut Vec<Emit>) {
        let label = match self.planned.get(index) {
            Some(planned) if label.is_empty() => planned.clone(),
            _ => label.to_owned(),
        };
        self.current_not_started = false;
        self.error_detail = ErrorDetail::default();
        match StepKind::of(&label) {
            StepKind::Git if self.pull_done.is_none() => {
                self.pull_done = Some(0);
                let total = self.git_steps();
                self.phase(Phase::Pull, 0, total, PhaseStatus::InProgress, sending, out);
            }
            StepKind::FlakeUpdate => {
                self.phase(Phase::Lock, 0, 1, PhaseStatus::InProgress, sending, out);
            }
            _ => {}
        }
        self.current_label = label;
    }

    /// A step ended: the pull's next dot, or the lock's.
    fn end_phase(&mut self, step: StepKind, ok: bool, sending: bool, out: &mut Vec<Emit>) {
        match step {
            StepKind::Git => {
                let total = self.git_steps();
                let done = self.pull_done.unwrap_or(0) + u32::from(ok);
                self.pull_done = Some(done);
                let status = match ok {
                    false => PhaseStatus::Error,
                    true if done >= total => PhaseStatus::Complete,
                    true => PhaseStatus::InProgress,
                };
                self.phase(Phase::Pull, done, total, status, sending, out);
            }
            StepKind::FlakeUpdate => {
                let (done, status) = if ok {
                    (1, PhaseStatus::Complete)
                } else {
                    (0, PhaseStatus::Error)
                };
                self.phase(Phase::Lock, done, 1, status, sending, out);
            }
            StepKind::Rebuild | StepKind::Other => {}
        }
    }

    /// The pull's steps (a log without `step` records, from an older
    /// supervisor, counts those seen so far).
    fn git_steps(&self) -> u32 {
        let planned = self
            .planned
            .iter()
            .filter(|label| StepKind::of(label) == StepKind::Git)
            .count() as u32;
        planned.max(self.pull_done.unwrap_or(0)).max(1)
    }

    fn phase(
        &self,
        phase: Phase,
        current: u32,
        total: u32,
        status: PhaseStatus,
        sending: bool,
        out: &mut Vec<Emit>,
    ) {
        if !sending {
            return;
        }
        let step = Some(PhaseProgress {
            current,
            total,
            status,
            detail: None,
        });
        let progress = match phase {
            Phase::Pull => Phases {
                pull: step,
                ..Phases::default()
            },
            Phase::Lock => Phases {
                lock: step,
                ..Phases::default()
            },
        };
        out.push(Emit::Frame(
            Outbound::OperationProgress(&OperationProgress { progress }).to_json(),
        ));
    }

    /// The tests compartment's dots: one result per script so far, the
    /// rest pending.
    fn tests_phase(&self, status: PhaseStatus, sending: bool, out: &mut Vec<Emit>) {
        if !sending {
            return;
        }
        let mut results: Vec<TestResult> = self
            .results
            .iter()
            .map(|r| {
                if r.ok {
                    TestResult::Pass
                } else {
                    TestResult::Fail
                }
            })
            .collect();
        results.resize(self.steps.max(results.len()), TestResult::Pending);
        let progress = Phases {
            tests: Some(TestsProgress {
                current: self.results.len() as u32,
                total: self.steps as u32,
                results,
                status,
            }),
            ..Phases::default()
        };
        out.push(Emit::Frame(
            Outbound::OperationProgress(&OperationProgress { progress }).to_json(),
        ));
    }

    /// When a held-back build progress report is due, if one is.
    fn progress_due(&self) -> Option<Instant> {
        let build = self.build.as_ref()?;
        if !build.dirty {
            return None;
        }
        Some(
            build
                .last_report
                .map_or_else(Instant::now, |last| last + PROGRESS_INTERVAL),
        )
    }

    /// The report the throttle held back, once its interval is over, while
    /// the log is quiet (a long build phase prints nothing).
    fn held_back_progress(&mut self) -> Option<Emit> {
        self.build.as_mut()?.throttled().map(Emit::Progress)
    }

    fn passed(&self) -> u32 {
        self.results.iter().filter(|r| r.ok).count() as u32
    }

    /// After a test script ended.
    fn test_progress(&self) -> TestProgress {
        let current = self.results.len() as u32;
        let total = self.steps as u32;
        let passed = self.passed();
        let last = current >= total || self.stopped;
        let result = match self.results.last() {
            _ if last => format!("{passed}/{total} passed"),
            Some(step) => format!(
                "{} {}",
                step.label,
                if step.ok { "passed" } else { "failed" }
            ),
            None => String::new(),
        };
        TestProgress {
            current,
            total,
            passed,
            running: !last,
            result,
        }
    }

    fn progress_frame(&mut self, progress: TestProgress, sending: bool, out: &mut Vec<Emit>) {
        self.final_progress |= !progress.running;
        if sending {
            out.push(Emit::Frame(Outbound::TestProgress(&progress).to_json()));
        }
    }

    fn status(&self, generation: String) -> Status {
        let (status, message, exit_code) = self.outcome(&generation);
        Status {
            status,
            command: self.kind.name().to_owned(),
            exit_code,
            message,
            generation,
        }
    }

    fn outcome(&self, generation: &str) -> (Outcome, String, i32) {
        if self.stopped {
            let code = self.results.last().map_or(-1, |r| r.code);
            return (Outcome::Error, "Stopped by user".to_owned(), code);
        }
        if !self.done {
            return (
                Outcome::Error,
                "the command's supervisor ended unexpectedly; exit code unknown".to_owned(),
                -1,
            );
        }
        if self.kind == CommandKind::Test {
            let (passed, total) = (self.passed(), self.steps);
            let summary = format!("{passed}/{total} passed");
            return if passed as usize == total {
                (Outcome::Ok, summary, 0)
            } else {
                (Outcome::Error, summary, 1)
            };
        }
        if let Some(failed) = self.results.iter().find(|r| !r.ok) {
            let detail = if failed.detail.is_empty() {
                &failed.how
            } else {
                &failed.detail
            };
            let message = match StepKind::of(&failed.label) {
                _ if failed.not_started => failed.how.clone(),
                StepKind::Git => format!("{} failed: {detail}", failed.label),
                StepKind::FlakeUpdate => format!("nix flake update failed: {detail}"),
                StepKind::Rebuild | StepKind::Other => failed.how.clone(),
            };
            return (Outcome::Error, message, failed.code);
        }
        if self.results.len() < self.steps {
            return (
                Outcome::Error,
                "the command ended before all its steps ran".to_owned(),
                -1,
            );
        }
        match self.kind {
            CommandKind::Pull => (Outcome::Ok, format!("at {generation}"), 0),
            CommandKind::Update => (
                Outcome::Ok,
                "flake.lock updated (every input)".to_owned(),
                0,
            ),
            CommandKind::BumpFlake => (
                Outcome::Ok,
                "flake.lock updated (input nixfleet)".to_owned(),
                0,
            ),
            kind => (Outcome::Ok, format!("{} succeeded", kind.name()), 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summarise(kind: CommandKind, log: &str, resume_at: usize) -> (Vec<String>, Status) {
        let mut summary = Summary::new(kind);
        let mut frames = Vec::new();
        let mut offset = 0;
        for record in log.split_inclusive('\n') {
            offset += record.len();
            let record = record.strip_suffix('\n').unwrap();
            let mut out = Vec::new();
            summary.on_record(parse(record.as_bytes()), offset > resume_at, &mut out);
            frames.extend(out.into_iter().filter_map(|e| match e {
                Emit::Frame(frame) | Emit::Progress(frame) => Some(frame),
                Emit::Started(_) | Emit::Tested { .. } | Emit::Rebuilt(_) => None,
            }));
        }
        (frames, summary.status("abc".into()))
    }

    #[test]
    fn build_progress_reports_only_changes_and_never_goes_backwards() {
        let mut progress = BuildProgress::new();
        let feed = |p: &mut BuildProgress, line: &str| {
            p.log.feed(line, &mut |_| {});
        };
        let step = |report: Option<OperationProgress>| {
            report.map(|r| {
                let s = r.progress.system.unwrap();
                (s.current, s.total, s.status)
            })
        };
        feed(
            &mut progress,
            r#"@nix {"action":"start","id":1,"type":104}"#,
        );
        feed(
            &mut progress,
            r#"@nix {"action":"result","id":1,"type":105,"fields":[1,5,1,0]}"#,
        );
        assert_eq!(
            step(progress.report(PhaseStatus::InProgress)),
            Some((1, 5, PhaseStatus::InProgress))
        );
        assert_eq!(
            step(progress.report(PhaseStatus::InProgress)),
            None,
            "no change, no report"
        );
        // Nix lowers what it expects: the dots stay where they were.
        feed(
            &mut progress,
            r#"@nix {"action":"result","id":1,"type":105,"fields":[2,3,1,0]}"#,
        );
        assert_eq!(
            step(progress.report(PhaseStatus::InProgress)),
            Some((2, 5, PhaseStatus::InProgress))
        );
        // Success fills the dots; a failure keeps what was done.
        let mut failed = BuildProgress::new();
        feed(&mut failed, r#"@nix {"action":"start","id":1,"type":104}"#);
        feed(
            &mut failed,
            r#"@nix {"action":"result","id":1,"type":105,"fields":[2,5,0,1]}"#,
        );
        assert_eq!(
            step(failed.report(PhaseStatus::Error)),
            Some((2, 5, PhaseStatus::Error))
        );
        assert_eq!(
            step(progress.report(PhaseStatus::Complete)),
            Some((5, 5, PhaseStatus::Complete))
        );
    }

    fn of_type<'a>(frames: &'a [String], kind: &str) -> Vec<&'a String> {
        let tag = format!("\"type\":\"{kind}\"");
        frames.iter().filter(|f| f.contains(&tag)).collect()
    }

    /// `(current, total, status)` of each `phase` dot report.
    fn dots(frames: &[String], phase: &str) -> Vec<(u64, u64, String)> {
        of_type(frames, "operation_progress")
            .iter()
            .filter_map(|f| {
                let value: serde_json::Value = serde_json::from_str(f).unwrap();
                let p = value["payload"]["progress"].get(phase)?.clone();
                Some((
                    p["current"].as_u64()?,
                    p["total"].as_u64()?,
                    p["status"].as_str()?.to_owned(),
                ))
            })
            .collect()
    }

    #[test]
    fn a_failed_git_step_quotes_gits_error_not_its_hints() {
        let log = "# steps 3\n# step 0 git fetch\n# step 1 git checkout\n# step 2 git clean\n\
                   # start 0 5 git fetch\ne fatal: no remote\ne hint: try this\ne \n\
                   # end 0 128 exit code 128\n# done\n";
        let (frames, status) = summarise(CommandKind::Pull, log, 0);
        assert_eq!(of_type(&frames, "output").len(), 3);
        assert_eq!(status.status, Outcome::Error);
        assert_eq!(status.exit_code, 128);
        assert_eq!(status.message, "git fetch failed: fatal: no remote");
        assert_eq!(
            dots(&frames, "pull"),
            [(0, 3, "in_progress".into()), (0, 3, "error".into())]
        );
    }

    #[test]
    fn a_pull_reports_a_dot_per_git_step_and_a_switch_after_it_none() {
        let log = "# steps 4\n# step 0 git fetch\n# step 1 git checkout\n# step 2 git clean\n\
                   # step 3 nixos-rebuild switch\n\
                   # start 0 5 git fetch\n# end 0 0 exit code 0\n\
                   # start 1 6 git checkout\n# end 1 0 exit code 0\n\
                   # start 2 7 git clean\n# end 2 0 exit code 0\n\
                   # start 3 8 nixos-rebuild switch\n# end 3 0 exit code 0\n# done\n";
        let (frames, status) = summarise(CommandKind::PullSwitch, log, 0);
        let expected = [
            (0, 3, "in_progress"),
            (1, 3, "in_progress"),
            (2, 3, "in_progress"),
            (3, 3, "complete"),
        ]
        .map(|(c, t, s)| (c, t, s.to_owned()));
        assert_eq!(dots(&frames, "pull"), expected);
        assert_eq!(status.message, "pull-switch succeeded");
    }

    #[test]
    fn a_flake_update_reports_the_lock_dot_and_quotes_nix() {
        let log = "# steps 1\n# step 0 nix flake update\n# start 0 5 nix flake update\n\
                   # end 0 0 exit code 0\n# done\n";
        let (frames, status) = summarise(CommandKind::Update, log, 0);
        assert_eq!(
            dots(&frames, "lock"),
            [(0, 1, "in_progress".into()), (1, 1, "complete".into())]
        );
        assert_eq!(status.message, "flake.lock updated (every input)");
        let log = "# steps 1\n# step 0 nix flake update nixfleet\n\
                   # start 0 5 nix flake update nixfleet\ne warning: dirty\n\
                   e error: cannot find flake input 'nixfleet'\n# end 0 1 exit code 1\n# done\n";
        let (frames, status) = summarise(CommandKind::BumpFlake, log, 0);
        assert_eq!(dots(&frames, "lock").last().unwrap().2, "error");
        assert_eq!(
            status.message,
            "nix flake update failed: error: cannot find flake input 'nixfleet'"
        );
    }

    #[test]
    fn the_core_hears_of_rebuilds_and_test_results_also_when_replayed() {
        let emits = |kind, log: &str| {
            let mut summary = Summary::new(kind);
            let mut out = Vec::new();
            for record in log.lines() {
                summary.on_record(parse(record.as_bytes()), false, &mut out);
            }
            out.into_iter()
                .filter(|e| matches!(e, Emit::Tested { .. } | Emit::Rebuilt(_)))
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
        };
        let log = "# steps 1\n# start 0 5 nixos-rebuild switch\n# end 0 1 exit code 1\n# done";
        assert_eq!(emits(CommandKind::Switch, log), ["Rebuilt(false)"]);
        let log =
            "# steps 1\n# start 0 5 nixos-rebuild switch\n# stopped\n# end 0 143 killed\n# done";
        assert!(
            emits(CommandKind::Switch, log).is_empty(),
            "a stop is no verdict"
        );
        let log = "# steps 2\n# start 0 5 T1.sh\n# end 0 0 exit code 0\n# start 1 6 T2.sh\n# end 1 1 exit code 1\n# done";
        assert_eq!(
            emits(CommandKind::Test, log),
            ["Tested { passed: 1, total: 2, stopped: false }"]
        );
    }

    #[test]
    fn replayed_records_count_for_the_status_but_are_not_sent() {
        let log = "# steps 1\n# start 0 5 nixos-rebuild switch\no one\no two\n# end 0 0 exit code 0\n# done\n";
        let upto_one = log.find("o two").unwrap();
        let (frames, status) = summarise(CommandKind::Switch, log, upto_one);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("\"two\""));
        assert_eq!(status.message, "switch succeeded");
        assert_eq!(status.exit_code, 0);
    }

    #[test]
    fn tests_send_progress_after_each_script_and_a_summary() {
        let log = "# steps 2\n# start 0 5 T1.sh\no a\n# end 0 0 exit code 0\n# start 1 6 T2.sh\n# end 1 1 exit code 1\n# done\n";
        let (frames, status) = summarise(CommandKind::Test, log, 0);
        let progress = of_type(&frames, "test_progress");
        assert_eq!(progress.len(), 2);
        assert!(
            progress[0].contains("\"T1.sh passed\"") && progress[0].contains("\"running\":true")
        );
        assert!(
            progress[1].contains("\"1/2 passed\"") && progress[1].contains("\"running\":false")
        );
        assert_eq!((status.status, status.exit_code), (Outcome::Error, 1));
        let compartment: Vec<String> = of_type(&frames, "operation_progress")
            .iter()
            .map(|f| {
                let value: serde_json::Value = serde_json::from_str(f).unwrap();
                let tests = &value["payload"]["progress"]["tests"];
                format!(
                    "{} {} {}",
                    tests["current"], tests["results"], tests["status"]
                )
            })
            .collect();
        assert_eq!(
            compartment,
            [
                r#"0 ["pending","pending"] "in_progress""#,
                r#"1 ["pass","pending"] "in_progress""#,
                r#"2 ["pass","fail"] "error""#,
            ]
        );
        let (frames, status) = summarise(CommandKind::Test, "# steps 0\n# done\n", 0);
        assert!(of_type(&frames, "test_progress")[0].contains("\"0/0 passed\""));
        assert_eq!(status.status, Outcome::Ok);
    }

    #[test]
    fn stops_unstarted_programs_and_dead_supervisors() {
        let log = "# steps 1\n# start 0 5 nixos-rebuild switch\n# stopped\n# end 0 143 killed by signal 15\n# done\n";
        let (_, status) = summarise(CommandKind::Switch, log, 0);
        assert_eq!(
            (status.message.as_str(), status.exit_code),
            ("Stopped by user", 143)
        );
        let log = "# steps 1\n# notstarted 0 cannot run nixos-rebuild: nope\n# end 0 127 cannot run nixos-rebuild: nope\n# done\n";
        let (_, status) = summarise(CommandKind::Switch, log, 0);
        assert_eq!(
            (status.message.as_str(), status.exit_code),
            ("cannot run nixos-rebuild: nope", 127)
        );
        let (_, status) = summarise(CommandKind::Switch, "# steps 1\n# start 0 5 x\no a\n", 0);
        assert_eq!(status.exit_code, -1);
        let (frames, _) = summarise(CommandKind::Switch, "# steps 1\n# dropped 3\n# done\n", 0);
        assert!(frames[0].contains("[nixfleet] 3 lines dropped"));
    }
}
