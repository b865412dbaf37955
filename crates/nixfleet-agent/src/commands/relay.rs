//! The supervisor's stdout: a way from a supervisor to the agent that
//! started it which needs no disk. Once the state disk refuses the
//! command log (full, read-only), the supervisor writes every further
//! record here instead (log_writer.rs): the command runs *streaming
//! only*. The agent's follower reads these records right after the log's
//! last one (follow.rs) and sends them on live.
//!
//! Neither side holds more than a bounded amount. The supervisor never
//! waits for the agent (the command would then wait too): it writes
//! without blocking, and the lines a full pipe has no room for (an agent
//! that is busy, or whose outbox waits for an absent dashboard) are
//! counted as not kept. Event records (step starts and exit codes) are few,
//! bounded by the plan, and are what the status is made of, so they are
//! never dropped: they wait in `pending` until the pipe has room, and the
//! supervisor, its command over, waits for the agent to take them. The
//! agent reads a chunk at a time, only when its outbox has room.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use tokio::io::AsyncReadExt;
use tokio::process::ChildStdout;

/// The pipe's size asked for (Linux's default is 64 KiB; 1 MiB is what an
/// unprivileged process may ask for by default): a burst of output then
/// waits in the kernel while the agent sends the last one on.
const PIPE_BYTES: libc::c_int = 1 << 20;

/// The supervisor's end: records written without blocking.
pub struct Relay {
    out: Option<File>,
    /// Bytes owed before any new line: the rest of a record a full pipe
    /// took only part of, and events waiting for room.
    pending: Vec<u8>,
}

impl Relay {
    /// No agent to relay to: every line offered counts as not relayed.
    pub fn none() -> Relay {
        Relay {
            out: None,
            pending: Vec::new(),
        }
    }

    /// The supervisor's stdout, which its agent reads: made non-blocking
    /// (only this process writes it: its steps get pipes of their own).
    pub fn stdout() -> Relay {
        match io::stdout().as_fd().try_clone_to_owned() {
            Ok(fd) => Relay::to(fd),
            Err(_) => Relay::none(),
        }
    }

    /// Relays into `fd` (a pipe's write end), without blocking.
    pub fn to(fd: OwnedFd) -> Relay {
        if rustix::io::ioctl_fionbio(&fd, true).is_err() {
            return Relay::none();
        }
        // SAFETY: F_SETPIPE_SZ takes an int and touches no memory; on a
        // descriptor that is not a pipe it fails, which changes nothing.
        unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES,
            )
        };
        Relay {
            out: Some(File::from(fd)),
            pending: Vec::new(),
        }
    }

    /// Relays whole line `records`; returns how many lines it could not
    /// (the pipe full, or no agent reading).
    pub fn lines(&mut self, records: &[u8]) -> u64 {
        if !self.flush() {
            return count_lines(records);
        }
        let written = self.write_some(records);
        // The last record begun (and not finished) by the write.
        let begun = memchr::memrchr(b'\n', &records[..written]).map_or(0, |i| i + 1);
        let mut rest = &records[begun..];
        if written > begun && self.out.is_some() {
            // Half a record went out: the rest of it must follow, or the
            // agent would read it glued to the next one.
            let end = memchr::memchr(b'\n', &records[written..])
                .map_or(records.len(), |i| written + i + 1);
            self.pending.extend_from_slice(&records[written..end]);
            rest = &records[end..];
        }
        count_lines(rest)
    }

    /// Relays an event record, now or as soon as the pipe has room.
    pub fn event(&mut self, record: &[u8]) {
        if self.out.is_some() {
            self.pending.extend_from_slice(record);
            self.flush();
        }
    }

    /// The command is over: what is still owed goes out, waiting for the
    /// agent if need be (an agent gone closes the pipe: EPIPE, done).
    pub fn finish(&mut self) {
        if let Some(out) = self.out.take() {
            let blocking = rustix::io::ioctl_fionbio(&out, false).is_ok();
            if blocking {
                let _ = io::Write::write_all(&mut &out, &self.pending);
            }
        }
        self.pending.clear();
    }

    /// Writes what is pending; true when nothing is left and the pipe is
    /// still open.
    fn flush(&mut self) -> bool {
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            let written = self.write_some(&pending);
            self.pending = pending;
            self.pending.drain(..written);
        }
        self.pending.is_empty() && self.out.is_some()
    }

    /// Writes as much of `bytes` as the pipe takes now.
    fn write_some(&mut self, bytes: &[u8]) -> usize {
        let Some(out) = &self.out else {
            return 0;
        };
        let mut done = 0;
        while done < bytes.len() {
            match rustix::io::write(out, &bytes[done..]) {
                Ok(0) | Err(rustix::io::Errno::AGAIN) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => {
                    // No agent reads any more (EPIPE): nothing will.
                    self.out = None;
                    self.pending.clear();
                    return done;
                }
            }
        }
        done
    }
}

