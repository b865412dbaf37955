//! Why a session ended, and how a failed one is described in the log and
//! in systemd's STATUS line.

use std::time::Duration;

/// Why a session ended.
#[derive(Debug)]
pub(super) enum SessionEnd {
    Shutdown,
    /// Asked to register again on a fresh connection.
    Reregister,
    /// Nothing heard for `ping_timeout`.
    Silent,
    /// A write waited `ping_timeout` without the peer accepting a byte.
    Stalled,
    /// Shutdown was requested while a write could not finish: the socket is
    /// full, so no close frame would get through either.
    ShutdownMidWrite,
    ClosedByPeer(String),
    /// The dashboard sent a frame over the size limit.
    TooBig,
    Broken(String),
}

impl SessionEnd {
    /// The kind of end, one of a few fixed words (the `reason` label of
    /// `nixfleet_agent_disconnects_total`).
    pub(super) fn label(&self) -> &'static str {
        match self {
            SessionEnd::Shutdown | SessionEnd::ShutdownMidWrite => "shutdown",
            SessionEnd::Reregister => "reregister",
            SessionEnd::Silent => "silent",
            SessionEnd::Stalled => "stalled",
            SessionEnd::ClosedByPeer(_) => "closed_by_peer",
            SessionEnd::TooBig => "frame_too_big",
            SessionEnd::Broken(_) => "broken",
        }
    }

    /// The reason in words, and its label.
    pub(super) fn reason_with_label(self, ping_timeout: Duration) -> (String, &'static str) {
        let label = self.label();
        (self.reason(ping_timeout), label)
    }

    /// The end as the reason to reconnect: what went wrong, in words.
    pub(super) fn reason(self, ping_timeout: Duration) -> String {
        match self {
            SessionEnd::Shutdown | SessionEnd::ShutdownMidWrite => "shutting down".to_owned(),
            SessionEnd::Reregister => "registering again".to_owned(),
            SessionEnd::Silent => format!(
                "no sign of life from the dashboard for {}s",
                ping_timeout.as_secs()
            ),
            SessionEnd::Stalled => {
                format!("the dashboard read no data for {}s", ping_timeout.as_secs())
            }
            SessionEnd::ClosedByPeer(why) => format!("dashboard closed the connection ({why})"),
            SessionEnd::TooBig => "dashboard sent a frame over 1 MiB".to_owned(),
            SessionEnd::Broken(why) => why,
        }
    }
}
