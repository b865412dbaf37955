//! Everything the command log said so far that the dashboard and the core
//! need: each record becomes output frames, progress dots, test progress,
//! compartment events, and in the end the command's status, computed from
//! the exit codes the supervisor recorded.
//!
//! Records before the delivery cursor are only replayed (to rebuild what
//! the status needs: step results, the current pid, a rebuild's counts,
//! a check's data), never sent again.

use super::build_progress::BuildProgress;
use super::checks::{CheckEvent, Checks};
use super::dots::{Phase, phase_frame, tests_frame};
use super::lines::{ErrorDetail, line_text, output_frame};
use super::log::Record;
use super::step::{StepKind, StepResult};
use super::table::CommandKind;
use crate::nix_log::{Effect, Meaning};
use crate::protocol::{Outbound, Outcome, PhaseStatus, Status, Stream, TestProgress};
use crate::signature::{HEAD_LABEL, PULL_LABEL};
use crate::status::LockAnswer;
use std::path::PathBuf;
use std::time::Instant;

/// What a record turns into.
#[derive(Debug)]
pub enum Emit {
    Frame(String),
    /// A line of the command's output, as its frame.
    Line(String),
    /// Lines the log's cap did not keep (counted for the metrics).
    Dropped(u64),
    /// An intermediate build progress report (a newer one replaces it).
    Progress(String),
    Started(u32),
    /// A `test` command's result, for the tests compartment.
    Tested {
        passed: u32,
        total: u32,
        stopped: bool,
        /// The scripts that failed, by name.
        failed: Vec<String>,
    },
    /// A `nixos-rebuild` step ran to its end (ok or not).
    Rebuilt(bool),
    /// A lock check's answer, for the lock compartment.
    Lock(LockAnswer),
    /// A system check's verdict, for the system compartment.
    System(Result<bool, String>),
}

/// Everything the log said so far that the status and progress need.
pub struct Summary {
    kind: CommandKind,
    /// Every step's label, by index (from the `step` records).
    planned: Vec<String>,
    /// Git steps done, once the pull's first dot was sent.
    pull_done: Option<u32>,
    /// While a `nixos-rebuild` that builds runs: its structured log's state
    /// (rebuilt by replay after a restart, so counts stay right).
    build: Option<BuildProgress>,
    /// The verdicts of a `refresh-*` command's checks.
    checks: Checks,
    steps: usize,
    current_label: String,
    current_not_started: bool,
    current_timed_out: bool,
    error_detail: ErrorDetail,
    results: Vec<StepResult>,
    stopped: bool,
    done: bool,
    final_progress: bool,
}

impl Summary {
    pub fn new(kind: CommandKind, repo_dir: PathBuf, branch: String) -> Self {
        Summary {
            kind,
            planned: Vec::new(),
            pull_done: None,
            build: None,
            checks: Checks::new(kind, repo_dir, branch),
            steps: 0,
            current_label: String::new(),
            current_not_started: false,
            current_timed_out: false,
            error_detail: ErrorDetail::default(),
            results: Vec::new(),
            stopped: false,
            done: false,
            final_progress: false,
        }
    }

