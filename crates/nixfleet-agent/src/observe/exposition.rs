//! The snapshot as Prometheus metrics, for node_exporter's textfile
//! collector: encoded by the `prometheus-client` crate (names, `_total`
//! and unit suffixes, escaping are its business), written world-readable
//! (0644: node_exporter runs as its own user) and replaced atomically.

use super::snapshot::{Snapshot, unix_now};
use crate::outbox::LineCounts;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// The snapshot, the output line counts and the flake.lock's newest input
/// time in Prometheus' text format. `now` stands for the last heartbeat
/// while connected (the caller writes on the heartbeat's grid) and is what
/// the lock's age is counted to.
pub fn render(snapshot: &Snapshot, lines: LineCounts, flake_lock: Option<u64>, now: u64) -> String {
    let mut registry = Registry::with_prefix("nixfleet_agent");
    link_metrics(&mut registry, snapshot, now);
    command_metrics(&mut registry, snapshot);
    rollback_metrics(&mut registry, snapshot);
    line_metrics(&mut registry, lines);
    if let Some(newest) = flake_lock {
        let age = Gauge::<i64>::default();
        // A clock behind the lock's times says 0, not a negative age.
        age.set(i64::try_from(now.saturating_sub(newest)).unwrap_or(i64::MAX));
        registry.register_with_unit(
            "flake_lock_age",
            "Time since the newest lastModified of flake.lock's direct inputs",
            Unit::Seconds,
            age,
        );
    }
    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&vec![
        ("version", snapshot.agent.version.clone()),
        (
            "source_commit",
            snapshot.agent.source_commit.clone().unwrap_or_default(),
        ),
    ])
    .set(1);
    registry.register("info", "The agent's version and source commit", info);
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &registry);
    counter_families_with_total(&text)
}

