//! Files and processes on the test's host: stand-in scripts, git with a
//! fixed identity, pids that stand-ins write, files they leave.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Writes an executable stand-in script.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    set_mode(&path, 0o755);
    path
}

/// A pid a stand-in wrote to a file.
/// Reads a pid that a stand-in script writes with `echo $$ > FILE`. The
/// agent may report the command (e.g. in a heartbeat) before the script got
/// that far, so this waits for a complete line, up to 10 s. The waiting
/// blocks the test's thread only; the child writes independently of it.
pub fn read_pid(path: &Path) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(pid) = text
            .strip_suffix('\n')
            .and_then(|line| line.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pid in {} within 10 s (read {text:?})",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a process runs; a zombie counts as dead (it runs nothing).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Waits (polling, with a deadline) until `path` exists and returns its
/// content. For files a stand-in script writes when it is done.
pub async fn wait_for_file(path: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.is_empty()
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
