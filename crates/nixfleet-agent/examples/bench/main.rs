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

mod dashboard;
mod generator;
mod idle;
mod probe;

use dashboard::{Dashboard, Lines};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The heartbeat interval the benchmark configures, in seconds.
const INTERVAL_SECS: u64 = 1;
const TOKEN: &str = "bench-token-0123456789";

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

/// How much of everything to do.
struct Plan {
    name: &'static str,
    /// How long the idle agents are watched.
    idle: Duration,
    /// The heartbeat intervals of the idle agents, in seconds.
    idle_intervals: &'static [u64],
    flood_lines: u64,
    latency_lines: u64,
    latency_rate: u64,
    reconnects: usize,
    slow_lines: u64,
    crash_lines: u64,
    /// `BENCH_ONLY=idle,flood,latency,reconnect,slow,crash`: the phases to run.
    only: Option<Vec<String>>,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            name: "full",
            // Two 30 s heartbeats and four pings in any such window.
            idle: Duration::from_secs(60),
            idle_intervals: &[1, 30],
            flood_lines: 300_000,
            latency_lines: 1_000,
            latency_rate: 100,
            reconnects: 3,
            slow_lines: 1_000_000,
            crash_lines: 300_000,
            only: only_phases(),
        }
    }

    fn quick() -> Plan {
        Plan {
            name: "quick",
            idle: Duration::from_secs(5),
            idle_intervals: &[1],
            flood_lines: 30_000,
            latency_lines: 200,
            latency_rate: 100,
            reconnects: 1,
            slow_lines: 100_000,
            crash_lines: 30_000,
            only: only_phases(),
        }
    }

    fn wants(&self, phase: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|p| p == phase))
    }
}

fn only_phases() -> Option<Vec<String>> {
    let only = std::env::var("BENCH_ONLY").ok()?;
    Some(only.split(',').map(|p| p.trim().to_owned()).collect())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Miss,
    Info,
}

#[derive(Default)]
struct Report {
    passed: usize,
    missed: Vec<String>,
}

impl Report {
    fn header(&self) {
        println!(
            "{:<10} {:<30} {:>22}  {:<18} {:<16} verdict",
            "phase", "figure", "measured", "target", "Go agent v2"
        );
    }

    fn row(
        &mut self,
        phase: &str,
        figure: &str,
        value: String,
        target: &str,
        go: &str,
        v: Verdict,
    ) {
        let verdict = match v {
            Verdict::Pass => {
                self.passed += 1;
                "PASS"
            }
            Verdict::Miss => {
                self.missed.push(format!("{phase} {}", figure.trim()));
                "MISS"
            }
            Verdict::Info => "",
        };
        println!("{phase:<10} {figure:<30} {value:>22}  {target:<18} {go:<16} {verdict}");
    }

    fn check(ok: bool) -> Verdict {
        if ok { Verdict::Pass } else { Verdict::Miss }
    }
}

/// The agent under test.
struct Agent {
    child: tokio::process::Child,
    pid: u32,
    stderr: PathBuf,
}

impl Agent {
    /// Fails the benchmark if the agent is gone.
    fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("the agent exited ({status}){}", self.tail())),
            Err(error) => Err(format!("cannot check on the agent: {error}")),
        }
    }

    /// SIGTERM, and wait (at most 10 s) for it to exit.
    async fn stop(&mut self) -> Result<(), String> {
        let pid = rustix::process::Pid::from_raw(self.pid as i32).ok_or("bad pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .map_err(|e| format!("SIGTERM: {e}"))?;
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("waiting for the agent: {error}")),
            Err(_) => Err(format!(
                "the agent did not exit within 10 s of SIGTERM{}",
                self.tail()
            )),
        }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("; last lines of its stderr:\n{tail}")
    }
}