/// The crate writes OpenMetrics, where a counter's family is named without
/// `_total` (`# TYPE x counter`, then `x_total 3`). node_exporter's textfile
/// collector parses the Prometheus text format, where the family is the
/// sample's name: there `x` would have no samples and `x_total` would be
/// "untyped". So the `# HELP` and `# TYPE` lines of counters get the
/// suffix; samples, values and escaping stay the crate's. (`# UNIT` and
/// `# EOF` are plain comments to that parser.)
fn counter_families_with_total(text: &str) -> String {
    let counters: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len() + 16 * counters.len());
    for line in text.lines() {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn link_metrics(registry: &mut Registry, snapshot: &Snapshot, now: u64) {
    let connected = Gauge::<i64>::default();
    connected.set(i64::from(snapshot.link.is_connected()));
    registry.register("connected", "1 while connected to the dashboard", connected);
    let connects = Counter::<u64>::default();
    connects.inc_by(snapshot.counters.connects);
    registry.register(
        "connects",
        "Connections made since the agent started",
        connects,
    );
    let disconnects = Family::<Labels, Counter>::default();
    for (reason, n) in &snapshot.counters.disconnects {
        disconnects
            .get_or_create(&vec![("reason", reason.clone())])
            .inc_by(*n);
    }
    registry.register("disconnects", "Connections lost, by reason", disconnects);
    if let Some(beat) = snapshot.last_heartbeat(now) {
        let last = FloatGauge::default();
        last.set(beat as f64);
        registry.register_with_unit(
            "last_heartbeat_timestamp",
            "When the last heartbeat was sent (Unix time)",
            Unit::Seconds,
            last,
        );
    }
}

fn command_metrics(registry: &mut Registry, snapshot: &Snapshot) {
    let commands = Family::<Labels, Counter>::default();
    for (command, results) in &snapshot.counters.commands {
        for (result, n) in results {
            commands
                .get_or_create(&vec![
                    ("command", command.clone()),
                    ("result", result.clone()),
                ])
                .inc_by(*n);
        }
    }
    registry.register(
        "commands",
        "Commands finished, by command and result",
        commands,
    );
    let durations = Family::<Labels, FloatGauge>::default();
    for (command, result) in &snapshot.last_results {
        durations
            .get_or_create(&vec![("command", command.clone())])
            .set(result.duration_secs);
    }
    registry.register_with_unit(
        "command_duration",
        "How long the last run of each command took",
        Unit::Seconds,
        durations,
    );
    let needs_reboot = Gauge::<i64>::default();
    needs_reboot.set(i64::from(snapshot.needs_reboot));
    registry.register(
        "needs_reboot",
        "1 while the booted system differs from the current one in kernel, initrd or kernel modules",
        needs_reboot,
    );
    if let Some(switch) = &snapshot.last_switch {
        let at = FloatGauge::default();
        at.set(switch.finished as f64);
        registry.register_with_unit(
            "last_switch_timestamp",
            "When the last switch (or boot, rollback) ended (Unix time)",
            Unit::Seconds,
            at,
        );
        let success = Gauge::<i64>::default();
        success.set(i64::from(switch.ok));
        registry.register(
            "last_switch_success",
            "1 if the last switch succeeded",
            success,
        );
    }
}

/// Both results always, so that a first rollback is an increase from 0.
fn rollback_metrics(registry: &mut Registry, snapshot: &Snapshot) {
    let family = Family::<Labels, Counter>::default();
    for result in ["ok", "failed"] {
        let n = snapshot.counters.rollbacks.get(result).copied();
        family
            .get_or_create(&vec![("result", result.to_owned())])
            .inc_by(n.unwrap_or(0));
    }
    registry.register(
        "rollbacks",
        "Safe deployments rolled back (unconfirmed, or the host's tests failed), by the rollback's result",
        family,
    );
}

fn line_metrics(registry: &mut Registry, lines: LineCounts) {
    let family = Family::<Labels, Counter>::default();
    for (outcome, n) in [("delivered", lines.delivered), ("dropped", lines.dropped)] {
        family
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc_by(n);
    }
    registry.register(
        "output_lines",
        "Lines of command output: acknowledged by the dashboard, or dropped by the command log's cap",
        family,
    );
}

/// The metrics file: rewritten only when its text changed.
pub struct MetricsFile {
    path: PathBuf,
    written: Option<String>,
}

impl MetricsFile {
    pub fn new(path: PathBuf) -> MetricsFile {
        MetricsFile {
            path,
            written: None,
        }
    }

    /// Writes `text` unless it is what the file already holds; true when
    /// it wrote.
    pub fn update(&mut self, text: String) -> io::Result<bool> {
        if self.written.as_ref() == Some(&text) {
            return Ok(false);
        }
        write_public(&self.path, text.as_bytes())?;
        self.written = Some(text);
        Ok(true)
    }

    /// Renders the snapshot, the line counts and the lock's newest input
    /// time, and writes them if they changed.
    pub fn refresh(
        &mut self,
        snapshot: &Snapshot,
        lines: LineCounts,
        flake_lock: Option<u64>,
    ) -> io::Result<bool> {
        self.update(render(snapshot, lines, flake_lock, unix_now()))
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory
/// and a rename, mode 0644: a scrape sees the old file or the new one,
/// never half of one. The temporary name does not end in `.prom`, so the
/// collector never reads it.
pub fn write_public(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    // The umask may have taken bits away; a file that existed kept its mode.
    file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    file.write_all(bytes)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::snapshot::{AgentInfo, Counters, Link};
    use std::os::unix::fs::MetadataExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn snapshot() -> Snapshot {
        Snapshot {
            agent: AgentInfo {
                version: "1.2.3".into(),
                source_commit: Some("abc".into()),
                binary: "/bin/nixfleet-agent".into(),
                pid: 1,
                started: 100,
            },
            url: "ws://127.0.0.1/ws".into(),
            interval_secs: 30,
            link: Link::Connected { since: 1000 },
            running: None,
            last_results: Default::default(),
            last_switch: None,
            counters: Counters {
                connects: 2,
                ..Counters::default()
            },
            compartments: None,
            needs_reboot: true,
            reboot_entries: vec!["kernel".into()],
        }
    }

    #[test]
    fn counters_are_typed_under_their_sample_names() {
        let lines = LineCounts {
            delivered: 12,
            dropped: 3,
        };
        let text = render(&snapshot(), lines, None, 1075);
        assert!(
            text.contains("# TYPE nixfleet_agent_connects_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP nixfleet_agent_connects_total "),
            "{text}"
        );
        assert!(
            text.contains("\nnixfleet_agent_connects_total 2\n"),
            "{text}"
        );
        assert!(text.contains("\nnixfleet_agent_connected 1\n"), "{text}");
        assert!(text.contains("\nnixfleet_agent_needs_reboot 1\n"), "{text}");
        // Connected at 1000, a beat every 30 s: the last one at 1060.
        assert!(
            text.contains("\nnixfleet_agent_last_heartbeat_timestamp_seconds 1060"),
            "{text}"
        );
        assert!(!text.contains("_total_total"), "{text}");
        assert!(
            text.contains("# TYPE nixfleet_agent_output_lines_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("\nnixfleet_agent_output_lines_total{outcome=\"delivered\"} 12\n"),
            "{text}"
        );
        assert!(
            text.contains("\nnixfleet_agent_output_lines_total{outcome=\"dropped\"} 3\n"),
            "{text}"
        );
    }

    #[test]
    fn rollbacks_count_by_result_and_the_lock_age_is_to_now() {
        let lines = LineCounts::default();
        let mut with = snapshot();
        let text = render(&with, lines, None, 1075);
        for result in ["ok", "failed"] {
            let zero = format!("\nnixfleet_agent_rollbacks_total{{result=\"{result}\"}} 0\n");
            assert!(text.contains(&zero), "{text}");
        }
        assert!(
            text.contains("# TYPE nixfleet_agent_rollbacks_total counter\n"),
            "{text}"
        );
        // No lock file read: no age at all, rather than a made-up one.
        assert!(!text.contains("flake_lock_age"), "{text}");

        with.counters.rollbacks.insert("failed".into(), 2);
        let text = render(&with, lines, Some(1000), 1075);
        assert!(
            text.contains("\nnixfleet_agent_rollbacks_total{result=\"failed\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("\nnixfleet_agent_flake_lock_age_seconds 75\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE nixfleet_agent_flake_lock_age_seconds gauge\n"),
            "{text}"
        );
        // A lock "from the future" (the host's clock behind): age 0.
        let text = render(&with, lines, Some(2000), 1075);
        assert!(
            text.contains("\nnixfleet_agent_flake_lock_age_seconds 0\n"),
            "{text}"
        );
    }

    #[test]
    fn an_unchanged_text_is_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.prom");
        let mut file = MetricsFile::new(path.clone());
        assert!(file.update("a 1\n".into()).unwrap());
        let inode = std::fs::metadata(&path).unwrap().ino();
        assert!(!file.update("a 1\n".into()).unwrap());
        // Every write renames a new file into place: same inode, no write.
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        assert!(file.update("a 2\n".into()).unwrap());
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn a_reader_never_sees_half_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.prom");
        // Two versions of different lengths, both large enough to need
        // more than one write() if written in place.
        let short = "x 1\n".repeat(20_000);
        let long = "y 22\n".repeat(30_000);
        write_public(&path, short.as_bytes()).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (path, done) = (path.clone(), done.clone());
            let (short, long) = (short.clone(), long.clone());
            std::thread::spawn(move || {
                let mut reads = 0u32;
                while !done.load(Ordering::Relaxed) || reads < 100 {
                    let text = std::fs::read_to_string(&path).unwrap();
                    assert!(
                        text == short || text == long,
                        "partial file: {} bytes",
                        text.len()
                    );
                    reads += 1;
                }
                reads
            })
        };
        let mut file = MetricsFile::new(path);
        for i in 0..300 {
            let text = if i % 2 == 0 {
                long.clone()
            } else {
                short.clone()
            };
            assert!(file.update(text).unwrap());
        }
        done.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() >= 100);
    }
}
