//! The layer: the `Layer` type every source is turned into, the kinds of
//! layer in order of precedence, and naming the source of a value for
//! messages. The sources that fill layers are in `sources`.

use super::keys::{env_name, flag_name};
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};
use std::path::{Path, PathBuf};

/// The layers, lowest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum LayerKind {
    Defaults,
    System,
    File,
    Env,
    Credentials,
    Flags,
}

impl LayerKind {
    const ALL: [LayerKind; 6] = [
        LayerKind::Defaults,
        LayerKind::System,
        LayerKind::File,
        LayerKind::Env,
        LayerKind::Credentials,
        LayerKind::Flags,
    ];

    /// The figment metadata name of the layer.
    fn name(self) -> &'static str {
        match self {
            LayerKind::Defaults => "built-in defaults",
            LayerKind::System => "system defaults",
            LayerKind::File => "config file",
            LayerKind::Env => "environment variables",
            LayerKind::Credentials => "systemd credentials",
            LayerKind::Flags => "command-line flags",
        }
    }

    pub(super) fn from_metadata(meta: &Metadata) -> Option<LayerKind> {
        LayerKind::ALL.into_iter().find(|k| k.name() == meta.name)
    }
}

/// One configuration layer: a flat dictionary of keys from one source.
pub(super) struct Layer {
    pub(super) kind: LayerKind,
    /// Config file path, or the credentials directory.
    pub(super) path: Option<PathBuf>,
    pub(super) dict: Dict,
}

impl Layer {
    pub(super) fn new(kind: LayerKind) -> Layer {
        Layer {
            kind,
            path: None,
            dict: Dict::new(),
        }
    }

    pub(super) fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.dict.insert(key.to_owned(), value.into());
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        let meta = Metadata::named(self.kind.name());
        let meta = match &self.path {
            Some(path) => meta.source(path.as_path()),
            None => meta,
        };
        match self.kind {
            LayerKind::Env => {
                meta.interpolater(|_: &Profile, keys: &[&str]| env_name(&keys.join(".")))
            }
            LayerKind::Flags => {
                meta.interpolater(|_: &Profile, keys: &[&str]| flag_name(&keys.join(".")))
            }
            _ => meta,
        }
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// Names the source of `key` as supplied by the layer with metadata `meta`.
pub(super) fn describe(meta: Option<&Metadata>, key: &str) -> String {
    let Some(meta) = meta else {
        return "unknown source".to_owned();
    };
    let path = meta
        .source
        .as_ref()
        .and_then(|s| s.file_path())
        .map(Path::to_path_buf);
    match LayerKind::from_metadata(meta) {
        Some(LayerKind::Defaults) => "built-in default".to_owned(),
        Some(LayerKind::System) => match key {
            "hostname" => "system hostname".to_owned(),
            "state_dir" => "$STATE_DIRECTORY".to_owned(),
            _ => "system default".to_owned(),
        },
        Some(LayerKind::File) => match path {
            Some(p) => p.display().to_string(),
            None => "config file".to_owned(),
        },
        Some(LayerKind::Env) => format!("environment variable {}", env_name(key)),
        Some(LayerKind::Credentials) => match path {
            Some(dir) => format!("systemd credential {}", dir.join(key).display()),
            None => format!("systemd credential {key}"),
        },
        Some(LayerKind::Flags) => format!("flag {}", flag_name(key)),
        None => meta.name.to_string(),
    }
}
