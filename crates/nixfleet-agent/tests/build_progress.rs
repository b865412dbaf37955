//! Build progress end to end: a stand-in `nixos-rebuild` that insists on
//! Nix's structured log flags and replays recorded internal-json logs; the
//! in-test dashboard must get the plain rendering line for line and
//! `operation_progress` reports that only move forward, end on the right
//! counts and come at most about four a second.

mod common;

use common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nix-log");

/// The stand-in refuses to run without the flags, like a test double
/// should: the replay only makes sense if the agent asked for the format.
const REQUIRE_STRUCTURED_FLAGS: &str = r#"case " $* " in
  *" --log-format internal-json -v "*) ;;
  *) echo "stand-in: expected --log-format internal-json -v, got: $*" >&2; exit 64 ;;
esac"#;

fn fixture(name: &str, ext: &str) -> PathBuf {
    PathBuf::from(format!("{FIXTURES}/{name}.{ext}"))
}

async fn agent_replaying(dashboard: &Dashboard, body: &str) -> (Agent, u64) {
    let body = format!("{REQUIRE_STRUCTURED_FLAGS}\n{body}");
    let agent = start_with_rebuild(dashboard.url(), &body, |_| {}).await;
    let register = dashboard.wait_frame("register", 1, 10 * SECOND).await;
    (agent, register.conn())
}

/// The `system` step of each progress report, with its arrival.
fn system_steps(dashboard: &Dashboard) -> Vec<(tokio::time::Instant, Value)> {
    dashboard
        .frames("operation_progress")
        .iter()
        .map(|s| (s.at(), s.payload()["progress"]["system"].clone()))
        .collect()
}

fn assert_moves_forward(steps: &[(tokio::time::Instant, Value)]) {
    let (mut current, mut total) = (0, 0);
    for (_, step) in steps {
        let c = step["current"].as_u64().unwrap();
        let t = step["total"].as_u64().unwrap();
        assert!(c >= current && t >= total, "went backwards: {steps:?}");
        assert!(c <= t, "current past total: {step}");
        (current, total) = (c, t);
    }
}

/// The lines of a fixture that must arrive as errors: Nix's error messages
/// (level 0: `error: …` and their indented continuation) and plain stderr
/// lines that are not Nix's structured log (nixos-rebuild's own). The rest
/// is Nix's log of a build going well, written to stderr but no error.
fn error_lines(name: &str) -> std::collections::HashSet<String> {
    let log = std::fs::read_to_string(fixture(name, "log")).unwrap();
    let expected = std::fs::read_to_string(fixture(name, "expected")).unwrap();
    let mut errors: std::collections::HashSet<String> = log
        .lines()
        .filter(|l| !l.starts_with("@nix "))
        .map(str::to_owned)
        .collect();
    let mut in_error = false;
    for line in expected.lines() {
        in_error = line.starts_with("error:") || (in_error && line.starts_with("       "));
        if in_error {
            errors.insert(line.to_owned());
        }
    }
    errors
}

/// Replays one fixture through `switch` and checks what the dashboard got.
async fn replay(name: &str, exit: i32) -> (Vec<Value>, Value) {
    let dashboard = Dashboard::start().await;
    let body = format!("cat '{}' >&2\nexit {exit}", fixture(name, "log").display());
    let (_agent, conn) = agent_replaying(&dashboard, &body).await;
    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(
        status.payload()["exit_code"],
        exit,
        "{name}: {}",
        status.payload()
    );

    let expected = std::fs::read_to_string(fixture(name, "expected")).unwrap();
    let outputs = dashboard.frames("output");
    let lines: Vec<&str> = outputs
        .iter()
        .map(|s| s.payload()["line"].as_str().unwrap())
        .collect();
    assert_eq!(lines, expected.lines().collect::<Vec<_>>(), "{name}");
    let errors = error_lines(name);
    for (seen, line) in outputs.iter().zip(&lines) {
        let p = seen.payload();
        let expected = errors.contains(*line);
        assert_eq!(p["is_error"], expected, "{name}: {p}");
        assert_eq!(
            p["stream"],
            if expected { "stderr" } else { "stdout" },
            "{p}"
        );
    }

    let steps = system_steps(&dashboard);
    assert!(!steps.is_empty(), "{name}: no progress");
    assert_moves_forward(&steps);
    // The final report follows every line it describes and precedes the
    // status.
    let log = dashboard.log();
    let position = |pred: &dyn Fn(&Seen) -> bool| log.iter().rposition(pred).unwrap();
    let last_line = position(&|s| s.kind() == Some("output"));
    let last_progress = position(&|s| s.kind() == Some("operation_progress"));
    let status_at = position(&|s| s.kind() == Some("status"));
    assert!(last_line < last_progress && last_progress < status_at);
    let last = steps.last().unwrap().1.clone();
    (steps.into_iter().map(|(_, s)| s).collect(), last)
}

