//! Reading a file that holds the token (`token_file`, or the systemd
//! credential `token`): capped, trimmed, checked. No error ever contains
//! what the file holds.

use crate::config::files::{check_readable_file, read_capped};
use crate::config::keys::MAX_TOKEN_FILE_BYTES;
use secrecy::SecretString;
use std::path::Path;

/// The result of reading a token from a file: the trimmed token, or what is
/// wrong with the file (no content).
pub(crate) type TokenRead = Result<SecretString, String>;

/// Reads and trims a token file; the error never contains the content.
pub(crate) fn read_token_file(path: &Path) -> TokenRead {
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

/// Checks a token (already trimmed where it came from a file).
pub(crate) fn check_token(token: &str) -> Result<(), String> {
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
