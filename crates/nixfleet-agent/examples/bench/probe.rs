//! What the kernel says about the agent process: memory from
//! `/proc/PID/status`, CPU time from the threads' `schedstat` (nanoseconds
//! of run time, not clock ticks, so a few milliseconds are measurable) and
//! how many times they were scheduled in (for an idle agent, its wake-ups).

use std::path::Path;

/// Memory figures in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss: u64,
    pub hwm: u64,
    pub anon: u64,
    pub file: u64,
}

pub fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
    }
}

/// CPU time of the process so far: the sum of its live threads' run time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub ns: u64,
    pub threads: usize,
    /// Times a thread was put on a CPU.
    pub runs: u64,
}

pub fn cpu(pid: u32) -> Cpu {
    let mut total = Cpu::default();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return total;
    };
    for task in tasks.flatten() {
        if let Some([ns, _waited, runs]) = numbers(&task.path().join("schedstat")) {
            total.ns += ns;
            total.runs += runs;
            total.threads += 1;
        }
    }
    total
}

/// `schedstat`: run time (ns), time waiting for a CPU (ns), times run.
fn numbers(path: &Path) -> Option<[u64; 3]> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// Drops the file's pages from the page cache (when no one maps it), so
/// that the agent starts as after a boot: its binary read from disk. How
/// much of a mapped file counts in RSS depends on how its pages were cached
/// (readahead, folio sizes), which otherwise varies from run to run.
pub fn evict_from_page_cache(path: &Path) {
    if let Ok(file) = std::fs::File::open(path) {
        let _ = rustix::fs::fsync(&file);
        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed);
    }
}

/// A child process of `parent`, if it has one.
pub fn child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // pid (comm) state ppid …; comm may hold spaces and parentheses.
            let after_comm = &stat[stat.rfind(')')? + 1..];
            let ppid: u32 = after_comm.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
}

/// The size of the binary once stripped: a stripped copy when `strip` is
/// installed (the release profile strips already, so usually the same).
pub fn stripped_size(binary: &Path) -> std::io::Result<(u64, bool)> {
    let size = std::fs::metadata(binary)?.len();
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("agent");
    std::fs::copy(binary, &copy)?;
    let stripped = std::process::Command::new("strip")
        .arg(&copy)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if stripped {
        Ok((std::fs::metadata(&copy)?.len(), true))
    } else {
        Ok((size, false))
    }
}
