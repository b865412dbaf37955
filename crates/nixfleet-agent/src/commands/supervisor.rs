//! The command's supervisor: a small process (the agent binary started
//! as `nixfleet-agent --supervise`, plan on stdin) that runs a command's
//! steps one by one and writes everything into the command log.
//!
//! Why a separate process: the unit uses `KillMode=process`, so a command
//! outlives the agent (a crash, a watchdog abort, an OOM kill, the restart
//! after a switch). The supervisor outlives it too. It keeps reading the
//! command's pipes, so the command never gets SIGPIPE and never waits for
//! the agent or the dashboard; it runs the remaining steps (the switch after
//! a pull, the next test script); and it writes each step's real exit code
//! into the log, where the next agent finds it.
//!
//! It does nothing but this: no network, no secrets (its environment is the
//! command's whitelist) but `repo_url`'s credentials, which only the git
//! steps that talk to it get, in their environment; blocking I/O on three
//! threads. Its only limits are the disk cap of the log and the stop file
//! the agent creates. A disk that refuses to keep the log (full, read-only)
//! never costs the command or its exit code: what follows goes to the agent
//! on stdout instead (log_writer.rs, relay.rs), lines it has no room for
//! are counted.

use super::group::{GROUP_POLL, GroupStop, describe_exit, exit_code_of, lower_priority};
use super::log::{MAX_LINE_BYTES, Plan, Step};
use super::log_writer::{Log, one_line};
use super::table::StopRequest;
use crate::git_credentials::credential_env;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// After a step exits, how long its pipes may stay open (held by a leftover
/// background process) before the supervisor stops reading them.
const PIPE_DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Bytes read from a pipe at once.
const READ_CHUNK: usize = 64 * 1024;

/// Entry point of `nixfleet-agent --supervise`.
pub fn main() -> ExitCode {
    super::stop_signal::catch();
    let mut input = Vec::new();
    if std::io::stdin().read_to_end(&mut input).is_err() {
        return ExitCode::FAILURE;
    }
    let Ok(plan) = serde_json::from_slice::<Plan>(&input) else {
        eprintln!("nixfleet-agent --supervise: expected a plan on stdin");
        return ExitCode::from(crate::config::EXIT_CONFIG);
    };
    // A log that cannot be opened does not stop the command: it streams
    // to the agent on stdout, its end also goes to the end file.
    let log = Arc::new(Log::open(&plan, super::relay::Relay::stdout()));
    run(&plan, &log);
    ExitCode::SUCCESS
}

fn run(plan: &Plan, log: &Arc<Log>) {
    log.event(&format!("steps {}", plan.steps.len()));
    // All labels up front: the agent counts a phase's steps (the pull's
    // dots) before they run, also when it picks the log up after a death.
    for (index, step) in plan.steps.iter().enumerate() {
        log.event(&format!("step {index} {}", one_line(&step.label)));
    }
    for note in &plan.notes {
        log.note(note);
    }
    for (index, step) in plan.steps.iter().enumerate() {
        if stop_request(plan).is_some() {
            log.event("stopped");
            break;
        }
        let ended = run_step(plan, log, index, step);
        if ended.stopped {
            log.event("stopped");
        }
        if ended.timed_out {
            log.event("timedout");
        }
        log.event(&format!("end {index} {} {}", ended.code, ended.how));
        if ended.stopped || (!ended.ok && step.stop_on_failure) {
            break;
        }
    }
    log.finish(plan.end_file.as_deref());
}

struct Ended {
    ok: bool,
    code: i32,
    how: String,
    stopped: bool,
    timed_out: bool,
}

impl Ended {
    /// The step never ran.
    fn not_started(why: String) -> Self {
        Ended {
            ok: false,
            code: 127,
            how: why,
            stopped: false,
            timed_out: false,
        }
    }
}

