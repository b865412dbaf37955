//! The mock dashboard's page with a fleet (issue 25): 300 real agents
//! connected, the page loads in headless Chromium, shows the right host
//! count (drawing at most 100 rows), and while the fleet is idle its event
//! stream stays below a bound derived from the protocol.
//!
//! The bound: an idle agent sends one heartbeat per `interval`, and the
//! page's feed carries for each heartbeat only that host (`hosts_changed`,
//! its object with the one new metrics sample), so the stream needs about
//! `AGENTS × PER_HOST_BYTES / INTERVAL` bytes per second; the test allows
//! twice that (a host may beat once more than average inside the window)
//! plus the framing of at most one event per 50 ms (the mock's least gap
//! between two reads of one subscriber). A feed that resent the fleet on
//! every change (as before issue 25) needs hundreds of times more.
//!
//! Its own binary, so that it never runs beside the other browser tests.
//! Every process it starts ends by its PID, also when the test fails (the
//! `Fleet` guard, the mock's and the browser's kill-on-drop).
//!
//! inotify: each agent holds one inotify instance while it runs, and the
//! per-user limit (`fs.inotify.max_user_instances`, often 128) is below
//! the fleet: the agents past it run without one and check their files'
//! metadata on each heartbeat instead (`src/file_watch.rs`). The test
//! needs no sysctl; it prints how many agents watch and how many poll, and
//! starts the browser before the fleet so that the browser has its own.
//! Meanwhile other programs of the same user may find no inotify instance
//! left, which is why it is short.

mod browser_kit;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use browser_kit::{
    Browser, StreamMeter, agent_binary, chromium_or_skip, git, start_mock, write_agent_config,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "browser-fleet-token-7d1e";
const AGENTS: usize = 300;
/// The agents' heartbeat interval, seconds.
const INTERVAL: u64 = 10;
/// How long the idle stream is measured: three heartbeats of each agent.
const IDLE: Duration = Duration::from_secs(3 * INTERVAL);
/// The most one host's entry in a `hosts_changed` event may take: its API
/// object (the agent's register and heartbeat payloads as the protocol
/// defines them, and the mock's own fields) with one metrics sample.
/// Measured: at most 2,246 bytes with this agent (the largest entry
/// this test printed); the rest is room for longer versions and paths.
const PER_HOST_BYTES: usize = 4_000;
/// Framing of one SSE event (`event: hosts_changed`, `data: {"now":…,
/// "hosts":[…]}`, blank line) and of the HTTP chunk around it.
const EVENT_OVERHEAD: u64 = 100;
/// Events per second at most on one feed (one per 50 ms).
const MAX_EVENTS_PER_S: u64 = 20;
/// Bytes per second the idle page's stream may take.
const BOUND: u64 =
    2 * (AGENTS * PER_HOST_BYTES) as u64 / INTERVAL + MAX_EVENTS_PER_S * EVENT_OVERHEAD;
/// Beyond this the fleet did not come up at all (a hang, not a timing).
const FLEET_DEADLINE: Duration = Duration::from_secs(300);

fn hostname(i: usize) -> String {
    format!("fleet-page-{i}")
}

/// The agents, each killed by its PID and reaped when the guard drops
/// (also on a failed assertion); then their directories are removed.
struct Fleet {
    agents: Vec<std::process::Child>,
    dir: tempfile::TempDir,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            let _ = agent.kill();
        }
        for agent in &mut self.agents {
            let _ = agent.wait();
        }
    }
}

impl Fleet {
    /// Starts `AGENTS` agents against `addr`, each with its own state
    /// directory and a copy of one seed repository (a copy, not a clone
    /// each: 300 `git clone`s would take longer than the test).
    fn start(binary: &Path, addr: &str) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        std::fs::write(seed.join("flake.nix"), "{ }\n").unwrap();
        git(&seed, &["init", "-q", "--template=", "-b", "main"]);
        git(&seed, &["add", "."]);
        git(&seed, &["commit", "-q", "-m", "fleet"]);
        let token = dir.path().join("token");
        std::fs::write(&token, TOKEN).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut fleet = Fleet {
            agents: Vec::with_capacity(AGENTS),
            dir,
        };
        for i in 1..=AGENTS {
            let home = fleet.dir.path().join(hostname(i));
            copy_tree(&seed, &home.join("repo"));
            let child = start_agent(binary, &home, &hostname(i), &token, addr);
            fleet.agents.push(child);
        }
        fleet
    }

    fn home(&self, i: usize) -> PathBuf {
        self.dir.path().join(hostname(i))
    }

    /// Agents that ended (none should), with their stderr.
    fn ended(&mut self) -> Vec<String> {
        let mut ended = Vec::new();
        for (i, agent) in self.agents.iter_mut().enumerate() {
            if let Ok(Some(status)) = agent.try_wait() {
                let stderr = std::fs::read_to_string(
                    self.dir.path().join(hostname(i + 1)).join("agent.stderr"),
                )
                .unwrap_or_default();
                ended.push(format!("{} {status}:\n{stderr}", hostname(i + 1)));
            }
        }
        ended
    }

    /// How many agents hold an inotify instance (the others poll).
    fn watching(&self) -> usize {
        self.agents
            .iter()
            .filter(|a| holds_inotify(&format!("/proc/{}", a.id())))
            .count()
    }
}

