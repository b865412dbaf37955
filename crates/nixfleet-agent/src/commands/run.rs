//! One command, from the dashboard's request to its status: planned
//! (plan.rs), launched under its supervisor (launch.rs), then followed
//! (follow.rs) until the log says it ended.

use super::follow::follow;
use super::launch::launch;
use super::plan::{Planned, Planner};
use super::progress::Progress;
use super::table::{CommandKind, StopRequest};
use crate::child_env::{ChildEnv, child_environment};
use crate::config::Config;
use crate::host_facts::generation;
use crate::outbox::Outbox;
use crate::protocol::{Outcome, Status};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// Test-only, and only in debug builds (release builds never read it):
/// set, the agent stops itself (SIGSTOP) once a command's supervisor has
/// its plan and before the core hears `Launched`, so that a test kills it
/// in exactly that window (tests/handover.rs). Nothing else can hold the
/// agent between two statements of one task.
pub const TEST_STOP_AFTER_LAUNCH_ENV: &str = "NIXFLEET_TEST_STOP_AFTER_LAUNCH";

fn stop_here_if_testing() {
    #[cfg(debug_assertions)]
    if std::env::var_os(TEST_STOP_AFTER_LAUNCH_ENV).is_some_and(|v| !v.is_empty()) {
        let me = rustix::process::getpid();
        let _ = rustix::process::kill_process(me, rustix::process::Signal::STOP);
    }
}

/// What every command needs, shared by all of them.
pub struct Runner {
    config: Arc<Config>,
    outbox: Arc<Outbox>,
    child_env: ChildEnv,
    planner: Planner,
    /// Whether `state_dir` had less free space than a log's cap when the
    /// last command started (warned about on change, not per command).
    space_short: AtomicBool,
}

impl Runner {
    pub fn new(config: Arc<Config>, outbox: Arc<Outbox>) -> Self {
        let child_env = Arc::new(child_environment(
            std::env::vars_os(),
            config.ssh_key.as_deref(),
        ));
        let planner = Planner::new(config.clone(), child_env.clone());
        Runner {
            config,
            outbox,
            child_env,
            planner,
            space_short: AtomicBool::new(false),
        }
    }

    /// The environment every child gets (for the agent's own queries).
    pub fn child_env(&self) -> &[(std::ffi::OsString, std::ffi::OsString)] {
        &self.child_env
    }

    pub fn shared_child_env(&self) -> ChildEnv {
        self.child_env.clone()
    }

    /// The plan of the automatic rollback to `system` (see
    /// [`Planner::rollback_to`]).
    pub fn rollback_plan(&self, system: &str, profile: &Path, notes: Vec<String>) -> Planned {
        self.planner.rollback_to(system, profile, notes)
    }

    /// Runs one command to its end and returns its status: `plan` when
    /// given (the automatic rollback), else the command's own plan. Output
    /// lines, progress and the verdicts of checks are queued in the outbox
    /// as they happen; the status is left to the caller, which queues it
    /// after them.
    pub async fn run(
        &self,
        kind: CommandKind,
        plan: Option<Planned>,
        progress: &mpsc::Sender<Progress>,
        stop: &mut watch::Receiver<Option<StopRequest>>,
    ) -> Status {
        let failed = |message: String, exit_code: i32| {
            warn!(command = kind.name(), "{message}");
            Status {
                status: Outcome::Error,
                command: kind.name().to_owned(),
                exit_code,
                message,
                generation: generation(&self.config.repo_dir),
            }
        };
        if stop.borrow().is_some() {
            return failed("Stopped by user".to_owned(), -1);
        }
        let planned = match plan {
            Some(planned) => planned,
            None => match self.planner.plan(kind).await {
                Ok(planned) => planned,
                Err(message) => return failed(message, 1),
            },
        };
        self.note_free_space(kind.log_max_bytes(self.config.log_max_bytes));
        let launched = launch(&self.config, &self.child_env, &self.outbox, kind, planned);
        let launched = match launched.await {
            Ok(launched) => launched,
            Err(error) => return failed(format!("cannot start the command: {error}"), -1),
        };
        stop_here_if_testing();
        let _ = progress.send(Progress::Launched(launched.record)).await;
        follow(launched.followed, &self.outbox, progress, stop).await
    }

    /// A state disk with less room than one command log may take is said
    /// once (and its recovery), so the operator hears before lines go.
    fn note_free_space(&self, cap: u64) {
        let Some(free) = super::log::free_bytes(&self.config.state_dir) else {
            return;
        };
        let short = free < cap;
        if short == self.space_short.swap(short, Ordering::Relaxed) {
            return;
        }
        if short {
            warn!(
                free_bytes = free,
                log_max_bytes = cap,
                dir = %self.config.state_dir.display(),
                "state_dir has less free space than one command log may take: old logs are pruned first, then lines are counted, not kept"
            );
        } else {
            info!(
                free_bytes = free,
                "state_dir has room for a full command log again"
            );
        }
    }
}
