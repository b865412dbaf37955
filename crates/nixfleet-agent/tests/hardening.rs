//! Hardening (issue 16): each test reproduces a hole an attacker or a bad
//! day opened, against the real binary over loopback.

mod common;

use common::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

// One module per side an attack comes from.
#[path = "hardening/dashboard.rs"]
mod dashboard;
#[path = "hardening/host.rs"]
mod host;
#[path = "hardening/repository.rs"]
mod repository;
