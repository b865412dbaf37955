//! What the phases after startup share: the main agent and its dashboard,
//! the table they add rows to, and what one phase leaves for a later one.

use crate::agent::{Agent, AgentSettings};
use crate::dashboard::Dashboard;
use crate::table::Report;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Phases<'a> {
    pub report: &'a mut Report,
    pub dashboard: &'a mut Dashboard,
    pub agent: &'a mut Agent,
    pub agent_binary: &'a Path,
    pub wrapper: &'a [String],
    pub bench_exe: &'a Path,
    /// Where the stand-in `nixos-rebuild` is written.
    pub bin_dir: PathBuf,
    pub settings: &'a AgentSettings<'a>,
    /// The child's own wall time in the flood phase (fast dashboard).
    pub fast_child: Option<Duration>,
    /// Why the benchmark failed (not MISSes: broken runs).
    pub failures: Vec<String>,
}
