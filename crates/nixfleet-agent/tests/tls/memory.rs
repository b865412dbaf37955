//! Looking for bytes in another process's writable memory (heap, stacks,
//! data), through `/proc/PID/maps` and `/proc/PID/mem`. The agent is not
//! dumpable, so this needs root (CAP_SYS_PTRACE).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Which of `needles` occur in the writable mappings of `pid`, by index,
/// with the mapping they were found in; `Err` when the memory cannot be
/// read at all.
pub fn find_in_memory(pid: u32, needles: &[&[u8]]) -> Result<Vec<(usize, String)>, String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| e.to_string())?;
    let mem = File::open(format!("/proc/{pid}/mem")).map_err(|e| e.to_string())?;
    let longest = needles.iter().map(|n| n.len()).max().unwrap_or(0);
    let mut found = Vec::new();
    let mut scanned = 0u64;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        // In chunks that overlap by a needle's length, so that nothing
        // across a chunk's edge is missed.
        let chunk = 1 << 20;
        let mut at = start;
        while at < end {
            let len = (end - at).min(chunk + longest as u64) as usize;
            let mut buf = vec![0u8; len];
            let Ok(n) = mem.read_at(&mut buf, at) else {
                break;
            };
            scanned += n as u64;
            for (i, needle) in needles.iter().enumerate() {
                if memchr::memmem::find(&buf[..n], needle).is_some()
                    && !found.iter().any(|(j, _)| *j == i)
                {
                    found.push((i, line.to_owned()));
                }
            }
            at += chunk;
        }
    }
    if scanned == 0 {
        return Err("no writable memory could be read".into());
    }
    Ok(found)
}
