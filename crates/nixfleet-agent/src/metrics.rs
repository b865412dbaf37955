//! Host metrics for heartbeats: StaSysMo's files when they are fresh, else
//! the kernel's own counters.

use crate::config::MetricsMode;
use crate::protocol::Metrics;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// StaSysMo files older than this count as absent (config.md).
pub const STASYSMO_MAX_AGE: Duration = Duration::from_secs(30);

/// Samples metrics once per heartbeat. CPU usage is the share of busy time
/// between two samples, so the sampler keeps the previous counters.
pub struct Sampler {
    mode: MetricsMode,
    stasysmo_dir: PathBuf,
    previous_cpu: Option<CpuTimes>,
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
            stasysmo_dir,
            previous_cpu: None,
        }
    }

    /// The current metrics, or `None` when off or unavailable.
    pub fn sample(&mut self) -> Option<Metrics> {
        match self.mode {
            MetricsMode::None => None,
            MetricsMode::Stasysmo => read_stasysmo(&self.stasysmo_dir, SystemTime::now()),
            MetricsMode::Proc => self.sample_proc(),
            MetricsMode::Auto => {
                read_stasysmo(&self.stasysmo_dir, SystemTime::now()).or_else(|| self.sample_proc())
            }
        }
    }

    fn sample_proc(&mut self) -> Option<Metrics> {
        let cpu_now = read_cpu_times()?;
        let cpu = cpu_percent(self.previous_cpu, cpu_now);
        self.previous_cpu = Some(cpu_now);
        let (ram, swap) = read_memory()?;
        let load = {
            use procfs::Current;
            procfs::LoadAverage::current().ok()?.one as f64
        };
        Some(Metrics {
            cpu: round2(cpu),
            ram: round2(ram),
            swap: round2(swap),
            load: round2(load),
        })
    }
}

fn read_cpu_times() -> Option<CpuTimes> {
    use procfs::CurrentSI;
    let total = procfs::KernelStats::current().ok()?.total;
    let idle = total.idle + total.iowait.unwrap_or(0);
    let all = total.user
        + total.nice
        + total.system
        + total.idle
        + total.iowait.unwrap_or(0)
        + total.irq.unwrap_or(0)
        + total.softirq.unwrap_or(0)
        + total.steal.unwrap_or(0);
    Some(CpuTimes {
        busy: all.saturating_sub(idle),
        total: all,
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

fn read_memory() -> Option<(f64, f64)> {
    use procfs::Current;
    let m = procfs::Meminfo::current().ok()?;
    let available = m.mem_available.unwrap_or(m.mem_free + m.cached);
    Some((
        percent_used(m.mem_total, available),
        percent_used(m.swap_total, m.swap_free),
    ))
}

fn percent_used(total: u64, free: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    total.saturating_sub(free) as f64 * 100.0 / total as f64
}

/// StaSysMo writes one number per file; all four must be present, numeric
/// and fresh, or the whole reading is absent.
fn read_stasysmo(dir: &Path, now: SystemTime) -> Option<Metrics> {
    let read = |name: &str| -> Option<f64> {
        let path = dir.join(name);
        let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
        // A clock step backwards makes the file look "from the future": treat
        // that as fresh rather than flapping.
        if now.duration_since(modified).unwrap_or_default() > STASYSMO_MAX_AGE {
            return None;
        }
        let text = std::fs::read_to_string(&path).ok()?;
        let value: f64 = text.trim().parse().ok()?;
        value.is_finite().then_some(value)
    };
    Some(Metrics {
        cpu: read("cpu")?,
        ram: read("ram")?,
        swap: read("swap")?,
        load: read("load")?,
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
        let later = SystemTime::now() + STASYSMO_MAX_AGE + Duration::from_secs(5);
        assert_eq!(read_stasysmo(dir.path(), later), None);
        std::fs::write(dir.path().join("load"), "NaN").unwrap();
        assert_eq!(read_stasysmo(dir.path(), SystemTime::now()), None);
        std::fs::write(dir.path().join("load"), "garbage").unwrap();
        assert_eq!(read_stasysmo(dir.path(), SystemTime::now()), None);
        std::fs::remove_file(dir.path().join("load")).unwrap();
        assert_eq!(read_stasysmo(dir.path(), SystemTime::now()), None);
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
