//! Safe deployments in the core: the running system recorded before a
//! switch, the countdown armed when the switch changed it, confirmed by the
//! dashboard, or the rollback run through the normal command path when
//! the deadline passes. The record and the decisions live in
//! `activation/`; this file ties them to the core's events.

use super::confirm::{Verdict, now_secs};
use super::core::Core;
use crate::activation::{self, Adopted, Phase, Record, Resume};
use crate::commands::handover::CommandRecord;
use crate::commands::log::has_ended;
use crate::commands::{CommandKind, StopRequest};
use crate::connection::Control;
use crate::host_facts::{current_system, generation};
use crate::protocol::{Outcome, Status};
use tracing::{info, warn};

impl Core {
    /// At start: what a previous agent left (after `adopt_previous`, so
    /// that a command or rollback it started is followed, not repeated).
    pub(super) fn resume_activation(&mut self) {
        let record = Record::load(&self.state_dir);
        let current = current_system();
        let boot = activation::boot_id();
        let adopted = self.adopted();
        match activation::resume(
            record.as_ref(),
            boot.as_deref(),
            current.as_deref(),
            adopted,
        ) {
            Resume::Nothing => {}
            Resume::Forget => Record::clear(&self.state_dir),
            Resume::Wait | Resume::Countdown => self.activation = record,
            Resume::Arm => match record {
                // Only the tests after the switch guard it: they still run.
                Some(record) if self.confirm_timeout.is_zero() && record.tests_due => {
                    self.activation = Some(record);
                }
                Some(_) if self.confirm_timeout.is_zero() => Record::clear(&self.state_dir),
                Some(record) => self.arm(record),
                None => {}
            },
            Resume::Report => {
                if let Some(record) = record {
                    self.report_unattended(record);
                }
            }
            Resume::OtherBoot { message } => {
                warn!("{message}");
                Record::clear(&self.state_dir);
                self.rollback_status(Outcome::Warning, 0, message);
            }
            Resume::AlreadyBack { report } => {
                info!("the rollback was cut short, but the recorded system runs: {report}");
                self.conclude(record, report, 0);
            }
            Resume::RollBackAgain => {
                warn!(
                    "the rollback was cut short (the agent or the host stopped while it ran); running it again"
                );
                self.activation = record;
                self.roll_back();
            }
            Resume::Interrupted { message } => {
                warn!("{message}");
                self.conclude(record, message, -1);
            }
        }
    }

    /// What `adopt_previous` took over, as the activation needs to know it:
    /// a rollback whose supervisor runs, or whose log has its end, is
    /// followed; one with neither was cut short.
    fn adopted(&self) -> Adopted {
        match &self.running {
            None => Adopted::Nothing,
            Some(r) if r.kind != CommandKind::Rollback => Adopted::Command,
            Some(_) => {
                let record = CommandRecord::load(&self.state_dir);
                let followed = record
                    .is_some_and(|r| r.is_running() || r.log.as_deref().is_some_and(has_ended));
                if followed {
                    Adopted::Rollback
                } else {
                    Adopted::RollbackCutShort
                }
            }
        }
    }

    /// A rollback cut short ends with `report`: the record says so, and
    /// the dashboard is told once.
    fn conclude(&mut self, record: Option<Record>, report: String, exit_code: i32) {
        let Some(mut record) = record else {
            return;
        };
        record.phase = Phase::RolledBack;
        record.report = Some(report);
        record.exit_code = exit_code;
        record.reported = false;
        self.report_unattended(record);
    }

    /// A rolled-back record: its report stands in the system compartment,
    /// and, if it was not sent yet (a rollback the timer ran, or one cut
    /// short), it is sent once: by the end of the adopted rollback, whose
    /// lines go first, or now when there is none.
    fn report_unattended(&mut self, mut record: Record) {
        let Some(report) = record.report.clone() else {
            return;
        };
        self.compartments.rolled_back(&report);
        let adopted_rollback = self
            .running
            .as_ref()
            .is_some_and(|r| r.kind == CommandKind::Rollback);
        if !record.reported && !adopted_rollback {
            record.reported = true;
            self.save_activation(&record);
            self.count_rollback(record.exit_code == 0);
            self.rollback_status(Outcome::Error, record.exit_code, report);
        } else {
            self.save_activation(&record);
        }
        self.activation = Some(record);
    }

