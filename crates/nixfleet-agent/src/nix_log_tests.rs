//! Unit tests of nix_log.rs, kept apart so the module stays readable.

use super::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nix-log");

fn fixture(name: &str) -> (String, String) {
    let read = |ext: &str| std::fs::read_to_string(format!("{FIXTURES}/{name}.{ext}")).unwrap();
    (read("log"), read("expected"))
}

/// Feeds every line; returns the rendering and every snapshot taken
/// after a line that changed the counts.
fn run(log: &str) -> (Vec<String>, Vec<Snapshot>, NixLog) {
    let mut nix = NixLog::new();
    let mut shown = Vec::new();
    let mut snapshots = Vec::new();
    for line in log.lines() {
        if nix.feed(line, &mut |l, _| shown.push(l.to_owned())) == Effect::Counts {
            snapshots.push(nix.snapshot());
        }
    }
    (shown, snapshots, nix)
}

fn feed_one(nix: &mut NixLog, line: &str) -> Vec<String> {
    let mut shown = Vec::new();
    nix.feed(line, &mut |l, _| shown.push(l.to_owned()));
    shown
}

fn assert_renders_as_expected(name: &str) -> (Vec<Snapshot>, NixLog) {
    let (log, expected) = fixture(name);
    let (shown, snapshots, nix) = run(&log);
    let expected: Vec<&str> = expected.lines().collect();
    assert_eq!(shown, expected, "{name}");
    assert!(nix.is_structured());
    (snapshots, nix)
}

#[test]
fn substitution_only_counts_paths_and_bytes() {
    let (snapshots, nix) = assert_renders_as_expected("substitute-only");
    let last = nix.snapshot();
    assert_eq!(
        last.downloads,
        Counts {
            done: 4,
            expected: 4,
            running: 0,
            failed: 0
        }
    );
    assert_eq!(last.builds, Counts::default());
    assert_eq!(last.bytes.done, 47_050_000);
    assert_eq!(last.bytes.expected, 47_050_000);
    assert_eq!(last.bytes.downloaded, 11_312_000);
    assert_eq!(last.steps(), (4, 4));
    // While copying, the expected bytes come from setExpected.
    assert!(
        snapshots
            .iter()
            .any(|s| s.bytes.expected == 47_050_000 && s.bytes.done < 47_050_000)
    );
    let mut done = 0;
    for s in &snapshots {
        assert!(s.downloads.done >= done, "downloads never go backwards");
        done = s.downloads.done;
    }
}

#[test]
fn a_mixed_deployment_renders_like_print_build_logs() {
    let (snapshots, nix) = assert_renders_as_expected("mixed");
    let last = nix.snapshot();
    assert_eq!((last.builds.done, last.builds.expected), (2, 2));
    assert_eq!((last.downloads.done, last.downloads.expected), (2, 2));
    assert_eq!(last.steps(), (4, 4));
    assert!(last.running.is_empty());
    // The running build and its phase were visible on the way.
    assert!(snapshots.iter().any(|s| s.running
        == [RunningBuild {
            drv: "hello-2.12.1".into(),
            phase: Some("configurePhase".into())
        }]));
    assert!(
        snapshots
            .iter()
            .any(|s| s.builds.running == 1 && s.builds.done == 0)
    );
}

#[test]
fn a_failed_build_is_counted_and_its_error_shown_in_full() {
    let (_, nix) = assert_renders_as_expected("build-failure");
    let last = nix.snapshot();
    assert_eq!(
        last.builds,
        Counts {
            done: 1,
            expected: 3,
            running: 0,
            failed: 1
        }
    );
    assert_eq!(last.steps(), (1, 3));
}

/// Recorded from Nix 2.8 (`nix-build --log-format internal-json -v`,
/// three small derivations); the expected rendering is the plain run
/// of the same derivations with each build's lines prefixed.
#[test]
fn a_real_nix_build_renders_like_its_plain_run() {
    let (_, nix) = assert_renders_as_expected("real-nix-2.8-build");
    let last = nix.snapshot();
    assert_eq!((last.builds.done, last.builds.expected), (3, 3));
    assert_eq!(last.builds.failed, 0);
    assert_eq!(last.steps(), (3, 3));
}

#[test]
fn a_real_nix_failure_renders_like_its_plain_run() {
    let (snapshots, nix) = assert_renders_as_expected("real-nix-2.8-failure");
    let last = nix.snapshot();
    assert_eq!(last.builds.failed, 1);
    assert_eq!(last.builds.done, 0);
    // Nix announced two builds before the failure cancelled the second.
    assert!(snapshots.iter().any(|s| s.builds.expected == 2));
}