#[tokio::test]
async fn a_mixed_switch_is_rendered_line_for_line_with_progress_to_the_end() {
    let (steps, last) = replay("mixed", 0).await;
    assert_eq!(last["status"], "complete");
    assert_eq!(
        (last["current"].as_u64(), last["total"].as_u64()),
        (Some(4), Some(4))
    );
    let detail = &last["detail"];
    assert_eq!(detail["builds"]["done"], 2);
    assert_eq!(detail["builds"]["expected"], 2);
    assert_eq!(detail["downloads"]["done"], 2);
    assert_eq!(detail["bytes"]["done"], 80_400_000);
    assert_eq!(detail["running"], Value::Array(vec![]));
    assert!(
        steps[..steps.len() - 1]
            .iter()
            .all(|s| s["status"] == "in_progress")
    );
}

#[tokio::test]
async fn a_substitution_only_switch_counts_downloads() {
    let (_, last) = replay("substitute-only", 0).await;
    assert_eq!(last["status"], "complete");
    assert_eq!(
        (last["current"].as_u64(), last["total"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(last["detail"]["downloads"]["done"], 4);
    assert_eq!(last["detail"]["builds"]["expected"], 0);
    assert_eq!(last["detail"]["bytes"]["downloaded"], 11_312_000);
}

#[tokio::test]
async fn a_failed_build_ends_in_error_with_what_was_done() {
    let (_, last) = replay("build-failure", 1).await;
    assert_eq!(last["status"], "error");
    assert_eq!(
        (last["current"].as_u64(), last["total"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(last["detail"]["builds"]["failed"], 1);
}

#[tokio::test]
async fn plain_output_streams_as_before_and_reports_no_progress() {
    let dashboard = Dashboard::start().await;
    // An old Nix or a plain script: no structured line at all.
    let body = "echo 'building the system configuration...' >&2\n\
                echo '@nix is only a prefix with a space' >&2\n\
                echo 'stdout line'\n\
                printf '@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"cut' >&2\n\
                exit 0";
    let (_agent, conn) = agent_replaying(&dashboard, body).await;
    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok");
    let mut lines: Vec<String> = dashboard
        .frames("output")
        .iter()
        .map(|s| s.payload()["line"].as_str().unwrap().to_owned())
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "@nix is only a prefix with a space",
            "@nix {\"action\":\"msg\",\"level\":0,\"msg\":\"cut",
            "building the system configuration...",
            "stdout line",
        ]
    );
    assert!(dashboard.frames("operation_progress").is_empty());
}

#[tokio::test]
async fn a_flood_gets_at_most_about_four_progress_reports_a_second() {
    let dashboard = Dashboard::start().await;
    // 20 bursts of 1,000 build log lines, the build count moving with every
    // line, 100 ms apart: about 2 s of output whose counts change 20,000
    // times.
    let body = r#"
store=/nix/store/0123456789abcdfghijklmnpqrsvwxyz
echo '@nix {"action":"start","id":1,"level":0,"type":104,"text":""}' >&2
echo "@nix {\"action\":\"start\",\"id\":2,\"level\":3,\"type\":105,\"text\":\"building '$store-flood-1.0.drv'\",\"fields\":[\"$store-flood-1.0.drv\",\"\",1,1]}" >&2
i=0
while [ $i -lt 20000 ]; do
  i=$((i+1))
  printf '@nix {"action":"result","id":2,"type":101,"fields":["line %d"]}\n@nix {"action":"result","id":1,"type":105,"fields":[%d,20000,1,0]}\n' $i $i >&2
  if [ $((i % 1000)) -eq 0 ]; then sleep 0.1; fi
done
echo '@nix {"action":"stop","id":2}' >&2
echo '@nix {"action":"result","id":1,"type":105,"fields":[20000,20000,0,0]}' >&2
echo '@nix {"action":"stop","id":1}' >&2
"#;
    let (_agent, conn) = agent_replaying(&dashboard, body).await;
    dashboard.command(conn, "switch");
    let status = dashboard.wait_frame("status", 1, 60 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok");

    let steps = system_steps(&dashboard);
    assert_moves_forward(&steps);
    let (last_at, last) = steps.last().unwrap().clone();
    assert_eq!(last["status"], "complete");
    assert_eq!(
        (last["current"].as_u64(), last["total"].as_u64()),
        (Some(20_000), Some(20_000))
    );
    let first_at = steps[0].0;
    let span = last_at.duration_since(first_at).as_secs_f64();
    assert!(
        steps.len() >= 3,
        "the throttle must not swallow everything: {} reports over {span:.2}s",
        steps.len()
    );
    // At most one per 250 ms of the agent's time, plus the first and the
    // final one, plus one for the span measured at the dashboard being
    // shorter than the agent's when the first report was delayed on its
    // way through a busy machine.
    let allowed = (span * 4.0).ceil() as usize + 3;
    eprintln!(
        "flood: {} progress reports over {span:.2}s for 20000 count changes",
        steps.len()
    );
    assert!(
        steps.len() <= allowed,
        "{} progress reports over {span:.2}s (allowed {allowed})",
        steps.len()
    );
    for (i, (at, _)) in steps.iter().enumerate() {
        let in_window = steps[i..]
            .iter()
            .take_while(|(later, _)| later.duration_since(*at) < Duration::from_secs(1))
            .count();
        assert!(in_window <= 6, "{in_window} reports within one second");
    }

    // Never ahead of the lines: a report saying N builds steps done comes
    // after the line that preceded that count in the log (unless lines
    // were dropped on the way, which this check cannot see through).
    let log = dashboard.log();
    let dropped = log.iter().any(|s| {
        s.kind() == Some("output")
            && s.payload()["line"]
                .as_str()
                .is_some_and(|l| l.ends_with(" lines dropped"))
    });
    if !dropped {
        let mut last_line = 0;
        for seen in &log {
            match seen.kind() {
                Some("output") => {
                    if let Some(n) = seen.payload()["line"]
                        .as_str()
                        .and_then(|l| l.strip_prefix("flood> line "))
                    {
                        last_line = n.parse().unwrap();
                    }
                }
                Some("operation_progress") => {
                    let done = seen.payload()["progress"]["system"]["detail"]["builds"]["done"]
                        .as_u64()
                        .unwrap();
                    assert!(done <= last_line, "report of {done} after line {last_line}");
                }
                _ => {}
            }
        }
        assert_eq!(last_line, 20_000);
    }
}

#[tokio::test]
async fn a_change_held_back_by_the_throttle_is_sent_while_the_build_is_quiet() {
    let dashboard = Dashboard::start().await;
    // The first report goes out at once; the phase change right after it
    // is held back, and then the build prints nothing for a long while.
    let body = r#"
store=/nix/store/0123456789abcdfghijklmnpqrsvwxyz
echo '@nix {"action":"start","id":1,"level":0,"type":104,"text":""}' >&2
echo '@nix {"action":"result","id":1,"type":105,"fields":[0,1,1,0]}' >&2
echo "@nix {\"action\":\"start\",\"id\":2,\"level\":3,\"type\":105,\"text\":\"building '$store-quiet-1.0.drv'\",\"fields\":[\"$store-quiet-1.0.drv\",\"\",1,1]}" >&2
echo '@nix {"action":"result","id":2,"type":104,"fields":["buildPhase"]}' >&2
sleep 3
"#;
    let (_agent, conn) = agent_replaying(&dashboard, body).await;
    dashboard.command(conn, "switch");
    let first = dashboard
        .wait_frame("operation_progress", 1, 10 * SECOND)
        .await;
    let phase_reported = dashboard
        .wait_frame_where("operation_progress", 10 * SECOND, |p| {
            p["progress"]["system"]["detail"]["running"][0]["phase"] == "buildPhase"
        })
        .await;
    let waited = phase_reported.at().duration_since(first.at());
    assert!(
        waited < Duration::from_millis(1500),
        "the held-back report came {waited:?} after the first"
    );
    assert!(
        dashboard.frames("status").is_empty(),
        "reported only at the end"
    );
    let status = dashboard.wait_frame("status", 1, 10 * SECOND).await;
    assert_eq!(status.payload()["status"], "ok");
}

#[tokio::test]
async fn a_real_nix_recording_is_replayed_line_for_line() {
    // Recorded from Nix 2.8 itself (see the fixtures' README).
    // No line of it is an error (replay checks every line's is_error).
    assert!(error_lines("real-nix-2.8-build").is_empty());
    let (_, last) = replay("real-nix-2.8-build", 0).await;
    assert_eq!(last["status"], "complete");
    assert_eq!(
        (last["current"].as_u64(), last["total"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(last["detail"]["builds"]["done"], 3);
}

#[tokio::test]
async fn a_real_failed_build_sends_its_error_lines_as_errors() {
    // Nix's two `error:` messages are errors; the build's own lines before
    // them are not (replay checks every line's is_error).
    assert_eq!(error_lines("real-nix-2.8-failure").len(), 2);
    let (_, last) = replay("real-nix-2.8-failure", 1).await;
    assert_eq!(last["status"], "error");
}
