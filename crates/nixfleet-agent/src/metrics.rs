//! Host metrics for heartbeats: StaSysMo's files when they are fresh, else
//! the kernel's own counters.
//!
//! The kernel's counters come from `/proc/stat`, `/proc/meminfo` and
//! `/proc/loadavg`, opened once and re-read from offset 0 into one reused
//! buffer: a sample is three `pread`s and a scan of a few lines, with no
//! allocation. (The `procfs` crate opened, read and parsed each file whole,
//! building a map of every `/proc/meminfo` field, and cost most of an idle
//! heartbeat; it remains the reference the tests compare this reader with.)

use crate::config::MetricsMode;
use crate::protocol::Metrics;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// StaSysMo files older than this count as absent (config.md).
pub const STASYSMO_MAX_AGE: Duration = Duration::from_secs(30);

/// Enough for every field read here: the first line of `/proc/stat`, and
/// `/proc/meminfo` up to `SwapFree` (its 16th line; the file is ~1.5 KiB).
const PROC_READ_BUFFER: usize = 4096;

/// `/proc` is sampled at most this often; heartbeats in between repeat the
/// last sample. The kernel recomputes the load average every 5 s
/// (`LOAD_FREQ`), so reading it more often returns the same number, and a
/// CPU share over 5 s is as live as a fleet dashboard needs (StaSysMo's
/// values count as fresh for 30 s). Read cold, once a second, `/proc/stat`
/// and `/proc/meminfo` cost about 40 and 30 µs: most of an idle heartbeat
/// at a 1 s interval.
const PROC_SAMPLE_PERIOD: Duration = Duration::from_secs(5);

/// Samples metrics once per heartbeat. CPU usage is the share of busy time
/// between two samples, so the sampler keeps the previous counters.
pub struct Sampler {
    mode: MetricsMode,
    stasysmo: [PathBuf; 4],
    /// `/proc` (elsewhere in tests).
    proc_root: PathBuf,
    proc: Option<ProcFiles>,
    previous_cpu: Option<CpuTimes>,
    /// The last `/proc` sample, and when it was taken.
    last_proc: Option<(Instant, Metrics)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

impl Sampler {
    pub fn new(mode: MetricsMode, stasysmo_dir: PathBuf) -> Self {
        Sampler {
            mode,
            stasysmo: ["cpu", "ram", "swap", "load"].map(|name| stasysmo_dir.join(name)),
            proc_root: PathBuf::from("/proc"),
            proc: None,
            previous_cpu: None,
            last_proc: None,
        }
    }

    /// The current metrics, or `None` when off or unavailable.
    pub fn sample(&mut self) -> Option<Metrics> {
        match self.mode {
            MetricsMode::None => None,
            MetricsMode::Stasysmo => read_stasysmo(&self.stasysmo, SystemTime::now()),
            MetricsMode::Proc => self.sample_proc(Instant::now()),
            MetricsMode::Auto => read_stasysmo(&self.stasysmo, SystemTime::now())
                .or_else(|| self.sample_proc(Instant::now())),
        }
    }

    fn sample_proc(&mut self, now: Instant) -> Option<Metrics> {
        if let Some((taken, last)) = &self.last_proc
            && now.saturating_duration_since(*taken) < PROC_SAMPLE_PERIOD
        {
            return Some(*last);
        }
        if self.proc.is_none() {
            // Opened on first use; retried on the next sample if it failed.
            self.proc = ProcFiles::open(&self.proc_root).ok();
        }
        let proc = self.proc.as_mut()?;
        let cpu_now = proc.cpu_times()?;
        let cpu = cpu_percent(self.previous_cpu, cpu_now);
        self.previous_cpu = Some(cpu_now);
        let memory = proc.memory()?;
        let load = proc.load_one()?;
        let metrics = Metrics {
            cpu: round2(cpu),
            ram: round2(percent_used(memory.total, memory.available)),
            swap: round2(percent_used(memory.swap_total, memory.swap_free)),
            load: round2(load),
        };
        self.last_proc = Some((now, metrics));
        Some(metrics)
    }
}

/// The three `/proc` files, kept open for the agent's lifetime.
struct ProcFiles {
    stat: File,
    meminfo: File,
    loadavg: File,
    buf: Box<[u8]>,
}

/// `/proc/meminfo` fields, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Memory {
    total: u64,
    available: u64,
    swap_total: u64,
    swap_free: u64,
}