    /// Whether the supervisor recorded its end.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Updates the summary; adds to `out` what to send when `sending`
    /// (records before the delivery cursor are only replayed).
    pub fn on_record(&mut self, record: Record<'_>, sending: bool, out: &mut Vec<Emit>) {
        match record {
            Record::Line { stderr, cut, raw } => self.on_line(stderr, cut, raw, sending, out),
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
                let builds = StepKind::of(&self.current_label) == StepKind::Rebuild
                    && self.kind != CommandKind::Rollback;
                self.build = builds.then(BuildProgress::new);
                out.push(Emit::Started(pid));
            }
            Record::NotStarted { index, .. } => {
                self.begin_step(index, "", sending, out);
                self.current_not_started = true;
            }
            Record::Stopped => self.stopped = true,
            Record::TimedOut => self.current_timed_out = true,
            Record::End { code, how, .. } => self.end_step(code, how, sending, out),
            Record::Dropped(n) if sending => {
                self.notice(&format!("[nixfleet] {n} lines dropped"), out);
                out.push(Emit::Dropped(n));
            }
            // Announced before the status; not a line of the command.
            Record::NotKept { lines, why } if sending => {
                self.notice(&format!("[nixfleet] {lines} lines not kept: {why}"), out);
                out.push(Emit::Dropped(lines));
            }
            // Said once, before the first line that is not kept: a
            // reconnect cannot send these again from the disk.
            Record::Streaming(why) if sending => self.notice(
                &format!("[nixfleet] streaming only from here, output not kept on disk: {why}"),
                out,
            ),
            Record::Dropped(_) | Record::NotKept { .. } | Record::Streaming(_) => {}
            Record::Done => self.on_done(sending, out),
            Record::Cut | Record::Unknown => {}
        }
    }

    fn notice(&self, text: &str, out: &mut Vec<Emit>) {
        let frame = output_frame(self.kind.name(), Stream::Stderr, text);
        out.push(Emit::Frame(frame));
    }

    /// Where a line of the command becomes what the dashboard gets: a
    /// rebuild's structured log is rendered to plain lines and its counts
    /// reported, a check's data is kept for its verdict; anything else
    /// goes as is.
    fn on_line(&mut self, stderr: bool, cut: bool, raw: &[u8], sending: bool, out: &mut Vec<Emit>) {
        let stream = if stderr {
            Stream::Stderr
        } else {
            Stream::Stdout
        };
        if self.build.is_none() && !stderr && !sending && !self.kind.is_check() {
            return;
        }
        let text = line_text(raw, cut);
        if !stderr && self.checks.keeps_stdout(&text) {
            return;
        }
        let shown = sending && (!stderr || self.checks.shows_stderr());
        let command = self.kind.name();
        let error_detail = &mut self.error_detail;
        let mut line = |plain: &str, meaning: Meaning| {
            if stderr {
                error_detail.note(plain);
            }
            // Nix's rendered log goes by what it says, not by the stderr
            // it was written to (docs/protocol.md, `is_error` by meaning).
            let stream = match meaning {
                Meaning::AsIs => stream,
                Meaning::Info => Stream::Stdout,
                Meaning::Error => Stream::Stderr,
            };
            if shown {
                out.push(Emit::Line(output_frame(command, stream, plain)));
            }
        };
        match self.build.as_mut() {
            Some(build) => {
                if build.log.feed(&text, &mut line) == Effect::Counts {
                    build.dirty = true;
                    if sending && let Some(report) = build.throttled() {
                        out.push(Emit::Progress(report));
                    }
                }
            }
            None => line(&text, Meaning::AsIs),
        }
    }

    /// A step starts (or could not start): the first git step opens the
    /// pull's dots, a flake update the lock's; a check's step settles the
    /// checks before it.
    fn begin_step(&mut self, index: usize, label: &str, sending: bool, out: &mut Vec<Emit>) {
        let label = match self.planned.get(index) {
            Some(planned) if label.is_empty() => planned.clone(),
            _ => label.to_owned(),
        };
        self.current_not_started = false;
        self.current_timed_out = false;
        self.error_detail = ErrorDetail::default();
        match StepKind::of(&label) {
            _ if self.kind.is_check() => {}
            StepKind::Git if self.pull_done.is_none() => {
                self.pull_done = Some(0);
                let total = self.git_steps();
                push_phase(Phase::Pull, 0, total, PhaseStatus::InProgress, sending, out);
            }
            StepKind::FlakeUpdate => {
                push_phase(Phase::Lock, 0, 1, PhaseStatus::InProgress, sending, out);
            }
            _ => {}
        }
        let mut events = Vec::new();
        self.checks.begin(&label, &mut events);
        self.check_events(events, sending, out);
        self.current_label = label;
    }

    /// A step ended: its final build report, its dot, its result.
    fn end_step(&mut self, code: i32, how: &str, sending: bool, out: &mut Vec<Emit>) {
        let ok = code == 0 && !self.stopped && !self.current_not_started;
        if let Some(mut build) = self.build.take()
            && build.log.is_structured()
        {
            // The final report, whatever the throttle says: it is what the
            // dots end on.
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
        let result = StepResult {
            label,
            code,
            how: how.to_owned(),
            ok,
            detail: self.error_detail.get().unwrap_or_default().to_owned(),
            not_started: self.current_not_started,
            timed_out: self.current_timed_out,
        };
        if !self.stopped {
            let mut events = Vec::new();
            self.checks.end(&result, &mut events);
            self.check_events(events, sending, out);
        }
        self.results.push(result);
        if self.kind == CommandKind::Test {
            self.test_step_ended(sending, out);
        }
    }

    /// A step ended: the pull's next dot, or the lock's.
    fn end_phase(&mut self, step: StepKind, ok: bool, sending: bool, out: &mut Vec<Emit>) {
        match step {
            _ if self.kind.is_check() => {}
            StepKind::Git => {
                let total = self.git_steps();
                let done = self.pull_done.unwrap_or(0) + u32::from(ok);
                self.pull_done = Some(done);
                let status = match ok {
                    false => PhaseStatus::Error,
                    true if done >= total => PhaseStatus::Complete,
                    true => PhaseStatus::InProgress,
                };
                push_phase(Phase::Pull, done, total, status, sending, out);
            }
            StepKind::FlakeUpdate => {
                let (done, status) = if ok {
                    (1, PhaseStatus::Complete)
                } else {
                    (0, PhaseStatus::Error)
                };
                push_phase(Phase::Lock, done, 1, status, sending, out);
            }
            StepKind::Rebuild | StepKind::Other => {}
        }
    }

    /// A test script ended: the tests compartment's dots and the progress.
    fn test_step_ended(&mut self, sending: bool, out: &mut Vec<Emit>) {
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

    fn on_done(&mut self, sending: bool, out: &mut Vec<Emit>) {
        self.done = true;
        if !self.stopped {
            let mut events = Vec::new();
            self.checks.finish(&mut events);
            self.check_events(events, sending, out);
        }
        if self.kind != CommandKind::Test {
            return;
        }
        out.push(Emit::Tested {
            passed: self.passed(),
            total: self.steps as u32,
            stopped: self.stopped,
            failed: self
                .results
                .iter()
                .filter(|r| !r.ok)
                .map(|r| r.label.clone())
                .collect(),
        });
        if !self.final_progress {
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

    /// A check's verdict line is output (sent once); its compartment events
    /// go to the core also when replayed, as a new agent's core needs them.
    fn check_events(&self, events: Vec<CheckEvent>, sending: bool, out: &mut Vec<Emit>) {
        for event in events {
            match event {
                CheckEvent::Line(line) if sending => {
                    let frame = output_frame(self.kind.name(), Stream::Stdout, &line);
                    out.push(Emit::Frame(frame));
                }
                CheckEvent::Line(_) => {}
                CheckEvent::Lock(answer) => out.push(Emit::Lock(answer)),
                CheckEvent::System(verdict) => out.push(Emit::System(verdict)),
            }
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

    /// The tests compartment's dots.
    fn tests_phase(&self, status: PhaseStatus, sending: bool, out: &mut Vec<Emit>) {
        if sending {
            out.push(Emit::Frame(tests_frame(&self.results, self.steps, status)));
        }
    }

    /// When a held-back build progress report is due, if one is.
    pub fn progress_due(&self) -> Option<Instant> {
        self.build.as_ref()?.due()
    }

    /// The report the throttle held back, once its interval is over, while
    /// the log is quiet (a long build phase prints nothing).
    pub fn held_back_progress(&mut self) -> Option<Emit> {
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

    pub fn status(&self, generation: String) -> Status {
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
        if self.kind.is_check() {
            return self.checks.outcome();
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
            return (Outcome::Error, failure_message(failed), failed.code);
        }
        if self.results.len() < self.steps {
            return (
                Outcome::Error,
                "the command ended before all its steps ran".to_owned(),
                -1,
            );
        }
        (Outcome::Ok, success_message(self.kind, generation), 0)
    }
}

/// A phase's dots, when sending.
fn push_phase(
    phase: Phase,
    current: u32,
    total: u32,
    status: PhaseStatus,
    sending: bool,
    out: &mut Vec<Emit>,
) {
    if sending {
        out.push(Emit::Frame(phase_frame(phase, current, total, status)));
    }
}

/// What a status says about the step that failed.
fn failure_message(failed: &StepResult) -> String {
    let detail = failed.detail_or_how();
    match StepKind::of(&failed.label) {
        _ if failed.not_started => failed.how.clone(),
        // The check's own line names the commit and why.
        _ if failed.label == PULL_LABEL || failed.label == HEAD_LABEL => detail.to_owned(),
        StepKind::Git => format!("{} failed: {detail}", failed.label),
        StepKind::FlakeUpdate => format!("nix flake update failed: {detail}"),
        StepKind::Rebuild | StepKind::Other => failed.how.clone(),
    }
}

fn success_message(kind: CommandKind, generation: &str) -> String {
    match kind {
        CommandKind::Pull => format!("at {generation}"),
        CommandKind::Update => "flake.lock updated (every input)".to_owned(),
        CommandKind::BumpFlake => "flake.lock updated (input nixfleet)".to_owned(),
        kind => format!("{} succeeded", kind.name()),
    }
}

#[cfg(test)]
#[path = "summary_tests.rs"]
mod tests;
