//! Test fixtures shared by the integration tests: an in-test dashboard that
//! records every frame with its arrival time, TCP proxies that can freeze or
//! throttle, and the real agent binary started as a process.
//!
//! Waiting is always on events (a `Notify` fired per recorded frame), with a
//! deadline; never a sleep standing in for synchronisation.
//!
//! One module per concern; every binary takes them all with `use common::*`.

// Each test binary uses a part of these.
#![allow(dead_code)]
// tungstenite's handshake callback fixes the (large) error type.
#![allow(clippy::result_large_err)]

mod agent;
mod dashboard;
mod host;
mod host_tools;
mod proxy;
mod seen;
mod serve;

// What a binary does not use of these is not an error, as for dead code.
#[allow(unused_imports)]
pub use agent::*;
#[allow(unused_imports)]
pub use dashboard::*;
#[allow(unused_imports)]
pub use host::*;
#[allow(unused_imports)]
pub use host_tools::*;
#[allow(unused_imports)]
pub use proxy::*;
#[allow(unused_imports)]
pub use seen::{Seen, heartbeat_gaps, longest_heartbeat_silence};

use std::time::Duration;

pub const TOKEN: &str = "test-T0KEN-do-not-leak-7f3a";

pub const SECOND: Duration = Duration::from_secs(1);
