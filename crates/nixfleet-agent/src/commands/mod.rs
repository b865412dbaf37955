//! The commands the dashboard may ask for, and how every one of them runs.
//!
//! One path, for the commands that change the host and for the read-only
//! checks (`refresh-*`) alike; the files are named for its stations and
//! each imports only files before it on this list:
//!
//! 1. `table.rs`: the command kinds, what each may do, which status
//!    compartments it works on, what may be asked while one runs.
//! 2. `group.rs`: process groups, and the one way a group is stopped;
//!    `stop_signal.rs`: a stop request as a signal to the supervisor.
//! 3. `log.rs`: the command log's format, the plan handed to the
//!    supervisor, creating and pruning logs, the end file.
//!    `relay.rs`: the supervisor's stdout, which carries the records a
//!    refusing disk did not take to the agent.
//!    `log_writer.rs`: the log as the supervisor writes it, also on a
//!    disk that refuses.
//! 4. `lines.rs`: a line of output as the dashboard gets it.
//! 5. `handover.rs`: the running-command record one agent hands to the
//!    next, and following a command of an older agent.
//! 6. `progress.rs`: what a running command tells the agent core.
//! 7. `plan.rs`: the steps of each command, from the configuration.
//! 8. `launch.rs`: the log created, the supervisor started.
//! 9. `supervisor.rs`: the supervisor process (`nixfleet-agent
//!    --supervise`): runs the steps, writes the log, stops a group.
//! 10. `step.rs`, `build_progress.rs`, `dots.rs`, `checks.rs`: what the
//!     log's records mean: a step's result, a rebuild's counts, progress
//!     dots, the checks' verdicts.
//! 11. `summary.rs`: each record turned into frames, events and the status.
//! 12. `follow.rs`: the log followed as it grows, frames into the outbox.
//! 13. `run.rs`: one command from request to status (plan, launch,
//!     follow).
//! 14. `unattended.rs`: the rollback timer's hidden mode, which runs the
//!     automatic rollback through the same plan, launch and log when no
//!     agent runs, for the next agent to adopt.
//!
//! Nothing the dashboard sends ever becomes an argument or reaches a shell.
//! Programs come from `PATH`. The command runs under its supervisor and
//! writes only into its log, so it never waits for the agent or the
//! dashboard, and it survives the agent: a next agent adopts the record
//! and follows the log from where delivery stood.

pub mod build_progress;
pub mod checks;
pub mod dots;
pub mod follow;
pub mod group;
pub mod handover;
pub mod launch;
pub mod lines;
pub mod log;
pub mod log_writer;
pub mod plan;
pub mod progress;
pub mod relay;
pub mod run;
pub mod step;
pub mod stop_signal;
pub mod summary;
pub mod supervisor;
pub mod table;
pub mod unattended;

pub use lines::{MAX_LINE_BYTES, TRUNCATED_MARK, output_frame};
pub use progress::Progress;
pub use run::Runner;
pub use table::{CommandKind, Request, StopRequest};
