//! The command log as the supervisor writes it (format in log.rs): whole
//! records in single `write`s, output under its cap, and a disk that
//! refuses (full, read-only, failing) never stopping the command.
//!
//! What the disk refuses is never waited for. Before a write, and again
//! when it is refused for want of space, the oldest other logs are pruned.
//! Once the disk still refuses anything (a whole batch, half of one, an
//! event), the log is *sealed*: nothing more is written into it, so it
//! stays a clean prefix of whole records the follower can trust (the half
//! record a cut-short write left is never ended). From then on the command
//! runs *streaming only*: a `# streaming <why>` record and every later
//! record go to the supervisor's stdout, which the agent that started it
//! reads right after the log (relay.rs); the lines that cannot go that way
//! either are counted. Every later event is also kept in memory, and at the
//! end those events, the count (`# notkept`) and `# done` go into the end
//! file, whose space was taken at start, for an agent that did not start
//! the supervisor (follow.rs reads the relay, else the end file).

use super::log::{END_FILE_BYTES, MAX_TAIL_RECORD, Plan, remove_oldest};
use super::relay::Relay;
use crate::redact::Scrubber;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Free space wanted beyond a batch before writing it; below that, old
/// logs are pruned first.
const SLACK_BYTES: u64 = 64 * 1024;

pub struct Log {
    max_bytes: u64,
    scrubber: Scrubber,
    path: PathBuf,
    inner: Mutex<LogState>,
}

pub struct LogState {
    file: Option<File>,
    written: u64,
    cut: bool,
    /// Lines past the cap.
    pub dropped: u64,
    /// Lines neither the disk nor the relay took.
    not_kept: u64,
    /// Why the disk refused, the first time, naming the file system.
    refused: Option<String>,
    sealed: bool,
    /// Records not written into the sealed log, in order.
    tail: Vec<String>,
    /// Where records go once the log is sealed.
    relay: Relay,
}

