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
            Record::Dropped(n) => {
                if sending {
                    let notice = format!("[nixfleet] {n} lines dropped");
                    let frame = output_frame(self.kind.name(), Stream::Stderr, &notice);
                    out.push(Emit::Frame(frame));
                    out.push(Emit::Dropped(n));
                }
            }
            Record::Done => self.on_done(sending, out),
            Record::Cut | Record::Unknown => {}
        }
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
mod tests {
    use super::*;
    use crate::commands::log::parse;

    fn summarise(kind: CommandKind, log: &str, resume_at: usize) -> (Vec<String>, Status) {
        let mut summary = Summary::new(kind, "/nonexistent".into(), "main".into());
        let mut frames = Vec::new();
        let mut offset = 0;
        for record in log.split_inclusive('\n') {
            offset += record.len();
            let record = record.strip_suffix('\n').unwrap();
            let mut out = Vec::new();
            summary.on_record(parse(record.as_bytes()), offset > resume_at, &mut out);
            frames.extend(out.into_iter().filter_map(|e| match e {
                Emit::Frame(frame) | Emit::Line(frame) | Emit::Progress(frame) => Some(frame),
                Emit::Started(_)
                | Emit::Dropped(_)
                | Emit::Tested { .. }
                | Emit::Rebuilt(_)
                | Emit::Lock(_)
                | Emit::System(_) => None,
            }));
        }
        (frames, summary.status("abc".into()))
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
            let mut summary = Summary::new(kind, "/nonexistent".into(), "main".into());
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
            ["Tested { passed: 1, total: 2, stopped: false, failed: [\"T2.sh\"] }"]
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
