//! Keys about the configuration repository: `repo_dir`, `repo_url`,
//! `branch`, `ssh_key`. Values reach git as arguments, so none may pass for
//! an option.

use super::{Validator, check_path};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

impl Validator<'_> {
    /// `repo_dir` (required).
    pub(crate) fn repo_dir(&self, dir: Option<String>) -> Result<PathBuf, String> {
        let Some(dir) = dir else {
            return Err("repo_dir is required (set repo_dir in the config file, \
                        NIXFLEET_REPO_DIR or --repo-dir)"
                .to_owned());
        };
        check_path(&dir).map_err(|p| self.bad("repo_dir", &dir, &p))?;
        if dir.starts_with('-') {
            return Err(self.bad(
                "repo_dir",
                &dir,
                "must not start with '-' (git would take it for an option; write ./-…)",
            ));
        }
        Ok(PathBuf::from(dir))
    }

    /// `repo_url`: optional (isolated mode when set).
    pub(crate) fn repo_url(&self, url: Option<String>) -> Result<Option<String>, String> {
        let Some(url) = url else { return Ok(None) };
        check_repo_url(&url)
            .map_err(|p| self.bad("repo_url", &crate::redact::redact_url(&url), &p))?;
        Ok(Some(url))
    }

    /// `branch` (has a default).
    pub(crate) fn branch(&self, branch: Option<String>) -> Result<String, String> {
        let branch = branch.unwrap_or_default();
        check_branch(&branch).map_err(|p| self.bad("branch", &branch, &p))?;
        Ok(branch)
    }

    /// `ssh_key`: optional; an unreadable or loose key is a warning, since
    /// it may appear later (and git reports it when it is used).
    pub(crate) fn ssh_key(&mut self, key: Option<String>) -> Result<Option<PathBuf>, String> {
        let Some(key) = key else { return Ok(None) };
        check_path(&key).map_err(|p| self.bad("ssh_key", &key, &p))?;
        let path = PathBuf::from(key);
        match fs::metadata(&path) {
            Err(e) => {
                let warning = format!(
                    "ssh_key {} (from {}) cannot be read: {e}",
                    path.display(),
                    self.origin("ssh_key")
                );
                self.warnings.push(warning);
            }
            Ok(m) if m.permissions().mode() & 0o077 != 0 => self.warnings.push(format!(
                "ssh_key {} is accessible by group or others (mode {:04o}); ssh refuses \
                 such keys: chmod 600 it",
                path.display(),
                m.permissions().mode() & 0o7777
            )),
            Ok(_) => {}
        }
        Ok(Some(path))
    }
}

/// `branch`: a name git accepts as a branch, that cannot pass for an option.
pub fn check_branch(branch: &str) -> Result<(), String> {
    if branch.is_empty() {
        return Err("is empty".to_owned());
    }
    if branch.starts_with('-') {
        return Err("must not start with '-'".to_owned());
    }
    if branch.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters".to_owned());
    }
    if branch.contains("..") {
        return Err("must not contain \"..\"".to_owned());
    }
    let invalid = branch
        .chars()
        .any(|c| matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
        || branch.contains("@{")
        || branch == "@"
        || branch.contains("//")
        || branch.starts_with('/')
        || branch.ends_with('/')
        || branch.ends_with('.')
        || branch
            .split('/')
            .any(|c| c.starts_with('.') || c.ends_with(".lock"));
    if invalid {
        return Err("is not a valid git branch name".to_owned());
    }
    Ok(())
}

/// `repo_url`: non-empty, cannot pass for an option.
pub fn check_repo_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err("is empty (leave repo_url unset for a repository you manage)".to_owned());
    }
    if url.starts_with('-') {
        return Err("must not start with '-'".to_owned());
    }
    if url.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    Ok(())
}
