//! The verdicts of the read-only checks (`refresh-*`). Their steps run
//! like any command's; what the follower reads of them here becomes the
//! verdict line (`[nixfleet] git: ok (…)`), the compartment events and, in
//! the end, the command's status. A check with nothing to look at was
//! planned without a step (see plan.rs): its verdict says why.

use super::step::StepResult;
use super::table::{Check, CommandKind};
use crate::host_facts::{current_system, head_commit, resolve_ref};
use crate::protocol::{CheckStatus, Outcome};
use crate::status::{LockAnswer, git_check};
use std::path::PathBuf;

/// Most stdout kept from a step whose stdout is parsed (the dry run's
/// JSON); the rest is in the log but not kept.
const MAX_CAPTURED_BYTES: usize = 4 * 1024 * 1024;

/// What a settled check gives the follower.
#[derive(Debug)]
pub enum CheckEvent {
    /// The verdict line, shown as the command's stdout.
    Line(String),
    Lock(LockAnswer),
    System(Result<bool, String>),
}

/// One check's part of the status.
#[derive(Debug, Clone)]
struct Verdict {
    ok: bool,
    summary: String,
    code: i32,
}

/// The checks of one command, settled in order as the log goes by.
pub struct Checks {
    checks: &'static [Check],
    repo_dir: PathBuf,
    branch: String,
    /// The check whose step runs now.
    current: Option<Check>,
    /// Its stdout, when that is data for the verdict.
    captured: String,
    verdicts: Vec<Verdict>,
}

impl Checks {
    pub fn new(kind: CommandKind, repo_dir: PathBuf, branch: String) -> Self {
        Checks {
            checks: kind.checks(),
            repo_dir,
            branch,
            current: None,
            captured: String::new(),
            verdicts: Vec::new(),
        }
    }

    /// A step starts: the checks before its own, which had no step, are
    /// settled first.
    pub fn begin(&mut self, label: &str, out: &mut Vec<CheckEvent>) {
        // Only this command's checks: a pull's `git fetch` is no check.
        let check = Check::of_label(label).filter(|check| self.checks.contains(check));
        if let Some(check) = check {
            while self.next().is_some_and(|next| next != check) {
                self.settle(None, out);
            }
        }
        self.current = check;
        self.captured.clear();
    }

    /// Whether a stdout line of the current step is kept for the verdict
    /// (and not sent); keeps it.
    pub fn keeps_stdout(&mut self, text: &str) -> bool {
        if !self.current.is_some_and(Check::stdout_is_data) {
            return false;
        }
        if self.captured.len() + text.len() < MAX_CAPTURED_BYTES {
            self.captured.push_str(text);
            self.captured.push('\n');
        }
        true
    }

    /// Whether a stderr line of the current step is shown.
    pub fn shows_stderr(&self) -> bool {
        self.current.is_none_or(Check::stderr_is_shown)
    }

    /// The current step ended.
    pub fn end(&mut self, result: &StepResult, out: &mut Vec<CheckEvent>) {
        if self.current.take().is_some() {
            self.settle(Some(result), out);
        }
    }

    /// The command is done: every check not settled yet had no step.
    pub fn finish(&mut self, out: &mut Vec<CheckEvent>) {
        while self.next().is_some() {
            self.settle(None, out);
        }
    }

    /// The status: one check's verdict, or all of them joined, the first
    /// failure deciding the exit code.
    pub fn outcome(&self) -> (Outcome, String, i32) {
        let summary: Vec<&str> = self.verdicts.iter().map(|v| v.summary.as_str()).collect();
        let summary = summary.join("; ");
        match self.verdicts.iter().find(|v| !v.ok) {
            Some(failed) => (Outcome::Error, summary, failed.code),
            None => (Outcome::Ok, summary, 0),
        }
    }

    fn next(&self) -> Option<Check> {
        self.checks.get(self.verdicts.len()).copied()
    }

    fn settle(&mut self, result: Option<&StepResult>, out: &mut Vec<CheckEvent>) {
        let Some(check) = self.next() else { return };
        let verdict = match check {
            Check::Git => self.git(result, out),
            Check::Lock => self.lock(result, out),
            Check::System => self.system(result, out),
        };
        self.verdicts.push(verdict);
    }

    /// HEAD against the `origin/<branch>` just fetched.
    fn git(&self, fetch: Option<&StepResult>, out: &mut Vec<CheckEvent>) -> Verdict {
        match fetch {
            None => failed(
                format!("no git repository at {}", self.repo_dir.display()),
                1,
            ),
            Some(fetch) if fetch.not_started => failed(fetch.how.clone(), fetch.code),
            Some(fetch) if !fetch.ok => failed(
                format!("{} failed: {}", fetch.label, fetch.detail_or_how()),
                fetch.code,
            ),
            Some(_) => {
                let branch = &self.branch;
                let upstream =
                    resolve_ref(&self.repo_dir, &format!("refs/remotes/origin/{branch}"));
                let head = head_commit(&self.repo_dir);
                let (status, message) = git_check(head.as_deref(), upstream.as_deref(), branch);
                let summary = format!("git: {} ({message})", check_word(status));
                out.push(CheckEvent::Line(format!("[nixfleet] {summary}")));
                Verdict {
                    ok: true,
                    summary,
                    code: 0,
                }
            }
        }
    }

