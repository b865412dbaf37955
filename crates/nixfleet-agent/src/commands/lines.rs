//! A line of a command's output, from the bytes the supervisor recorded to
//! the `output` frame the dashboard gets, and the stderr line a failed
//! step's status quotes.

use crate::protocol::{Outbound, OutputLine, Stream};

pub use super::log::MAX_LINE_BYTES;
/// Appended to a line cut at [`MAX_LINE_BYTES`].
pub const TRUNCATED_MARK: &str = " …[truncated]";
/// Longest error detail quoted in a status message.
const MAX_DETAIL_CHARS: usize = 200;

/// A line as sent: lossy UTF-8, one trailing `\r` removed, cut lines marked.
pub fn line_text(raw: &[u8], cut: bool) -> String {
    let mut bytes = raw;
    if cut {
        // Do not split a UTF-8 sequence at the cut.
        if let Err(e) = std::str::from_utf8(bytes)
            && e.error_len().is_none()
        {
            bytes = &bytes[..e.valid_up_to()];
        }
    } else if let Some(stripped) = bytes.strip_suffix(b"\r") {
        bytes = stripped;
    }
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if cut {
        text.push_str(TRUNCATED_MARK);
    }
    text
}

/// The one place a line of the command's output becomes an `output` frame.
pub fn output_frame(command: &str, stream: Stream, text: &str) -> String {
    Outbound::Output(OutputLine::new(command, stream, text)).to_json()
}

/// Picks the line of a failed process's stderr that a status message
/// quotes. git (and nix) prefix the actual error with `fatal:` or `error:`
/// and follow it with hints, so the last such line wins; without one, the
/// first line (the lead sentence: hints come after it).
#[derive(Debug, Default)]
pub struct ErrorDetail {
    first: String,
    error: String,
}

impl ErrorDetail {
    pub fn note(&mut self, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        if line.starts_with("fatal:") || line.starts_with("error:") {
            self.error.clear();
            self.error.extend(line.chars().take(MAX_DETAIL_CHARS));
        } else if self.first.is_empty() {
            self.first.extend(line.chars().take(MAX_DETAIL_CHARS));
        }
    }

    pub fn get(&self) -> Option<&str> {
        [&self.error, &self.first]
            .into_iter()
            .find(|s| !s.is_empty())
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_detail_prefers_git_errors_over_hints() {
        let detail = |lines: &[&str]| {
            let mut d = ErrorDetail::default();
            lines.iter().for_each(|l| d.note(l));
            d.get().map(str::to_owned)
        };
        // `git pull` with no upstream: no fatal line, the lead sentence.
        assert_eq!(
            detail(&[
                "There is no tracking information for the current branch.",
                "Please specify which branch you want to merge with.",
                "",
                "    git branch --set-upstream-to=<remote>/<branch> main",
            ])
            .as_deref(),
            Some("There is no tracking information for the current branch.")
        );
        assert_eq!(
            detail(&[
                "Cloning into 'repo'...",
                "fatal: repository '/x' does not exist",
                "hint: try again",
            ])
            .as_deref(),
            Some("fatal: repository '/x' does not exist")
        );
        assert_eq!(
            detail(&["error: one", "error: two", "hint: h"]).as_deref(),
            Some("error: two")
        );
        assert_eq!(detail(&["", "  "]), None);
    }

    #[test]
    fn line_text_strips_cr_replaces_bad_utf8_and_marks_cuts() {
        assert_eq!(line_text(b"hello\r", false), "hello");
        assert_eq!(line_text(b"a\rb", false), "a\rb");
        assert_eq!(line_text(b"bad \xff byte", false), "bad \u{fffd} byte");
        // A cut inside "é" (0xC3 0xA9) drops the half character.
        assert_eq!(line_text(b"ab\xc3", true), format!("ab{TRUNCATED_MARK}"));
    }
}
