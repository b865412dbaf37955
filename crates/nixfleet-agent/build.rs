//! Records the git commit the agent is built from as
//! `NIXFLEET_SOURCE_COMMIT` (read by `heartbeat::source_commit`), for the
//! v3 dashboards' freshness check.
//!
//! The flake sets the variable from `self.rev` (or `self.dirtyRev`); the
//! Nix build sandbox has no `.git`. A plain `cargo build` in a checkout
//! asks git; without either the value is empty and the field is left out.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-env-changed=NIXFLEET_SOURCE_COMMIT");
    let commit = match std::env::var("NIXFLEET_SOURCE_COMMIT") {
        Ok(commit) => commit,
        Err(_) => commit_from_git().unwrap_or_default(),
    };
    println!("cargo::rustc-env=NIXFLEET_SOURCE_COMMIT={}", commit.trim());
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn commit_from_git() -> Option<String> {
    let commit = git(&["rev-parse", "HEAD"])?;
    // Build again when HEAD moves (a commit, a checkout): HEAD itself and
    // the branch it points to. Only files that exist are named, or cargo
    // would rerun this script on every build.
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])?];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.extend(git(&["rev-parse", "--git-path", &branch]));
        watched.extend(git(&["rev-parse", "--git-path", "packed-refs"]));
    }
    for path in watched.iter().filter(|p| Path::new(p).exists()) {
        println!("cargo::rerun-if-changed={path}");
    }
    Some(commit)
}
