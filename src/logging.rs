//! Logging through tracing: human-readable on stderr.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// Installs the global subscriber. `level` was validated by the config
/// loader; an unparsable one falls back to `info` rather than failing.
pub fn init(level: &str) {
    let filter: Targets = level.parse().unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry().with(fmt).with(filter).init();
}
