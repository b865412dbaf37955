//! What the agent shows the host it runs on: the state file behind
//! `nixfleet-agent status`, and the Prometheus metrics file for
//! node_exporter's textfile collector. Neither listens on a socket.
//!
//! One task owns the [`Snapshot`]: it follows the link and the running
//! command through their `watch`es, the connection's counts
//! ([`LinkCounts`](crate::connection::LinkCounts)) and the core's
//! [`CommandHistory`] (logs, results, counts) through theirs: cumulative
//! or latest-wins, never a queue that could drop a count or make the
//! sender wait for a task that writes files. It writes the state
//! file only when the snapshot changed (a connect, a disconnect, a
//! command's start and end), never per heartbeat: the last heartbeat is
//! derived from when the link came up and the interval (`report`).
//!
//! The parts, from the bottom up: `snapshot` (what is kept, the state
//! file), `history` (what the core keeps of commands), `exposition` (the
//! snapshot as metrics, the metrics file),
//! `flake_lock` (the lock file's newest input, for the metrics),
//! `task` (the owner), `report` (the `status` subcommand, which only reads
//! the state file).

pub mod exposition;
mod flake_lock;
mod history;
pub mod report;
pub mod snapshot;
mod task;

pub use history::{CommandEnd, CommandHistory, History};
pub use snapshot::{STATE_FILE, Snapshot};
pub use task::{Observer, Watched};
