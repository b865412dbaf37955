//! NixFleet agent benchmark: prints one line per figure, with its target,
//! what the Go agent (v2) measured, and PASS/MISS.
//!
//! ```text
//! cargo bench-agent            # alias: cargo run --release --example bench --
//! cargo bench-agent --quick    # everything scaled down, ~10 s (or BENCH_QUICK=1)
//! ```
//!
//! It builds the agent binary (same profile and target directory as this
//! example; `BENCH_AGENT=/path/to/nixfleet-agent` uses a given binary
//! instead) and runs it against an in-process dashboard on 127.0.0.1, with a
//! stand-in `nixos-rebuild` first on its `PATH` that runs this benchmark's
//! own binary as the output generator (see `generator.rs`). The main agent
//! gets `interval = 1`, `metrics = "proc"` (`BENCH_METRICS` overrides) and
//! `log_level = "info"`; everything else is the default (the idle agents
//! differ only in `interval` and `metrics`). Its `repo_dir`
//! holds a minimal `.git` (HEAD and a branch ref), which every heartbeat
//! reads, as on a host. The binary is dropped from the page cache before
//! the agent starts (as after a boot), since how much of a mapped file
//! counts in RSS depends on how its pages were cached.
//!
//! Phases:
//! 1. idle: four more agents, each with its own dashboard and its own copy
//!    of the binary, connected side by side for 60 s: heartbeats every 1 s
//!    and every 30 s (the default), each with `metrics = "none"` and
//!    `"proc"`. VmRSS at the end; CPU run time of all threads (schedstat,
//!    ns) over the 60 s, shown per 18 s (the Go agent's figure), and per
//!    heartbeat: the difference between the 1 s and the 30 s agent over
//!    the window, divided by the difference in beats (see `idle.rs`);
//! 2. flood (the main agent from here on): `switch` printing 300,000 lines
//!    of 93 bytes as fast as it can;
//! 3. latency: `switch` printing 1,000 lines at 100 lines/s;
//! 4. reconnect: the dashboard dies and listens again at once, 3 times;
//! 5. slow: `switch` printing 1,000,000 lines to a dashboard that reads
//!    20,000 frames/s (the backlog waits on disk);
//! 6. crash: `switch` printing 300,000 lines to that slow dashboard; the
//!    agent is SIGKILLed when a tenth has arrived and started again, as
//!    systemd would.
//!
//! `--quick` runs the 1 s idle agents for 5 s (no 30 s ones), 30,000
//! lines, 200 paced lines, one reconnect, 100,000 slow lines and 30,000
//! crash lines; CPU time is still shown per 20 s.
//!
//! Timings are noisy on a shared machine, so a MISS does not fail the run;
//! the exit status is non-zero only when the benchmark itself failed: the
//! agent died or did not answer, lines were lost or reordered although the
//! dashboard kept up, a command did not end `ok`, or the agent did not exit
//! 0 on SIGTERM.
//!
//! For profiling: `BENCH_ONLY=idle,flood,latency,reconnect` picks phases,
//! and `BENCH_WRAP="valgrind --tool=callgrind"` (or `strace -f -c -o F`)
//! runs the agent under a tool; figures are then the tool's.

mod agent;
mod backlog;
mod command;
mod dashboard;
mod flood;
mod generator;
mod idle;
mod latency;
mod phases;
mod plan;
mod probe;
mod reconnect;
mod stand_in;
mod table;