fn count_lines(records: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', records).count() as u64
}

/// Most bytes held read and not yet handled: a relayed record is at most
/// a line (64 KiB) and a few bytes.
const MAX_HELD: usize = 128 * 1024;
/// Room made for a read once records come this way (until then, the
/// supervisor of a command whose log is kept writes nothing here, and a
/// read needs no room beyond the first few bytes).
const READ_ROOM: usize = 64 * 1024;

/// The agent's end: the supervisor's stdout, read when the follower has
/// room for what it holds.
pub struct RelayIn {
    stdout: Option<ChildStdout>,
    /// Read and not yet handled.
    pub buf: Vec<u8>,
    /// Whether anything came this way.
    pub used: bool,
}

impl RelayIn {
    pub fn new(stdout: Option<ChildStdout>) -> RelayIn {
        RelayIn {
            stdout,
            buf: Vec::new(),
            used: false,
        }
    }

    /// Whether the supervisor may still relay something.
    pub fn open(&self) -> bool {
        self.stdout.is_some()
    }

    /// Waits until the supervisor relayed something (appended to `buf`)
    /// or closed its end. Cancel-safe (nothing is read then). Never
    /// returns once closed.
    pub async fn read(&mut self) {
        let Some(stdout) = self.stdout.as_mut() else {
            return std::future::pending().await;
        };
        if self.buf.len() >= MAX_HELD {
            // Only a damaged stream has a record this long.
            tracing::warn!("skipping an over-long record relayed by the supervisor");
            self.buf.clear();
        }
        if self.used {
            self.buf.reserve(READ_ROOM);
        }
        match stdout.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => self.stdout = None,
            Ok(_) => self.used = true,
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (std::io::PipeReader, Relay) {
        let (read, write) = std::io::pipe().unwrap();
        (read, Relay::to(OwnedFd::from(write)))
    }

    /// A reader that never comes: the supervisor goes on, counts the
    /// lines the pipe had no room for, keeps its events and completes
    /// the record it began.
    #[test]
    fn a_full_pipe_costs_lines_counted_never_events() {
        let (read, mut relay) = pipe();
        let line = format!("o {}\n", "x".repeat(1000));
        let mut not_relayed = 0;
        for _ in 0..3000 {
            not_relayed += relay.lines(line.repeat(3).as_bytes());
        }
        assert!(not_relayed > 0, "the pipe never filled");
        relay.event(b"# end 0 3 exit code 3\n");
        relay.event(b"# done\n");
        let reader = std::thread::spawn(move || std::io::read_to_string(read).unwrap());
        relay.finish();
        drop(relay);
        let text = reader.join().unwrap();
        let lines = text
            .lines()
            .filter(|l| *l == &line[..line.len() - 1])
            .count() as u64;
        assert_eq!(
            lines + not_relayed,
            9000,
            "each line relayed whole or counted"
        );
        assert!(
            text.lines()
                .all(|l| l == &line[..line.len() - 1] || l.starts_with('#'))
        );
        assert!(
            text.ends_with("# end 0 3 exit code 3\n# done\n"),
            "{}",
            &text[text.len() - 60..]
        );
    }

    #[test]
    fn no_reader_at_all_costs_every_line_and_nothing_else() {
        let (read, mut relay) = pipe();
        drop(read);
        assert_eq!(relay.lines(b"o a\no b\n"), 2);
        relay.event(b"# done\n");
        relay.finish();
        assert_eq!(Relay::none().lines(b"o a\n"), 1);
    }
}
