//! The command log: one file per command under `state_dir/logs`, written by
//! the command's supervisor (supervisor.rs) and read by the agent
//! (follow.rs). It is both the record a human reads afterwards and the
//! queue of output waiting for the dashboard: the agent keeps only a byte
//! offset saying how far it has delivered.
//!
//! One record per line, in the order the supervisor saw things happen:
//!
//! ```text
//! o <bytes>          a stdout line of the command (raw bytes, no newline)
//! O <bytes>          a stdout line cut at MAX_LINE_BYTES
//! e <bytes>          a stderr line
//! E <bytes>          a stderr line cut at MAX_LINE_BYTES
//! # steps <n>        the command has n steps (processes run one by one)
//! # step <i> <label> what step i will be (one per step, after `steps`)
//! # start <i> <pid> <label>
//! # notstarted <i> <why>
//! # stopped          a stop was requested; no further step runs
//! # timedout         the step ran out of its time and was stopped
//! # end <i> <code> <how it ended>
//! # cut <bytes>      the log reached its cap here; later lines are counted only
//! # dropped <n>      lines not kept because of the cap
//! # notkept <n> <why> lines not kept because the disk refused them (full,
//!                    read-only, failing); `why` names the file system
//! # streaming <why>  the disk refused the log (`why` names the file system):
//!                    what follows goes to the agent only (relay.rs)
//! # done             the supervisor finished; nothing follows
//! ```
//!
//! When the disk refuses a record, the log stops there (it stays a clean
//! prefix, see log_writer.rs). The records after it go to the agent that
//! started the supervisor, on its stdout (relay.rs), and the events among
//! them, once the command ends, into the end file (`state_dir/ends/<log
//! name>.end`): created with
//! its space taken when the command starts, so that writing into it needs
//! no free space. It holds the same records, padded with empty lines.
//!
//! A single file keeps the order between a test script's lines and the
//! progress after it, and lets one offset describe what was delivered.

pub use crate::state_file::{private_dir, private_file, write_private};
use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Longest output line kept; longer ones are cut and marked.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Command logs kept under `state_dir/logs`.
pub const KEPT_LOGS: usize = 50;
/// Size of the end file: room for the end records of any plan (each
/// record the supervisor puts there is at most [`MAX_TAIL_RECORD`] bytes).
pub const END_FILE_BYTES: usize = 16 * 1024;
/// Longest record written into the end file.
pub const MAX_TAIL_RECORD: usize = 512;
/// Free space the agent makes (by pruning old logs) before a command
/// starts: its end file and a first batch of lines. The supervisor prunes
/// further, batch by batch, as the command writes (log_writer.rs).
const ROOM_AT_START: u64 = END_FILE_BYTES as u64 + 128 * 1024;

/// What the agent hands its supervisor (as JSON on the supervisor's stdin,
/// so nothing of it shows in `ps`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub log: PathBuf,
    /// Created by the agent to ask for a stop; holds `TERM` or `KILL`.
    pub stop_file: PathBuf,
    pub stop_grace_ms: u64,
    /// Output bytes the log may hold before lines are dropped.
    pub max_bytes: u64,
    /// The agent's own lines about the command (decisions taken while
    /// planning it), written as stdout lines before the first step.
    #[serde(default)]
    pub notes: Vec<String>,
    /// `repo_url`, whose credentials (if it has any) are replaced in every
    /// line before it is written (a child may print the URL it was given),
    /// and given to the steps that talk to it (`repo_credentials`) through
    /// their environment.
    #[serde(default)]
    pub scrub_url: Option<String>,
    /// The end file (see the top of this file); `None` when it could not
    /// be created (the disk was already full): the supervisor then hands
    /// its last records to the agent on its stdout only.
    #[serde(default)]
    pub end_file: Option<PathBuf>,
    pub steps: Vec<Step>,
}

/// One process of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Short and secret-free: it is logged (`git fetch`, `T01-boot.sh`).
    pub label: String,
    pub program: String,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// Whether a failure ends the command (every step but a test script's).
    pub stop_on_failure: bool,
    /// For a program from the repository (a test script): the repository.
    /// Right before running it, the supervisor refuses it unless it and
    /// every directory up to here are owned by root or the agent's user and
    /// writable by no one else (whoever could write there would choose
    /// what runs as root).
    #[serde(default)]
    pub trusted_within: Option<PathBuf>,
    /// Lowest CPU priority (nice 19) and the idle IO class, so that a
    /// check never makes a small host unresponsive.
    #[serde(default)]
    pub low_priority: bool,
    /// Stopped like a `stop` once this has passed.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// A git step that talks to `repo_url`: it gets the URL's credentials
    /// in its environment (see git_credentials.rs), never on its argv.
    #[serde(default)]
    pub repo_credentials: bool,
}

