//! Safe deployments: what the agent keeps on disk between a switch and the
//! dashboard's confirmation, and the pure decisions about it.
//!
//! A ground-floor room: it imports only `state_file` and `host_facts`, never
//! the connection, the commands or the core. The core (`agent/`) ties it
//! to the connection's events and to the command path.
//!
//! The parts, each building on the ones before it: `host` (where the
//! running system, the system profile and the boot id are read, with the
//! test stand-ins), `record` (the private record in `state_dir`), `decide`
//! (armed, expired, another boot; the messages the dashboard gets),
//! `timer` (the transient systemd timer's argv, and the lock that decides
//! who rolls back), `unattended` (the hidden mode that timer runs).

pub mod decide;
pub mod host;
pub mod record;
pub mod timer;
pub mod unattended;

pub use decide::{Adopted, Resume, resume, short_path};
pub use host::{boot_id, profile_generation, system_profile};
pub use record::{Phase, Record};