async fn run(plan: Plan) -> Result<(), String> {
    let agent_binary = locate_agent()?;
    let bench_exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let metrics = std::env::var("BENCH_METRICS").unwrap_or_else(|_| "proc".to_owned());
    let wrapper: Vec<String> = std::env::var("BENCH_WRAP")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
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
    let mut report = Report::default();
    report.header();

    // Binary size.
    let (size, stripped) = probe::stripped_size(&agent_binary)
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

    // The generator alone, so that the flood measures the agent.
    if plan.wants("flood") {
        let generator_rate = calibrate_generator(&bench_exe, plan.flood_lines)?;
        report.row(
            "generator",
            "flood stand-in alone",
            format!("{} lines/s", thousands(generator_rate as u64)),
            "≫ 300,000 lines/s",
            "",
            Verdict::Info,
        );
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
    probe::evict_from_page_cache(&agent_binary);
    let mut agent = spawn_agent(&settings)?;
    let spawned = Instant::now();

    let connected = dashboard
        .wait_for(Duration::from_secs(15), |r| r.registers.first().copied())
        .await;
    agent.alive()?;
    let connected = connected.ok_or_else(|| format!("no register within 15 s{}", agent.tail()))?;
    if !wrapper.is_empty() {
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
    if plan.wants("idle") {
        phases.idle(&plan).await?;
    }
    if plan.wants("flood") {
        phases.flood(&plan).await?;
    }
    if plan.wants("latency") {
        phases.latency(&plan).await?;
    }
    if plan.wants("reconnect") {
        phases.reconnect(&plan).await?;
    }
    if plan.wants("slow") {
        phases.slow(&plan).await?;
    }
    if plan.wants("crash") {
        phases.crash(&plan).await?;
    }
    let failures = std::mem::take(&mut phases.failures);

    // Graceful shutdown.
    let stopping = Instant::now();
    let pid = rustix::process::Pid::from_raw(agent.pid as i32).ok_or("bad pid")?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM)
        .map_err(|e| format!("SIGTERM: {e}"))?;
    let exit = tokio::time::timeout(Duration::from_secs(10), agent.child.wait())
        .await
        .map_err(|_| {
            format!(
                "the agent did not exit within 10 s of SIGTERM{}",
                agent.tail()
            )
        })?
        .map_err(|e| format!("waiting for the agent: {e}"))?;
    report.row(
        "shutdown",
        "SIGTERM → exit",
        format!("{:.0} ms, code {:?}", ms(stopping.elapsed()), exit.code()),
        "",
        "",
        Verdict::Info,
    );

    println!(
        "\n{} PASS, {} MISS{}",
        report.passed,
        report.missed.len(),
        if report.missed.is_empty() {
            String::new()
        } else {
            format!(" ({})", report.missed.join("; "))
        }
    );
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

/// What the phases share.
struct Phases<'a> {
    report: &'a mut Report,
    dashboard: &'a mut Dashboard,
    agent: &'a mut Agent,
    agent_binary: &'a Path,
    wrapper: &'a [String],
    bench_exe: &'a Path,
    bin_dir: PathBuf,
    settings: &'a AgentSettings<'a>,
    /// The child's own wall time in the flood phase (fast dashboard).
    fast_child: Option<Duration>,
    /// Why the benchmark failed (not MISSes: broken runs).
    failures: Vec<String>,
}

impl Phases<'_> {
    /// Agents connected and idle, at both intervals, metrics off and on.
    async fn idle(&mut self, plan: &Plan) -> Result<(), String> {
        let cases = idle::cases(plan.idle_intervals);
        let measured = idle::measure(
            &cases,
            plan.idle,
            self.agent_binary,
            self.wrapper,
            self.bench_exe,
        )
        .await?;
        let (measured, floor) = measured;
        idle::report(self.report, &measured, &floor);
        Ok(())
    }

    /// A `switch` whose output is as fast as the generator can go.
    async fn flood(&mut self, plan: &Plan) -> Result<(), String> {
        let lines = plan.flood_lines;
        stand_in(&self.bin_dir, self.bench_exe, &format!("__flood {lines}"))?;
        let flood = run_command(self.dashboard, self.agent, lines).await?;
        self.fast_child = Some(flood.lines.child_time());
        let memory = probe::memory(self.agent.pid);
        let elapsed = flood.status_at - flood.sent_at;
        let rate = flood.lines.received as f64 / elapsed.as_secs_f64();
        let lost = lines.saturating_sub(flood.lines.received);
        let report = &mut *self.report;
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
        self.failures.extend(flood.failure(lines));
        Ok(())
    }

    /// A `switch` printing at a steady rate: child write → dashboard.
    async fn latency(&mut self, plan: &Plan) -> Result<(), String> {
        let (lines, rate) = (plan.latency_lines, plan.latency_rate);
        stand_in(
            &self.bin_dir,
            self.bench_exe,
            &format!("__paced {lines} {rate}"),
        )?;
        let paced = run_command(self.dashboard, self.agent, lines).await?;
        let (p50, p99, max) = percentiles(&paced.lines.latency_us);
        self.report.row(
            "latency",
            &format!("median at {rate} lines/s"),
            format!("{p50:.2} ms"),
            "",
            "",
            Verdict::Info,
        );
        self.report.row(
            "latency",
            &format!("p99 ({} lines)", paced.lines.received),
            format!("{p99:.2} ms (max {max:.1})"),
            "≤ 10 ms",
            "",
            Report::check(p99 <= 10.0),
        );
        self.failures.extend(paced.failure(lines));
        Ok(())
    }

    /// The dashboard dies and listens again at once; the agent, whose
    /// backoff is at its first step (its last connection got `registered`),
    /// comes back after 1 s ± 10 %.
    async fn reconnect(&mut self, plan: &Plan) -> Result<(), String> {
        let mut back_to_register = Vec::new();
        let mut down_to_register = Vec::new();
        for _ in 0..plan.reconnects {
            let before = self.dashboard.record().registers.len();
            self.dashboard.kill();
            let down = Instant::now();
            let back = self
                .dashboard
                .restart()
                .await
                .map_err(|e| format!("cannot listen again: {e}"))?;
            let registered = self
                .dashboard
                .wait_for(Duration::from_secs(10), |r| {
                    r.registers.get(before).copied()
                })
                .await;
            self.agent.alive()?;
            let registered = registered.ok_or_else(|| {
                format!(
                    "no register within 10 s of the dashboard's return{}",
                    self.agent.tail()
                )
            })?;
            back_to_register.push(ms(registered - back));
            down_to_register.push(ms(registered - down));
            // Let the session settle (registered, a heartbeat) before the next.
            self.dashboard
                .wait_for(Duration::from_secs(3), |r| {
                    r.heartbeats.last().filter(|&&h| h > registered).copied()
                })
                .await;
        }
        back_to_register.sort_by(f64::total_cmp);
        down_to_register.sort_by(f64::total_cmp);
        let median = |v: &[f64]| v[v.len() / 2];
        self.report.row(
            "reconnect",
            &format!("dashboard back → register ({})", back_to_register.len()),
            format!(
                "{:.0} ms (max {:.0})",
                median(&back_to_register),
                back_to_register[back_to_register.len() - 1]
            ),
            "1st backoff step",
            "",
            Verdict::Info,
        );
        self.report.row(
            "reconnect",
            "  dashboard down → register",
            format!("{:.0} ms", median(&down_to_register)),
            "backoff 1 s ± 10 %",
            "",
            Verdict::Info,
        );
        Ok(())
    }
}

