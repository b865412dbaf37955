//! The web page in a real browser: Debian's headless Chromium, driven over
//! the Chrome DevTools Protocol, against the real mock dashboard and the
//! real agent with a stand-in `nixos-rebuild` first on its PATH.
//!
//! One browser, one mock and one agent serve the whole walk-through, which
//! checks what a person would check, in order. The driver (and why the
//! DevTools protocol rather than WebDriver) is in `browser_kit/`; the page
//! with a fleet of 300 agents is `browser_fleet.rs`.
//!
//! Without Chromium the test is skipped with a message, except under
//! `CI=true`, where it fails. `NIXFLEET_CHROMIUM` names another binary.
//! A screenshot of the host view during a command is saved as
//! `target/browser-artifacts/host-view.png`.

mod browser_kit;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use browser_kit::{Browser, agent_binary, chromium_or_skip, git, start_mock, write_agent_config};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const TOKEN: &str = "browser-test-token-51c2";
const HOST: &str = "browser-host";

/// A stand-in `nixos-rebuild` that talks like Nix: what it will build and
/// fetch, one line per build and download, a warning on stderr, then it
/// waits until `release` exists, so the test decides when the build ends
/// (or until the test's directory is gone: the agent's commands outlive
/// it by design, a test's must not outlive the test).
fn rebuild_stand_in(release: &Path) -> String {
    format!(
        r#"#!/bin/sh
echo "these 2 derivations will be built:"
echo "  /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-etc.drv"
echo "  /nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system.drv"
echo "these 3 paths will be fetched (1.20 MiB download, 4.80 MiB unpacked):"
for p in hello coreutils bash; do
  echo "copying path '/nix/store/cccccccccccccccccccccccccccccccc-$p' from 'https://cache.nixos.org'..."
done
echo "building '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-etc.drv'..."
echo "warning: Git tree '/var/lib/nixfleet/repo' is dirty" >&2
echo "building '/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system.drv'..."
until [ -e '{release}' ] || [ ! -d '{home}' ]; do sleep 0.05; done
echo "activating the configuration..."
echo "setting up /etc..."
"#,
        release = release.display(),
        home = release.parent().unwrap_or(Path::new("/")).display()
    )
}

struct AgentProcess {
    child: Child,
}

impl AgentProcess {
    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id().unwrap() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }
}

fn start_agent(binary: &Path, dir: &Path, url: &str) -> AgentProcess {
    start_agent_with(binary, dir, url, &rebuild_stand_in(&dir.join("release")))
}

/// A stand-in `nixos-rebuild` that replays Nix 2.8's recorded log of a
/// good build (three derivations) the way Nix writes it: all on stderr.
fn recorded_build_stand_in() -> String {
    let log = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nixfleet-agent/tests/fixtures/nix-log/real-nix-2.8-build.log"
    );
    format!(
        "#!/bin/sh
case \" $* \" in
  *\" --log-format internal-json \"*) cat '{log}' >&2 ;;
           *) echo \"expected Nix's structured log flags: $*\" >&2; exit 64 ;;
esac
"
    )
}

fn start_agent_with(binary: &Path, dir: &Path, url: &str, stand_in: &str) -> AgentProcess {
    let repo = dir.join("repo");
    let bin = dir.join("bin");
    for d in [&repo, &bin, &dir.join("state")] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(repo.join("flake.nix"), "{ }\n").unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "config"]);
    let rebuild = bin.join("nixos-rebuild");
    let mut file = std::fs::File::create(&rebuild).unwrap();
    file.write_all(stand_in.as_bytes()).unwrap();
    drop(file);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rebuild, std::fs::Permissions::from_mode(0o755)).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = write_agent_config(
        dir,
        url,
        HOST,
        &token,
        "interval = 1\nstop_grace = 2\nmetrics = \"proc\"",
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = Command::new(binary)
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("PATH", path)
        .env("HOME", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.stderr")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start the agent");
    AgentProcess { child }
}

