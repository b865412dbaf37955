//! What the idle agent keeps resident: once, after start-up, it gives back
//! the memory that only start-up needed.
//!
//! Start-up (command line, figment and TOML, the tracing set-up, the
//! runtime, DNS, the WebSocket handshake) runs code spread over most of
//! the agent's binary and of libc, and the kernel maps file pages in 64 KiB
//! blocks around each fault. An idle agent then keeps about twice the code
//! it runs mapped: 4.3 MiB resident, 2.8 MiB once those pages are given
//! back (README, Performance).
//!
//! [`release_startup_memory`] drops the page-table entries of the
//! read-only, private file mappings that hold no private copies (the
//! binary's and the libraries' code and constants) with
//! `madvise(MADV_DONTNEED)`. Nothing is lost and nothing is paged out: the
//! pages stay in the page cache, and what the idle loop runs next is mapped
//! back by a minor fault (once, a few hundred of them). What stays unmapped
//! is what idling never touches, which the kernel may then reclaim like any
//! other clean cache. Mappings that were written (the relocated, then
//! read-only RELRO data) or may be written are left alone: dropping those
//! would bring back the file's bytes in place of the process's.
//!
//! Then it hands glibc's free heap back to the kernel (`malloc_trim`), so
//! that the smaps text it read (tens of KiB) does not stay resident.

use std::ops::Range;

/// What [`release_startup_memory`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// How many mappings it unmapped the pages of.
    pub mappings: usize,
    /// How much of them was resident before, in KiB.
    pub resident_kib: u64,
}

/// Unmaps the pages of the process's read-only file mappings and trims the
/// heap. Call it once start-up is over (see the module comment).
pub fn release_startup_memory() -> std::io::Result<Released> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = Released::default();
    for mapping in droppable(&smaps) {
        let len = mapping.range.end - mapping.range.start;
        // SAFETY: `droppable` keeps only private, non-writable mappings of
        // a file that hold no anonymous (copied-on-write) page: their
        // contents are the file's, so dropping the pages changes nothing
        // the process can observe; the next access maps them again. No
        // one can write to them meanwhile, as they are not writable.
        let result = unsafe {
            libc::madvise(
                mapping.range.start as *mut libc::c_void,
                len,
                libc::MADV_DONTNEED,
            )
        };
        if result == 0 {
            released.mappings += 1;
            released.resident_kib += mapping.rss_kib;
        }
    }
    // Last, so that the smaps text (tens of KiB) is free too.
    drop(smaps);
    #[cfg(target_env = "gnu")]
    // SAFETY: `malloc_trim` only returns free memory of glibc's own heap
    // to the kernel; it is thread-safe and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
    Ok(released)
}

/// One mapping of `/proc/self/smaps`, with what decides whether its pages
/// may be dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    range: Range<usize>,
    /// `r-xp`, `rw-p`, …
    permissions: String,
    /// The mapped file's path, or `[heap]`, `[stack]`, … or empty.
    path: String,
    rss_kib: u64,
    anonymous_kib: Option<u64>,
    locked: bool,
}

impl Mapping {
    fn droppable(&self) -> bool {
        let permissions = self.permissions.as_bytes();
        self.path.starts_with('/')
            && permissions.len() == 4
            && permissions[1] != b'w'
            && permissions[3] == b'p'
            // Unknown counts as written: never guess.
            && self.anonymous_kib == Some(0)
            && !self.locked
            && self.rss_kib > 0
    }
}

/// The mappings of an smaps text whose pages may be dropped.
fn droppable(smaps: &str) -> Vec<Mapping> {
    parse(smaps)
        .into_iter()
        .filter(Mapping::droppable)
        .collect()
}

fn parse(smaps: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        if let Some(mapping) = header(line) {
            mappings.push(mapping);
            continue;
        }
        let Some(current) = mappings.last_mut() else {
            continue;
        };
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kib = || {
            value
                .trim()
                .strip_suffix("kB")
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        match key {
            "Rss" => current.rss_kib = kib().unwrap_or(0),
            "Anonymous" => current.anonymous_kib = kib(),
            "VmFlags" => current.locked = value.split_whitespace().any(|flag| flag == "lo"),
            _ => {}
        }
    }
    mappings
}