impl Phases<'_> {
    /// A flood to a dashboard reading 20,000 frames/s: everything arrives,
    /// the child is not held back, memory and heartbeats are unaffected.
    async fn slow(&mut self, plan: &Plan) -> Result<(), String> {
        let lines = plan.slow_lines;
        stand_in(&self.bin_dir, self.bench_exe, &format!("__flood {lines}"))?;
        self.dashboard.set_read_rate(Some(SLOW_READER));
        let run = run_command(self.dashboard, self.agent, lines).await;
        self.dashboard.set_read_rate(None);
        let run = run?;
        let memory = probe::memory(self.agent.pid);
        self.backlog_rows("slow", lines, &run, memory.hwm);
        self.failures.extend(run.failure(lines));
        Ok(())
    }

    /// The agent dies (SIGKILL) mid-flood to a slow dashboard and is
    /// started again: everything arrives once more, with the real status.
    async fn crash(&mut self, plan: &Plan) -> Result<(), String> {
        let lines = plan.crash_lines;
        stand_in(&self.bin_dir, self.bench_exe, &format!("__flood {lines}"))?;
        self.dashboard.set_read_rate(Some(SLOW_READER));
        let dashboard = &*self.dashboard;
        let agent = &mut *self.agent;
        let settings = self.settings;
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
        let dashboard = &*self.dashboard;
        let (run, killed) = tokio::join!(run_command_started(dashboard, lines), crash);
        self.dashboard.set_read_rate(None);
        let (run, killed) = (run?, killed?);
        self.agent.alive()?;
        let memory = probe::memory(self.agent.pid);
        let report = &mut *self.report;
        report.row(
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
        self.backlog_rows("crash", lines, &run, memory.hwm);
        self.failures.extend(run.failure(lines));
        Ok(())
    }

    fn backlog_rows(&mut self, phase: &str, lines: u64, run: &CommandRun, hwm_kib: u64) {
        let report = &mut *self.report;
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
        let fast = self.fast_child.map(|f| f.mul_f64(lines as f64 / 300_000.0));
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
        report.row(
            phase,
            "peak RSS (VmHWM, whole run)",
            format!("{:.2} MiB", mib(hwm_kib)),
            "≤ 8 MiB",
            "",
            Report::check(mib(hwm_kib) <= 8.0),
        );
        let logs = self.settings.dir.join("state/logs");
        let disk = std::fs::read_dir(&logs)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
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
}

/// The slow dashboard's read rate, frames per second.
const SLOW_READER: u32 = 20_000;

/// What one command looked like from the dashboard.
struct CommandRun {
    /// When the agent registered, over the whole run.
    registers: Vec<Instant>,
    sent_at: Instant,
    status_at: Instant,
    status: String,
    message: String,
    lines: Lines,
    largest_gap: Duration,
    beats: usize,
    last_line_to_status_ms: f64,
}

impl CommandRun {
    fn first_register_after(&self, at: Instant) -> Option<Instant> {
        self.registers.iter().copied().find(|r| *r > at)
    }

    /// Why this run means the benchmark failed, if it does.
    fn failure(&self, expected: u64) -> Option<String> {
        let lines = &self.lines;
        if self.status != "ok" {
            Some(format!(
                "the command ended {}: {}",
                self.status, self.message
            ))
        } else if lines.received != expected || lines.dropped > 0 {
            Some(format!(
                "{} of {expected} lines arrived ({} reported dropped) although the dashboard kept up",
                lines.received, lines.dropped
            ))
        } else if lines.out_of_order > 0 || lines.foreign > 0 {
            Some(format!(
                "{} lines out of order, {} unexpected lines",
                lines.out_of_order, lines.foreign
            ))
        } else {
            None
        }
    }
}

/// Sends `switch` and waits for its status and the heartbeat after it.
async fn run_command(
    dashboard: &Dashboard,
    agent: &mut Agent,
    expected_lines: u64,
) -> Result<CommandRun, String> {
    let run = run_command_started(dashboard, expected_lines).await;
    agent.alive()?;
    run.map_err(|e| format!("{e}{}", agent.tail()))
}

/// Sends `switch` and waits for its status and the heartbeat after it,
/// without watching the agent (which may be restarted meanwhile).
async fn run_command_started(
    dashboard: &Dashboard,
    expected_lines: u64,
) -> Result<CommandRun, String> {
    let statuses_before = {
        let mut record = dashboard.record();
        record.lines = Lines {
            latency_us: Vec::with_capacity(expected_lines as usize),
            ..Lines::default()
        };
        record.statuses.len()
    };
    let sent_at = Instant::now();
    if !dashboard.command("switch") {
        return Err("the agent is not connected".into());
    }
    wait_command(dashboard, expected_lines, statuses_before, sent_at).await
}

async fn wait_command(
    dashboard: &Dashboard,
    expected_lines: u64,
    statuses_before: usize,
    sent_at: Instant,
) -> Result<CommandRun, String> {
    // Generous: a slow debug build on a busy machine still finishes.
    let timeout = Duration::from_secs(60 + expected_lines / 5_000);
    let status = dashboard
        .wait_for(timeout, |r| r.statuses.get(statuses_before).cloned())
        .await;
    let status = status.ok_or_else(|| format!("no status within {timeout:?}"))?;
    if status.status == "ok" {
        // After a successful switch the agent registers again on a fresh
        // connection (v3); the next command must go to that one.
        dashboard
            .wait_for(Duration::from_secs(10), |r| {
                r.registers.last().filter(|&&at| at > status.at).copied()
            })
            .await
            .ok_or("no register after the successful switch within 10 s")?;
    }
    // The heartbeat after the status closes the last gap of the command.
    let beat_wait = Duration::from_secs(INTERVAL_SECS * 2 + 1);
    dashboard
        .wait_for(beat_wait, |r| {
            r.heartbeats.last().filter(|&&h| h > status.at).copied()
        })
        .await;
    let mut record = dashboard.record();
    let lines = std::mem::take(&mut record.lines);
    let gaps: Vec<Duration> = record
        .heartbeats
        .windows(2)
        .filter(|w| w[1] > sent_at && w[0] < status.at)
        .map(|w| w[1] - w[0])
        .collect();
    let last_line_to_status_ms =
        status.realtime_ns.saturating_sub(lines.last_stamp_ns) as f64 / 1e6;
    let registers = record.registers.clone();
    Ok(CommandRun {
        registers,
        sent_at,
        status_at: status.at,
        status: status.status,
        message: status.message,
        lines,
        largest_gap: gaps.iter().copied().max().unwrap_or_default(),
        beats: gaps.len(),
        last_line_to_status_ms,
    })
}

/// The agent binary: `BENCH_AGENT`, else built now by cargo with this
/// example's profile and target directory (a no-op when up to date).
fn locate_agent() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("BENCH_AGENT") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // <target>/<profile>/examples/bench
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot find the target directory")?;
    let target_dir = profile_dir
        .parent()
        .ok_or("cannot find the target directory")?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--quiet",
            "--bin",
            "nixfleet-agent",
            "--target-dir",
        ])
        .arg(target_dir);
    match profile {
        "debug" => {
            eprintln!(
                "bench: this is a debug build; figures are for `cargo bench-agent` (release)"
            );
        }
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    let status = build
        .status()
        .map_err(|e| format!("cannot run cargo to build the agent: {e}"))?;
    if !status.success() {
        return Err(format!("building the agent failed ({status})"));
    }
    Ok(profile_dir.join("nixfleet-agent"))
}