impl ProcFiles {
    fn open(proc: &Path) -> std::io::Result<ProcFiles> {
        Ok(ProcFiles {
            stat: File::open(proc.join("stat"))?,
            meminfo: File::open(proc.join("meminfo"))?,
            loadavg: File::open(proc.join("loadavg"))?,
            buf: vec![0; PROC_READ_BUFFER].into_boxed_slice(),
        })
    }

    fn cpu_times(&mut self) -> Option<CpuTimes> {
        parse_cpu_times(read_from_start(&self.stat, &mut self.buf)?)
    }

    fn memory(&mut self) -> Option<Memory> {
        parse_meminfo(read_from_start(&self.meminfo, &mut self.buf)?)
    }

    fn load_one(&mut self) -> Option<f64> {
        parse_load_one(read_from_start(&self.loadavg, &mut self.buf)?)
    }
}

/// The file's current content from offset 0, as much as fits in `buf`. The
/// kernel regenerates a `/proc` file on each read from offset 0, and hands
/// over all of it that fits in one read: a short read is the whole file, so
/// no second read to see the end.
fn read_from_start<'a>(file: &File, buf: &'a mut [u8]) -> Option<&'a [u8]> {
    loop {
        match file.read_at(buf, 0) {
            Ok(n) => return Some(&buf[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// The aggregate `cpu` line of `/proc/stat`: user nice system idle iowait
/// irq softirq steal (guest time is already part of user and nice). Kernels
/// older than 2.6.11 print fewer columns; missing ones count as 0.
fn parse_cpu_times(stat: &[u8]) -> Option<CpuTimes> {
    let line = stat.split(|&b| b == b'\n').next()?;
    let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
    if fields.next()? != b"cpu" {
        return None;
    }
    let mut columns = [0u64; 8];
    let mut seen = 0;
    for (column, field) in columns.iter_mut().zip(fields) {
        *column = parse_u64(field)?;
        seen += 1;
    }
    if seen < 4 {
        return None;
    }
    let [user, nice, system, idle, iowait, irq, softirq, steal] = columns;
    let all = [user, nice, system, idle, iowait, irq, softirq, steal]
        .iter()
        .fold(0u64, |sum, &c| sum.saturating_add(c));
    Some(CpuTimes {
        busy: all.saturating_sub(idle.saturating_add(iowait)),
        total: all,
    })
}

/// `MemTotal`, `MemAvailable` (or, on kernels before 3.14, `MemFree` +
/// `Cached`), `SwapTotal` and `SwapFree`.
fn parse_meminfo(meminfo: &[u8]) -> Option<Memory> {
    let (mut total, mut available, mut free, mut cached) = (None, None, None, None);
    let (mut swap_total, mut swap_free) = (None, None);
    for line in meminfo.split(|&b| b == b'\n') {
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        let slot = match &line[..colon] {
            b"MemTotal" => &mut total,
            b"MemAvailable" => &mut available,
            b"MemFree" => &mut free,
            b"Cached" => &mut cached,
            b"SwapTotal" => &mut swap_total,
            b"SwapFree" => &mut swap_free,
            _ => continue,
        };
        let value = line[colon + 1..]
            .split(|&b| b == b' ')
            .find(|f| !f.is_empty())?;
        *slot = Some(parse_u64(value)?);
    }
    let available = match (available, free, cached) {
        (Some(available), _, _) => available,
        (None, Some(free), Some(cached)) => free.saturating_add(cached),
        _ => return None,
    };
    Some(Memory {
        total: total?,
        available,
        swap_total: swap_total?,
        swap_free: swap_free?,
    })
}

/// The first field of `/proc/loadavg` (the 1-minute load average).
fn parse_load_one(loadavg: &[u8]) -> Option<f64> {
    let field = loadavg.split(|&b| b == b' ').next()?;
    let value: f64 = std::str::from_utf8(field).ok()?.trim().parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some(value)
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if d.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        } else {
            None
        }
    })
}

/// Busy share since the previous sample; since boot for the first one.
fn cpu_percent(previous: Option<CpuTimes>, now: CpuTimes) -> f64 {
    let base = previous.unwrap_or(CpuTimes { busy: 0, total: 0 });
    let total = now.total.saturating_sub(base.total);
    if total == 0 {
        return 0.0;
    }
    let busy = now.busy.saturating_sub(base.busy).min(total);
    busy as f64 * 100.0 / total as f64
}

fn percent_used(total: u64, free: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    total.saturating_sub(free) as f64 * 100.0 / total as f64
}

/// StaSysMo writes one number per file (`cpu`, `ram`, `swap`, `load`); all
/// four must be present, numeric and fresh, or the whole reading is absent.
fn read_stasysmo(files: &[PathBuf; 4], now: SystemTime) -> Option<Metrics> {
    let read = |path: &PathBuf| -> Option<f64> {
        let file = File::open(path).ok()?;
        let modified = file.metadata().ok()?.modified().ok()?;
        // A clock step backwards makes the file look "from the future": treat
        // that as fresh rather than flapping.
        if now.duration_since(modified).unwrap_or_default() > STASYSMO_MAX_AGE {
            return None;
        }
        let mut buf = [0u8; 64];
        let text = read_from_start(&file, &mut buf)?;
        let value: f64 = std::str::from_utf8(text).ok()?.trim().parse().ok()?;
        value.is_finite().then_some(value)
    };
    let [cpu, ram, swap, load] = files;
    Some(Metrics {
        cpu: read(cpu)?,
        ram: read(ram)?,
        swap: read(swap)?,
        load: read(load)?,
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_all(dir: &Path, values: [(&str, &str); 4]) {
        for (name, value) in values {
            std::fs::write(dir.join(name), value).unwrap();
        }
    }

    #[test]
    fn stasysmo_values_are_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        write_all(
            dir.path(),
            [
                ("cpu", "12.5\n"),
                ("ram", "40.25"),
                ("swap", "0"),
                ("load", "1.75"),
            ],
        );
        let mut sampler = Sampler::new(MetricsMode::Stasysmo, dir.path().into());
        assert_eq!(
            sampler.sample(),
            Some(Metrics {
                cpu: 12.5,
                ram: 40.25,
                swap: 0.0,
                load: 1.75
            })
        );
    }

    #[test]
    fn stale_or_missing_or_garbage_stasysmo_files_count_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        write_all(
            dir.path(),
            [("cpu", "1"), ("ram", "2"), ("swap", "3"), ("load", "4")],
        );
        let files = Sampler::new(MetricsMode::Stasysmo, dir.path().into()).stasysmo;
        assert!(read_stasysmo(&files, SystemTime::now()).is_some());
        let later = SystemTime::now() + STASYSMO_MAX_AGE + Duration::from_secs(5);
        assert_eq!(read_stasysmo(&files, later), None);
        std::fs::write(dir.path().join("load"), "NaN").unwrap();
        assert_eq!(read_stasysmo(&files, SystemTime::now()), None);
        std::fs::write(dir.path().join("load"), "garbage").unwrap();
        assert_eq!(read_stasysmo(&files, SystemTime::now()), None);
        std::fs::remove_file(dir.path().join("load")).unwrap();
        assert_eq!(read_stasysmo(&files, SystemTime::now()), None);
    }

    #[test]
    fn auto_falls_back_to_proc_and_proc_values_are_sane() {
        let dir = tempfile::tempdir().unwrap();
        let mut sampler = Sampler::new(MetricsMode::Auto, dir.path().join("absent"));
        for _ in 0..2 {
            let m = sampler.sample().expect("/proc is readable on Linux");
            for v in [m.cpu, m.ram, m.swap] {
                assert!((0.0..=100.0).contains(&v), "{m:?}");
            }
            assert!(m.load >= 0.0);
        }
    }

    #[test]
    fn proc_is_sampled_at_most_every_five_seconds() {
        let proc = tempfile::tempdir().unwrap();
        let write = |cpu_busy: u64, cpu_idle: u64, mem_available: u64, load: &str| {
            let stat = format!("cpu  {cpu_busy} 0 0 {cpu_idle} 0 0 0 0 0 0\ncpu0 0\n");
            std::fs::write(proc.path().join("stat"), stat).unwrap();
            let meminfo = format!(
                "MemTotal: 1000 kB\nMemFree: 1 kB\nMemAvailable: {mem_available} kB\n\
                 Cached: 1 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n"
            );
            std::fs::write(proc.path().join("meminfo"), meminfo).unwrap();
            std::fs::write(proc.path().join("loadavg"), format!("{load} 0 0 1/1 1\n")).unwrap();
        };
        let mut sampler = Sampler::new(MetricsMode::Proc, proc.path().join("no-stasysmo"));
        sampler.proc_root = proc.path().to_owned();
        let start = Instant::now();
        write(100, 900, 750, "0.50");
        let first = sampler.sample_proc(start).unwrap();
        assert_eq!((first.cpu, first.ram, first.load), (10.0, 25.0, 0.5));

        // A second later the files changed, but the sample is repeated.
        write(600, 1400, 250, "2.00");
        let second = sampler.sample_proc(start + Duration::from_secs(1)).unwrap();
        assert_eq!(second, first);

        // Five seconds after it was taken, /proc is read again; CPU is the
        // busy share since that sample: 500 of 1000.
        let third = sampler.sample_proc(start + PROC_SAMPLE_PERIOD).unwrap();
        assert_eq!((third.cpu, third.ram, third.load), (50.0, 75.0, 2.0));
    }

    /// This reader against the `procfs` crate on this machine: the same
    /// counters (ours read just before and just after procfs's, so a
    /// counter that moved in between must lie between them).
    #[test]
    fn proc_reader_agrees_with_the_procfs_crate() {
        use procfs::{Current, CurrentSI};
        let mut ours = ProcFiles::open(Path::new("/proc")).expect("/proc");
        let (cpu_before, memory_before, load_before) = (
            ours.cpu_times().unwrap(),
            ours.memory().unwrap(),
            ours.load_one().unwrap(),
        );
        let stats = procfs::KernelStats::current().unwrap().total;
        let meminfo = procfs::Meminfo::current().unwrap();
        let loadavg = procfs::LoadAverage::current().unwrap();
        let (cpu_after, memory_after, load_after) = (
            ours.cpu_times().unwrap(),
            ours.memory().unwrap(),
            ours.load_one().unwrap(),
        );

        let idle = stats.idle + stats.iowait.unwrap_or(0);
        let total = stats.user
            + stats.nice
            + stats.system
            + idle
            + stats.irq.unwrap_or(0)
            + stats.softirq.unwrap_or(0)
            + stats.steal.unwrap_or(0);
        assert!((cpu_before.total..=cpu_after.total).contains(&total));
        assert!((cpu_before.busy..=cpu_after.busy).contains(&(total - idle)));

        let kib = |bytes: u64| bytes / 1024;
        assert_eq!(memory_before.total, kib(meminfo.mem_total));
        assert_eq!(memory_before.swap_total, kib(meminfo.swap_total));
        // Free memory moves all the time: within 1 % of the total.
        let near = |a: u64, b: u64| a.abs_diff(b) <= memory_before.total / 100;
        let available = meminfo
            .mem_available
            .unwrap_or(meminfo.mem_free + meminfo.cached);
        assert!(near(memory_before.available, kib(available)));
        assert!(near(memory_after.swap_free, kib(meminfo.swap_free)));
        // procfs reads the load as f32; the kernel updates it every 5 s.
        let procfs_load = f64::from(loadavg.one);
        assert!(
            [load_before, load_after]
                .iter()
                .any(|&l| (l - procfs_load).abs() < 0.005),
            "{load_before} / {procfs_load} / {load_after}"
        );

        // And the figures a heartbeat carries: equal after rounding.
        let ram = round2(percent_used(memory_before.total, memory_before.available));
        let procfs_ram = round2(percent_used(meminfo.mem_total, available));
        assert!((ram - procfs_ram).abs() <= 1.0, "{ram} vs {procfs_ram}");
    }

    #[test]
    fn proc_parsers_read_the_kernel_formats() {
        let stat =
            b"cpu  73685 10 19196 50745 633 7 232 60 5 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1 2 3\n";
        assert_eq!(
            parse_cpu_times(stat),
            Some(CpuTimes {
                busy: 73685 + 10 + 19196 + 7 + 232 + 60,
                total: 73685 + 10 + 19196 + 50745 + 633 + 7 + 232 + 60,
            })
        );
        // Old kernels: four columns.
        assert_eq!(
            parse_cpu_times(b"cpu 1 2 3 4\n"),
            Some(CpuTimes { busy: 6, total: 10 })
        );
        for bad in [
            &b""[..],
            b"cpu0 1 2 3 4\n",
            b"cpu 1 2\n",
            b"cpu 1 x 3 4\n",
            b"cpu 99999999999999999999999 1 1 1\n",
        ] {
            assert_eq!(
                parse_cpu_times(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }

        let meminfo = b"MemTotal:       24683652 kB\nMemFree:         1337156 kB\n\
            MemAvailable:   23780352 kB\nBuffers:            1024 kB\n\
            Cached:         21921320 kB\nSwapCached:            0 kB\n\
            SwapTotal:       2097148 kB\nSwapFree:        1048574 kB\n";
        assert_eq!(
            parse_meminfo(meminfo),
            Some(Memory {
                total: 24683652,
                available: 23780352,
                swap_total: 2097148,
                swap_free: 1048574,
            })
        );
        let old = b"MemTotal: 1000 kB\nMemFree: 100 kB\nCached: 200 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n";
        assert_eq!(parse_meminfo(old).map(|m| m.available), Some(300));
        assert_eq!(parse_meminfo(b"MemTotal: 1000 kB\n"), None);
        assert_eq!(
            parse_meminfo(
                b"MemTotal: lots kB\nMemAvailable: 1 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n"
            ),
            None
        );

        assert_eq!(parse_load_one(b"2.36 2.17 1.27 3/121 5563\n"), Some(2.36));
        assert_eq!(parse_load_one(b"0.00 0.00 0.00 1/1 1\n"), Some(0.0));
        assert_eq!(parse_load_one(b""), None);
        assert_eq!(parse_load_one(b"NaN 1 1\n"), None);
    }

    #[test]
    fn none_mode_yields_null() {
        let mut sampler = Sampler::new(MetricsMode::None, PathBuf::new());
        assert_eq!(sampler.sample(), None);
    }

    #[test]
    fn cpu_percent_uses_the_delta() {
        let a = CpuTimes {
            busy: 100,
            total: 1000,
        };
        let b = CpuTimes {
            busy: 150,
            total: 1100,
        };
        assert_eq!(cpu_percent(Some(a), b), 50.0);
        assert_eq!(cpu_percent(Some(b), b), 0.0);
        assert_eq!(cpu_percent(None, a), 10.0);
        // Counters never go backwards, but a bogus reading must not panic.
        assert_eq!(cpu_percent(Some(b), a), 0.0);
    }
}
