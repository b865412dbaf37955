//! The systemd credentials layer: `token`, `ssh_key` and `tls_client_key` in
//! `$CREDENTIALS_DIRECTORY`. The token is read here, once, but kept out of
//! the layer; whether it is used depends on the layers above.

use super::token_file::{TokenRead, read_token_file};
use crate::config::files::path_string;
use crate::config::keys::Env;
use crate::config::layer::{Layer, LayerKind};
use secrecy::SecretString;
use std::fs;
use std::path::PathBuf;

/// The credential file `$CREDENTIALS_DIRECTORY/token`, read when the
/// credentials layer is built; its error matters only if no later layer
/// overrides the token.
pub(crate) struct CredentialToken {
    pub(crate) path: PathBuf,
    pub(crate) read: TokenRead,
}

/// The systemd credentials `token` and `ssh_key` in
/// `$CREDENTIALS_DIRECTORY`. The token's value stays out of the layer (it
/// only records that the credential sets the token) and is returned beside
/// it.
pub(crate) fn credentials_layer(
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
    // Private keys given as credentials: the layer holds their paths, the
    // validation reads them.
    for key in ["ssh_key", "tls_client_key"] {
        let path = dir.join(key);
        if fs::symlink_metadata(&path).is_ok() {
            creds.set(key, path_string(&path, "CREDENTIALS_DIRECTORY")?);
        }
    }
    creds.path = Some(dir);
    Ok((creds, credential))
}