use agent::{Agent, AgentSettings, INTERVAL_SECS, locate_agent, prepare_work_dir, spawn_agent};
use dashboard::Dashboard;
use phases::Phases;
use plan::Plan;
use stand_in::calibrate_generator;
use std::path::Path;
use std::process::{ExitCode, ExitStatus};
use std::time::{Duration, Instant};
use table::{Report, Verdict, mib, ms, thousands};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let number = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
    // The benchmark's binary is also the stand-in's output generator.
    let generated = match args.get(1).map(String::as_str) {
        Some("__flood") => Some(generator::flood(number(2))),
        Some("__paced") => Some(generator::paced(number(2), number(3))),
        Some("__floor") => Some(generator::floor(number(2))),
        _ => None,
    };
    if let Some(result) = generated {
        return if result.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: cargo bench-agent [-- --quick]\n\
             (cargo run --release --example bench -- [--quick])\n\
             env: BENCH_QUICK=1, BENCH_AGENT=/path/to/nixfleet-agent, BENCH_METRICS=none|proc|auto,\n\
             BENCH_ONLY=idle,flood,latency,reconnect, BENCH_WRAP=\"valgrind --tool=callgrind\""
        );
        return ExitCode::SUCCESS;
    }
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let plan = if quick { Plan::quick() } else { Plan::full() };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bench: cannot start a runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(plan)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("\nbench FAILED: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The whole run: the binary, the main agent's startup, the phases the plan
/// wants in their order, and the graceful shutdown.
async fn run(plan: Plan) -> Result<(), String> {
    let agent_binary = locate_agent()?;
    let bench_exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let metrics = std::env::var("BENCH_METRICS").unwrap_or_else(|_| "proc".to_owned());
    let wrapper: Vec<String> = std::env::var("BENCH_WRAP")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    print_heading(&plan, &agent_binary, &metrics, &wrapper);
    let mut report = Report::default();
    report.header();
    binary_row(&mut report, &agent_binary)?;
    if plan.wants("flood") {
        generator_row(&mut report, &bench_exe, plan.flood_lines)?;
    }

    let work = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    prepare_work_dir(work.path())?;
    let mut dashboard = Dashboard::start()
        .await
        .map_err(|e| format!("dashboard: {e}"))?;
    let settings = AgentSettings {
        binary: &agent_binary,
        wrapper: &wrapper,
        dir: work.path(),
        url: dashboard.url(),
        metrics: &metrics,
        interval_secs: INTERVAL_SECS,
    };
    let mut agent = start_main_agent(&mut report, &dashboard, &settings).await?;
    let mut phases = Phases {
        report: &mut report,
        dashboard: &mut dashboard,
        agent: &mut agent,
        agent_binary: &agent_binary,
        wrapper: &wrapper,
        bench_exe: &bench_exe,
        bin_dir: work.path().join("bin"),
        settings: &settings,
        fast_child: None,
        failures: Vec::new(),
    };
    run_phases(&mut phases, &plan).await?;
    let failures = std::mem::take(&mut phases.failures);

    let exit = shutdown(&mut report, &mut agent).await?;
    report.summary();
    if let Some(failure) = failures.first() {
        return Err(format!("{failure}{}", agent.tail()));
    }
    if exit.code() != Some(0) && wrapper.is_empty() {
        return Err(format!(
            "the agent exited with {exit} after SIGTERM{}",
            agent.tail()
        ));
    }
    Ok(())
}

/// The graceful shutdown: SIGTERM, and how long the agent took to exit.
async fn shutdown(report: &mut Report, agent: &mut Agent) -> Result<ExitStatus, String> {
    let stopping = Instant::now();
    let exit = agent.terminate().await?;
    report.row(
        "shutdown",
        "SIGTERM → exit",
        format!("{:.0} ms, code {:?}", ms(stopping.elapsed()), exit.code()),
        "",
        "",
        Verdict::Info,
    );
    Ok(exit)
}

/// What is measured, on what machine, with which agent settings.
fn print_heading(plan: &Plan, agent_binary: &Path, metrics: &str, wrapper: &[String]) {
    println!(
        "nixfleet-agent benchmark ({} run): {}\n{} CPUs, load {}; main agent: heartbeat interval {INTERVAL_SECS} s, metrics = \"{metrics}\"",
        plan.name,
        agent_binary.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    if !wrapper.is_empty() {
        println!(
            "agent wrapped in `{}`: figures are the wrapper's",
            wrapper.join(" ")
        );
    }
    println!();
}

/// The binary's size, stripped.
fn binary_row(report: &mut Report, agent_binary: &Path) -> Result<(), String> {
    let (size, stripped) = probe::stripped_size(agent_binary)
        .map_err(|e| format!("cannot read {}: {e}", agent_binary.display()))?;
    report.row(
        "binary",
        if stripped {
            "size, stripped"
        } else {
            "size (strip not found)"
        },
        format!("{:.2} MB ({:.2} MiB)", size as f64 / 1e6, mib(size / 1024)),
        "≤ 4 MB",
        "",
        Report::check(size <= 4_000_000),
    );
    Ok(())
}

/// The generator alone, so that the flood measures the agent.
fn generator_row(report: &mut Report, bench_exe: &Path, lines: u64) -> Result<(), String> {
    let generator_rate = calibrate_generator(bench_exe, lines)?;
    report.row(
        "generator",
        "flood stand-in alone",
        format!("{} lines/s", thousands(generator_rate as u64)),
        "≫ 300,000 lines/s",
        "",
        Verdict::Info,
    );
    Ok(())
}

/// Starts the main agent from a cold page cache and waits for its register.
async fn start_main_agent(
    report: &mut Report,
    dashboard: &Dashboard,
    settings: &AgentSettings<'_>,
) -> Result<Agent, String> {
    probe::evict_from_page_cache(settings.binary);
    let mut agent = spawn_agent(settings)?;
    let spawned = Instant::now();
    let connected = dashboard
        .wait_for(Duration::from_secs(15), |r| r.registers.first().copied())
        .await;
    agent.alive()?;
    let connected = connected.ok_or_else(|| format!("no register within 15 s{}", agent.tail()))?;
    if !settings.wrapper.is_empty() {
        // Measure (and later stop) the agent, not a tracer that forked it.
        agent.pid = probe::child_of(agent.pid).unwrap_or(agent.pid);
    }
    let startup = probe::cpu(agent.pid);
    report.row(
        "startup",
        "spawn → register",
        format!(
            "{:.1} ms, CPU {:.1} ms",
            ms(connected - spawned),
            startup.ns as f64 / 1e6
        ),
        "",
        "",
        Verdict::Info,
    );
    Ok(agent)
}

/// The phases the plan wants, in their order.
async fn run_phases(phases: &mut Phases<'_>, plan: &Plan) -> Result<(), String> {
    if plan.wants("idle") {
        idle::run(phases, plan).await?;
    }
    if plan.wants("flood") {
        flood::run(phases, plan).await?;
    }
    if plan.wants("latency") {
        latency::run(phases, plan).await?;
    }
    if plan.wants("reconnect") {
        reconnect::run(phases, plan).await?;
    }
    if plan.wants("slow") {
        backlog::slow(phases, plan).await?;
    }
    if plan.wants("crash") {
        backlog::crash(phases, plan).await?;
    }
    Ok(())
}
