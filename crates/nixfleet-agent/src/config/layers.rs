//! The layers: the `Layer` type every source is turned into, the layers
//! that come from the process (system defaults, `NIXFLEET_*` variables,
//! systemd credentials), and naming the source of a value for messages.
//! The file layer is in `toml_file`, the flag layer in `cli`.

use super::Env;
use super::files::path_string;
use super::keys::{KEYS, env_name, flag_name};
use super::token::{CredentialToken, read_token_file};
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};
use secrecy::SecretString;
use std::fs;
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

/// Defaults that come from the system: the hostname, and the state
/// directory systemd created (`StateDirectory=`).
pub(super) fn system_layer(system_hostname: Option<String>, env: Env<'_>) -> Layer {
    let mut system = Layer::new(LayerKind::System);
    if let Some(name) = system_hostname {
        system.set("hostname", name);
    }
    if let Some(dirs) = env("STATE_DIRECTORY") {
        // systemd passes a colon-separated list with StateDirectory=a b.
        if let Some(first) = dirs.split(':').find(|d| !d.is_empty()) {
            system.set("state_dir", first);
        }
    }
    system
}

/// `NIXFLEET_<KEY>` for the known keys only.
pub(super) fn env_layer(env: Env<'_>) -> Layer {
    let mut layer = Layer::new(LayerKind::Env);
    for key in KEYS {
        if let Some(value) = env(&env_name(key)) {
            layer.set(key, value);
        }
    }
    layer
}

/// The systemd credentials `token` and `ssh_key` in
/// `$CREDENTIALS_DIRECTORY`. The token's value stays out of the layer (it
/// only records that the credential sets the token) and is returned beside
/// it.
pub(super) fn credentials_layer(
    env: Env<'_>,
    secrets: &mut Vec<SecretString>,
    warnings: &mut Vec<String>,
) -> Result<(Layer, Option<CredentialToken>), String> {
    let mut creds = Layer::new(LayerKind::Credentials);
    let mut credential = None;
    let Some(dir) = env("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) else {
        return Ok((creds, credential));
    };
    let dir = PathBuf::from(dir);
    if !dir.is_dir() {
        warnings.push(format!(
            "CREDENTIALS_DIRECTORY {} is not a directory; no credentials loaded",
            dir.display()
        ));
    }
    let token_path = dir.join("token");
    if fs::symlink_metadata(&token_path).is_ok() {
        let read = read_token_file(&token_path);
        // A read error matters only if no later layer overrides the token.
        creds.set("token", "");
        if let Ok(token) = &read {
            secrets.push(token.clone());
        }
        credential = Some(CredentialToken {
            path: token_path,
            read,
        });
    }
    let ssh_key = dir.join("ssh_key");
    if fs::symlink_metadata(&ssh_key).is_ok() {
        creds.set("ssh_key", path_string(&ssh_key, "CREDENTIALS_DIRECTORY")?);
    }
    creds.path = Some(dir);
    Ok((creds, credential))
}
