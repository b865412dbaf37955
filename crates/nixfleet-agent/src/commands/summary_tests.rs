//! Tests of summary.rs (kept apart to keep that file short).
use super::*;
use crate::commands::log::parse;

fn summarise(kind: CommandKind, log: &str, resume_at: usize) -> (Vec<String>, Status) {
    let mut summary = Summary::new(kind, "/nonexistent".into(), "main".into());
    let mut frames = Vec::new();
    let mut offset = 0;
    for record in log.split_inclusive('\n') {
        offset += record.len();
        let record = record.strip_suffix('\n').unwrap();
        let mut out = Vec::new();
        summary.on_record(parse(record.as_bytes()), offset > resume_at, &mut out);
        frames.extend(out.into_iter().filter_map(|e| match e {
            Emit::Frame(frame) | Emit::Line(frame) | Emit::Progress(frame) => Some(frame),
            Emit::Started(_)
            | Emit::Dropped(_)
            | Emit::Tested { .. }
            | Emit::Rebuilt(_)
            | Emit::Lock(_)
            | Emit::System(_) => None,
        }));
    }
    (frames, summary.status("abc".into()))
}

fn of_type<'a>(frames: &'a [String], kind: &str) -> Vec<&'a String> {
    let tag = format!("\"type\":\"{kind}\"");
    frames.iter().filter(|f| f.contains(&tag)).collect()
}

