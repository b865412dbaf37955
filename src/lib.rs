//! NixFleet agent: keeps a NixOS host live on a NixFleet dashboard and runs
//! the dashboard's commands (`pull`, `switch`, `test`, `stop`, …).
//!
//! One module per concern; `main.rs` only wires them together.

pub mod config;
pub mod logging;
pub mod protocol;