    /// Whether the running command is the automatic rollback.
    pub(super) fn rolling_back(&self) -> bool {
        let rollback = self
            .running
            .as_ref()
            .is_some_and(|r| r.kind == CommandKind::Rollback);
        rollback
            && self
                .activation
                .as_ref()
                .is_some_and(|r| r.phase == Phase::RollingBack)
    }

    /// The deadline of an armed activation, for the core's wait.
    pub(super) fn armed_deadline(&self) -> Option<u64> {
        self.activation
            .as_ref()
            .filter(|r| r.phase == Phase::Armed)
            .map(|r| r.deadline)
    }

    /// Why `kind` may not start now: an activation waits for confirmation,
    /// or its rollback runs.
    pub(super) fn activation_refusal(&self, kind: CommandKind) -> Option<String> {
        let record = self.activation.as_ref()?;
        let pending = matches!(record.phase, Phase::Armed | Phase::RollingBack);
        (kind.activates() && pending).then(|| activation::decide::refusal(record, now_secs()))
    }

    /// Before an activating command: the running system, to go back to.
    pub(super) fn record_before(&mut self, kind: CommandKind) {
        if self
            .activation
            .as_ref()
            .is_some_and(|r| r.phase == Phase::RolledBack)
        {
            // A new activation: the rollback's report stays in the system
            // compartment until one succeeds, but it is not sent again.
            Record::clear(&self.state_dir);
            self.activation = None;
        }
        let guarded = !self.confirm_timeout.is_zero() || self.rollback_on_failed_tests;
        if !kind.needs_confirmation() || !guarded {
            return;
        }
        let Some(system) = current_system() else {
            info!(
                command = kind.name(),
                "no running NixOS system to record: this switch cannot be rolled back"
            );
            return;
        };
        let generation = activation::profile_generation(&activation::system_profile());
        let boot = activation::boot_id().unwrap_or_default();
        let record = Record::recorded(kind.name(), system, generation, boot);
        self.save_activation(&record);
        self.activation = Some(record);
    }

    /// A command ended: an automatic rollback's status carries its report;
    /// a switch that changed the system arms the countdown. Returns the
    /// status to send and, for a rollback, the report for the system
    /// compartment.
    pub(super) fn activation_ended(
        &mut self,
        kind: Option<CommandKind>,
        status: Status,
    ) -> (Option<Status>, Option<String>) {
        let (Some(kind), Some(record)) = (kind, self.activation.clone()) else {
            return (Some(status), None);
        };
        match record.phase {
            // The rollback a previous agent left cut short: the lines its
            // log held went out; it runs again next, and that run's status
            // is the one the dashboard gets.
            Phase::RollingBack if kind == CommandKind::Rollback && self.rollback_due => {
                (None, None)
            }
            Phase::RollingBack | Phase::RolledBack if kind == CommandKind::Rollback => {
                let (status, report) = self.rollback_ended(record, status);
                (Some(status), report)
            }
            Phase::Recorded if kind.needs_confirmation() => {
                self.switch_ended(record, &status);
                (Some(status), None)
            }
            Phase::Recorded | Phase::Armed if kind == CommandKind::Test => {
                self.tests_ended(record, &status);
                (Some(status), None)
            }
            _ => (Some(status), None),
        }
    }

    /// A switch ended: armed when it changed the system; its tests run next
    /// when `rollback_on_failed_tests` asks for them.
    fn switch_ended(&mut self, record: Record, status: &Status) {
        let current = current_system();
        let succeeded = status.status == Outcome::Ok;
        let changed = activation::decide::should_arm(
            &record,
            succeeded,
            current.as_deref(),
            std::time::Duration::MAX,
        );
        self.test_after_switch = changed && self.rollback_on_failed_tests;
        let record = Record {
            tests_due: self.test_after_switch,
            ..record
        };
        if changed && !self.confirm_timeout.is_zero() {
            self.arm(record);
        } else if self.test_after_switch {
            self.save_activation(&record);
            self.activation = Some(record);
        } else {
            Record::clear(&self.state_dir);
            self.activation = None;
        }
    }