fn run_step(plan: &Plan, log: &Arc<Log>, index: usize, step: &Step) -> Ended {
    // Checked here, right before it runs, not when the agent planned it:
    // an earlier step must not get to swap the script.
    if let Some(repo) = &step.trusted_within
        && let Some(why) = untrusted_program(repo, Path::new(&step.program))
    {
        let why = format!("refusing to run {}: {why}", step.label);
        log.note(&format!("[nixfleet] {why}"));
        log.event(&format!("notstarted {index} {}", one_line(&why)));
        return Ended::not_started(why);
    }
    let mut child = match spawn(plan, step) {
        Ok(child) => child,
        Err(error) => {
            let why = format!("cannot run {}: {error}", step.program);
            log.event(&format!("notstarted {index} {}", one_line(&why)));
            return Ended::not_started(why);
        }
    };
    let pid = child.id();
    log.event(&format!("start {index} {pid} {}", one_line(&step.label)));
    let (drained, pumps) = start_pumps(&mut child, log);
    let timeout = step.timeout_ms.map(Duration::from_millis);
    let waited = wait(plan, &mut child, pid, timeout);
    let deadline = Instant::now() + PIPE_DRAIN_GRACE;
    for _ in 0..pumps {
        let left = deadline.saturating_duration_since(Instant::now());
        if drained.recv_timeout(left).is_err() {
            log.event("output pipes still open after the process exited; not reading them further");
            break;
        }
    }
    match (waited.status, waited.timed_out) {
        (_, Some(after)) => Ended {
            ok: false,
            code: 124,
            how: format!("timed out after {}s", after.as_secs()),
            stopped: false,
            timed_out: true,
        },
        (Some(status), None) => Ended {
            ok: status.success() && !waited.stopped,
            code: exit_code_of(status),
            how: describe_exit(status),
            stopped: waited.stopped,
            timed_out: false,
        },
        (None, None) => Ended {
            ok: false,
            code: -1,
            how: "waiting for the process failed".to_owned(),
            stopped: waited.stopped,
            timed_out: false,
        },
    }
}

/// Starts the step's process, leading its own process group.
fn spawn(plan: &Plan, step: &Step) -> std::io::Result<Child> {
    let mut command = Command::new(&step.program);
    command
        .args(&step.args)
        .current_dir(&step.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if step.repo_credentials
        && let Some(url) = &plan.scrub_url
    {
        command.envs(credential_env(url));
    }
    let low_priority = step.low_priority;
    // SAFETY: setsid, setpriority and ioprio_set are async-signal-safe and
    // touch no memory of ours. Each step leads its own process group, so a
    // stop signals everything it started and nothing else (not this
    // supervisor).
    unsafe {
        command.pre_exec(move || {
            rustix::process::setsid()?;
            if low_priority {
                lower_priority();
            }
            Ok(())
        });
    }
    command.spawn()
}

/// One thread per pipe, each writing whole lines into the log; returns
/// where they say they are done, and how many there are.
fn start_pumps(child: &mut Child, log: &Arc<Log>) -> (mpsc::Receiver<()>, usize) {
    let (drained_tx, drained_rx) = mpsc::channel();
    let pipes = [
        (
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            false,
        ),
        (
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            true,
        ),
    ];
    let mut pumps = 0;
    for (pipe, stderr) in pipes {
        if let Some(pipe) = pipe {
            let (log, done) = (log.clone(), drained_tx.clone());
            let spawned = std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    pump(pipe, stderr, &log);
                    let _ = done.send(());
                });
            pumps += usize::from(spawned.is_ok());
        }
    }
    (drained_rx, pumps)
}

/// How waiting for a step ended.
struct Waited {
    status: Option<ExitStatus>,
    stopped: bool,
    /// Stopped because its time ran out, after this long.
    timed_out: Option<Duration>,
}

