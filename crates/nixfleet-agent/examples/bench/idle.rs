//! The idle phase: what an agent costs while nothing happens, which every
//! host pays for as long as it runs.
//!
//! One agent per case (heartbeat interval × metrics mode), each with its own
//! dashboard, work directory and copy of the binary (dropped from the page
//! cache, so that each starts as after a boot rather than from pages
//! another one faulted in). They run side by side over the same window,
//! which starts once each has sent its first heartbeat.
//!
//! CPU per heartbeat is the difference between the 1 s and the 30 s agent
//! with the same metrics mode, divided by the difference in beats: what a
//! heartbeat adds to a connected, otherwise idle agent (both answer the
//! same pings, every 15 s).

use crate::agent::{Agent, AgentSettings, prepare_work_dir, spawn_agent};
use crate::dashboard::Dashboard;
use crate::phases::Phases;
use crate::plan::Plan;
use crate::probe;
use crate::table::{Report, Verdict, mib};
use std::path::Path;
use std::time::{Duration, Instant};

/// Idle RSS target: half the Go agent's 6.3 MiB, rounded down.
const RSS_TARGET_MIB: f64 = 3.2;
/// Idle CPU target per 18 s: half the Go agent's 8.7 ms, rounded down.
const CPU_TARGET_MS: f64 = 4.0;
/// The Go agent's idle CPU was measured over 18 s (issue 14).
const CPU_PERIOD: Duration = Duration::from_secs(18);

#[derive(Debug, Clone, Copy)]
struct Case {
    interval_secs: u64,
    metrics: &'static str,
}

/// Every interval with metrics off and with `/proc` metrics.
fn cases(intervals: &[u64]) -> Vec<Case> {
    intervals
        .iter()
        .flat_map(|&interval_secs| {
            ["none", "proc"].map(|metrics| Case {
                interval_secs,
                metrics,
            })
        })
        .collect()
}

struct Measured {
    case: Case,
    window: Duration,
    cpu_ns: u64,
    /// Times the agent was scheduled in over the window.
    runs: u64,
    threads: usize,
    beats: usize,
    memory: probe::Memory,
}

/// What the idle agents are measured against: a process that only wakes
/// up and writes a heartbeat-sized frame every second (`bench __floor`),
/// measured over the same window. Its figure is the part of an idle
/// agent's cost that is the machine's (the timer wake-up, the loopback
/// send, which also charges the receiver's TCP processing to the sender),
/// and it moves with the machine as the agents' figures do.
struct Floor {
    window: Duration,
    cpu_ns: u64,
    beats: u64,
}

/// Agents connected and idle, at both intervals, metrics off and on.
pub async fn run(phases: &mut Phases<'_>, plan: &Plan) -> Result<(), String> {
    let cases = cases(plan.idle_intervals);
    let (measured, floor) = measure(
        &cases,
        plan.idle,
        phases.agent_binary,
        phases.wrapper,
        phases.bench_exe,
    )
    .await?;
    report(phases.report, &measured, &floor);
    Ok(())
}

