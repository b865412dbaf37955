//! Tests of supervisor.rs (kept apart to keep that file short).
use super::*;
use crate::commands::log::{Record, parse};

fn plan(dir: &std::path::Path, steps: Vec<Step>, max_bytes: u64) -> Plan {
    Plan {
        log: dir.join("x.log"),
        stop_file: dir.join("stop"),
        stop_grace_ms: 1000,
        max_bytes,
        scrub_url: None,
        end_file: None,
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
    let log = Arc::new(Log::open(plan, crate::commands::relay::Relay::none()));
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
    assert!(
        records.contains(
            &"# end 1 127 cannot run /nonexistent/program: No such file or directory (os error 2)"
                .to_owned()
        ),
        "{records:?}"
    );
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
