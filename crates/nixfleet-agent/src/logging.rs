//! Logging through tracing.
//!
//! - Under systemd, when stderr is the journal (`$JOURNAL_STREAM` names the
//!   device and inode of fd 2, see `systemd.exec(5)`), events go to journald
//!   natively: the message becomes `MESSAGE`, the level `PRIORITY`, and every
//!   field a structured journal field named [`JOURNAL_FIELD_PREFIX`]`_` plus
//!   the upper-cased field name (`url` → `NIXFLEET_URL`, `command` →
//!   `NIXFLEET_COMMAND`, `pid` → `NIXFLEET_PID`), so for example
//!   `journalctl -u nixfleet NIXFLEET_COMMAND=switch` works. The prefix keeps
//!   the agent's fields apart from journald's own (`EXIT_CODE`, `ERRNO`, …)
//!   and always starts the name with a letter, as the journal requires.
//!   `SYSLOG_IDENTIFIER` is `nixfleet-agent`.
//! - Otherwise (or when the journald socket cannot be opened) events are
//!   human-readable lines on stderr, coloured only on a terminal.

use std::os::fd::AsFd;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// Prefix of the agent's structured journal fields (the journald layer adds
/// the `_`): `NIXFLEET_URL`, `NIXFLEET_HOST`, `NIXFLEET_COMMAND`,
/// `NIXFLEET_PID`, `NIXFLEET_ERROR`, …
pub const JOURNAL_FIELD_PREFIX: &str = "NIXFLEET";

/// `SYSLOG_IDENTIFIER` of the agent's journal entries.
const SYSLOG_IDENTIFIER: &str = "nixfleet-agent";

/// Installs the global subscriber. `level` was validated by the config
/// loader; an unparsable one falls back to `info` rather than failing.
/// Calling it again is harmless (the first subscriber stays).
pub fn init(level: &str) {
    let filter: Targets = level
        .parse()
        .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
    let stderr_is_journal = std::env::var("JOURNAL_STREAM")
        .ok()
        .is_some_and(|stream| is_journal_stream(&stream, std::io::stderr().as_fd()));
    if stderr_is_journal {
        match tracing_journald::layer() {
            Ok(journald) => {
                let journald = journald
                    .with_field_prefix(Some(JOURNAL_FIELD_PREFIX.to_owned()))
                    .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned());
                let _ = tracing_subscriber::registry()
                    .with(journald)
                    .with(filter)
                    .try_init();
                return;
            }
            Err(_) => {
                // stderr still ends up in the journal, which timestamps
                // each line itself.
                let fmt = tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .without_time();
                let _ = tracing_subscriber::registry()
                    .with(fmt)
                    .with(filter)
                    .try_init();
                tracing::debug!("cannot open the journald socket; logging to stderr");
                return;
            }
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(filter)
        .try_init();
}

/// Whether `journal_stream` (`$JOURNAL_STREAM`, `<device>:<inode>` in
/// decimal) names the file `fd` is open on.
fn is_journal_stream(journal_stream: &str, fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let Some((dev, ino)) = journal_stream.trim().split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match rustix::fs::fstat(fd) {
        #[allow(clippy::unnecessary_cast)] // the field types differ by target
        Ok(stat) => stat.st_dev as u64 == dev && stat.st_ino as u64 == ino,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn journal_stream_must_name_the_very_file() {
        let file = tempfile::tempfile().unwrap();
        let other = tempfile::tempfile().unwrap();
        let meta = file.metadata().unwrap();
        let stream = format!("{}:{}", meta.dev(), meta.ino());
        assert!(is_journal_stream(&stream, file.as_fd()));
        assert!(is_journal_stream(&format!("{stream}\n"), file.as_fd()));
        assert!(!is_journal_stream(&stream, other.as_fd()));
        let wrong_dev = format!("{}:{}", meta.dev() + 1, meta.ino());
        assert!(!is_journal_stream(&wrong_dev, file.as_fd()));
        for bad in ["", ":", "1", "a:b", "1:", ":1", "1:2:3"] {
            assert!(!is_journal_stream(bad, file.as_fd()), "{bad:?}");
        }
    }
}
