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

use crate::dashboard::Dashboard;
use crate::{AgentSettings, Report, Verdict, mib, prepare_work_dir, probe, spawn_agent};
use std::path::Path;
use std::time::{Duration, Instant};

/// Idle RSS target: half the Go agent's 6.3 MiB, rounded down.
const RSS_TARGET_MIB: f64 = 3.2;
/// Idle CPU target per 18 s: half the Go agent's 8.7 ms, rounded down.
const CPU_TARGET_MS: f64 = 4.0;
/// The Go agent's idle CPU was measured over 18 s (issue 14).
const CPU_PERIOD: Duration = Duration::from_secs(18);

#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub interval_secs: u64,
    pub metrics: &'static str,
}

/// Every interval with metrics off and with `/proc` metrics.
pub fn cases(intervals: &[u64]) -> Vec<Case> {
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

pub struct Measured {
    case: Case,
    window: Duration,
    cpu_ns: u64,
    threads: usize,
    beats: usize,
    memory: probe::Memory,
}

/// Starts an agent per case, watches them all for `window`, stops them.
pub async fn measure(
    cases: &[Case],
    window: Duration,
    binary: &Path,
    wrapper: &[String],
) -> Result<Vec<Measured>, String> {
    let work = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let mut running = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let dir = work.path().join(format!("idle-{i}"));
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

    let before: Vec<(probe::Cpu, usize)> = running
        .iter()
        .map(|(dashboard, agent)| (probe::cpu(agent.pid), dashboard.record().heartbeats.len()))
        .collect();
    let started = Instant::now();
    tokio::time::sleep(window).await;
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
            threads: cpu.threads,
            beats,
            memory,
        });
    }
    for (_, agent) in &mut running {
        agent.stop().await?;
    }
    Ok(measured)
}

pub fn report(report: &mut Report, measured: &[Measured]) {
    for m in measured {
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
    for metrics in ["none", "proc"] {
        let at = |interval| {
            measured
                .iter()
                .find(|m| m.case.interval_secs == interval && m.case.metrics == metrics)
        };
        let Some(fast) = at(1) else { continue };
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
    println!(
        "{:<10} (idle agents watched for {:.0} s side by side; CPU scaled to 18 s)",
        "",
        measured.first().map_or(0.0, |m| m.window.as_secs_f64())
    );
}