/// One parsed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    Line {
        stderr: bool,
        cut: bool,
        raw: &'a [u8],
    },
    Steps(usize),
    Planned {
        index: usize,
        label: &'a str,
    },
    Start {
        index: usize,
        pid: u32,
        label: &'a str,
    },
    NotStarted {
        index: usize,
        why: &'a str,
    },
    Stopped,
    TimedOut,
    End {
        index: usize,
        code: i32,
        how: &'a str,
    },
    Cut,
    Dropped(u64),
    NotKept {
        lines: u64,
        why: &'a str,
    },
    Streaming(&'a str),
    Done,
    /// Anything else (a newer format, a damaged line): skipped.
    Unknown,
}

/// Parses one record (without its newline).
pub fn parse(record: &[u8]) -> Record<'_> {
    let (tag, rest) = match record {
        [tag, b' ', rest @ ..] => (*tag, rest),
        [tag] => (*tag, &[][..]),
        _ => return Record::Unknown,
    };
    match tag {
        b'o' | b'O' | b'e' | b'E' => Record::Line {
            stderr: tag.eq_ignore_ascii_case(&b'e'),
            cut: tag.is_ascii_uppercase(),
            raw: rest,
        },
        b'#' => parse_event(std::str::from_utf8(rest).unwrap_or("")).unwrap_or(Record::Unknown),
        _ => Record::Unknown,
    }
}

fn parse_event(text: &str) -> Option<Record<'_>> {
    let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
    let mut fields = rest.splitn(3, ' ');
    Some(match word {
        "steps" => Record::Steps(rest.parse().ok()?),
        "step" => {
            let (index, label) = rest.split_once(' ').unwrap_or((rest, ""));
            Record::Planned {
                index: index.parse().ok()?,
                label,
            }
        }
        "start" => Record::Start {
            index: fields.next()?.parse().ok()?,
            pid: fields.next()?.parse().ok()?,
            label: fields.next().unwrap_or(""),
        },
        "notstarted" => {
            let (index, why) = rest.split_once(' ').unwrap_or((rest, ""));
            Record::NotStarted {
                index: index.parse().ok()?,
                why,
            }
        }
        "stopped" => Record::Stopped,
        "timedout" => Record::TimedOut,
        "end" => Record::End {
            index: fields.next()?.parse().ok()?,
            code: fields.next()?.parse().ok()?,
            how: fields.next().unwrap_or(""),
        },
        "cut" => Record::Cut,
        "dropped" => Record::Dropped(rest.parse().ok()?),
        "notkept" => {
            let (lines, why) = rest.split_once(' ').unwrap_or((rest, ""));
            Record::NotKept {
                lines: lines.parse().ok()?,
                why,
            }
        }
        "streaming" => Record::Streaming(rest),
        "done" => Record::Done,
        _ => return None,
    })
}

/// Creates a new, empty command log and prunes old ones so that at most
/// [`KEPT_LOGS`] remain and, with the new one's cap, they fit `total_budget`.
pub fn create(
    state_dir: &Path,
    command: &str,
    max_bytes: u64,
    total_budget: u64,
) -> io::Result<PathBuf> {
    private_dir(state_dir)?;
    let dir = state_dir.join("logs");
    private_dir(&dir)?;
    prune(&dir, KEPT_LOGS - 1, total_budget.saturating_sub(max_bytes));
    // Space is short: the oldest logs go first (every log here belongs to
    // a command that ended and was delivered: one command runs at a time).
    while free_bytes(&dir).is_some_and(|free| free < ROOM_AT_START.min(max_bytes))
        && remove_oldest(&dir, None)
    {}
    let path = new_path(state_dir, command);
    private_file(&path, OpenOptions::new().create_new(true).write(true))?;
    Ok(path)
}