impl Log {
    /// The log of `plan`, opened for appending; a log that cannot be
    /// opened is sealed from the start (the command runs all the same,
    /// streaming only through `relay`).
    pub fn open(plan: &Plan, relay: Relay) -> Log {
        use super::log::{private_dir, private_file};
        // Created if the agent could not (so that the error names the
        // real cause: a read-only or full disk, not a missing file).
        let open = || private_file(&plan.log, OpenOptions::new().append(true).create(true));
        let file = match open() {
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                private_dir(plan.log.parent().unwrap_or(Path::new("/"))).and_then(|()| open())
            }
            opened => opened,
        };
        Log::new(plan, file, relay)
    }

    pub fn new(plan: &Plan, file: io::Result<File>, relay: Relay) -> Log {
        let (file, refused) = match file {
            Ok(file) => (Some(file), None),
            Err(error) => (None, Some(why_refused(&error, &plan.log))),
        };
        let written = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        let unopened = file.is_none();
        let log = Log {
            max_bytes: plan.max_bytes,
            scrubber: Scrubber::for_url(plan.scrub_url.as_deref()),
            path: plan.log.clone(),
            inner: Mutex::new(LogState {
                sealed: false,
                file,
                written,
                cut: false,
                dropped: 0,
                not_kept: 0,
                refused,
                tail: Vec::new(),
                relay,
            }),
        };
        if unopened {
            log.seal(&mut log.lock());
        }
        log
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `lines` whole output records, or as many as fit under the
    /// cap; past it every line is only counted.
    pub fn append(&self, records: &[u8], lines: u64) {
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
            let kept = if state.sealed {
                0
            } else {
                self.write(&mut state, &records[..fits])
            };
            if kept < fits {
                // Sealed now if not before: the rest streams.
                let not_relayed = state.relay.lines(&records[kept..fits]);
                state.not_kept += not_relayed;
            }
        }
        if fits < records.len() {
            state.dropped += count_lines(&records[fits..]);
            state.cut = true;
            drop(state);
            self.event(&format!("cut {}", self.max_bytes));
        }
    }

    /// Adds a line of the command to `records`, without `repo_url`'s
    /// credentials.
    pub fn push_line(&self, records: &mut Vec<u8>, tag: u8, cut: bool, line: &[u8]) {
        match self.scrubber.scrub_bytes(line) {
            Some(clean) => push_record(records, tag, cut, &clean),
            None => push_record(records, tag, cut, line),
        }
    }

    /// A line of the agent's own, as stdout of the command (under the cap
    /// like any line).
    pub fn note(&self, text: &str) {
        let mut record = Vec::with_capacity(text.len() + 3);
        push_record(&mut record, b'o', false, one_line(text).as_bytes());
        self.append(&record, 1);
    }

    /// An event record: into the log, or, once the log is sealed, to the
    /// relay and kept for the end file (in order: a refused event seals
    /// the log).
    pub fn event(&self, text: &str) {
        let record = format!("# {text}\n");
        let mut state = self.lock();
        if !state.sealed && self.write(&mut state, record.as_bytes()) == record.len() {
            return;
        }
        let record = cut_record(record);
        state.relay.event(record.as_bytes());
        state.tail.push(record);
    }

    /// No more writes into the log: the command streams only from here,
    /// which the relay's first record says (and the end file's, for an
    /// agent that could not read the relay).
    fn seal(&self, state: &mut LogState) {
        if std::mem::replace(&mut state.sealed, true) {
            return;
        }
        let why = state.refused.clone();
        let why = why.unwrap_or_else(|| "the disk refused the log".to_owned());
        let record = cut_record(format!("# streaming {why}\n"));
        state.relay.event(record.as_bytes());
        state.tail.push(record);
    }

    /// The last records: the count of lines not kept, those past the cap,
    /// `done`; then, if the log was sealed, the end file, and what the
    /// relay still owes its agent.
    pub fn finish(&self, end_file: Option<&Path>) {
        let (dropped, not_kept, why) = {
            let state = self.lock();
            (state.dropped, state.not_kept, state.refused.clone())
        };
        if not_kept > 0 {
            let why = why.unwrap_or_else(|| "the disk refused them".to_owned());
            self.event(&format!("notkept {not_kept} {why}"));
        }
        if dropped > 0 {
            self.event(&format!("dropped {dropped}"));
        }
        self.event("done");
        let mut state = self.lock();
        if !state.sealed {
            return;
        }
        let tail = tail_bytes(&state.tail);
        if let Some(end_file) = end_file {
            // Overwritten in place: its blocks were written at start.
            let written = OpenOptions::new()
                .write(true)
                .open(end_file)
                .and_then(|f| f.write_all_at(&tail, 0).and_then(|()| f.sync_data()));
            if let Err(error) = written {
                eprintln!("nixfleet-agent --supervise: cannot write the end file: {error}");
            }
        }
        state.relay.finish();
    }

    /// Writes `bytes` (whole records); returns how many bytes of whole
    /// records the log kept. A refusal seals the log.
    fn write(&self, state: &mut LogState, bytes: &[u8]) -> usize {
        let Some(file) = state.file.as_ref() else {
            return 0;
        };
        let (done, error) = self.write_file(file, bytes);
        state.written += done as u64;
        let Some(error) = error else {
            return done;
        };
        if state.refused.is_none() {
            state.refused = Some(why_refused(&error, &self.path));
        }
        self.seal(state);
        memchr::memrchr(b'\n', &bytes[..done]).map_or(0, |i| i + 1)
    }

    /// Bytes written, and the error that stopped the rest.
    fn write_file(&self, mut file: &File, bytes: &[u8]) -> (usize, Option<io::Error>) {
        self.make_room(file, bytes.len() as u64);
        let mut done = 0;
        while done < bytes.len() {
            match file.write(&bytes[done..]) {
                Ok(0) => return (done, Some(io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                // Nothing of the batch written yet: retrying is safe.
                Err(error) if done == 0 && is_no_space(&error) && self.prune_one() => {}
                Err(error) => return (done, Some(error)),
            }
        }
        (done, None)
    }

    /// Short of space for `needed` bytes: the oldest other logs go first.
    fn make_room(&self, file: &File, needed: u64) {
        let free = |file: &File| {
            rustix::fs::fstatvfs(file)
                .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
                .unwrap_or(u64::MAX)
        };
        while free(file) < needed + SLACK_BYTES && self.prune_one() {}
    }

    fn prune_one(&self) -> bool {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        remove_oldest(dir, Some(&self.path))
    }
}

fn count_lines(records: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', records).count() as u64
}

fn push_record(records: &mut Vec<u8>, tag: u8, cut: bool, line: &[u8]) {
    records.push(if cut { tag.to_ascii_uppercase() } else { tag });
    records.push(b' ');
    records.extend_from_slice(line);
    records.push(b'\n');
}

/// Events are one line each.
pub fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

fn is_no_space(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Why the disk refused, for the `[nixfleet] N lines not kept: …` line.
fn why_refused(error: &io::Error, log: &Path) -> String {
    let fs = mount_point(log);
    match error.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => format!("no space left on {fs}"),
        Some(libc::EROFS) => format!("{fs} is read-only"),
        _ => one_line(&format!("{error} on {fs}")),
    }
}

/// The mount point of the file system holding `path` (the longest mount
/// point in /proc/self/mountinfo that contains it); its directory if that
/// cannot be read.
pub fn mount_point(path: &Path) -> String {
    let dir = path.parent().unwrap_or(path);
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_octal)
        .filter(|mount| dir.starts_with(mount))
        .max_by_key(String::len)
        .unwrap_or_else(|| dir.display().to_string())
}

