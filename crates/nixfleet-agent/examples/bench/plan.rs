//! How much of everything to do: the full run, or `--quick`.

use std::time::Duration;

pub struct Plan {
    pub name: &'static str,
    /// How long the idle agents are watched.
    pub idle: Duration,
    /// The heartbeat intervals of the idle agents, in seconds.
    pub idle_intervals: &'static [u64],
    pub flood_lines: u64,
    pub latency_lines: u64,
    pub latency_rate: u64,
    pub reconnects: usize,
    pub slow_lines: u64,
    pub crash_lines: u64,
    /// `BENCH_ONLY=idle,flood,latency,reconnect,slow,crash`: the phases to run.
    only: Option<Vec<String>>,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            name: "full",
            // Two 30 s heartbeats and four pings in any such window.
            idle: Duration::from_secs(60),
            idle_intervals: &[1, 30],
            flood_lines: 300_000,
            latency_lines: 1_000,
            latency_rate: 100,
            reconnects: 3,
            slow_lines: 1_000_000,
            crash_lines: 300_000,
            only: only_phases(),
        }
    }

    pub fn quick() -> Plan {
        Plan {
            name: "quick",
            idle: Duration::from_secs(5),
            idle_intervals: &[1],
            flood_lines: 30_000,
            latency_lines: 200,
            latency_rate: 100,
            reconnects: 1,
            slow_lines: 100_000,
            crash_lines: 30_000,
            only: only_phases(),
        }
    }

    pub fn wants(&self, phase: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|p| p == phase))
    }
}

fn only_phases() -> Option<Vec<String>> {
    let only = std::env::var("BENCH_ONLY").ok()?;
    Some(only.split(',').map(|p| p.trim().to_owned()).collect())
}
