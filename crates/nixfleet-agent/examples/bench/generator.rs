//! The stand-in `nixos-rebuild`'s output: the benchmark binary runs itself
//! as the child (`bench __flood N` / `bench __paced N RATE`), so the
//! generator is compiled, needs nothing installed, and stamps every line
//! with CLOCK_REALTIME in nanoseconds.
//!
//! A line looks like this, 93 bytes with its newline:
//!
//! ```text
//! L0000042 T1764059247123456789 building '/nix/store/0c6k…bf5b-pkg.drv'
//! ```
//!
//! The dashboard reads the sequence number (`L…`, to count lost and
//! reordered lines) and the stamp (`T…`, for latency) back from each
//! `output` frame.

use std::io::Write;
use std::os::fd::AsFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const STORE_HASH: &str = "0c6kzph7l0dcbfmjap64jbq0zsgbbf5b";

/// CLOCK_REALTIME in nanoseconds since the epoch.
pub fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn write_line(out: &mut impl Write, seq: u64) -> std::io::Result<()> {
    writeln!(
        out,
        "L{seq:07} T{:019} building '/nix/store/{STORE_HASH}-pkg.drv'",
        realtime_ns()
    )
}

/// stdout as a plain file: no line buffering in between.
fn raw_stdout() -> std::fs::File {
    let fd = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .expect("stdout can be duplicated");
    std::fs::File::from(fd)
}

/// Writes `lines` lines as fast as possible, in 64 KiB writes (what a
/// program with a fully buffered stdout does).
pub fn flood(lines: u64) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, raw_stdout());
    for seq in 0..lines {
        write_line(&mut out, seq)?;
    }
    out.flush()
}

/// Writes `lines` lines at `rate` per second, one write(2) per line, each
/// stamped just before it is written.
pub fn paced(lines: u64, rate: u64) -> std::io::Result<()> {
    let mut out = raw_stdout();
    let period_ns = 1_000_000_000 / rate.max(1);
    let start = Instant::now();
    let mut line = Vec::with_capacity(128);
    for seq in 0..lines {
        let due = start + Duration::from_nanos(period_ns * seq);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        line.clear();
        write_line(&mut line, seq)?;
        out.write_all(&line)?;
    }
    Ok(())
}

/// What a sequence number and stamp parse back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub seq: u64,
    pub realtime_ns: u64,
}

/// Parses `L<seq> T<ns> …` at the start of a line (as it appears inside the
/// JSON string: no escapes occur in these lines).
pub fn parse_stamp(line: &[u8]) -> Option<Stamp> {
    let rest = line.strip_prefix(b"L")?;
    let (seq, rest) = leading_number(rest)?;
    let rest = rest.strip_prefix(b" T")?;
    let (realtime_ns, _) = leading_number(rest)?;
    Some(Stamp { seq, realtime_ns })
}

fn leading_number(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let value = bytes[..digits]
        .iter()
        .fold(0u64, |n, b| n * 10 + u64::from(b - b'0'));
    Some((value, &bytes[digits..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let mut buf = Vec::new();
        write_line(&mut buf, 42).unwrap();
        assert_eq!(buf.len(), 93);
        let stamp = parse_stamp(&buf).unwrap();
        assert_eq!(stamp.seq, 42);
        assert!(stamp.realtime_ns > 1_600_000_000_000_000_000);
    }
}

/// The idle phase's reference (`bench __floor PORT`): what any agent must
/// do at least for a heartbeat every second, a wake-up and one
/// heartbeat-sized write to a TCP socket on loopback, and nothing else.
/// Runs until the socket is closed.
pub fn floor(port: u64) -> std::io::Result<()> {
    let port = u16::try_from(port).map_err(std::io::Error::other)?;
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port))?;
    socket.set_nodelay(true)?;
    // A heartbeat frame's size (a masked text frame of about 750 bytes).
    let frame = [b'x'; 751];
    let start = Instant::now();
    for beat in 1u32.. {
        let due = start + Duration::from_secs(1) * beat;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        socket.write_all(&frame)?;
    }
    Ok(())
}