#[test]
fn plain_output_passes_through_unchanged() {
    let mut nix = NixLog::new();
    for line in [
        "building the system configuration...",
        "",
        "  indented \x1b[1mbold\x1b[0m",
        "@nixos is not a prefix",
        "@nix",
    ] {
        assert_eq!(feed_one(&mut nix, line), [line]);
    }
    assert!(!nix.is_structured());
    assert_eq!(nix.snapshot(), Snapshot::default());
}

#[test]
fn malformed_and_truncated_lines_fall_back_to_the_raw_line() {
    let good = r#"@nix {"action":"result","fields":["compiling foo.c"],"id":7,"type":101}"#;
    let mut nix = NixLog::new();
    feed_one(
        &mut nix,
        r#"@nix {"action":"start","id":7,"level":3,"type":105,"text":"building 'x'","fields":["/nix/store/00000000000000000000000000000000-foo-1.0.drv"]}"#,
    );
    // Every prefix of a valid line, cut anywhere (also inside a UTF-8
    // sequence would be lossy-replaced before reaching here).
    for end in 0..good.len() {
        let cut = &good[..end];
        let shown = feed_one(&mut nix, cut);
        if cut.starts_with(PREFIX) {
            assert_eq!(shown, [cut], "cut at {end}");
        }
    }
    assert_eq!(feed_one(&mut nix, good), ["foo> compiling foo.c"]);
    let cut_marked = format!("{}{}", &good[..40], crate::commands::TRUNCATED_MARK);
    assert_eq!(feed_one(&mut nix, &cut_marked), [cut_marked.as_str()]);
    for odd in [
        "@nix ",
        "@nix null",
        "@nix []",
        "@nix \"msg\"",
        "@nix {}",
        r#"@nix {"action":5}"#,
        r#"@nix {"action":"start","id":-1}"#,
        r#"@nix {"action":"result","id":7,"type":105,"fields":"x"}"#,
        r#"@nix {"action":"msg","level":"3","msg":"x"}"#,
        "@nix {\"action\":\"msg\",\"msg\":\"\\ud800\"}",
    ] {
        assert_eq!(feed_one(&mut nix, odd), [odd], "{odd}");
    }
}

