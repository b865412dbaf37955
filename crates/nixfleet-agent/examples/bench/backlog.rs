//! The phases with a backlog: a flood to a dashboard that reads only
//! 20,000 frames/s, so the output waits on disk (slow), and the same with
//! the agent killed mid-flood and started again (crash). Everything must
//! arrive, the child must not be held back, and memory and heartbeats
//! must not notice.

use crate::agent::{INTERVAL_SECS, spawn_agent};
use crate::command::{CommandRun, run_command, run_command_started};
use crate::phases::Phases;
use crate::plan::Plan;
use crate::probe;
use crate::stand_in::stand_in;
use crate::table::{Report, Verdict, mib, ms, thousands};
use std::time::{Duration, Instant};

/// The slow dashboard's read rate, frames per second.
const SLOW_READER: u32 = 20_000;

/// A flood to a dashboard reading 20,000 frames/s: everything arrives,
/// the child is not held back, memory and heartbeats are unaffected.
pub async fn slow(phases: &mut Phases<'_>, plan: &Plan) -> Result<(), String> {
    let lines = plan.slow_lines;
    stand_in(
        &phases.bin_dir,
        phases.bench_exe,
        &format!("__flood {lines}"),
    )?;
    phases.dashboard.set_read_rate(Some(SLOW_READER));
    let run = run_command(phases.dashboard, phases.agent, lines).await;
    phases.dashboard.set_read_rate(None);
    let run = run?;
    let memory = probe::memory(phases.agent.pid);
    backlog_rows(phases, "slow", lines, &run, memory.hwm);
    phases.failures.extend(run.failure(lines));
    Ok(())
}

/// The agent dies (SIGKILL) mid-flood to a slow dashboard and is
/// started again: everything arrives once more, with the real status.
pub async fn crash(phases: &mut Phases<'_>, plan: &Plan) -> Result<(), String> {
    let lines = plan.crash_lines;
    stand_in(
        &phases.bin_dir,
        phases.bench_exe,
        &format!("__flood {lines}"),
    )?;
    phases.dashboard.set_read_rate(Some(SLOW_READER));
    let dashboard = &*phases.dashboard;
    let agent = &mut *phases.agent;
    let settings = phases.settings;
    let kill_at = lines / 10;
    let crash = async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        dashboard
            .wait_for(Duration::from_secs(60), |r| {
                (r.lines.received >= kill_at).then_some(())
            })
            .await
            .ok_or("the flood did not start")?;
        let _ = agent.child.start_kill();
        let _ = agent.child.wait().await;
        let killed = Instant::now();
        *agent = spawn_agent(settings)?;
        Ok::<Instant, String>(killed)
    };
    let dashboard = &*phases.dashboard;
    let (run, killed) = tokio::join!(run_command_started(dashboard, lines), crash);
    phases.dashboard.set_read_rate(None);
    let (run, killed) = (run?, killed?);
    phases.agent.alive()?;
    let memory = probe::memory(phases.agent.pid);
    phases.report.row(
        "crash",
        "SIGKILL → register of the next agent",
        format!(
            "{:.0} ms",
            ms(run.first_register_after(killed).unwrap_or(killed) - killed)
        ),
        "",
        "",
        Verdict::Info,
    );
    backlog_rows(phases, "crash", lines, &run, memory.hwm);
    phases.failures.extend(run.failure(lines));
    Ok(())
}

/// The rows both phases print: delivery, the child's pace, memory, disk,
/// heartbeats and the status.
fn backlog_rows(phases: &mut Phases<'_>, phase: &str, lines: u64, run: &CommandRun, hwm_kib: u64) {
    delivery_rows(phases, phase, lines, run);
    let report = &mut *phases.report;
    report.row(
        phase,
        "peak RSS (VmHWM, whole run)",
        format!("{:.2} MiB", mib(hwm_kib)),
        "≤ 8 MiB",
        "",
        Report::check(mib(hwm_kib) <= 8.0),
    );
    let disk = largest_log(phases.settings.dir);
    report.row(
        phase,
        "disk: the command's log",
        format!("{:.1} MiB", disk as f64 / (1024.0 * 1024.0)),
        "≤ log_max_bytes (1 GiB)",
        "",
        Report::check(disk <= 1 << 30),
    );
    let gap_limit = INTERVAL_SECS as f64 * 1000.0 + 50.0;
    report.row(
        phase,
        &format!("largest heartbeat gap (of {})", run.beats),
        format!("{:.0} ms", ms(run.largest_gap)),
        &format!("≤ {gap_limit:.0} ms"),
        "",
        if phase == "crash" {
            // The restart itself is a gap.
            Verdict::Info
        } else {
            Report::check(ms(run.largest_gap) <= gap_limit)
        },
    );
    report.row(
        phase,
        "status",
        format!("{} ({})", run.status, run.message),
        "ok",
        "",
        Report::check(run.status == "ok"),
    );
}

/// Whether every line arrived in order, and whether the child ran as fast
/// as it did in the flood (scaled to this phase's lines).
fn delivery_rows(phases: &mut Phases<'_>, phase: &str, lines: u64, run: &CommandRun) {
    let report = &mut *phases.report;
    report.row(
        phase,
        &format!(
            "lines delivered at {} frames/s",
            thousands(u64::from(SLOW_READER))
        ),
        format!(
            "{} of {} ({} sent twice)",
            thousands(run.lines.received),
            thousands(lines),
            run.lines.repeats
        ),
        "all",
        "",
        Report::check(run.lines.received == lines && run.lines.out_of_order == 0),
    );
    let child = run.lines.child_time();
    let fast = phases
        .fast_child
        .map(|f| f.mul_f64(lines as f64 / 300_000.0));
    report.row(
        phase,
        "child wall time",
        match fast {
            Some(fast) => format!(
                "{:.0} ms (fast dashboard, scaled: {:.0} ms)",
                ms(child),
                ms(fast)
            ),
            None => format!("{:.0} ms", ms(child)),
        },
        "≤ fast + 10 %",
        "",
        match fast {
            Some(fast) => Report::check(child <= fast.mul_f64(1.1)),
            None => Verdict::Info,
        },
    );
}

/// The size of the largest file in the agent's command log directory.
fn largest_log(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("state/logs"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}