fn artifact_dir() -> PathBuf {
    let mock = Path::new(env!("CARGO_BIN_EXE_nixfleet-mock-dashboard"));
    // target/<profile>/nixfleet-mock-dashboard → target/browser-artifacts
    mock.parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."))
        .join("browser-artifacts")
}

fn row(cell: &str) -> String {
    format!("tr[data-host=\"{HOST}\"] td.{cell}")
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_follows_a_host_and_runs_commands_in_the_browser() {
    let Some(chromium) = chromium_or_skip("browser test") else {
        return;
    };
    let agent_bin = agent_binary();
    let (_mock, addr) = start_mock(TOKEN).await;
    let base = format!("http://{addr}");
    let mut browser = Browser::start(&chromium).await;

    // Opened before any host exists: the page says so, then the host
    // appears by itself (pushed, not reloaded).
    browser.open(&format!("{base}/")).await;
    browser
        .wait(
            "document.getElementById('feed').dataset.state === 'live' && !document.getElementById('no-hosts').hidden",
            "the empty host list",
        )
        .await;
    let work = tempfile::tempdir().unwrap();
    let agent = start_agent(&agent_bin, work.path(), &format!("ws://{addr}/ws"));
    browser
        .wait(
            &format!(
                "document.querySelector('{}')?.textContent === 'online'",
                row("state")
            ),
            "the host to appear online",
        )
        .await;
    let generation = browser.text(&row("generation")).await;
    assert!(
        generation.len() >= 7 && generation.chars().all(|c| c.is_ascii_hexdigit()),
        "generation cell: {generation:?}"
    );
    assert!(
        !browser
            .text(&row("agent"))
            .await
            .trim_matches('–')
            .is_empty()
    );

    // A heartbeat updates the age: the time of the last heartbeat changes
    // and the age reads a second or two.
    let first_beat = browser
        .eval(&format!(
            "document.querySelector('{}').dataset.t",
            row("age")
        ))
        .await;
    browser
        .wait(
            &format!(
                "(() => {{ const c = document.querySelector('{}'); \
                 return c.dataset.t !== {first_beat} && /^[0-2] s ago$/.test(c.textContent); }})()",
                row("age")
            ),
            "a newer heartbeat with a fresh age",
        )
        .await;
    // Metrics arrive with each heartbeat and draw a sparkline.
    browser
        .wait(
            &format!(
                "/\\d+% \\/ \\d+%/.test(document.querySelector('{m}').textContent) && \
                 document.querySelector('{m} polyline.cpu')?.getAttribute('points').split(' ').length >= 2",
                m = row("metrics")
            ),
            "metrics with a sparkline",
        )
        .await;

    // The filter box: a hostname substring that matches nothing hides the
    // row and says so; clearing it brings the row back.
    let filter = |text: &str| {
        format!(
            "(() => {{ const f = document.getElementById('host-filter'); f.value = '{text}'; \
             f.dispatchEvent(new Event('input')); return true; }})()"
        )
    };
    browser.eval(&filter("no-such-host")).await;
    browser
        .wait(
            "document.querySelectorAll('#hosts tbody tr').length === 0 && \
             document.getElementById('host-count').textContent === '1 host, 0 match'",
            "the filtered, empty host list",
        )
        .await;
    browser.eval(&filter("BROWSER")).await;
    browser
        .wait(
            &format!(
                "document.querySelector('tr[data-host=\"{HOST}\"]') !== null && \
                 document.getElementById('host-count').dataset.total === '1'"
            ),
            "the host found by a case-insensitive filter",
        )
        .await;
    browser.eval(&filter("")).await;

    // Open the host view and press "switch": lines stream in, stderr marked,
    // progress counted, the buttons marked busy.
    browser.click(&format!("tr[data-host=\"{HOST}\"]")).await;
    browser
        .wait(
            "!document.getElementById('host-view').hidden && document.getElementById('view-name').textContent === 'browser-host'",
            "the host view",
        )
        .await;
    browser.click("button[data-command=\"switch\"]").await;
    browser
        .wait(
            "[...document.querySelectorAll('#output .line.stdout')].some(l => l.textContent.includes(\"building '/nix/store/bbbb\"))",
            "the switch's output lines",
        )
        .await;
    let stderr = browser.text("#output .line.stderr").await;
    assert!(stderr.contains("Git tree"), "stderr line: {stderr:?}");
    browser
        .wait(
            "document.getElementById('line-count').dataset.lines === '10'",
            "a line counter of 10",
        )
        .await;
    browser
        .wait(
            "document.getElementById('progress-text').textContent.includes('builds 2/2') && \
             document.getElementById('progress-text').textContent.includes('downloads 3/3')",
            "build progress",
        )
        .await;
    browser
        .wait(
            &format!(
                "document.querySelector('{}').textContent === 'switch'",
                row("running")
            ),
            "the host list showing switch running",
        )
        .await;
    browser
        .wait(
            "document.querySelector('button[data-command=\"test\"]').classList.contains('would-reject') && \
             !document.querySelector('button[data-command=\"stop\"]').classList.contains('would-reject')",
            "the buttons marked for a busy host",
        )
        .await;
    let shot = artifact_dir().join("host-view.png");
    browser.screenshot(&shot).await;
    eprintln!(
        "screenshot of the host view during a command: {}",
        shot.display()
    );

    // A second command while busy is shown as rejected.
    browser.click("button[data-command=\"test\"]").await;
    browser
        .wait(
            "[...document.querySelectorAll('#output .line.rejected')].some(l => l.textContent.includes('command already running'))",
            "the rejection in the output",
        )
        .await;
    browser
        .wait(
            "document.querySelector('#timeline tr[data-kind=\"rejected\"]')?.textContent.includes('running switch')",
            "the rejection in the timeline",
        )
        .await;

    // The build ends: the last lines, then the status with its exit code
    // and duration.
    std::fs::write(work.path().join("release"), "").unwrap();
    browser
        .wait(
            "[...document.querySelectorAll('#output .line')].some((l) => l.textContent.includes('switch: ok, exit code 0'))",
            "the status after the last line",
        )
        .await;
    // A successful switch registers again on a fresh connection (v3), so a
    // "registered" marker may follow the status; the status itself must
    // come right after the build's last line.
    let before_status = browser
        .eval(
            "[...document.querySelectorAll('#output .line')].find((l) => l.textContent.includes('switch: ok, exit code 0')).previousElementSibling.textContent",
        )
        .await;
    assert_eq!(before_status, "setting up /etc...");
    let status_row = browser
        .wait(
            "document.querySelector('#timeline tr[data-kind=\"status\"]')?.textContent",
            "the status in the timeline",
        )
        .await;
    let status_row = status_row.as_str().unwrap();
    assert!(
        status_row.contains("exit code 0") && status_row.contains(" s"),
        "status row: {status_row}"
    );
    browser
        .wait(
            "document.getElementById('progress-fill').classList.contains('ok')",
            "a full progress bar",
        )
        .await;

    // The next command goes to the agent's fresh connection: wait for it
    // (a click while the old one closes finds no agent to send to).
    browser
        .wait(
            "[...document.querySelectorAll('#timeline tr[data-kind=\"registered\"]')].some((r) => r.textContent.includes('registered on connection #2'))",
            "the agent registered again after the switch",
        )
        .await;

    // "stop" while busy ends the command with the agent's stop status.
    std::fs::remove_file(work.path().join("release")).unwrap();
    browser.click("button[data-command=\"switch\"]").await;
    browser
        .wait(
            &format!(
                "document.querySelector('{}').textContent === 'switch'",
                row("running")
            ),
            "the second switch running",
        )
        .await;
    browser.click("button[data-command=\"stop\"]").await;
    browser
        .wait(
            "[...document.querySelectorAll('#output .line.status-error')].some(l => l.textContent.includes('Stopped by user'))",
            "the stopped status",
        )
        .await;
    browser
        .wait(
            &format!(
                "document.querySelector('{}').textContent === 'idle'",
                row("running")
            ),
            "the host idle again",
        )
        .await;

    // A host that stops sending heartbeats turns offline (3 × 1 s), and
    // back online when it resumes.
    agent.signal(rustix::process::Signal::STOP);
    browser
        .wait(
            &format!(
                "document.querySelector('{}').textContent.startsWith('offline')",
                row("state")
            ),
            "the silent host offline",
        )
        .await;
    agent.signal(rustix::process::Signal::CONT);
    browser
        .wait(
            &format!(
                "document.querySelector('{}').textContent === 'online'",
                row("state")
            ),
            "the host online again",
        )
        .await;
    // Its connection events are on the timeline: the first register, and
    // the fresh one after the successful switch (v3).
    let registered = browser
        .eval("[...document.querySelectorAll('#timeline tr[data-kind=\"registered\"]')].map((r) => r.textContent).join('\\n')")
        .await;
    let registered = registered.as_str().unwrap_or_default();
    assert!(
        registered.contains("registered on connection #1")
            && registered.contains("registered on connection #2"),
        "{registered}"
    );
}

/// Nix writes a good build's whole log to stderr; the page must not draw
/// it as errors (issue 26). The screenshot of that page is the README's,
/// taken here so that it shows what the page really looks like.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_build_is_drawn_without_errors_and_is_the_readme_screenshot() {
    let Some(chromium) = chromium_or_skip("browser test") else {
        return;
    };
    let agent_bin = agent_binary();
    let (_mock, addr) = start_mock(TOKEN).await;
    let mut browser = Browser::start(&chromium).await;
    let work = tempfile::tempdir().unwrap();
    let url = format!("ws://{addr}/ws");
    let _agent = start_agent_with(&agent_bin, work.path(), &url, &recorded_build_stand_in());
    browser.open(&format!("http://{addr}/")).await;
    let online = format!(
        "document.querySelector('{}')?.textContent === 'online'",
        row("state")
    );
    browser.wait(&online, "the host online").await;
    // The row's cells end on one line: the status cell's border is the
    // row's (it once sat 7 px higher).
    let bottoms = browser
        .eval(&format!(
            "[...document.querySelectorAll('tr[data-host=\"{HOST}\"] td')].map((c) => Math.round(c.getBoundingClientRect().bottom))"
        ))
        .await;
    let bottoms: Vec<i64> = bottoms
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert!(
        bottoms.windows(2).all(|w| w[0] == w[1]),
        "cell bottoms: {bottoms:?}"
    );
    // #host=NAME opens the host's view (the address a click on it gives).
    browser
        .eval(&format!("location.hash = 'host={HOST}'"))
        .await;
    browser
        .wait(
            &format!("!document.getElementById('host-view').hidden && document.getElementById('view-name').textContent === '{HOST}'"),
            "the host view from #host=",
        )
        .await;
    browser.click("button[data-command=\"switch\"]").await;
    browser
        .wait(
            "[...document.querySelectorAll('#output .line')].some((l) => l.textContent.includes('switch: ok, exit code 0'))",
            "the switch's ok status",
        )
        .await;
    let built = browser
        .eval("[...document.querySelectorAll('#output .line.stdout')].filter((l) => l.textContent.startsWith('fleet-')).length")
        .await;
    assert!(
        built.as_u64().unwrap_or(0) >= 5,
        "the build's own lines: {built}"
    );
    let errors = browser
        .eval("[...document.querySelectorAll('#output .line.stderr')].map((l) => l.textContent)")
        .await;
    assert_eq!(
        errors,
        json!([]),
        "lines drawn as errors after a good build"
    );
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/mock-dashboard.png");
    browser.screenshot(&shot).await;
    eprintln!("the README's screenshot: {}", shot.display());
}
