//! The real node_exporter (Debian's `prometheus-node-exporter`, installed
//! by scripts/test.sh), reading only a textfile directory: what Prometheus
//! would scrape from a host running the agent.

use crate::common::SECOND;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::time::Instant;

/// The Debian package's binary (CI installs it: scripts/test.sh).
pub const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";

/// node_exporter reading only the textfile directory, on a free loopback
/// port. Killed when dropped.
pub struct NodeExporter {
    child: std::process::Child,
    port: u16,
}

impl NodeExporter {
    pub fn start(dir: &Path) -> NodeExporter {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(NODE_EXPORTER)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--collector.disable-defaults")
            .arg("--collector.textfile")
            .arg(format!("--collector.textfile.directory={}", dir.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node exporter starts");
        NodeExporter { child, port }
    }

    /// GET /metrics: the body, or None while it does not answer yet.
    pub fn scrape(&self) -> Option<String> {
        let mut socket = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        socket.set_read_timeout(Some(5 * SECOND)).ok()?;
        let request = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
        socket.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        socket.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.0 200").then(|| body.to_owned())
    }

    /// Scrapes until every line in `wanted` is there; the collector must
    /// never report a parse error.
    pub async fn wait_for(&self, wanted: &[&str]) -> String {
        let has = |body: &str| wanted.iter().all(|w| body.lines().any(|l| l == *w));
        self.wait_until(&format!("{wanted:?}"), has).await
    }

    /// Scrapes until `done` holds for a body without a parse error, up to
    /// 15 s; fails on a parse error.
    pub async fn wait_until(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + 15 * SECOND;
        loop {
            let body = self.scrape().unwrap_or_default();
            if body.contains("node_textfile_scrape_error") {
                assert!(body.contains("node_textfile_scrape_error 0"), "{body}");
            }
            if body.contains("node_textfile_scrape_error 0") && done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "never scraped {what}; last:\n{body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Whether node_exporter is missing, said as a skip.
pub fn missing() -> bool {
    let missing = !Path::new(NODE_EXPORTER).exists();
    if missing {
        eprintln!(
            "skipped: {NODE_EXPORTER} is not installed (apt install prometheus-node-exporter)"
        );
    }
    missing
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
