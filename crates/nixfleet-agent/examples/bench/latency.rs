//! The latency phase: a `switch` printing at a steady rate, measured from
//! the child's write to the dashboard's arrival.

use crate::command::run_command;
use crate::phases::Phases;
use crate::plan::Plan;
use crate::stand_in::stand_in;
use crate::table::{Report, Verdict, percentiles};

pub async fn run(phases: &mut Phases<'_>, plan: &Plan) -> Result<(), String> {
    let (lines, rate) = (plan.latency_lines, plan.latency_rate);
    stand_in(
        &phases.bin_dir,
        phases.bench_exe,
        &format!("__paced {lines} {rate}"),
    )?;
    let paced = run_command(phases.dashboard, phases.agent, lines).await?;
    let (p50, p99, max) = percentiles(&paced.lines.latency_us);
    phases.report.row(
        "latency",
        &format!("median at {rate} lines/s"),
        format!("{p50:.2} ms"),
        "",
        "",
        Verdict::Info,
    );
    phases.report.row(
        "latency",
        &format!("p99 ({} lines)", paced.lines.received),
        format!("{p99:.2} ms (max {max:.1})"),
        "≤ 10 ms",
        "",
        Report::check(p99 <= 10.0),
    );
    phases.failures.extend(paced.failure(lines));
    Ok(())
}