/// Starts an agent per case and the floor process, watches them all for
/// `window`, stops them.
async fn measure(
    cases: &[Case],
    window: Duration,
    binary: &Path,
    wrapper: &[String],
    bench_exe: &Path,
) -> Result<(Vec<Measured>, Floor), String> {
    let work = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let mut running = start_agents(cases, work.path(), binary, wrapper).await?;
    first_heartbeats(&mut running, cases, wrapper).await?;

    let mut floor = FloorProcess::start(bench_exe).await?;
    let floor_before = probe::cpu(floor.pid);
    let before: Vec<(probe::Cpu, usize)> = running
        .iter()
        .map(|(dashboard, agent)| (probe::cpu(agent.pid), dashboard.record().heartbeats.len()))
        .collect();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let floor_after = probe::cpu(floor.pid);
    let floor_figures = Floor {
        window: started.elapsed(),
        cpu_ns: floor_after.ns.saturating_sub(floor_before.ns),
        beats: floor_after.runs.saturating_sub(floor_before.runs),
    };
    floor.stop().await;
    let mut measured = Vec::new();
    for (((dashboard, agent), case), (cpu_before, beats_before)) in
        running.iter_mut().zip(cases).zip(before)
    {
        let cpu = probe::cpu(agent.pid);
        let memory = probe::memory(agent.pid);
        let beats = dashboard.record().heartbeats.len() - beats_before;
        agent.alive()?;
        measured.push(Measured {
            case: *case,
            window: started.elapsed(),
            cpu_ns: cpu.ns.saturating_sub(cpu_before.ns),
            runs: cpu.runs.saturating_sub(cpu_before.runs),
            threads: cpu.threads,
            beats,
            memory,
        });
    }
    for (_, agent) in &mut running {
        agent.stop().await?;
    }
    Ok((measured, floor_figures))
}

/// An agent per case, each with its own dashboard, work directory under
/// `work` and copy of the binary (out of the page cache).
async fn start_agents(
    cases: &[Case],
    work: &Path,
    binary: &Path,
    wrapper: &[String],
) -> Result<Vec<(Dashboard, Agent)>, String> {
    let mut running = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let dir = work.join(format!("idle-{i}"));
        prepare_work_dir(&dir)?;
        let copy = dir.join("nixfleet-agent");
        std::fs::copy(binary, &copy).map_err(|e| format!("copying the agent: {e}"))?;
        probe::evict_from_page_cache(&copy);
        let dashboard = Dashboard::start()
            .await
            .map_err(|e| format!("dashboard: {e}"))?;
        let agent = spawn_agent(&AgentSettings {
            binary: &copy,
            wrapper,
            dir: &dir,
            url: dashboard.url(),
            metrics: case.metrics,
            interval_secs: case.interval_secs,
        })?;
        running.push((dashboard, agent));
    }
    Ok(running)
}

/// Waits for each agent's first heartbeat; with a wrapper, measures the
/// agent it started rather than the wrapper.
async fn first_heartbeats(
    running: &mut [(Dashboard, Agent)],
    cases: &[Case],
    wrapper: &[String],
) -> Result<(), String> {
    for ((dashboard, agent), case) in running.iter_mut().zip(cases) {
        let first = dashboard
            .wait_for(Duration::from_secs(15), |r| r.heartbeats.first().copied())
            .await;
        agent.alive()?;
        first.ok_or_else(|| {
            format!(
                "idle agent ({} s, {}): no heartbeat within 15 s{}",
                case.interval_secs,
                case.metrics,
                agent.tail()
            )
        })?;
        if !wrapper.is_empty() {
            agent.pid = probe::child_of(agent.pid).unwrap_or(agent.pid);
        }
    }
    Ok(())
}

/// The running `bench __floor` process and the socket that drains it.
struct FloorProcess {
    child: tokio::process::Child,
    pid: u32,
    reader: tokio::task::JoinHandle<std::io::Result<u64>>,
}

impl FloorProcess {
    /// Starts it and waits until it has connected to its sink.
    async fn start(bench_exe: &Path) -> Result<FloorProcess, String> {
        let sink = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("floor listener: {e}"))?;
        let port = sink
            .local_addr()
            .map_err(|e| format!("floor listener: {e}"))?
            .port();
        let child = tokio::process::Command::new(bench_exe)
            .args(["__floor", &port.to_string()])
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("floor process: {e}"))?;
        let pid = child.id().ok_or("the floor process exited at once")?;
        let (mut socket, _) = tokio::time::timeout(Duration::from_secs(10), sink.accept())
            .await
            .map_err(|_| "the floor process did not connect".to_owned())?
            .map_err(|e| format!("floor accept: {e}"))?;
        let reader = tokio::spawn(async move {
            let mut sink = tokio::io::sink();
            tokio::io::copy(&mut socket, &mut sink).await
        });
        Ok(FloorProcess { child, pid, reader })
    }

    async fn stop(&mut self) {
        let _ = self.child.kill().await;
        self.reader.abort();
    }
}