    /// At start, after `resume_activation`: the tests after a switch that a
    /// previous agent ran (it restarted or died before they ended) still
    /// decide. A test run it started was adopted: its end decides; else
    /// they run now.
    pub(super) fn resume_tests(&mut self) {
        let due = self
            .activation
            .as_ref()
            .is_some_and(|r| r.tests_due && matches!(r.phase, Phase::Recorded | Phase::Armed));
        if !due {
            return;
        }
        if self
            .running
            .as_ref()
            .is_some_and(|r| r.kind == CommandKind::Test)
        {
            self.testing_activation = true;
        } else {
            self.test_after_switch = true;
            self.test_if_due();
        }
    }

    /// The tests of a switch ended: a failure rolls it back now.
    fn tests_ended(&mut self, mut record: Record, status: &Status) {
        if !std::mem::take(&mut self.testing_activation) {
            return;
        }
        record.tests_due = false;
        if status.status == Outcome::Ok {
            if record.phase == Phase::Recorded {
                Record::clear(&self.state_dir);
                self.activation = None;
            } else {
                self.save_activation(&record);
                self.activation = Some(record);
            }
            return;
        }
        record.failed_tests = std::mem::take(&mut self.failed_tests);
        if record.failed_tests.is_empty() {
            record.failed_tests.push(status.message.clone());
        }
        self.save_activation(&record);
        self.activation = Some(record);
        self.rollback_due = true;
    }

    /// After a switch, with `rollback_on_failed_tests`: the host's tests,
    /// as the `test` command runs them.
    pub(super) fn test_if_due(&mut self) {
        if std::mem::take(&mut self.test_after_switch) && self.running.is_none() {
            info!("running the host's tests after the switch (rollback_on_failed_tests)");
            self.testing_activation = true;
            self.failed_tests.clear();
            self.launch(CommandKind::Test, None);
        }
    }

    fn rollback_ended(&mut self, mut record: Record, status: Status) -> (Status, Option<String>) {
        let (report, exit_code) = match (&record.report, &record.phase) {
            // Decided already: the same rollback again (its status was not
            // delivered before the agent restarted), one the timer ran, or
            // one cut short: the same report.
            (Some(report), Phase::RolledBack) => (report.clone(), record.exit_code),
            _ if status.status == Outcome::Ok => {
                (activation::decide::rollback_report(&record, Ok(())), 0)
            }
            _ => (
                activation::decide::rollback_report(
                    &record,
                    Err((status.exit_code, status.message.as_str())),
                ),
                status.exit_code,
            ),
        };
        warn!("{report}");
        // Once per rollback, by whoever sends its status first (the agent
        // that ran it, or the one that adopted the timer's run); an agent
        // that adopts its end again after delivering it does not.
        if record.phase != Phase::RolledBack || !record.reported {
            self.count_rollback(exit_code == 0);
        }
        record.phase = Phase::RolledBack;
        record.report = Some(report.clone());
        record.exit_code = exit_code;
        // This status carries it.
        record.reported = true;
        self.save_activation(&record);
        self.activation = Some(record);
        let status = Status {
            status: Outcome::Error,
            message: report.clone(),
            exit_code,
            ..status
        };
        (status, Some(report))
    }

    /// Starts the countdown for `record`'s switch.
    fn arm(&mut self, record: Record) {
        let commit = generation(&self.repo_dir);
        let armed = activation::decide::arm(&record, commit, self.confirm_timeout, now_secs());
        info!(
            command = %armed.command,
            "the switch changed the running system; it is rolled back to {} unless the dashboard confirms it within {} s",
            activation::short_path(&armed.system),
            armed.timeout_secs
        );
        let armed = self.arm_timer(armed);
        self.save_activation(&armed);
        self.confirmation.rearm();
        self.activation = Some(armed);
    }