/// Where a new log of `command` goes (named for the time, so that name
/// order is age order).
pub fn new_path(state_dir: &Path, command: &str) -> PathBuf {
    let stamp = humantime::format_rfc3339_millis(SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    state_dir
        .join("logs")
        .join(format!("{stamp}-{command}.log"))
}

/// The end file of `log` (`state_dir/logs/<name>` → `state_dir/ends/<name>.end`):
/// in a directory of its own, so that `logs/` holds the logs only.
pub fn end_path(log: &Path) -> PathBuf {
    let state_dir = log
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"));
    let mut name = log.file_name().unwrap_or_default().to_owned();
    name.push(".end");
    state_dir.join("ends").join(name)
}

/// Creates `log`'s end file with its space taken (written out as empty
/// lines, then fsynced), so that the supervisor's last records overwrite
/// it in place and need no free space. On a file system that copies on
/// write (btrfs, ZFS) an overwrite may still need space; the supervisor's
/// stdout is the second way (see follow.rs). On failure nothing is left.
pub fn reserve_end(log: &Path) -> io::Result<PathBuf> {
    use std::io::Write;
    let path = end_path(log);
    private_dir(path.parent().unwrap_or(Path::new("/")))?;
    let reserved = private_file(&path, OpenOptions::new().create_new(true).write(true)).and_then(
        |mut file| {
            file.write_all(&[b'\n'; END_FILE_BYTES])?;
            file.sync_all()
        },
    );
    match reserved {
        Ok(()) => Ok(path),
        Err(error) => {
            let _ = std::fs::remove_file(&path);
            Err(error)
        }
    }
}

/// Longest record read back by [`replay`]: a line at its cap and its tag.
const MAX_RECORD_BYTES: u64 = MAX_LINE_BYTES as u64 + 3;

/// Whether a command's end was recorded: `done` ends its log, or its end
/// file (when the log was sealed). Reads the log's last bytes only.
pub fn has_ended(log: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    const DONE: &[u8] = b"# done\n";
    let tail_is_done = std::fs::File::open(log).ok().is_some_and(|mut file| {
        let len = file.metadata().map_or(0, |m| m.len());
        let mut tail = Vec::with_capacity(DONE.len());
        file.seek(SeekFrom::Start(len.saturating_sub(DONE.len() as u64)))
            .and_then(|_| file.take(DONE.len() as u64).read_to_end(&mut tail))
            .is_ok()
            && tail == DONE
    });
    tail_is_done
        || end_file_records(log)
            .is_some_and(|r| r.split(|b| *b == b'\n').any(|r| parse(r) == Record::Done))
}

/// The end file's bytes (it is [`END_FILE_BYTES`] long; no more is read).
fn end_file_records(log: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(end_path(log)).ok()?;
    let mut bytes = Vec::new();
    file.take(END_FILE_BYTES as u64)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(bytes)
}

/// Hands every record of an ended command to `each`, in order: its log,
/// then, if the log ends without `done`, the end file's records. Returns
/// whether `done` was among them. Reads record by record, each at most
/// [`MAX_RECORD_BYTES`] (a longer one, which the supervisor never writes,
/// ends the log there), so memory stays bounded.
pub fn replay(log: &Path, mut each: impl FnMut(Record<'_>)) -> bool {
    use std::io::{BufRead, Read};
    let mut done = false;
    let mut record = Vec::new();
    if let Ok(file) = std::fs::File::open(log) {
        let mut reader = std::io::BufReader::new(file);
        loop {
            record.clear();
            let read = (&mut reader)
                .take(MAX_RECORD_BYTES)
                .read_until(b'\n', &mut record);
            // Without its newline: cut short (or over-long), not a record.
            if !matches!(read, Ok(n) if n > 0) || record.last() != Some(&b'\n') {
                break;
            }
            let parsed = parse(&record[..record.len() - 1]);
            done |= parsed == Record::Done;
            each(parsed);
        }
    }
    if !done && let Some(bytes) = end_file_records(log) {
        for record in bytes.split(|b| *b == b'\n').filter(|r| !r.is_empty()) {
            let parsed = parse(record);
            done |= parsed == Record::Done;
            each(parsed);
        }
    }
    done
}

/// Bytes an unprivileged writer may still use on `dir`'s file system.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Removes the oldest command log in `dir` (and its end file) other than
/// `except`; false when there is none to remove.
pub fn remove_oldest(dir: &Path, except: Option<&Path>) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let oldest = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .filter(|p| Some(p.as_path()) != except)
        .min();
    match oldest {
        Some(log) => {
            let _ = std::fs::remove_file(end_path(&log));
            std::fs::remove_file(&log).is_ok()
        }
        None => false,
    }
}

/// Keeps the newest `keep` logs whose sizes add up to at most `max_total`
/// bytes. Names start with a UTC timestamp, so name order is age order.
pub fn prune(dir: &Path, keep: usize, max_total: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<(PathBuf, u64)> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .map(|p| {
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            (p, len)
        })
        .collect();
    logs.sort();
    let mut total = 0u64;
    let mut kept = 0usize;
    for (path, len) in logs.iter().rev() {
        if kept < keep && total + len <= max_total {
            kept += 1;
            total += len;
        } else {
            let _ = std::fs::remove_file(end_path(path));
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_pruned_to_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..7 {
            std::fs::write(dir.path().join(format!("2026010{i}T000000Z-pull.log")), "").unwrap();
        }
        prune(dir.path(), 3, u64::MAX);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "20260104T000000Z-pull.log",
                "20260105T000000Z-pull.log",
                "20260106T000000Z-pull.log"
            ]
        );
    }

    #[test]
    fn the_oldest_other_log_goes_with_its_end_file() {
        let state_dir = tempfile::tempdir().unwrap();
        let dir = state_dir.path().join("logs");
        std::fs::create_dir(&dir).unwrap();
        let logs: Vec<PathBuf> = (1..=3)
            .map(|i| dir.join(format!("2026010{i}T000000Z-switch.log")))
            .collect();
        for log in &logs {
            std::fs::write(log, "o x\n").unwrap();
            let end = reserve_end(log).unwrap();
            assert_eq!(
                std::fs::metadata(&end).unwrap().len(),
                END_FILE_BYTES as u64
            );
        }
        assert!(end_path(&logs[0]).starts_with(state_dir.path().join("ends")));
        // The running command's log is never the one to go.
        assert!(remove_oldest(&dir, Some(&logs[0])));
        assert!(logs[0].exists() && !logs[1].exists() && !end_path(&logs[1]).exists());
        assert!(remove_oldest(&dir, Some(&logs[0])));
        assert!(
            !remove_oldest(&dir, Some(&logs[0])),
            "only the running one is left"
        );
        assert!(logs[0].exists() && end_path(&logs[0]).exists());
    }

    #[test]
    fn output_line_records_parse() {
        assert_eq!(
            parse(b"o hello"),
            Record::Line {
                stderr: false,
                cut: false,
                raw: b"hello"
            }
        );
        assert_eq!(
            parse(b"E x"),
            Record::Line {
                stderr: true,
                cut: true,
                raw: b"x"
            }
        );
        assert_eq!(
            parse(b"e "),
            Record::Line {
                stderr: true,
                cut: false,
                raw: b""
            }
        );
    }

    #[test]
    fn step_and_end_records_parse() {
        assert_eq!(parse(b"# steps 3"), Record::Steps(3));
        assert_eq!(
            parse(b"# step 1 git fetch"),
            Record::Planned {
                index: 1,
                label: "git fetch"
            }
        );
        assert_eq!(
            parse(b"# start 1 42 git fetch"),
            Record::Start {
                index: 1,
                pid: 42,
                label: "git fetch"
            }
        );
        assert_eq!(
            parse(b"# end 0 -1 killed by signal 9"),
            Record::End {
                index: 0,
                code: -1,
                how: "killed by signal 9"
            }
        );
        assert_eq!(
            parse(b"# notstarted 2 cannot run x: No such file"),
            Record::NotStarted {
                index: 2,
                why: "cannot run x: No such file"
            }
        );
        assert_eq!(parse(b"# dropped 7"), Record::Dropped(7));
        assert_eq!(parse(b"# done"), Record::Done);
        assert_eq!(
            parse(b"# notkept 12 no space left on /var"),
            Record::NotKept {
                lines: 12,
                why: "no space left on /var"
            }
        );
        assert_eq!(parse(b"# stopped"), Record::Stopped);
        assert_eq!(parse(b"# timedout"), Record::TimedOut);
        assert_eq!(parse(b"# start x"), Record::Unknown);
        assert_eq!(parse(b"zz"), Record::Unknown);
        assert_eq!(parse(b""), Record::Unknown);
    }

    #[test]
    fn logs_are_pruned_by_count_and_by_size() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..7 {
            std::fs::write(
                dir.path().join(format!("2026010{i}T000000Z-pull.log")),
                "x".repeat(10),
            )
            .unwrap();
        }
        let left = |dir: &Path| {
            let mut left: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            left.sort();
            left
        };
        prune(dir.path(), 3, u64::MAX);
        assert_eq!(
            left(dir.path()),
            [
                "20260104T000000Z-pull.log",
                "20260105T000000Z-pull.log",
                "20260106T000000Z-pull.log"
            ]
        );
        prune(dir.path(), 3, 25);
        assert_eq!(
            left(dir.path()),
            ["20260105T000000Z-pull.log", "20260106T000000Z-pull.log"]
        );
    }
}