/// Runs the flood generator into a pipe this process drains; lines/s.
fn calibrate_generator(bench_exe: &Path, lines: u64) -> Result<f64, String> {
    use std::io::Read;
    let started = Instant::now();
    let mut child = std::process::Command::new(bench_exe)
        .args(["__flood", &lines.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the generator: {e}"))?;
    let mut pipe = child.stdout.take().ok_or("no pipe")?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut count = 0u64;
    loop {
        let n = pipe
            .read(&mut buf)
            .map_err(|e| format!("reading the generator: {e}"))?;
        if n == 0 {
            break;
        }
        count += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
    }
    let _ = child.wait();
    let elapsed = started.elapsed();
    if count != lines {
        return Err(format!("the generator wrote {count} lines, not {lines}"));
    }
    Ok(lines as f64 / elapsed.as_secs_f64())
}

/// Writes the stand-in `nixos-rebuild`: it runs this binary with `args`.
/// The agent passes children a whitelisted environment only, so the path
/// is written into the script.
fn stand_in(bin_dir: &Path, bench_exe: &Path, args: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let exe = bench_exe
        .to_str()
        .ok_or("the benchmark's path is not UTF-8")?;
    if exe.contains('\'') {
        return Err("the benchmark's path contains a quote".into());
    }
    let path = bin_dir.join("nixos-rebuild");
    let script = format!("#!/bin/sh\nexec '{exe}' {args}\n");
    // Written aside and renamed, so a run never sees a half-written script.
    let temp = bin_dir.join(".nixos-rebuild.new");
    std::fs::write(&temp, script).map_err(|e| format!("stand-in: {e}"))?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("stand-in: {e}"))?;
    std::fs::rename(&temp, &path).map_err(|e| format!("stand-in: {e}"))
}

/// How to start the agent.
struct AgentSettings<'a> {
    binary: &'a Path,
    /// A command to run the agent under (`BENCH_WRAP`, e.g. valgrind).
    wrapper: &'a [String],
    dir: &'a Path,
    url: String,
    metrics: &'a str,
    interval_secs: u64,
}