    /// Under systemd, a transient timer that rolls back even if no agent
    /// runs then; otherwise only this agent's countdown.
    fn arm_timer(&mut self, mut armed: Record) -> Record {
        if !activation::timer::systemd_is_init() {
            if !std::mem::replace(&mut self.told_no_timer, true) {
                info!(
                    "systemd is not the init system: an unconfirmed switch is rolled back by the agent's own countdown only (no timer survives an agent that cannot start)"
                );
            }
            return armed;
        }
        let exe = match std::fs::read_link("/proc/self/exe") {
            Ok(exe) => exe,
            Err(error) => {
                warn!(%error, "cannot find this binary for the rollback timer; the agent's own countdown only");
                return armed;
            }
        };
        let unit = activation::timer::unit_name(armed.deadline);
        let argv = activation::timer::arm_argv(&unit, armed.timeout_secs, &exe, &self.state_dir);
        self.run_quietly(argv, "arm the rollback timer");
        armed.timer_unit = Some(unit);
        armed
    }

    /// Runs a short systemd command in the background (no shell); a
    /// failure is logged.
    fn run_quietly(&self, argv: Vec<std::ffi::OsString>, what: &'static str) {
        let env = self.runner.shared_child_env();
        tokio::spawn(async move {
            let Some((program, args)) = argv.split_first() else {
                return;
            };
            let result = tokio::process::Command::new(program)
                .args(args)
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(std::process::Stdio::null())
                .output()
                .await;
            match result {
                Ok(out) if out.status.success() => {}
                Ok(out) => warn!(
                    status = %out.status,
                    "cannot {what}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(error) => warn!(%error, "cannot {what}"),
            }
        });
    }

    /// The dashboard was reached after the switch: the countdown ends.
    pub(super) fn confirm(&mut self, how: &str) {
        let Some(record) = self.activation.as_ref().filter(|r| r.phase == Phase::Armed) else {
            return;
        };
        info!(command = %record.command, commit = %record.commit, "the switch is confirmed: {how}");
        if let Some(unit) = &record.timer_unit {
            self.run_quietly(
                activation::timer::cancel_argv(unit),
                "stop the rollback timer",
            );
        }
        if self.testing_activation || record.tests_due {
            // The countdown ends; the tests still decide.
            let record = Record {
                phase: Phase::Recorded,
                timer_unit: None,
                ..record.clone()
            };
            self.save_activation(&record);
            self.activation = Some(record);
            return;
        }
        Record::clear(&self.state_dir);
        self.activation = None;
    }

    pub(super) fn on_verdict(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Stable => self.confirm("a connection opened after it stayed up"),
            Verdict::Expired => self.roll_back(),
        }
    }

    /// The deadline passed: the rollback runs as the command `rollback`,
    /// through the same path as every command (plan, supervisor, log). A
    /// command still running is stopped first; the rollback follows its end.
    fn roll_back(&mut self) {
        let Some(record) = self.activation.as_mut() else {
            return;
        };
        if matches!(record.phase, Phase::Armed | Phase::Recorded) {
            record.phase = Phase::RollingBack;
            let record = record.clone();
            self.save_activation(&record);
        }
        if let Some(running) = &self.running {
            warn!(
                command = running.kind.name(),
                "a command runs; stopping it to roll back"
            );
            running.stop.send_replace(Some(StopRequest::Terminate));
            self.rollback_due = true;
            return;
        }
        let Some(record) = self.activation.as_mut() else {
            return;
        };
        // Counted before it starts: a rollback cut short runs again once.
        record.attempts += 1;
        let record = record.clone();
        self.save_activation(&record);
        let note = activation::decide::rollback_note(&record);
        warn!("{}", note.trim_start_matches("[nixfleet] "));
        let profile = activation::system_profile();
        let plan = self
            .runner
            .rollback_plan(&record.system, &profile, vec![note]);
        self.launch(CommandKind::Rollback, Some(plan));
    }

    /// After a command ended: the rollback that waited for it.
    pub(super) fn rollback_if_due(&mut self) {
        if std::mem::take(&mut self.rollback_due) {
            self.roll_back();
        }
    }

    fn save_activation(&self, record: &Record) {
        if let Err(error) = record.save(&self.state_dir) {
            warn!(%error, "cannot write the activation record; the countdown does not survive a restart");
        }
    }

    /// A status for `rollback` that no command of this agent produced.
    fn rollback_status(&mut self, status: Outcome, exit_code: i32, message: String) {
        let status = Status {
            status,
            command: CommandKind::Rollback.name().to_owned(),
            exit_code,
            message,
            generation: generation(&self.repo_dir),
        };
        self.send_status(status, Control::Heartbeat);
    }
}