#[test]
fn odd_but_valid_events_never_panic_or_count_garbage() {
    let mut nix = NixLog::new();
    for line in [
        // Results for unknown activities, fields of the wrong types,
        // huge numbers, unknown actions and types.
        r#"@nix {"action":"result","id":99,"type":105,"fields":[1,2,3,4]}"#,
        r#"@nix {"action":"result","id":99,"type":101,"fields":[42]}"#,
        r#"@nix {"action":"result","id":99,"type":101,"fields":[]}"#,
        r#"@nix {"action":"start","id":1,"type":104}"#,
        r#"@nix {"action":"result","id":1,"type":105,"fields":["a",null,{},[]]}"#,
        r#"@nix {"action":"result","id":1,"type":106,"fields":[104,18446744073709551615]}"#,
        r#"@nix {"action":"result","id":1,"type":106,"fields":[104,18446744073709551615]}"#,
        r#"@nix {"action":"result","id":1,"type":106,"fields":[999,5]}"#,
        r#"@nix {"action":"start","id":2,"type":105,"fields":[7]}"#,
        r#"@nix {"action":"start","id":3,"type":105,"fields":["/"]}"#,
        r#"@nix {"action":"start","id":4,"type":105,"fields":["-"]}"#,
        r#"@nix {"action":"result","id":2,"type":104,"fields":[1]}"#,
        r#"@nix {"action":"stop","id":12345}"#,
        r#"@nix {"action":"setStatus","id":1,"future":true}"#,
        r#"@nix {"action":"msg","level":99,"msg":"very chatty"}"#,
    ] {
        nix.feed(line, &mut |_, _| {});
        let _ = nix.snapshot();
    }
    assert_eq!(nix.snapshot().builds.expected, u64::MAX);
    assert_eq!(nix.snapshot().running.len(), 3);
    nix.feed(r#"@nix {"action":"stop","id":1}"#, &mut |_, _| {});
    assert_eq!(nix.snapshot().builds.expected, 0);
}

#[test]
fn build_log_lines_carry_the_package_name() {
    let mut nix = NixLog::new();
    let start = |id: u32, kind: u64, drv: &str| {
        format!(
            r#"@nix {{"action":"start","id":{id},"level":3,"type":{kind},"text":"","fields":["{drv}","",1,1]}}"#
        )
    };
    let line = |id: u32, kind: u64, text: &str| {
        format!(r#"@nix {{"action":"result","id":{id},"type":{kind},"fields":["{text}"]}}"#)
    };
    let store = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz";
    nix.feed(
        &start(1, 105, &format!("{store}-hello-2.12.1.drv")),
        &mut |_, _| {},
    );
    nix.feed(
        &start(2, 105, &format!("{store}-nixos-system-web-1-25.11.drv")),
        &mut |_, _| {},
    );
    nix.feed(
        &start(3, 110, &format!("{store}-hello-2.12.1.drv")),
        &mut |_, _| {},
    );
    nix.feed(&start(4, 105, "short-name.drv"), &mut |_, _| {});
    assert_eq!(feed_one(&mut nix, &line(1, 101, "ok")), ["hello> ok"]);
    assert_eq!(
        feed_one(&mut nix, &line(2, 101, "ok")),
        ["nixos-system-web> ok"]
    );
    assert_eq!(
        feed_one(&mut nix, &line(3, 107, "signed")),
        ["hello (post)> signed"]
    );
    assert_eq!(feed_one(&mut nix, &line(4, 101, "x")), ["short-name> x"]);
    assert_eq!(feed_one(&mut nix, &line(9, 101, "who")), ["unnamed> who"]);
    assert_eq!(
        feed_one(&mut nix, &line(1, 101, "two\\nlines\\r")),
        ["hello> two", "hello> lines"]
    );
    let names: Vec<_> = nix.snapshot().running.into_iter().map(|r| r.drv).collect();
    assert_eq!(
        names,
        ["hello-2.12.1", "nixos-system-web-1-25.11", "short-name"]
    );
}

#[test]
fn only_levels_a_default_run_shows_are_rendered() {
    let mut nix = NixLog::new();
    let msg = |level: u32| format!(r#"@nix {{"action":"msg","level":{level},"msg":"at {level}"}}"#);
    let shown: Vec<String> = (0..=7).flat_map(|l| feed_one(&mut nix, &msg(l))).collect();
    assert_eq!(shown, ["at 0", "at 1", "at 2", "at 3"]);
    let start = |level: u32, kind: u32| {
        format!(
            r#"@nix {{"action":"start","id":{kind}{level},"level":{level},"type":{kind},"text":"t{level}"}}"#
        )
    };
    assert_eq!(feed_one(&mut nix, &start(3, 100)), ["t3..."]);
    assert!(feed_one(&mut nix, &start(4, 101)).is_empty());
    assert!(
        feed_one(&mut nix, &start(3, 111)).is_empty(),
        "waiting is never shown"
    );
}

#[test]
fn replaying_gives_the_same_state_as_living_through_it() {
    let (log, _) = fixture("mixed");
    let lines: Vec<&str> = log.lines().collect();
    for split in [0, 10, lines.len() / 2, lines.len()] {
        let mut live = NixLog::new();
        let mut sent = 0;
        for line in &lines[..split] {
            live.feed(line, &mut |_, _| sent += 1);
        }
        let mut replayed = NixLog::new();
        for line in &lines[..split] {
            replayed.feed(line, &mut |_, _| {});
        }
        assert_eq!(live.snapshot(), replayed.snapshot(), "after {split} lines");
    }
}

#[test]
fn too_many_activities_are_rendered_but_not_tracked() {
    let mut nix = NixLog::new();
    for id in 0..(MAX_ACTIVITIES as u64 + 10) {
        let line = format!(
            r#"@nix {{"action":"start","id":{id},"level":3,"type":105,"text":"b{id}","fields":["x-{id}.drv"]}}"#
        );
        assert_eq!(feed_one(&mut nix, &line), [format!("b{id}...")]);
    }
    assert_eq!(nix.activities.len(), MAX_ACTIVITIES);
    assert_eq!(nix.snapshot().running.len(), MAX_LISTED_BUILDS);
}

#[test]
fn ansi_escapes_are_removed() {
    assert_eq!(strip_ansi("\x1b[31;1merror:\x1b[0m x"), "error: x");
    assert_eq!(
        strip_ansi("\x1b]8;;http://x\x07link\x1b]8;;\x1b\\ end"),
        "link end"
    );
    assert_eq!(strip_ansi("cut \x1b["), "cut ");
    assert_eq!(strip_ansi("lone \x1b"), "lone ");
    assert!(matches!(strip_ansi("plain"), Cow::Borrowed("plain")));
}

#[test]
fn names_are_split_like_nix_does() {
    assert_eq!(
        derivation_name("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12.1.drv"),
        "hello-2.12.1"
    );
    assert_eq!(derivation_name("plain.drv"), "plain");
    assert_eq!(package_name("hello-2.12.1"), "hello");
    assert_eq!(package_name("gcc-wrapper-13.2.0"), "gcc-wrapper");
    assert_eq!(package_name("nixos-system-web-1-25.11"), "nixos-system-web");
    assert_eq!(package_name("no-version"), "no-version");
    assert_eq!(package_name("trailing-"), "trailing-");
    assert_eq!(package_name("ünï-côdé-1"), "ünï-côdé");
}