    /// The age of the commit that last changed `flake.lock`.
    fn lock(&self, query: Option<&StepResult>, out: &mut Vec<CheckEvent>) -> Verdict {
        let result = match query {
            // No flake.lock: nothing to ask git.
            None => Ok(None),
            Some(query) if query.ok => Ok(self.captured.trim().parse().ok()),
            Some(query) if query.timed_out => Err("git log timed out".to_owned()),
            Some(query) if query.not_started => Err(query.how.clone()),
            Some(query) => Err(format!("git log failed: {}", query.detail)),
        };
        let answer = LockAnswer::new(&self.repo_dir, result);
        let verdict = match answer.verdict() {
            Ok((status, message)) => Verdict {
                ok: true,
                summary: format!("lock: {} ({message})", check_word(status)),
                code: 0,
            },
            Err(why) => failed(format!("lock: {why}"), 1),
        };
        out.push(CheckEvent::Lock(answer));
        out.push(CheckEvent::Line(format!("[nixfleet] {}", verdict.summary)));
        verdict
    }

    /// The dry run's toplevel against the running system.
    fn system(&self, dry_run: Option<&StepResult>, out: &mut Vec<CheckEvent>) -> Verdict {
        let current = current_system();
        let (Some(dry_run), Some(current)) = (dry_run, current) else {
            let why = "no /run/current-system to compare with (not NixOS?)".to_owned();
            out.push(CheckEvent::System(Err(why.clone())));
            return failed(why, 1);
        };
        let (event, verdict) = if dry_run.ok {
            let matches = dry_run_builds(&self.captured, &current);
            let summary = if matches {
                "system: ok (the repo builds the running system)"
            } else {
                "system: outdated (the repo builds a different system)"
            };
            let verdict = Verdict {
                ok: true,
                summary: summary.to_owned(),
                code: 0,
            };
            (Ok(matches), verdict)
        } else {
            let why = if dry_run.timed_out || dry_run.not_started {
                dry_run.how.clone()
            } else {
                format!("nix build --dry-run failed: {}", dry_run.detail_or_how())
            };
            (Err(why.clone()), failed(why, dry_run.code))
        };
        out.push(CheckEvent::System(event));
        out.push(CheckEvent::Line(format!("[nixfleet] {}", verdict.summary)));
        verdict
    }
}

fn failed(summary: String, code: i32) -> Verdict {
    Verdict {
        ok: false,
        summary,
        code,
    }
}

fn check_word(status: CheckStatus) -> &'static str {
    match status {
        CheckStatus::Ok => "ok",
        CheckStatus::Outdated => "outdated",
        CheckStatus::Error => "error",
        CheckStatus::Unknown => "unknown",
        CheckStatus::Working => "working",
    }
}

/// Whether `nix build --dry-run --json` says the toplevel's output is the
/// running system: the `outputs` of its JSON, else (another shape) any
/// mention of the path.
fn dry_run_builds(stdout: &str, current: &str) -> bool {
    match serde_json::from_str::<serde_json::Value>(stdout.trim()) {
        Ok(serde_json::Value::Array(items)) => items.iter().any(|item| {
            item.get("outputs")
                .and_then(serde_json::Value::as_object)
                .is_some_and(|outputs| outputs.values().any(|v| v.as_str() == Some(current)))
        }),
        _ => stdout.contains(current),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dry_run_verdicts() {
        let json =
            r#"[{"drvPath":"/nix/store/d.drv","outputs":{"out":"/nix/store/abc-nixos-system"}}]"#;
        assert!(dry_run_builds(json, "/nix/store/abc-nixos-system"));
        assert!(!dry_run_builds(json, "/nix/store/xyz-nixos-system"));
        assert!(!dry_run_builds("[]", "/nix/store/abc"));
        assert!(dry_run_builds("not json /nix/store/abc", "/nix/store/abc"));
    }

    #[test]
    fn checks_without_a_step_are_settled_in_order_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut checks = Checks::new(CommandKind::RefreshAll, dir.path().into(), "main".into());
        let mut out = Vec::new();
        checks.finish(&mut out);
        let (outcome, summary, code) = checks.outcome();
        assert_eq!((outcome, code), (Outcome::Error, 1));
        assert!(
            summary.starts_with("no git repository at ")
                && summary.contains("; lock: unknown (flake.lock not found); "),
            "{summary}"
        );
        assert!(matches!(out[0], CheckEvent::Lock(_)), "{out:?}");
    }
}
