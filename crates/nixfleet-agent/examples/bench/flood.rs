//! The flood phase: a `switch` whose output is as fast as the generator
//! can go, to a dashboard that keeps up.

use crate::agent::INTERVAL_SECS;
use crate::command::{CommandRun, run_command};
use crate::phases::Phases;
use crate::plan::Plan;
use crate::probe;
use crate::stand_in::stand_in;
use crate::table::{Report, Verdict, mib, ms, percentiles, thousands};

pub async fn run(phases: &mut Phases<'_>, plan: &Plan) -> Result<(), String> {
    let lines = plan.flood_lines;
    stand_in(
        &phases.bin_dir,
        phases.bench_exe,
        &format!("__flood {lines}"),
    )?;
    let flood = run_command(phases.dashboard, phases.agent, lines).await?;
    phases.fast_child = Some(flood.lines.child_time());
    let memory = probe::memory(phases.agent.pid);
    throughput_rows(phases.report, lines, &flood);
    let report = &mut *phases.report;
    report.row(
        "flood",
        "peak RSS (VmHWM)",
        format!("{:.2} MiB", mib(memory.hwm)),
        "≤ 12 MiB",
        "12 MiB",
        Report::check(mib(memory.hwm) <= 12.0),
    );
    report.row(
        "flood",
        "  VmRSS after the flood",
        format!("{:.2} MiB", mib(memory.rss)),
        "",
        "",
        Verdict::Info,
    );
    timing_rows(report, &flood);
    phases.failures.extend(flood.failure(lines));
    Ok(())
}

/// Lines per second, how long the command took, and what was lost.
fn throughput_rows(report: &mut Report, lines: u64, flood: &CommandRun) {
    let elapsed = flood.status_at - flood.sent_at;
    let rate = flood.lines.received as f64 / elapsed.as_secs_f64();
    let lost = lines.saturating_sub(flood.lines.received);
    report.row(
        "flood",
        &format!("{} lines delivered", thousands(lines)),
        format!("{} lines/s", thousands(rate as u64)),
        "≥ 300,000 lines/s",
        "~100,000",
        Report::check(rate >= 300_000.0),
    );
    report.row(
        "flood",
        "  command → status",
        format!("{:.0} ms", ms(elapsed)),
        "",
        "",
        Verdict::Info,
    );
    report.row(
        "flood",
        "lines lost",
        format!("{lost}"),
        "0",
        "a few hundred",
        Report::check(lost == 0),
    );
}

/// Heartbeats during the flood, and how late the lines and the status were.
fn timing_rows(report: &mut Report, flood: &CommandRun) {
    let gap_limit = INTERVAL_SECS as f64 * 1000.0 + 50.0;
    report.row(
        "flood",
        &format!("largest heartbeat gap (of {})", flood.beats),
        format!("{:.0} ms", ms(flood.largest_gap)),
        &format!("≤ {gap_limit:.0} ms"),
        "",
        Report::check(ms(flood.largest_gap) <= gap_limit),
    );
    report.row(
        "flood",
        "child's last line → status",
        format!("{:.1} ms", flood.last_line_to_status_ms),
        "",
        "",
        Verdict::Info,
    );
    let (p50, p99, max) = percentiles(&flood.lines.latency_us);
    report.row(
        "flood",
        "  line latency p50/p99/max",
        format!("{p50:.1} / {p99:.1} / {max:.1} ms"),
        "",
        "",
        Verdict::Info,
    );
}
