//! The progress dots of `operation_progress`: the pull's git steps, the
//! lock's flake update, the tests compartment's scripts.

use super::step::StepResult;
use crate::protocol::{
    OperationProgress, Outbound, PhaseProgress, PhaseStatus, Phases, TestResult, TestsProgress,
};

/// A compartment whose steps are counted as dots.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    Pull,
    Lock,
}

/// The frame of one phase's dots.
pub fn phase_frame(phase: Phase, current: u32, total: u32, status: PhaseStatus) -> String {
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
    Outbound::OperationProgress(&OperationProgress { progress }).to_json()
}

/// The tests compartment's dots: one result per script so far, the rest
/// (of `steps`) pending.
pub fn tests_frame(results: &[StepResult], steps: usize, status: PhaseStatus) -> String {
    let mut dots: Vec<TestResult> = results
        .iter()
        .map(|r| {
            if r.ok {
                TestResult::Pass
            } else {
                TestResult::Fail
            }
        })
        .collect();
    dots.resize(steps.max(dots.len()), TestResult::Pending);
    let progress = Phases {
        tests: Some(TestsProgress {
            current: results.len() as u32,
            total: steps as u32,
            results: dots,
            status,
        }),
        ..Phases::default()
    };
    Outbound::OperationProgress(&OperationProgress { progress }).to_json()
}
