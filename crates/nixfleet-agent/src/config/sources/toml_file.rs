//! The TOML file layer: `--config` / `$NIXFLEET_CONFIG`, read with a size
//! cap, parsed without quoting the offending line (it may hold the token),
//! unknown keys refused with a suggestion.

use crate::config::cli::Cli;
use crate::config::files::read_capped;
use crate::config::keys::{Env, KEYS, MAX_CONFIG_FILE_BYTES};
use crate::config::layer::{Layer, LayerKind};
use crate::config::values::toml_str;
use figment::providers::{Format, Toml};
use figment::value::Dict;
use std::fs;
use std::path::PathBuf;

/// Reads `--config` / `$NIXFLEET_CONFIG` into the file layer.
pub(crate) fn config_file_layer(cli: &Cli, env: Env<'_>) -> Result<Option<Layer>, String> {
    let (path, given_by) = match (&cli.config, env("NIXFLEET_CONFIG")) {
        (Some(path), _) => (path.clone(), "flag --config"),
        (None, Some(path)) => (PathBuf::from(path), "environment variable NIXFLEET_CONFIG"),
        (None, None) => return Ok(None),
    };
    if path.as_os_str().is_empty() {
        return Err(format!("config file path is empty (given by {given_by})"));
    }
    let shown = path.display();
    let cannot = |problem: String| {
        format!("cannot read config file {shown} (given by {given_by}): {problem}")
    };
    let meta = fs::metadata(&path).map_err(|e| cannot(e.to_string()))?;
    if meta.is_dir() {
        return Err(cannot("it is a directory".to_owned()));
    }
    let bytes = read_capped(&path, MAX_CONFIG_FILE_BYTES).map_err(cannot)?;
    let text = String::from_utf8(bytes).map_err(|_| cannot("not valid UTF-8".to_owned()))?;
    let dict: Dict = Toml::from_str(&text).map_err(|e| {
        // Only the parser's message and position: its default rendering
        // quotes the offending line, which may hold the token.
        let position = match e.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!(" (line {line}, column {column})")
            }
            None => String::new(),
        };
        let message = e
            .message()
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("; ");
        format!("config file {shown} is not valid TOML: {message}{position}")
    })?;
    if let Some(key) = dict.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(unknown_key(key, &shown.to_string()));
    }
    let mut layer = Layer::new(LayerKind::File);
    layer.dict = dict;
    layer.path = Some(path);
    Ok(Some(layer))
}

pub(crate) fn unknown_key(key: &str, file: &str) -> String {
    let hint = match suggest_key(key) {
        Some(known) => format!(" (did you mean {known}?)"),
        None => format!(" (known keys: {})", KEYS.join(", ")),
    };
    format!("unknown key {} in {file}{hint}", toml_str(key))
}

/// The known key closest to a misspelt one, if any is close.
pub(crate) fn suggest_key(key: &str) -> Option<&'static str> {
    let normal = key.to_ascii_lowercase().replace('-', "_");
    KEYS.iter()
        .map(|k| (edit_distance(&normal, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}
