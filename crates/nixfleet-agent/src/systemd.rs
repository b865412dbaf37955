//! Talking to systemd: readiness, stopping, a truthful `STATUS=` line and
//! watchdog pings (`sd_notify(3)`), all over the `NOTIFY_SOCKET` datagram
//! socket.
//!
//! [`Systemd`] reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`
//! once, at startup, and never changes the environment: the agent gives the
//! processes it starts a clean, whitelisted environment of its own, so the
//! variables cannot leak to them. Outside systemd (no `NOTIFY_SOCKET`) every
//! method is a cheap no-op. Nothing here panics; a failure to send is logged
//! once, at debug level (systemd may simply not listen, e.g. `Type=simple`).
//!
//! [`StatusLine`] composes the text `systemctl status` shows, from the
//! connection state and the running command, and sends it only when it
//! changed.

use sd_notify::NotifyState;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::debug;

/// STATUS= texts longer than this are cut (systemd reads notification
/// datagrams into a 4 KiB buffer; a status line should be short anyway).
const MAX_STATUS_BYTES: usize = 1024;

/// The agent's link to the service manager. Create it once, at startup,
/// with [`Systemd::from_env`]; share it by reference or in an `Arc` (every
/// method takes `&self` and it is `Send + Sync`).
#[derive(Debug)]
pub struct Systemd {
    /// `None` outside systemd.
    notify: Option<Notifier>,
    /// The watchdog period systemd expects (`WatchdogSec=`), when it applies
    /// to this process.
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
    /// Set after the first failed send, so that the failure is logged once.
    failed: AtomicBool,
}

impl Systemd {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the
    /// environment (without changing it).
    pub fn from_env() -> Self {
        let notify_socket = std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from);
        let watchdog_usec = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        // A WATCHDOG_PID that is set but unparsable cannot be our pid.
        let watchdog_pid = std::env::var("WATCHDOG_PID")
            .ok()
            .map(|v| v.trim().parse::<u32>().unwrap_or(0));
        Self::new(notify_socket, watchdog_usec, watchdog_pid)
    }

    /// Builds from explicit values (what [`Systemd::from_env`] read; tests
    /// pass their own). A `notify_socket` starting with `@` names a socket
    /// in the abstract namespace, as in `sd_notify(3)`.
    pub fn new(
        notify_socket: Option<PathBuf>,
        watchdog_usec: Option<u64>,
        watchdog_pid: Option<u32>,
    ) -> Self {
        let notify = notify_socket
            .filter(|path| !path.as_os_str().is_empty())
            .and_then(|path| match Notifier::new(&path) {
                Ok(notifier) => Some(notifier),
                Err(error) => {
                    debug!(
                        error = %error,
                        "cannot use NOTIFY_SOCKET {}; not notifying systemd",
                        path.display()
                    );
                    None
                }
            });
        // sd_watchdog_enabled(3): on only with a positive WATCHDOG_USEC, and
        // only for the process WATCHDOG_PID names, if it names one.
        let ours = watchdog_pid.is_none_or(|pid| pid == std::process::id());
        let watchdog = watchdog_usec
            .filter(|&usec| usec > 0 && ours && notify.is_some())
            .map(Duration::from_micros);
        Systemd { notify, watchdog }
    }

    /// A `Systemd` that never sends anything.
    pub fn disabled() -> Self {
        Systemd {
            notify: None,
            watchdog: None,
        }
    }

    /// Whether there is a service manager to notify at all.
    pub fn is_enabled(&self) -> bool {
        self.notify.is_some()
    }

    /// `READY=1`: startup is complete (for `Type=notify`, the unit goes from
    /// `activating` to `active`).
    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// `STATUS=<text>`: the line `systemctl status` shows. Newlines become
    /// spaces and very long texts are cut. Prefer [`StatusLine`], which only
    /// sends changes.
    pub fn status(&self, text: &str) {
        if self.notify.is_none() {
            return;
        }
        let text = one_line(text, MAX_STATUS_BYTES);
        self.send(&[NotifyState::Status(&text)]);
    }

    /// How often to call [`Systemd::watchdog_ping`]: half of `WatchdogSec=`
    /// (as `sd_watchdog_enabled(3)` advises), or `None` when systemd does
    /// not watch this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|period| period / 2)
    }

    /// `WATCHDOG=1`: "still alive". A no-op when the watchdog is off.
    pub fn watchdog_ping(&self) {
        if self.watchdog.is_some() {
            self.send(&[NotifyState::Watchdog]);
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(notifier) = &self.notify else { return };
        let message = states
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        if let Err(error) = notifier.send(message.as_bytes())
            && !notifier.failed.swap(true, Ordering::Relaxed)
        {
            debug!(error = %error, "cannot notify systemd (logged once)");
        }
    }
}