/// Creates what an agent needs in `dir`: `bin` (for the stand-in), `state`,
/// and a repository with a commit (HEAD and a branch ref), which every
/// heartbeat reports, as on a host.
fn prepare_work_dir(dir: &Path) -> Result<(), String> {
    for sub in ["bin", "repo/.git/refs/heads", "state"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{sub}: {e}"))?;
    }
    let git = dir.join("repo/.git");
    std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n")
        .and_then(|()| {
            std::fs::write(
                git.join("refs/heads/main"),
                format!("{}\n", "5eed".repeat(10)),
            )
        })
        .map_err(|e| format!("repo: {e}"))
}

fn spawn_agent(settings: &AgentSettings<'_>) -> Result<Agent, String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = settings.dir;
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).map_err(|e| format!("token: {e}"))?;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("token: {e}"))?;
    let quoted = |p: &Path| format!("{:?}", p.display().to_string());
    let config = format!(
        "url = {:?}\ntoken_file = {}\nrepo_dir = {}\nstate_dir = {}\n\
         hostname = \"bench-host\"\ninterval = {}\nmetrics = {:?}\n\
         log_level = \"info\"\n",
        settings.url,
        quoted(&token),
        quoted(&dir.join("repo")),
        quoted(&dir.join("state")),
        settings.interval_secs,
        settings.metrics,
    );
    let config_path = dir.join("agent.toml");
    std::fs::write(&config_path, config).map_err(|e| format!("config: {e}"))?;
    let stderr = dir.join("agent.stderr");
    let stderr_file = std::fs::File::create(&stderr).map_err(|e| format!("stderr: {e}"))?;
    let path = format!(
        "{}:{}",
        dir.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = match settings.wrapper.split_first() {
        Some((program, args)) => {
            let mut command = tokio::process::Command::new(program);
            command.args(args).arg(settings.binary);
            command
        }
        None => tokio::process::Command::new(settings.binary),
    };
    let child = command
        .arg("--config")
        .arg(&config_path)
        .env_clear()
        .env("PATH", path)
        .env("HOME", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_file)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", settings.binary.display()))?;
    let pid = child.id().ok_or("the agent exited at once")?;
    Ok(Agent { child, pid, stderr })
}

impl Lines {
    /// The child's own wall time, from the stamps of its first and last line.
    fn child_time(&self) -> Duration {
        Duration::from_nanos(self.last_stamp_ns.saturating_sub(self.first_stamp_ns))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// p50, p99 and max of microsecond samples, in milliseconds.
fn percentiles(samples_us: &[u32]) -> (f64, f64, f64) {
    if samples_us.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut sorted = samples_us.to_vec();
    sorted.sort_unstable();
    let at = |q: f64| {
        let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
        f64::from(sorted[index]) / 1000.0
    };
    (
        at(0.5),
        at(0.99),
        f64::from(sorted[sorted.len() - 1]) / 1000.0,
    )
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