/// mountinfo writes a space as `\040` (and tab, newline, backslash alike).
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A record for the end file: at most MAX_TAIL_RECORD bytes, one line.
fn cut_record(mut record: String) -> String {
    if record.len() > MAX_TAIL_RECORD {
        let mut end = MAX_TAIL_RECORD - 1;
        while !record.is_char_boundary(end) {
            end -= 1;
        }
        record.truncate(end);
        record.push('\n');
    }
    record
}

/// The records for the end file, within its size: the last three
/// (`notkept`, `dropped`, `done`, what the status needs most) always, the
/// others in order while they fit.
fn tail_bytes(tail: &[String]) -> Vec<u8> {
    let (head, last) = tail.split_at(tail.len().saturating_sub(3));
    let last_len: usize = last.iter().map(String::len).sum();
    let budget = END_FILE_BYTES.saturating_sub(last_len);
    let mut out = Vec::with_capacity(END_FILE_BYTES);
    for record in head {
        if out.len() + record.len() > budget {
            break;
        }
        out.extend_from_slice(record.as_bytes());
    }
    for record in last {
        out.extend_from_slice(record.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_octal(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_octal(r"/x\\"), r"/x\\");
        assert_eq!(mount_point(Path::new("/proc/self/status")), "/proc");
    }

    /// A disk that refuses every write (/dev/full answers ENOSPC): old logs
    /// are pruned first, then the log is sealed; with no agent to relay
    /// to, lines are counted, and the events and the count go to the end
    /// file, whose old contents they overwrite in place.
    #[test]
    fn a_full_disk_costs_lines_counted_never_the_end() {
        let state_dir = tempfile::tempdir().unwrap();
        let dir = state_dir.path().join("logs");
        std::fs::create_dir(&dir).unwrap();
        let old = dir.join("20000101T000000Z-switch.log");
        std::fs::write(&old, "o old\n").unwrap();
        let log_path = dir.join("20260101T000000Z-switch.log");
        let end = crate::commands::log::reserve_end(&log_path).unwrap();
        let plan = Plan {
            log: log_path,
            stop_file: dir.join("stop"),
            stop_grace_ms: 1000,
            max_bytes: u64::MAX,
            scrub_url: None,
            end_file: Some(end.clone()),
            notes: Vec::new(),
            steps: Vec::new(),
        };
        let full = OpenOptions::new().append(true).open("/dev/full");
        let log = Log::new(&plan, full, Relay::none());
        log.append(b"o one\no two\n", 2);
        assert!(log.lock().sealed);
        assert!(!old.exists(), "the oldest other log goes first");
        log.event("steps 1");
        log.append(b"o three\n", 1);
        log.event("end 0 3 exit code 3");
        log.finish(Some(&end));
        let text = std::fs::read_to_string(&end).unwrap();
        assert_eq!(text.len(), END_FILE_BYTES, "overwritten in place");
        let fs = mount_point(&plan.log);
        assert_eq!(
            text.trim_end_matches('\n'),
            format!(
                "# streaming no space left on {fs}\n# steps 1\n# end 0 3 exit code 3\n\
                 # notkept 3 no space left on {fs}\n# done"
            )
        );
    }

    /// The same disk, with an agent reading the relay: every record after
    /// the seal reaches it, in order, the notice first; none is lost.
    #[test]
    fn a_full_disk_streams_to_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Plan {
            log: dir.path().join("x.log"),
            stop_file: dir.path().join("stop"),
            stop_grace_ms: 1000,
            max_bytes: u64::MAX,
            scrub_url: None,
            end_file: None,
            notes: Vec::new(),
            steps: Vec::new(),
        };
        let (read, write) = std::io::pipe().unwrap();
        let relay = Relay::to(std::os::fd::OwnedFd::from(write));
        let full = OpenOptions::new().append(true).open("/dev/full");
        let log = Log::new(&plan, full, relay);
        log.event("steps 1");
        log.append(b"o one\no two\n", 2);
        log.event("end 0 0 exited");
        log.finish(None);
        drop(log);
        let fs = mount_point(&plan.log);
        assert_eq!(
            std::io::read_to_string(read).unwrap(),
            format!(
                "# streaming no space left on {fs}\n# steps 1\no one\no two\n# end 0 0 exited\n# done\n"
            )
        );
    }

    #[test]
    fn the_end_file_always_gets_the_last_records() {
        let mut tail: Vec<String> = (0..1000)
            .map(|i| cut_record(format!("# step {i} {}\n", "x".repeat(600))))
            .collect();
        assert!(
            tail.iter()
                .all(|r| r.len() <= MAX_TAIL_RECORD && r.ends_with('\n'))
        );
        tail.push("# notkept 5 no space left on /\n".into());
        tail.push("# done\n".into());
        let bytes = tail_bytes(&tail);
        assert!(bytes.len() <= END_FILE_BYTES);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("# step 0 "));
        assert!(text.ends_with("# notkept 5 no space left on /\n# done\n"));
    }
}
