//! The token: which layer supplies it (inline, `token_file`, or the systemd
//! credential `token`), and checking it. The token is never part of a
//! message; every value read is added to `secrets` so the final error line
//! can scrub it. (Reading a token file is in `sources::token_file`.)

use super::{Validator, check_path};
use crate::config::effective::TokenSource;
use crate::config::files::warn_loose_permissions;
use crate::config::layer::LayerKind;
use crate::config::sources::credentials::CredentialToken;
use crate::config::sources::token_file::{check_token, read_token_file};
use crate::config::values::short_str;
use secrecy::{ExposeSecret, SecretString};
use std::path::{Path, PathBuf};

/// The token as merged from the layers: inline `token` and/or `token_file`.
pub(crate) struct TokenSetting<'a> {
    pub(crate) inline: Option<&'a SecretString>,
    pub(crate) file: Option<&'a str>,
}

/// Picks the layer that supplies the token and reads it.
pub(crate) fn resolve_token(
    setting: TokenSetting<'_>,
    v: &mut Validator<'_>,
    credential: Option<CredentialToken>,
    secrets: &mut Vec<SecretString>,
) -> Result<(SecretString, TokenSource), String> {
    let use_file = match (setting.inline, setting.file) {
        (None, None) => {
            return Err(
                "token is required (set token or token_file in the config file, \
                        NIXFLEET_TOKEN or NIXFLEET_TOKEN_FILE, the systemd credential \"token\", \
                        or --token-file)"
                    .to_owned(),
            );
        }
        (Some(_), None) => false,
        (None, Some(_)) => true,
        // Both merged from different layers (same-layer was refused
        // earlier): the later layer wins.
        (Some(_), Some(_)) => v.layer_of("token_file") > v.layer_of("token"),
    };
    if use_file {
        return token_from_file(setting.file.unwrap_or_default(), v, secrets);
    }
    if v.layer_of("token") == Some(LayerKind::Credentials) {
        let Some(CredentialToken { path, read }) = credential else {
            return Err("token credential vanished".to_owned());
        };
        let token =
            read.map_err(|p| format!("token (from systemd credential {}): {p}", path.display()))?;
        warn_loose_permissions(&path, "token credential", &mut v.warnings);
        return Ok((token, TokenSource::Credential { path }));
    }
    inline_token(setting.inline, v)
}

fn token_from_file(
    path: &str,
    v: &mut Validator<'_>,
    secrets: &mut Vec<SecretString>,
) -> Result<(SecretString, TokenSource), String> {
    let origin = v.origin("token_file");
    let bad = |problem: &str| {
        format!(
            "token_file = {} (from {origin}): {problem}",
            short_str(path)
        )
    };
    check_path(path).map_err(|p| bad(&p))?;
    let token = read_token_file(Path::new(path)).map_err(|p| bad(&p))?;
    secrets.push(token.clone());
    warn_loose_permissions(Path::new(path), "token_file", &mut v.warnings);
    let source = TokenSource::File {
        path: PathBuf::from(path),
        origin,
    };
    Ok((token, source))
}

fn inline_token(
    inline: Option<&SecretString>,
    v: &mut Validator<'_>,
) -> Result<(SecretString, TokenSource), String> {
    let source = v.origin("token");
    // Trimmed like a token file, for `NIXFLEET_TOKEN="$(cat file)"` and kin.
    let token = inline.map_or("", |t| t.expose_secret().trim());
    check_token(token).map_err(|p| format!("token (from {source}): {p}"))?;
    if v.layer_of("token") == Some(LayerKind::File)
        && let Some(file) = source_file(&source)
    {
        warn_loose_permissions(&file, "config file holding the token", &mut v.warnings);
    }
    Ok((
        SecretString::from(token.to_owned()),
        TokenSource::Inline { origin: source },
    ))
}

fn source_file(origin: &str) -> Option<PathBuf> {
    let path = PathBuf::from(origin);
    path.is_file().then_some(path)
}

/// The url must not carry the token: it is sent in the Authorization header.
pub(crate) fn check_token_not_in_url(
    url: &str,
    token: &SecretString,
    v: &Validator<'_>,
) -> Result<(), String> {
    // (Tokens shorter than 4 characters would match by accident.)
    if token.expose_secret().len() >= 4 && url.contains(token.expose_secret()) {
        return Err(format!(
            "url (from {}) contains the token: the token is sent in the Authorization header \
             and must never appear in the URL",
            v.origin("url")
        ));
    }
    Ok(())
}
