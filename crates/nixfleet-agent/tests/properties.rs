//! Property tests (proptest) over the agent's hostile-input paths:
//!
//! - inbound frame text → `protocol::decode`: never panics, agrees with a
//!   plain JSON reading of the same frame, and never echoes a large frame
//!   into what gets logged;
//! - configuration loading (`config::load_with`) from generated TOML files,
//!   environment values and token sources: never panics, errors are one line
//!   without the token, a loaded configuration renders without the token and
//!   reads back (from its own rendering) to the same configuration;
//! - the outbox, against a model of a connection that breaks mid-batch:
//!   every line and every status arrives, in order; what arrives twice is
//!   only what was written and not acknowledged when a connection broke.
//!
//! `PROPTEST_CASES` scales every test (the defaults keep CI to seconds).
//! The fuzz targets in `fuzz/` check the same properties for longer runs.

use nixfleet_agent::config::{Cli, Config, load_with};
use nixfleet_agent::outbox::{Item, Outbox};
use nixfleet_agent::protocol::{DecodeError, Inbound, KillSignal, decode};
use proptest::prelude::*;
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::Path;

// One module per property group above; the regressions file proptest
// keeps sits beside the module whose test found the case.
#[path = "properties/config.rs"]
mod config;
#[path = "properties/decode.rs"]
mod decode;
#[path = "properties/outbox.rs"]
mod outbox;

/// Cases per test: the default times `PROPTEST_CASES`/256 when that is set.
fn cases(default: u32) -> u32 {
    match std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        Some(n) => (u64::from(default) * u64::from(n) / 256).clamp(1, u64::from(u32::MAX)) as u32,
        None => default,
    }
}
