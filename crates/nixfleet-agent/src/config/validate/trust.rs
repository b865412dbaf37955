//! Keys about whom the agent trusts: `allowed_signers_file` and
//! `gpg_keyring`, the keys a commit must be signed with to be deployed.
//! A missing key file is an error here rather than at the first pull: the
//! agent would otherwise refuse every commit for a typo.

use super::{Validator, check_path};
use crate::config::files::check_readable_file;
use std::fs;
use std::path::{Path, PathBuf};

impl Validator<'_> {
    /// `allowed_signers_file`: optional; a readable file (git's SSH
    /// allowed-signers format, checked by git itself when it verifies).
    pub(crate) fn allowed_signers_file(
        &self,
        file: Option<String>,
    ) -> Result<Option<PathBuf>, String> {
        let key = "allowed_signers_file";
        let Some(file) = file else { return Ok(None) };
        check_path(&file).map_err(|p| self.bad(key, &file, &p))?;
        check_readable_file(Path::new(&file)).map_err(|p| self.bad(key, &file, &p))?;
        Ok(Some(PathBuf::from(file)))
    }

    /// `gpg_keyring`: optional; a readable file, or a directory whose
    /// regular files are key files.
    pub(crate) fn gpg_keyring(&self, keyring: Option<String>) -> Result<Option<PathBuf>, String> {
        let key = "gpg_keyring";
        let Some(keyring) = keyring else {
            return Ok(None);
        };
        check_path(&keyring).map_err(|p| self.bad(key, &keyring, &p))?;
        let path = Path::new(&keyring);
        if path.is_dir() {
            fs::read_dir(path)
                .map_err(|e| self.bad(key, &keyring, &format!("cannot read it: {e}")))?;
        } else {
            check_readable_file(path).map_err(|p| self.bad(key, &keyring, &p))?;
        }
        Ok(Some(PathBuf::from(keyring)))
    }
}
