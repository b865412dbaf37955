//! The token: which layer supplies it (inline, `token_file`, or the systemd
//! credential `token`), reading it from a file, and checking it. The token
//! is never part of a message; every value read is added to `secrets` so the
//! final error line can scrub it.

use super::errors::short_str;
use super::files::{check_readable_file, read_capped, warn_loose_permissions};
use super::keys::MAX_TOKEN_FILE_BYTES;
use super::layers::LayerKind;
use super::validate::{Validator, check_path};
use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::path::{Path, PathBuf};

/// Where the effective token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `token` set inline; `origin` names the layer (config file path or
    /// environment variable).
    Inline { origin: String },
    /// Read from `token_file` at `path`; `origin` names where `token_file`
    /// was set (config file path, environment variable or flag).
    File { path: PathBuf, origin: String },
    /// Read from the systemd credential `$CREDENTIALS_DIRECTORY/token`.
    Credential { path: PathBuf },
}

impl TokenSource {
    /// The file the token was read from, if any (token_file or credential).
    pub fn path(&self) -> Option<&Path> {
        match self {
            TokenSource::Inline { .. } => None,
            TokenSource::File { path, .. } | TokenSource::Credential { path } => Some(path),
        }
    }
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Inline { origin } => f.write_str(origin),
            TokenSource::File { path, origin } => {
                write!(f, "token_file {} (set by {origin})", path.display())
            }
            TokenSource::Credential { path } => {
                write!(f, "systemd credential {}", path.display())
            }
        }
    }
}

/// The result of reading a token from a file: the trimmed token, or what is
/// wrong with the file (no content).
pub(super) type TokenRead = Result<SecretString, String>;

/// The credential file `$CREDENTIALS_DIRECTORY/token`, read when the
/// credentials layer is built; its error matters only if no later layer
/// overrides the token.
pub(super) struct CredentialToken {
    pub(super) path: PathBuf,
    pub(super) read: TokenRead,
}

/// The token as merged from the layers: inline `token` and/or `token_file`.
pub(super) struct TokenSetting<'a> {
    pub(super) inline: Option<&'a SecretString>,
    pub(super) file: Option<&'a str>,
}

/// Picks the layer that supplies the token and reads it.
pub(super) fn resolve_token(
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
pub(super) fn check_token_not_in_url(
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

/// Checks a token (already trimmed where it came from a file).
fn check_token(token: &str) -> Result<(), String> {
    if token.trim().is_empty() {
        return Err("is empty".to_owned());
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(
            "contains whitespace or control characters (it is sent in an HTTP \
                    header and must be a single word)"
                .to_owned(),
        );
    }
    Ok(())
}

/// Reads and trims a token file; the error never contains the content.
pub(super) fn read_token_file(path: &Path) -> TokenRead {
    check_readable_file(path)?;
    let bytes = read_capped(path, MAX_TOKEN_FILE_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| "is not valid UTF-8".to_owned())?;
    let token = text.trim();
    if token.is_empty() {
        return Err("the file is empty".to_owned());
    }
    check_token(token)?;
    Ok(SecretString::from(token.to_owned()))
}
