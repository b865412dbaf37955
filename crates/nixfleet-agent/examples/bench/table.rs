//! The results table: one row per figure, with its target, what the Go
//! agent (v2) measured and the verdict, and how figures are written in it.

use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Miss,
    Info,
}

/// The rows printed so far, counted by verdict.
#[derive(Default)]
pub struct Report {
    pub passed: usize,
    pub missed: Vec<String>,
}

impl Report {
    pub fn header(&self) {
        println!(
            "{:<10} {:<30} {:>22}  {:<18} {:<16} verdict",
            "phase", "figure", "measured", "target", "Go agent v2"
        );
    }

    pub fn row(
        &mut self,
        phase: &str,
        figure: &str,
        value: String,
        target: &str,
        go: &str,
        v: Verdict,
    ) {
        let verdict = match v {
            Verdict::Pass => {
                self.passed += 1;
                "PASS"
            }
            Verdict::Miss => {
                self.missed.push(format!("{phase} {}", figure.trim()));
                "MISS"
            }
            Verdict::Info => "",
        };
        println!("{phase:<10} {figure:<30} {value:>22}  {target:<18} {go:<16} {verdict}");
    }

    pub fn check(ok: bool) -> Verdict {
        if ok { Verdict::Pass } else { Verdict::Miss }
    }

    /// The closing line: how many passed, and which missed.
    pub fn summary(&self) {
        println!(
            "\n{} PASS, {} MISS{}",
            self.passed,
            self.missed.len(),
            if self.missed.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.missed.join("; "))
            }
        );
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// p50, p99 and max of microsecond samples, in milliseconds.
pub fn percentiles(samples_us: &[u32]) -> (f64, f64, f64) {
    if samples_us.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut sorted = samples_us.to_vec();
    sorted.sort_unstable();
    let at = |q: f64| {
        let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
        f64::from(sorted[index]) / 1000.0
    };
    (
        at(0.5),
        at(0.99),
        f64::from(sorted[sorted.len() - 1]) / 1000.0,
    )
}

pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
