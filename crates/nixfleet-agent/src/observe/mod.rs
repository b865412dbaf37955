//! What the agent shows the host it runs on: the state file behind
//! `nixfleet-agent status`, and the Prometheus metrics file for
//! node_exporter's textfile collector. Neither listens on a socket.
//!
//! One task owns the [`Snapshot`]: it follows the link and the running
//! command through their `watch`es and hears of a command's log and end
//! through [`Observation`] messages from the core. It writes the state
//! file only when the snapshot changed (a connect, a disconnect, a
//! command's start and end), never per heartbeat: the last heartbeat is
//! derived from when the link came up and the interval (`report`).
//!
//! The parts, from the bottom up: `snapshot` (what is kept, the state
//! file), `exposition` (the snapshot as metrics, the metrics file),
//! `flake_lock` (the lock file's newest input, for the metrics),
//! `task` (the owner), `report` (the `status` subcommand, which only reads
//! the state file).

pub mod exposition;
mod flake_lock;
pub mod report;
pub mod snapshot;
mod task;

pub use snapshot::{STATE_FILE, Snapshot};
pub use task::{Observation, Observer, Watched};