fn start_agent(
    binary: &Path,
    home: &Path,
    name: &str,
    token: &Path,
    addr: &str,
) -> std::process::Child {
    let state = home.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let config = write_agent_config(
        home,
        &format!("ws://{addr}/ws"),
        name,
        token,
        &format!("interval = {INTERVAL}"),
    );
    std::process::Command::new(binary)
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(home.join("agent.stderr")).unwrap())
        .spawn()
        .expect("start an agent")
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Whether the process at `proc_dir` holds an inotify descriptor.
fn holds_inotify(proc_dir: &str) -> bool {
    std::fs::read_dir(format!("{proc_dir}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == Path::new("anon_inode:inotify")))
}

/// inotify instances held by all processes this test can see, and the
/// per-user limit.
fn inotify_in_use() -> (usize, String) {
    let in_use = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|p| {
            p.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|p| {
            std::fs::read_dir(p.path().join("fd"))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|l| l == Path::new("anon_inode:inotify"))
                })
                .count()
        })
        .sum();
    let limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    (in_use, limit)
}

/// `GET path` from the mock's API (HTTP/1.1, one request per connection).
async fn get_json(addr: &str, path: &str) -> Value {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the mock");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// Waits until every agent is connected and has sent a heartbeat.
async fn wait_for_fleet(addr: &str, fleet: &mut Fleet) {
    let start = Instant::now();
    loop {
        let hosts = get_json(addr, "/api/hosts").await;
        let ready = hosts
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["connected"] == true && !h["last_heartbeat"].is_null())
            .count();
        if ready == AGENTS {
            return;
        }
        let ended = fleet.ended();
        assert!(ended.is_empty(), "agents ended:\n{}", ended.join("\n"));
        assert!(
            start.elapsed() < FLEET_DEADLINE,
            "only {ready} of {AGENTS} agents connected with a heartbeat after {FLEET_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the idle stream carried: the largest host entry in bytes and the
/// hosts that appeared.
fn host_entries(meter: &StreamMeter) -> (usize, HashSet<String>) {
    let mut largest = 0;
    let mut seen = HashSet::new();
    for (name, data) in &meter.events {
        assert_ne!(name, "hosts", "the whole host list was sent again");
        if name != "hosts_changed" {
            continue;
        }
        let event: Value = serde_json::from_str(data).unwrap();
        for host in event["hosts"].as_array().unwrap() {
            largest = largest.max(host.to_string().len());
            seen.insert(host["hostname"].as_str().unwrap().to_owned());
        }
    }
    (largest, seen)
}

/// The stream's bytes: as Chromium counted them on the connection, or,
/// where it does not count an event stream's, rebuilt from the events.
fn stream_bytes(meter: &StreamMeter) -> u64 {
    let framed: u64 = meter
        .events
        .iter()
        .map(|(name, data)| (name.len() + data.len() + "event: \ndata: \n\n".len()) as u64)
        .sum();
    meter.wire_bytes.max(framed)
}

/// Opens the page and checks what it shows of the fleet; prints how long
/// it took and the size of the first event (the whole list).
async fn load_page(browser: &mut Browser, addr: &str) {
    browser.meter_event_streams().await;
    let loading = Instant::now();
    browser.open(&format!("http://{addr}/")).await;
    browser
        .wait(
            &format!(
                "document.getElementById('feed').dataset.state === 'live' && \
                 document.getElementById('host-count').dataset.total === '{AGENTS}'"
            ),
            "the page with the whole fleet",
        )
        .await;
    eprintln!(
        "the page showed {AGENTS} hosts {:.2} s after it was opened",
        loading.elapsed().as_secs_f64()
    );
    let count = browser.text("#host-count").await;
    assert_eq!(count, "300 hosts, 200 more not shown (filter to find them)");
    let rows = browser
        .eval(
            "[...document.querySelectorAll('#hosts tbody tr td.state')].map((c) => c.textContent)",
        )
        .await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 100, "rows drawn");
    assert!(rows.iter().all(|s| s == "online"), "{rows:?}");
    let loaded = browser.take_stream_meter().await;
    let first = loaded
        .events
        .iter()
        .find(|(name, _)| name == "hosts")
        .expect("the host list");
    eprintln!(
        "the first event, the whole list: {} bytes for {AGENTS} hosts",
        first.1.len()
    );
}

/// Measures the page's stream for [`IDLE`] and checks it against the bound.
async fn measure_idle_stream(browser: &mut Browser) {
    let measuring = Instant::now();
    let mut idle = StreamMeter::default();
    while measuring.elapsed() < IDLE {
        // The measured stretch itself; each take reads what Chromium sent.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let more = browser.take_stream_meter().await;
        idle.wire_bytes += more.wire_bytes;
        idle.events.extend(more.events);
    }
    let seconds = measuring.elapsed().as_secs_f64();
    let bytes = stream_bytes(&idle);
    let rate = bytes as f64 / seconds;
    let (largest, seen) = host_entries(&idle);
    eprintln!(
        "idle fleet: the page's stream took {bytes} bytes in {seconds:.1} s = {rate:.0} bytes/s \
         ({} events; Chromium counted {} bytes on the connection); largest host entry {largest} bytes; \
         bound {BOUND} bytes/s",
        idle.events.len(),
        idle.wire_bytes
    );
    assert_eq!(
        seen.len(),
        AGENTS,
        "every host's heartbeat reached the page"
    );
    assert!(
        largest <= PER_HOST_BYTES,
        "a host entry of {largest} bytes (at most {PER_HOST_BYTES})"
    );
    assert!(
        rate <= BOUND as f64,
        "the idle stream took {rate:.0} bytes/s, above {BOUND}"
    );
}

/// A host past the first 100 rows is found with the filter box.
async fn find_the_last_host(browser: &mut Browser) {
    let last = hostname(AGENTS);
    browser
        .eval(&format!(
            "(() => {{ const f = document.getElementById('host-filter'); f.value = '{last}'; \
             f.dispatchEvent(new Event('input')); return true; }})()"
        ))
        .await;
    browser
        .wait(
            &format!("document.querySelector('tr[data-host=\"{last}\"] td.state')?.textContent === 'online'"),
            "the last host found by the filter",
        )
        .await;
}

/// Every agent still runs, and none panicked.
fn check_agents(fleet: &mut Fleet) {
    let ended = fleet.ended();
    assert!(ended.is_empty(), "agents ended:\n{}", ended.join("\n"));
    for i in 1..=AGENTS {
        let stderr =
            std::fs::read_to_string(fleet.home(i).join("agent.stderr")).unwrap_or_default();
        assert!(
            !stderr.contains("panicked"),
            "{} panicked:\n{stderr}",
            hostname(i)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_holds_300_agents_and_its_idle_stream_stays_small() {
    let Some(chromium) = chromium_or_skip("browser fleet test") else {
        return;
    };
    let began = Instant::now();
    let agent_bin = agent_binary();
    let (_mock, addr) = start_mock(TOKEN).await;
    let (in_use, limit) = inotify_in_use();
    eprintln!(
        "inotify instances in use before the fleet: {in_use} (fs.inotify.max_user_instances = {limit})"
    );
    // Started before the fleet, so it gets its inotify instances.
    let mut browser = Browser::start(&chromium).await;

    let started = Instant::now();
    let mut fleet = Fleet::start(&agent_bin, &addr);
    eprintln!(
        "started {AGENTS} agents in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    wait_for_fleet(&addr, &mut fleet).await;
    let watching = fleet.watching();
    eprintln!(
        "all {AGENTS} connected with a heartbeat {:.2} s after the first start; \
         {watching} watch their files with inotify, {} poll (past the per-user limit)",
        started.elapsed().as_secs_f64(),
        AGENTS - watching
    );

    load_page(&mut browser, &addr).await;
    measure_idle_stream(&mut browser).await;
    find_the_last_host(&mut browser).await;
    check_agents(&mut fleet);
    drop(fleet);
    eprintln!("the test took {:.1} s", began.elapsed().as_secs_f64());
}
