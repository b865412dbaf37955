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
//! threads. Its only limits are
//! the disk cap of the log and the stop file the agent creates.

use super::group::{GROUP_POLL, GroupStop, describe_exit, exit_code_of, lower_priority};
use super::log::{MAX_LINE_BYTES, Plan, Step, private_file};
use super::table::StopRequest;
use crate::git_credentials::credential_env;
use crate::redact::Scrubber;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// After a step exits, how long its pipes may stay open (held by a leftover
/// background process) before the supervisor stops reading them.
const PIPE_DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Bytes read from a pipe at once.
const READ_CHUNK: usize = 64 * 1024;

/// Entry point of `nixfleet-agent --supervise`.
pub fn main() -> ExitCode {
    let mut input = Vec::new();
    if std::io::stdin().read_to_end(&mut input).is_err() {
        return ExitCode::FAILURE;
    }
    let Ok(plan) = serde_json::from_slice::<Plan>(&input) else {
        eprintln!("nixfleet-agent --supervise: expected a plan on stdin");
        return ExitCode::from(crate::config::EXIT_CONFIG);
    };
    let Ok(file) = private_file(&plan.log, OpenOptions::new().append(true)) else {
        return ExitCode::FAILURE;
    };
    let written = file.metadata().map(|m| m.len()).unwrap_or(0);
    let log = Arc::new(Log {
        max_bytes: plan.max_bytes,
        scrubber: Scrubber::for_url(plan.scrub_url.as_deref()),
        inner: Mutex::new(LogState {
            file,
            written,
            cut: false,
            dropped: 0,
        }),
    });
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
    let dropped = log.lock().dropped;
    if dropped > 0 {
        log.event(&format!("dropped {dropped}"));
    }
    log.event("done");
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

fn push_record(records: &mut Vec<u8>, tag: u8, cut: bool, line: &[u8]) {
    records.push(if cut { tag.to_ascii_uppercase() } else { tag });
    records.push(b' ');
    records.extend_from_slice(line);
    records.push(b'\n');
}

/// The command log as the supervisor writes it: whole records in single
/// `write`s, output capped, events always.
struct Log {
    max_bytes: u64,
    scrubber: Scrubber,
    inner: Mutex<LogState>,
}

struct LogState {
    file: File,
    written: u64,
    cut: bool,
    dropped: u64,
}

impl Log {
    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `lines` whole output records, or as many as fit under the
    /// cap; past it every line is only counted.
    fn append(&self, records: &[u8], lines: u64) {
        let mut state = self.lock();
        if state.cut {
            state.dropped += lines;
            return;
        }
        let room = self.max_bytes.saturating_sub(state.written);
        let fits = if records.len() as u64 <= room {
            records.len()
        } else {
            // The longest prefix of whole records that fits.
            let limit = room as usize;
            memchr::memrchr(b'\n', &records[..limit]).map_or(0, |i| i + 1)
        };
        if fits > 0 {
            write_or_give_up(&mut state, &records[..fits]);
        }
        if fits < records.len() {
            let not_kept = memchr::memchr_iter(b'\n', &records[fits..]).count() as u64;
            state.dropped += not_kept;
            state.cut = true;
            let note = format!("# cut {}\n", self.max_bytes);
            write_or_give_up(&mut state, note.as_bytes());
        }
    }

    /// A line of the agent's own, as stdout of the command (under the cap
    /// like any line).
    /// Adds a line of the command to `records`, without `repo_url`'s
    /// credentials.
    fn push_line(&self, records: &mut Vec<u8>, tag: u8, cut: bool, line: &[u8]) {
        match self.scrubber.scrub_bytes(line) {
            Some(clean) => push_record(records, tag, cut, &clean),
            None => push_record(records, tag, cut, line),
        }
    }

    fn note(&self, text: &str) {
        let mut record = Vec::with_capacity(text.len() + 3);
        push_record(&mut record, b'o', false, one_line(text).as_bytes());
        self.append(&record, 1);
    }

    fn event(&self, text: &str) {
        let mut state = self.lock();
        let record = format!("# {text}\n");
        write_or_give_up(&mut state, record.as_bytes());
    }
}

fn write_or_give_up(state: &mut LogState, bytes: &[u8]) {
    // A full disk must not stop the command: what cannot be written is
    // lost from the log (and so from the dashboard), never blocking.
    if state.file.write_all(bytes).is_ok() {
        state.written += bytes.len() as u64;
    }
}

/// Events are one line each.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
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
mod tests {
    use super::*;
    use crate::commands::log::{Record, parse};

    fn plan(dir: &std::path::Path, steps: Vec<Step>, max_bytes: u64) -> Plan {
        Plan {
            log: dir.join("x.log"),
            stop_file: dir.join("stop"),
            stop_grace_ms: 1000,
            max_bytes,
            scrub_url: None,
            notes: Vec::new(),
            steps,
        }
    }

    fn sh(label: &str, body: &str, stop_on_failure: bool) -> Step {
        Step {
            label: label.into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), body.into()],
            cwd: "/".into(),
            stop_on_failure,
            trusted_within: None,
            low_priority: false,
            timeout_ms: None,
            repo_credentials: false,
        }
    }

    fn run_plan(plan: &Plan) -> Vec<String> {
        std::fs::write(&plan.log, "").unwrap();
        let file = OpenOptions::new().append(true).open(&plan.log).unwrap();
        let log = Arc::new(Log {
            max_bytes: plan.max_bytes,
            scrubber: Scrubber::for_url(plan.scrub_url.as_deref()),
            inner: Mutex::new(LogState {
                file,
                written: 0,
                cut: false,
                dropped: 0,
            }),
        });
        run(plan, &log);
        let text = std::fs::read(&plan.log).unwrap();
        text.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .map(|l| {
                // Pids vary.
                match parse(l.as_bytes()) {
                    Record::Start { index, label, .. } => format!("# start {index} {label}"),
                    _ => l,
                }
            })
            .collect()
    }

    #[test]
    fn steps_run_in_order_and_a_failure_ends_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan(
            dir.path(),
            vec![
                sh("one", "echo a; echo b >&2; printf 'no newline'", true),
                sh("two", "exit 3", true),
                sh("three", "echo never", true),
            ],
            u64::MAX,
        );
        let records = run_plan(&plan);
        let stdout: Vec<_> = records.iter().filter(|r| r.starts_with("o ")).collect();
        assert_eq!(stdout, ["o a", "o no newline"]);
        assert!(records.contains(&"e b".to_owned()));
        assert_eq!(
            records[..5],
            [
                "# steps 3",
                "# step 0 one",
                "# step 1 two",
                "# step 2 three",
                "# start 0 one"
            ]
        );
        assert!(records.contains(&"# end 0 0 exit code 0".to_owned()));
        assert!(records.contains(&"# end 1 3 exit code 3".to_owned()));
        assert!(
            !records
                .iter()
                .any(|r| r.contains("three") && !r.starts_with("# step "))
        );
        assert_eq!(records.last().unwrap(), "# done");
    }

    #[test]
    fn notes_come_first_and_untrusted_programs_never_run() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ran = dir.path().join("ran");
        let script = repo.join("T01.sh");
        std::fs::write(&script, format!("#!/bin/sh\ntouch {}\n", ran.display())).unwrap();
        // Writable by the group: whoever is in it would choose what runs.
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o775)).unwrap();
        let mut step = sh("T01.sh", "", false);
        step.program = script.display().to_string();
        step.args.clear();
        step.trusted_within = Some(repo.clone());
        let mut plan = plan(dir.path(), vec![step.clone()], u64::MAX);
        plan.notes = vec!["[nixfleet] planned\nacross lines".into()];
        let records = run_plan(&plan);
        assert_eq!(records[2], "o [nixfleet] planned across lines");
        assert!(
            records.contains(
                &"o [nixfleet] refusing to run T01.sh: \
                  {} is writable by group or others (mode 0775)"
                    .replace("{}", &script.display().to_string())
            ),
            "{records:?}"
        );
        assert!(
            records
                .iter()
                .any(|r| r.starts_with("# end 0 127 refusing to run T01.sh"))
        );
        assert!(!ran.exists(), "a group-writable script ran");
        // The same script, once only its owner may write it, runs.
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let records = run_plan(&plan);
        assert!(
            records.contains(&"# end 0 0 exit code 0".to_owned()),
            "{records:?}"
        );
        assert!(ran.exists());
    }

    #[test]
    fn repo_url_credentials_never_reach_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let url = "https://deploy:s3cr3t-pw@git.example/fleet.git";
        let mut plan = plan(
            dir.path(),
            vec![sh(
                "git clone",
                &format!("echo cloning {url}; echo \"fatal: {url}\" >&2"),
                true,
            )],
            u64::MAX,
        );
        plan.scrub_url = Some(url.to_owned());
        let records = run_plan(&plan).join("\n");
        assert!(!records.contains("s3cr3t-pw"), "{records}");
        assert!(records.contains("o cloning https://<redacted>@git.example/fleet.git"));
        assert!(records.contains("e fatal: https://<redacted>@git.example/fleet.git"));
    }

    #[test]
    fn the_cap_cuts_whole_lines_notes_the_cut_and_counts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan(
            dir.path(),
            vec![sh(
                "flood",
                "for i in $(seq 1 1000); do echo line$i; done",
                false,
            )],
            1000,
        );
        let records = run_plan(&plan);
        let kept = records.iter().filter(|r| r.starts_with("o ")).count() as u64;
        assert!(kept > 50 && kept < 200, "{kept}");
        assert!(records.contains(&"# cut 1000".to_owned()), "{records:?}");
        assert!(records.contains(&format!("# dropped {}", 1000 - kept)));
        assert_eq!(records.last().unwrap(), "# done");
    }

    #[test]
    fn long_lines_are_cut_and_unstartable_programs_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut missing = sh("missing", "", true);
        missing.program = "/nonexistent/program".into();
        let plan = plan(
            dir.path(),
            vec![
                sh(
                    "long",
                    "head -c 70000 /dev/zero | tr '\\0' x; echo; echo after",
                    false,
                ),
                missing,
            ],
            u64::MAX,
        );
        let records = run_plan(&plan);
        let cut = records.iter().find(|r| r.starts_with("O ")).unwrap();
        assert_eq!(cut.len(), 2 + MAX_LINE_BYTES);
        assert!(records.contains(&"o after".to_owned()));
        assert!(
            records
                .iter()
                .any(|r| r.starts_with("# notstarted 1 cannot run /nonexistent/program"))
        );
        assert!(records.contains(&"# end 1 127 cannot run /nonexistent/program: No such file or directory (os error 2)".to_owned()), "{records:?}");
    }

    #[test]
    fn a_step_past_its_timeout_is_stopped_and_recorded_as_timed_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut slow = sh("slow", "sleep 30 & sleep 30", true);
        slow.timeout_ms = Some(200);
        let plan = plan(
            dir.path(),
            vec![slow, sh("next", "echo next", true)],
            u64::MAX,
        );
        let started = Instant::now();
        let records = run_plan(&plan);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(records.contains(&"# timedout".to_owned()), "{records:?}");
        assert!(
            records.contains(&"# end 0 124 timed out after 0s".to_owned()),
            "{records:?}"
        );
        assert!(
            !records.contains(&"# stopped".to_owned()),
            "not a user's stop"
        );
        assert!(!records.contains(&"o next".to_owned()), "{records:?}");
    }

    #[test]
    fn a_stop_file_stops_the_group_and_the_remaining_steps() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan(
            dir.path(),
            vec![
                sh("sleeper", "sleep 30 & sleep 30", false),
                sh("next", "echo next", false),
            ],
            u64::MAX,
        );
        let stop = plan.stop_file.clone();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::write(stop, "TERM").unwrap();
        });
        let started = Instant::now();
        let records = run_plan(&plan);
        stopper.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(records.contains(&"# stopped".to_owned()), "{records:?}");
        assert!(
            records.contains(&"# end 0 143 killed by signal 15".to_owned()),
            "{records:?}"
        );
        assert!(
            !records
                .iter()
                .any(|r| r.contains("next") && !r.starts_with("# step "))
        );
    }
}
