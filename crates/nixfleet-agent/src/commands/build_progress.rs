//! A rebuild's build progress: Nix's structured log (nix_log.rs) counted
//! into the `system` dots of `operation_progress`, at most four reports a
//! second, never going backwards.

use crate::nix_log::NixLog;
use crate::protocol::{OperationProgress, Outbound, PhaseProgress, PhaseStatus, Phases};
use std::time::{Duration, Instant};

/// Least time between two intermediate build progress reports (at most
/// four a second); the final one is never held back.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// A rebuild's structured log and what was last reported of it.
pub struct BuildProgress {
    pub log: NixLog,
    /// Counts changed since the last report.
    pub dirty: bool,
    last_report: Option<Instant>,
    /// The last `system` step sent; reports never go backwards.
    sent: Option<PhaseProgress>,
}

impl BuildProgress {
    pub(crate) fn new() -> Self {
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
    pub fn report(&mut self, status: PhaseStatus) -> Option<OperationProgress> {
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
    pub fn throttled(&mut self) -> Option<String> {
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

    /// When a held-back report is due, if one is.
    pub fn due(&self) -> Option<Instant> {
        if !self.dirty {
            return None;
        }
        Some(
            self.last_report
                .map_or_else(Instant::now, |last| last + PROGRESS_INTERVAL),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_progress_reports_only_changes_and_never_goes_backwards() {
        let mut progress = BuildProgress::new();
        let feed = |p: &mut BuildProgress, line: &str| {
            p.log.feed(line, &mut |_, _| {});
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
}