fn report(report: &mut Report, measured: &[Measured], floor: &Floor) {
    let per_period =
        floor.cpu_ns as f64 / 1e6 * CPU_PERIOD.as_secs_f64() / floor.window.as_secs_f64();
    report.row(
        "idle",
        "floor: wake + 751 B send / 1 s: CPU / 18 s",
        format!("{per_period:.2} ms ({} wake-ups)", floor.beats),
        "",
        "",
        Verdict::Info,
    );
    for m in measured {
        case_rows(report, m);
    }
    for metrics in ["none", "proc"] {
        per_beat_row(report, measured, metrics);
    }
    println!(
        "{:<10} (idle agents watched for {:.0} s side by side; CPU scaled to 18 s)",
        "",
        measured.first().map_or(0.0, |m| m.window.as_secs_f64())
    );
}

/// Memory, CPU and wake-ups of one idle agent.
fn case_rows(report: &mut Report, m: &Measured) {
    let Case {
        interval_secs,
        metrics,
    } = m.case;
    let name = format!("{interval_secs} s, metrics {metrics}");
    let go_reference = interval_secs == 1 && metrics == "none";
    report.row(
        "idle",
        &format!("{name}: VmRSS"),
        format!("{:.2} MiB", mib(m.memory.rss)),
        &format!("≤ {RSS_TARGET_MIB} MiB"),
        if go_reference { "6.3 MiB" } else { "" },
        Report::check(mib(m.memory.rss) <= RSS_TARGET_MIB),
    );
    report.row(
        "idle",
        "  RssAnon / RssFile",
        format!("{:.2} / {:.2} MiB", mib(m.memory.anon), mib(m.memory.file)),
        "",
        "",
        Verdict::Info,
    );
    let per_period = m.cpu_ns as f64 / 1e6 * CPU_PERIOD.as_secs_f64() / m.window.as_secs_f64();
    report.row(
        "idle",
        &format!("{name}: CPU / 18 s"),
        format!("{per_period:.2} ms ({} beats)", m.beats),
        &format!("≤ {CPU_TARGET_MS} ms"),
        if go_reference { "8.7 ms" } else { "" },
        Report::check(per_period <= CPU_TARGET_MS),
    );
    report.row(
        "idle",
        "  wake-ups",
        format!(
            "{} ({:.2} per heartbeat)",
            m.runs,
            m.runs as f64 / m.beats.max(1) as f64
        ),
        "",
        "",
        Verdict::Info,
    );
    if m.threads != 1 {
        report.row(
            "idle",
            "  threads",
            m.threads.to_string(),
            "1",
            "",
            Verdict::Info,
        );
    }
}

/// CPU per heartbeat with `metrics`: the 1 s agent less the 30 s one, per
/// beat of difference.
fn per_beat_row(report: &mut Report, measured: &[Measured], metrics: &str) {
    let at = |interval| {
        measured
            .iter()
            .find(|m| m.case.interval_secs == interval && m.case.metrics == metrics)
    };
    let Some(fast) = at(1) else { return };
    let (figure, per_beat_us) = match at(30) {
        Some(slow) if fast.beats > slow.beats => (
            format!("metrics {metrics}: CPU / heartbeat"),
            (fast.cpu_ns as f64 - slow.cpu_ns as f64) / (fast.beats - slow.beats) as f64 / 1e3,
        ),
        // --quick has no 30 s agent: everything the 1 s agent did.
        _ => (
            format!("metrics {metrics}: CPU / beat, all"),
            fast.cpu_ns as f64 / fast.beats.max(1) as f64 / 1e3,
        ),
    };
    report.row(
        "idle",
        &figure,
        format!("{per_beat_us:.0} µs"),
        "",
        "",
        Verdict::Info,
    );
}