/// `start-end perms offset dev inode [path]`, as in `/proc/PID/maps`.
fn header(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let range = usize::from_str_radix(start, 16).ok()?..usize::from_str_radix(end, 16).ok()?;
    let permissions = fields.next()?;
    let _offset = fields.next()?;
    let _device = fields.next()?;
    let _inode = fields.next()?;
    let path = fields.next().unwrap_or("").trim();
    Some(Mapping {
        range,
        permissions: permissions.to_owned(),
        path: path.to_owned(),
        rss_kib: 0,
        anonymous_kib: None,
        locked: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a00ad000 r--p 00000000 08:01 1234                       /nix/store/x-agent/bin/nixfleet-agent
Size:                692 kB
Rss:                 360 kB
Anonymous:             0 kB
VmFlags: rd mr mw me dw sd
55d0a00ad000-55d0a035e000 r-xp 000ac000 08:01 1234                       /nix/store/x-agent/bin/nixfleet-agent
Size:               2756 kB
Rss:                2052 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me dw sd
55d0a035e000-55d0a036f000 r--p 0035c000 08:01 1234                       /nix/store/x-agent/bin/nixfleet-agent
Size:                 68 kB
Rss:                  68 kB
Anonymous:            68 kB
VmFlags: rd mr mw me dw ac sd
55d0a036f000-55d0a0371000 rw-p 0036c000 08:01 1234                       /nix/store/x-agent/bin/nixfleet-agent
Size:                  8 kB
Rss:                   8 kB
Anonymous:             0 kB
VmFlags: rd wr mr mw me dw ac sd
55d0a1000000-55d0a1028000 rw-p 00000000 00:00 0                          [heap]
Size:                160 kB
Rss:                 160 kB
Anonymous:           160 kB
VmFlags: rd wr mr mw me ac sd
7f0000000000-7f0000020000 r-xp 00000000 08:01 99                         /nix/store/y-glibc/lib/libc.so.6 (deleted)
Size:                128 kB
Rss:                 128 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me sd
7f0000020000-7f0000021000 r-xp 00000000 08:01 99                         /nix/store/y-glibc/lib/locked.so
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me lo sd
7f0000030000-7f0000031000 r--s 00000000 08:01 77                         /run/shared
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
VmFlags: rd sh mr mw me sd
7f0000040000-7f0000041000 r--p 00000000 08:01 78                         /nix/store/z/unknown
Size:                  4 kB
Rss:                   4 kB
VmFlags: rd mr mw me sd
7f0000050000-7f0000060000 r--p 00000000 08:01 79                         /nix/store/z/not-resident
Size:                 64 kB
Rss:                   0 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
Size:                  8 kB
Rss:                   4 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me de sd
";

    #[test]
    fn parses_every_mapping_with_its_figures() {
        let mappings = parse(SMAPS);
        assert_eq!(mappings.len(), 11);
        let text = &mappings[1];
        assert_eq!(text.range, 0x55d0a00ad000..0x55d0a035e000);
        assert_eq!(text.permissions, "r-xp");
        assert_eq!(text.path, "/nix/store/x-agent/bin/nixfleet-agent");
        assert_eq!((text.rss_kib, text.anonymous_kib), (2052, Some(0)));
        assert_eq!(mappings[4].path, "[heap]");
        assert_eq!(
            mappings[5].path,
            "/nix/store/y-glibc/lib/libc.so.6 (deleted)"
        );
        assert!(mappings[6].locked);
        assert_eq!(mappings[8].anonymous_kib, None);
    }

    #[test]
    fn drops_only_unwritten_read_only_private_file_pages() {
        let kept: Vec<(usize, String)> = droppable(SMAPS)
            .into_iter()
            .map(|m| (m.range.start, m.permissions))
            .collect();
        assert_eq!(
            kept,
            [
                (0x55d0a0000000, "r--p".to_owned()),
                (0x55d0a00ad000, "r-xp".to_owned()),
                (0x7f0000000000, "r-xp".to_owned()),
            ],
            "not the RELRO data (copied on write), the writable data, the heap, \
             a locked, shared, unaccounted or non-resident mapping, or the vDSO"
        );
    }

    #[test]
    fn ignores_lines_it_does_not_know() {
        assert!(parse("").is_empty());
        assert!(parse("Rss: 4 kB\nnonsense\n").is_empty());
        let mappings = parse("00400000-00401000 r-xp 00000000 08:01 1 /bin/x\nRss: lots\n");
        assert_eq!(mappings.len(), 1);
        assert_eq!(mappings[0].rss_kib, 0);
        assert!(!mappings[0].droppable());
    }

    /// The test binary's own code, constants and relocated pointers still
    /// work after their pages were dropped: the selection never drops a
    /// page whose contents differ from the file's.
    #[test]
    fn the_process_runs_on_after_its_pages_were_dropped() {
        static NAMES: [&str; 3] = ["pull", "switch", "test"];
        let dyn_value: Box<dyn Fn(usize) -> usize> = Box::new(|n| n * 3);
        let before: Vec<String> = NAMES.iter().map(|n| n.to_uppercase()).collect();

        let released = release_startup_memory().expect("/proc/self/smaps is readable");

        assert!(released.mappings > 0, "{released:?}");
        let after: Vec<String> = NAMES.iter().map(|n| n.to_uppercase()).collect();
        assert_eq!(before, after);
        assert_eq!(dyn_value(14), 42);
        assert_eq!(format!("{:?}", Some(1.5)), "Some(1.5)");
    }
}