impl Notifier {
    fn new(path: &std::path::Path) -> io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_os_str().as_bytes();
        let address = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(path)?,
        };
        // Close-on-exec (std's default): commands never inherit it.
        let socket = UnixDatagram::unbound()?;
        Ok(Notifier {
            socket,
            address,
            failed: AtomicBool::new(false),
        })
    }

    fn send(&self, message: &[u8]) -> io::Result<()> {
        let sent = self.socket.send_to_addr(message, &self.address)?;
        if sent == message.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "incomplete datagram",
            ))
        }
    }
}

/// `text` on one line (newlines and other control characters become
/// spaces), at most `max` bytes (cut at a character boundary, with `…`).
fn one_line(text: &str, max: usize) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > max {
        let mut cut = max - '…'.len_utf8();
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line
}

/// The connection's part of the status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionStatus {
    Connecting { url: String },
    Connected { url: String },
    Reconnecting { in_secs: u64, error: String },
}

impl ConnectionStatus {
    /// `Reconnecting` after `delay` (rounded up to whole seconds, so that
    /// "in 0s" never shows for a pending wait).
    pub fn reconnecting(delay: Duration, error: impl Into<String>) -> Self {
        let in_secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
        ConnectionStatus::Reconnecting {
            in_secs,
            error: error.into(),
        }
    }
}

/// The running command's part of the status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandStatus {
    /// `switch`, `pull`, …
    pub name: String,
    pub since: SystemTime,
    /// Known once the process started.
    pub pid: Option<u32>,
}

/// Composes the `STATUS=` text from the agent's state and sends it when it
/// changed. For example:
///
/// - `connecting to ws://dash:8000/ws`
/// - `connected to ws://dash:8000/ws`
/// - `reconnecting in 4s after error: connection refused`
/// - `running switch since 12:03:04 UTC, pid 1234; connected to ws://dash:8000/ws`
/// - `stopping`
///
/// It holds only what it is given; the URL never carries the token.
#[derive(Debug, Clone)]
pub struct StatusLine {
    connection: ConnectionStatus,
    command: Option<CommandStatus>,
    stopping: bool,
    /// The text last sent, to send only changes.
    sent: Option<String>,
}

impl StatusLine {
    /// Starts as `connecting to <url>`.
    pub fn new(url: impl Into<String>) -> Self {
        StatusLine {
            connection: ConnectionStatus::Connecting { url: url.into() },
            command: None,
            stopping: false,
            sent: None,
        }
    }

    pub fn set_connection(&mut self, connection: ConnectionStatus) {
        self.connection = connection;
    }

    pub fn set_command(&mut self, command: Option<CommandStatus>) {
        self.command = command;
    }

    /// From now on the line reads `stopping`.
    pub fn set_stopping(&mut self) {
        self.stopping = true;
    }

    /// The current text.
    pub fn render(&self) -> String {
        if self.stopping {
            return "stopping".to_owned();
        }
        let connection = match &self.connection {
            ConnectionStatus::Connecting { url } => format!("connecting to {url}"),
            ConnectionStatus::Connected { url } => format!("connected to {url}"),
            ConnectionStatus::Reconnecting { in_secs, error } => {
                format!("reconnecting in {in_secs}s after error: {error}")
            }
        };
        match &self.command {
            None => connection,
            Some(command) => {
                let pid = command
                    .pid
                    .map(|pid| format!(", pid {pid}"))
                    .unwrap_or_default();
                format!(
                    "running {} since {} UTC{pid}; {connection}",
                    command.name,
                    utc_time_of_day(command.since)
                )
            }
        }
    }