/// `(current, total, status)` of each `phase` dot report.
fn dots(frames: &[String], phase: &str) -> Vec<(u64, u64, String)> {
    of_type(frames, "operation_progress")
        .iter()
        .filter_map(|f| {
            let value: serde_json::Value = serde_json::from_str(f).unwrap();
            let p = value["payload"]["progress"].get(phase)?.clone();
            Some((
                p["current"].as_u64()?,
                p["total"].as_u64()?,
                p["status"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

#[test]
fn a_failed_git_step_quotes_gits_error_not_its_hints() {
    let log = "# steps 3\n# step 0 git fetch\n# step 1 git checkout\n# step 2 git clean\n\
               # start 0 5 git fetch\ne fatal: no remote\ne hint: try this\ne \n\
               # end 0 128 exit code 128\n# done\n";
    let (frames, status) = summarise(CommandKind::Pull, log, 0);
    assert_eq!(of_type(&frames, "output").len(), 3);
    assert_eq!(status.status, Outcome::Error);
    assert_eq!(status.exit_code, 128);
    assert_eq!(status.message, "git fetch failed: fatal: no remote");
    assert_eq!(
        dots(&frames, "pull"),
        [(0, 3, "in_progress".into()), (0, 3, "error".into())]
    );
}

#[test]
fn a_pull_reports_a_dot_per_git_step_and_a_switch_after_it_none() {
    let log = "# steps 4\n# step 0 git fetch\n# step 1 git checkout\n# step 2 git clean\n\
               # step 3 nixos-rebuild switch\n\
               # start 0 5 git fetch\n# end 0 0 exit code 0\n\
               # start 1 6 git checkout\n# end 1 0 exit code 0\n\
               # start 2 7 git clean\n# end 2 0 exit code 0\n\
               # start 3 8 nixos-rebuild switch\n# end 3 0 exit code 0\n# done\n";
    let (frames, status) = summarise(CommandKind::PullSwitch, log, 0);
    let expected = [
        (0, 3, "in_progress"),
        (1, 3, "in_progress"),
        (2, 3, "in_progress"),
        (3, 3, "complete"),
    ]
    .map(|(c, t, s)| (c, t, s.to_owned()));
    assert_eq!(dots(&frames, "pull"), expected);
    assert_eq!(status.message, "pull-switch succeeded");
}

#[test]
fn a_flake_update_reports_the_lock_dot_and_quotes_nix() {
    let log = "# steps 1\n# step 0 nix flake update\n# start 0 5 nix flake update\n\
               # end 0 0 exit code 0\n# done\n";
    let (frames, status) = summarise(CommandKind::Update, log, 0);
    assert_eq!(
        dots(&frames, "lock"),
        [(0, 1, "in_progress".into()), (1, 1, "complete".into())]
    );
    assert_eq!(status.message, "flake.lock updated (every input)");
    let log = "# steps 1\n# step 0 nix flake update nixfleet\n\
               # start 0 5 nix flake update nixfleet\ne warning: dirty\n\
               e error: cannot find flake input 'nixfleet'\n# end 0 1 exit code 1\n# done\n";
    let (frames, status) = summarise(CommandKind::BumpFlake, log, 0);
    assert_eq!(dots(&frames, "lock").last().unwrap().2, "error");
    assert_eq!(
        status.message,
        "nix flake update failed: error: cannot find flake input 'nixfleet'"
    );
}

#[test]
fn the_core_hears_of_rebuilds_and_test_results_also_when_replayed() {
    let emits = |kind, log: &str| {
        let mut summary = Summary::new(kind, "/nonexistent".into(), "main".into());
        let mut out = Vec::new();
        for record in log.lines() {
            summary.on_record(parse(record.as_bytes()), false, &mut out);
        }
        out.into_iter()
            .filter(|e| matches!(e, Emit::Tested { .. } | Emit::Rebuilt(_)))
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
    };
    let log = "# steps 1\n# start 0 5 nixos-rebuild switch\n# end 0 1 exit code 1\n# done";
    assert_eq!(emits(CommandKind::Switch, log), ["Rebuilt(false)"]);
    let log = "# steps 1\n# start 0 5 nixos-rebuild switch\n# stopped\n# end 0 143 killed\n# done";
    assert!(
        emits(CommandKind::Switch, log).is_empty(),
        "a stop is no verdict"
    );
    let log = "# steps 2\n# start 0 5 T1.sh\n# end 0 0 exit code 0\n# start 1 6 T2.sh\n# end 1 1 exit code 1\n# done";
    assert_eq!(
        emits(CommandKind::Test, log),
        ["Tested { passed: 1, total: 2, stopped: false, failed: [\"T2.sh\"] }"]
    );
}

#[test]
fn replayed_records_count_for_the_status_but_are_not_sent() {
    let log = "# steps 1\n# start 0 5 nixos-rebuild switch\no one\no two\n# end 0 0 exit code 0\n# done\n";
    let upto_one = log.find("o two").unwrap();
    let (frames, status) = summarise(CommandKind::Switch, log, upto_one);
    assert_eq!(frames.len(), 1);
    assert!(frames[0].contains("\"two\""));
    assert_eq!(status.message, "switch succeeded");
    assert_eq!(status.exit_code, 0);
}

#[test]
fn tests_send_progress_after_each_script_and_a_summary() {
    let log = "# steps 2\n# start 0 5 T1.sh\no a\n# end 0 0 exit code 0\n# start 1 6 T2.sh\n# end 1 1 exit code 1\n# done\n";
    let (frames, status) = summarise(CommandKind::Test, log, 0);
    let progress = of_type(&frames, "test_progress");
    assert_eq!(progress.len(), 2);
    assert!(progress[0].contains("\"T1.sh passed\"") && progress[0].contains("\"running\":true"));
    assert!(progress[1].contains("\"1/2 passed\"") && progress[1].contains("\"running\":false"));
    assert_eq!((status.status, status.exit_code), (Outcome::Error, 1));
    let compartment: Vec<String> = of_type(&frames, "operation_progress")
        .iter()
        .map(|f| {
            let value: serde_json::Value = serde_json::from_str(f).unwrap();
            let tests = &value["payload"]["progress"]["tests"];
            format!(
                "{} {} {}",
                tests["current"], tests["results"], tests["status"]
            )
        })
        .collect();
    assert_eq!(
        compartment,
        [
            r#"0 ["pending","pending"] "in_progress""#,
            r#"1 ["pass","pending"] "in_progress""#,
            r#"2 ["pass","fail"] "error""#,
        ]
    );
    let (frames, status) = summarise(CommandKind::Test, "# steps 0\n# done\n", 0);
    assert!(of_type(&frames, "test_progress")[0].contains("\"0/0 passed\""));
    assert_eq!(status.status, Outcome::Ok);
}

#[test]
fn stops_unstarted_programs_and_dead_supervisors() {
    let log = "# steps 1\n# start 0 5 nixos-rebuild switch\n# stopped\n# end 0 143 killed by signal 15\n# done\n";
    let (_, status) = summarise(CommandKind::Switch, log, 0);
    assert_eq!(
        (status.message.as_str(), status.exit_code),
        ("Stopped by user", 143)
    );
    let log = "# steps 1\n# notstarted 0 cannot run nixos-rebuild: nope\n# end 0 127 cannot run nixos-rebuild: nope\n# done\n";
    let (_, status) = summarise(CommandKind::Switch, log, 0);
    assert_eq!(
        (status.message.as_str(), status.exit_code),
        ("cannot run nixos-rebuild: nope", 127)
    );
    let (_, status) = summarise(CommandKind::Switch, "# steps 1\n# start 0 5 x\no a\n", 0);
    assert_eq!(status.exit_code, -1);
    let (frames, _) = summarise(CommandKind::Switch, "# steps 1\n# dropped 3\n# done\n", 0);
    assert!(frames[0].contains("[nixfleet] 3 lines dropped"));
    let log = "# steps 1\n# start 0 5 x\n# end 0 3 exit code 3\n# notkept 7 no space left on /var\n# done\n";
    let (frames, status) = summarise(CommandKind::Switch, log, 0);
    assert!(frames[0].contains("[nixfleet] 7 lines not kept: no space left on /var"));
    assert_eq!(status.exit_code, 3);
}

#[test]
fn a_command_streaming_only_says_so_before_its_lines() {
    let log =
        "# streaming /var is read-only\n# steps 1\n# start 0 5 x\no a\n# end 0 0 exited\n# done\n";
    let (frames, status) = summarise(CommandKind::Switch, log, 0);
    assert!(
        frames[0].contains(
            "[nixfleet] streaming only from here, output not kept on disk: /var is read-only"
        ),
        "{frames:?}"
    );
    assert!(
        frames[1..].iter().any(|f| f.contains(r#""line":"a""#)),
        "{frames:?}"
    );
    assert_eq!(status.exit_code, 0);
}
