//! The flag layer, the highest: every configuration flag that was given
//! (`--config` and `--check-config` are not configuration keys).

use crate::config::cli::Cli;
use crate::config::files::path_string;
use crate::config::keys::flag_name;
use crate::config::layer::{Layer, LayerKind};

/// The flag layer (the highest): every flag that was given.
pub(crate) fn flag_layer(cli: &Cli) -> Result<Layer, String> {
    let mut flags = Layer::new(LayerKind::Flags);
    let strings = [
        ("url", &cli.url),
        ("hostname", &cli.hostname),
        ("repo_url", &cli.repo_url),
        ("branch", &cli.branch),
        ("interval", &cli.interval),
        ("log_level", &cli.log_level),
        ("metrics", &cli.metrics),
    ];
    for (key, value) in strings {
        if let Some(value) = value {
            flags.set(key, value.as_str());
        }
    }
    let paths = [
        ("token_file", &cli.token_file),
        ("repo_dir", &cli.repo_dir),
        ("ssh_key", &cli.ssh_key),
        ("state_dir", &cli.state_dir),
        ("ca_file", &cli.ca_file),
    ];
    for (key, value) in paths {
        if let Some(path) = value {
            flags.set(key, path_string(path, &format!("flag {}", flag_name(key)))?);
        }
    }
    Ok(flags)
}