    /// Sends `STATUS=` if the text differs from the last one sent. Returns
    /// whether it sent.
    pub fn publish(&mut self, systemd: &Systemd) -> bool {
        let text = self.render();
        if self.sent.as_deref() == Some(text.as_str()) {
            return false;
        }
        systemd.status(&text);
        self.sent = Some(text);
        true
    }
}

/// `HH:MM:SS` of `time` in UTC.
fn utc_time_of_day(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for systemd's notification socket.
    struct Listener {
        _dir: tempfile::TempDir,
        path: PathBuf,
        socket: UnixDatagram,
    }

    impl Listener {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket.set_nonblocking(true).unwrap();
            Listener {
                _dir: dir,
                path,
                socket,
            }
        }

        fn systemd(&self, usec: Option<u64>, pid: Option<u32>) -> Systemd {
            Systemd::new(Some(self.path.clone()), usec, pid)
        }

        /// Every datagram received so far.
        fn received(&self) -> Vec<String> {
            let mut all = Vec::new();
            let mut buf = [0u8; 8192];
            while let Ok(n) = self.socket.recv(&mut buf) {
                all.push(String::from_utf8(buf[..n].to_vec()).unwrap());
            }
            all
        }
    }

    #[test]
    fn sends_the_exact_datagrams() {
        let listener = Listener::new();
        let systemd = listener.systemd(Some(4_000_000), None);
        assert!(systemd.is_enabled());
        systemd.ready();
        systemd.status("connected to ws://127.0.0.1:1/ws");
        systemd.watchdog_ping();
        systemd.stopping();
        assert_eq!(
            listener.received(),
            [
                "READY=1",
                "STATUS=connected to ws://127.0.0.1:1/ws",
                "WATCHDOG=1",
                "STOPPING=1"
            ]
        );
    }

    #[test]
    fn status_is_one_line_and_bounded() {
        let listener = Listener::new();
        let systemd = listener.systemd(None, None);
        systemd.status("reconnecting in 2s after error: a\nb\r\tc");
        let long = "é".repeat(MAX_STATUS_BYTES);
        systemd.status(&long);
        let received = listener.received();
        assert_eq!(received[0], "STATUS=reconnecting in 2s after error: a b  c");
        let cut = received[1].strip_prefix("STATUS=").unwrap();
        assert!(cut.len() <= MAX_STATUS_BYTES, "{}", cut.len());
        assert!(cut.ends_with("é…"));
    }

    #[test]
    fn watchdog_is_half_the_period_and_only_for_this_process() {
        let listener = Listener::new();
        let me = std::process::id();

        let unset_pid = listener.systemd(Some(3_000_000), None);
        assert_eq!(
            unset_pid.watchdog_interval(),
            Some(Duration::from_millis(1500))
        );

        let our_pid = listener.systemd(Some(3_000_000), Some(me));
        assert_eq!(
            our_pid.watchdog_interval(),
            Some(Duration::from_millis(1500))
        );
        our_pid.watchdog_ping();
        assert_eq!(listener.received(), ["WATCHDOG=1"]);

        // WATCHDOG_PID names another process (we inherited the variables).
        let other = listener.systemd(Some(3_000_000), Some(me.wrapping_add(1)));
        assert_eq!(other.watchdog_interval(), None);
        other.watchdog_ping();
        assert!(listener.received().is_empty());

        for usec in [None, Some(0)] {
            let off = listener.systemd(usec, Some(me));
            assert_eq!(off.watchdog_interval(), None);
            off.watchdog_ping();
        }
        assert!(listener.received().is_empty());
        // Other notifications still work without a watchdog.
        listener.systemd(None, None).ready();
        assert_eq!(listener.received(), ["READY=1"]);
    }

    #[test]
    fn without_notify_socket_everything_is_a_no_op() {
        for systemd in [
            Systemd::new(None, Some(1_000_000), None),
            Systemd::new(Some(PathBuf::new()), Some(1_000_000), None),
            Systemd::disabled(),
        ] {
            assert!(!systemd.is_enabled());
            assert_eq!(systemd.watchdog_interval(), None);
            systemd.ready();
            systemd.status("x");
            systemd.watchdog_ping();
            systemd.stopping();
        }
    }

    #[test]
    fn a_socket_nobody_listens_on_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let systemd = Systemd::new(Some(dir.path().join("absent")), Some(2_000_000), None);
        assert!(systemd.is_enabled());
        assert_eq!(systemd.watchdog_interval(), Some(Duration::from_secs(1)));
        // Fails to send (ENOENT) every time; never panics.
        for _ in 0..3 {
            systemd.ready();
            systemd.watchdog_ping();
        }
    }

    #[test]
    fn abstract_socket_names_work() {
        let name = format!("nixfleet-test-{}", std::process::id());
        let address = {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
        };
        let socket = UnixDatagram::bind_addr(&address).unwrap();
        let systemd = Systemd::new(Some(PathBuf::from(format!("@{name}"))), None, None);
        systemd.ready();
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn from_env_does_not_change_the_environment() {
        // Reads whatever the test runner has; the point is that it leaves
        // the variables as they were.
        let before: Vec<_> = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"]
            .iter()
            .map(std::env::var_os)
            .collect();
        let _ = Systemd::from_env();
        let after: Vec<_> = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"]
            .iter()
            .map(std::env::var_os)
            .collect();
        assert_eq!(before, after);
    }

    fn at(h: u64, m: u64, s: u64) -> SystemTime {
        // 2024-05-01 plus the time of day.
        UNIX_EPOCH + Duration::from_secs(1_714_521_600 + h * 3600 + m * 60 + s)
    }

    #[test]
    fn status_line_texts() {
        let url = "ws://dash.example:8000/ws";
        let mut line = StatusLine::new(url);
        assert_eq!(line.render(), "connecting to ws://dash.example:8000/ws");
        line.set_connection(ConnectionStatus::Connected { url: url.into() });
        assert_eq!(line.render(), "connected to ws://dash.example:8000/ws");
        line.set_connection(ConnectionStatus::reconnecting(
            Duration::from_millis(3200),
            "connection refused",
        ));
        assert_eq!(
            line.render(),
            "reconnecting in 4s after error: connection refused"
        );
        line.set_connection(ConnectionStatus::Connected { url: url.into() });
        line.set_command(Some(CommandStatus {
            name: "switch".into(),
            since: at(12, 3, 4),
            pid: None,
        }));
        assert_eq!(
            line.render(),
            "running switch since 12:03:04 UTC; connected to ws://dash.example:8000/ws"
        );
        line.set_command(Some(CommandStatus {
            name: "switch".into(),
            since: at(12, 3, 4),
            pid: Some(1234),
        }));
        assert_eq!(
            line.render(),
            "running switch since 12:03:04 UTC, pid 1234; connected to ws://dash.example:8000/ws"
        );
        line.set_connection(ConnectionStatus::reconnecting(
            Duration::from_secs(1),
            "timed out",
        ));
        assert_eq!(
            line.render(),
            "running switch since 12:03:04 UTC, pid 1234; reconnecting in 1s after error: timed out"
        );
        line.set_command(None);
        line.set_stopping();
        assert_eq!(line.render(), "stopping");
        assert_eq!(
            ConnectionStatus::reconnecting(Duration::ZERO, "x"),
            ConnectionStatus::Reconnecting {
                in_secs: 0,
                error: "x".into()
            }
        );
        assert_eq!(utc_time_of_day(at(0, 0, 0)), "00:00:00");
        assert_eq!(utc_time_of_day(at(23, 59, 59)), "23:59:59");
    }

    #[test]
    fn status_line_sends_only_changes() {
        let listener = Listener::new();
        let systemd = listener.systemd(None, None);
        let url = "ws://127.0.0.1:9/ws";
        let mut line = StatusLine::new(url);
        assert!(line.publish(&systemd));
        assert!(!line.publish(&systemd));
        line.set_connection(ConnectionStatus::Connecting { url: url.into() });
        assert!(!line.publish(&systemd));
        line.set_connection(ConnectionStatus::Connected { url: url.into() });
        assert!(line.publish(&systemd));
        assert!(!line.publish(&systemd));
        line.set_stopping();
        assert!(line.publish(&systemd));
        assert_eq!(
            listener.received(),
            [
                "STATUS=connecting to ws://127.0.0.1:9/ws",
                "STATUS=connected to ws://127.0.0.1:9/ws",
                "STATUS=stopping"
            ]
        );
        // Outside systemd publishing is harmless.
        let mut quiet = StatusLine::new(url);
        assert!(quiet.publish(&Systemd::disabled()));
    }
}