/// Waits for the step, applying stop requests (and its timeout) to its
/// whole group, until no process of the group is left.
fn wait(plan: &Plan, child: &mut Child, pid: u32, timeout: Option<Duration>) -> Waited {
    let grace = Duration::from_millis(plan.stop_grace_ms);
    let mut group = GroupStop::new(pid, grace);
    let started = Instant::now();
    let mut waited = Waited {
        status: None,
        stopped: false,
        timed_out: None,
    };
    loop {
        if waited.status.is_none() {
            match child.try_wait() {
                Ok(Some(status)) => waited.status = Some(status),
                Ok(None) => {}
                Err(_) => return waited,
            }
        }
        if waited.status.is_some() && (!group.requested() || group.group_gone()) {
            return waited;
        }
        if waited.timed_out.is_none()
            && let Some(after) = timeout.filter(|after| started.elapsed() >= *after)
        {
            waited.timed_out = Some(after);
        }
        let request = stop_request(plan);
        waited.stopped |= request.is_some();
        if let Some(request) = request.or(waited.timed_out.map(|_| StopRequest::Terminate)) {
            group.request(request);
        }
        std::thread::sleep(GROUP_POLL);
    }
}

/// What the agent asked for, if it asked for a stop.
fn stop_request(plan: &Plan) -> Option<StopRequest> {
    if let Some(request) = super::stop_signal::requested() {
        return Some(request);
    }
    let text = std::fs::read(&plan.stop_file).ok()?;
    Some(if text.starts_with(b"KILL") {
        StopRequest::Kill
    } else {
        StopRequest::Terminate
    })
}

/// Reads one pipe to its end, writing whole lines as records. A line
/// longer than MAX_LINE_BYTES is kept up to there and marked cut; the rest
/// of it is skipped.
fn pump(mut pipe: Box<dyn Read + Send>, stderr: bool, log: &Log) {
    let tag = if stderr { b'e' } else { b'o' };
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut line: Vec<u8> = Vec::new();
    let mut cut = false;
    let mut records: Vec<u8> = Vec::with_capacity(READ_CHUNK + 1024);
    let mut lines = 0u64;
    loop {
        let n = match pipe.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut rest = &chunk[..n];
        while !rest.is_empty() {
            let newline = memchr::memchr(b'\n', rest);
            let part = &rest[..newline.unwrap_or(rest.len())];
            let room = MAX_LINE_BYTES - line.len();
            if part.len() > room {
                line.extend_from_slice(&part[..room]);
                cut = true;
            } else if !cut {
                line.extend_from_slice(part);
            }
            rest = &rest[part.len()..];
            if newline.is_some() {
                rest = &rest[1..];
                log.push_line(&mut records, tag, cut, &line);
                lines += 1;
                line.clear();
                cut = false;
            }
        }
        if !records.is_empty() {
            log.append(&records, lines);
            records.clear();
            lines = 0;
        }
    }
    if !line.is_empty() || cut {
        log.push_line(&mut records, tag, cut, &line);
        log.append(&records, 1);
    }
}

/// Why a program from the repository (a test script) must not run (as
/// root), if it must not: it, and every directory from it up to `repo_dir`, must resolve inside `repo_dir` (no
/// symlink out), be owned by root or the agent's user, and be writable by
/// no one else. Otherwise whoever could write there would choose what runs.
fn untrusted_program(repo_dir: &Path, script: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let repo = match std::fs::canonicalize(repo_dir) {
        Ok(repo) => repo,
        Err(e) => return Some(format!("cannot resolve repo_dir: {e}")),
    };
    let real = match std::fs::canonicalize(script) {
        Ok(real) => real,
        Err(e) => return Some(format!("cannot resolve it: {e}")),
    };
    if !real.starts_with(&repo) || real == repo {
        return Some(format!(
            "it resolves to {}, outside {}",
            real.display(),
            repo.display()
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    for path in real.ancestors().take_while(|p| p.starts_with(&repo)) {
        let metadata = match std::fs::symlink_metadata(path) {
            Ok(metadata) => metadata,
            Err(e) => return Some(format!("cannot inspect {}: {e}", path.display())),
        };
        if metadata.uid() != 0 && metadata.uid() != me {
            return Some(format!(
                "{} is owned by uid {}, not by root or the agent",
                path.display(),
                metadata.uid()
            ));
        }
        if metadata.mode() & 0o022 != 0 {
            return Some(format!(
                "{} is writable by group or others (mode {:04o})",
                path.display(),
                metadata.mode() & 0o7777
            ));
        }
    }
    None
}

#[cfg(test)]
#[path = "supervisor_tests.rs"]
mod tests;
