//! Signed commits only (`allowed_signers_file`, `gpg_keyring`): a commit
//! is checked out and built only when it is signed by one of the given
//! keys.
//!
//! The check is a step of the command (the hidden mode
//! `nixfleet-agent --verify-commit`, run by the supervisor like any other
//! step): in a pull between the fetch and the checkout, so that a refused
//! tip never reaches the working tree; in `switch` and `boot` before the
//! build, on HEAD. It runs `git verify-commit` with only the configured
//! keys: a fresh, private `GNUPGHOME` holding nothing but `gpg_keyring`'s
//! keys, `gpg.ssh.allowedSignersFile` on git's command line (which
//! outranks every config file), and neither the global nor the system git
//! configuration, so neither root's own keyring nor a setting in a config
//! file can widen what is accepted.
//!
//! Only the tip is checked, as comin does: every tip is checked before it
//! is deployed, so an unsigned commit below a signed tip is one a key
//! holder signed on top of (and vouched for).
//!
//! A refusal is recorded in `state_dir` (`refused-commit.json`) so that the
//! v3 git compartment can say `error: unsigned commit <short>` for as long
//! as that commit is the fetched tip or HEAD.

mod check;

pub use check::main;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The hidden first argument that makes the binary verify one commit.
pub const VERIFY_ARG: &str = "--verify-commit";
/// The label of the check in a pull (a git step: one of the pull's dots).
pub const PULL_LABEL: &str = "git verify-commit";
/// The label of the check of HEAD before a build (not a pull step).
pub const HEAD_LABEL: &str = "verify HEAD signature";
const REFUSED_FILE: &str = "refused-commit.json";

/// The keys a deployed commit must be signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeys {
    pub allowed_signers: Option<PathBuf>,
    pub gpg_keyring: Option<PathBuf>,
}

/// What is checked: a fetched tip before it is checked out, or HEAD (and
/// the working tree) before it is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Tip,
    Head,
}

impl Subject {
    fn as_str(self) -> &'static str {
        match self {
            Subject::Tip => "tip",
            Subject::Head => "head",
        }
    }
}

impl SigningKeys {
    /// `None` when neither key is set: commits are not checked.
    pub fn new(allowed_signers: Option<PathBuf>, gpg_keyring: Option<PathBuf>) -> Option<Self> {
        (allowed_signers.is_some() || gpg_keyring.is_some()).then_some(SigningKeys {
            allowed_signers,
            gpg_keyring,
        })
    }

    /// The arguments of the hidden mode checking `rev` in `repo`. Paths
    /// only: nothing secret, nothing from the dashboard.
    pub fn step_args(
        &self,
        subject: Subject,
        repo: &Path,
        rev: &str,
        state_dir: &Path,
    ) -> Vec<String> {
        let path = |p: &Option<PathBuf>| {
            p.as_deref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        vec![
            VERIFY_ARG.to_owned(),
            subject.as_str().to_owned(),
            repo.to_string_lossy().into_owned(),
            rev.to_owned(),
            state_dir.to_string_lossy().into_owned(),
            path(&self.allowed_signers),
            path(&self.gpg_keyring),
        ]
    }
}

/// The last commit refused, and what the git compartment says about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedCommit {
    /// The full commit id.
    pub commit: String,
    /// `unsigned commit 1a2b3c4`, or why its signature was not accepted.
    pub message: String,
}

impl RefusedCommit {
    pub fn load(state_dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(state_dir.join(REFUSED_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn save(&self, state_dir: &Path) {
        // Only the compartment's wording depends on it: the refusal itself
        // stands without the record.
        let _ = crate::state_file::save_json(state_dir, REFUSED_FILE, self);
    }

    fn clear(state_dir: &Path) {
        let _ = std::fs::remove_file(state_dir.join(REFUSED_FILE));
    }
}

/// The first seven characters of a commit id.
pub fn short(commit: &str) -> &str {
    commit.get(..7).unwrap_or(commit)
}
