//! The host facts a rollback needs: the running system and the boot id
//! (both `host_facts`, shared with the commands), the system profile and
//! its generation. Each path can be redirected by a test-only environment
//! variable, as `NIXFLEET_TEST_CURRENT_SYSTEM` redirects
//! `/run/current-system`.

use std::path::{Path, PathBuf};

/// The profile `nixos-rebuild` and `nix-env --set` give a new generation.
pub const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";
/// Test-only: a stand-in for [`SYSTEM_PROFILE`].
pub const TEST_SYSTEM_PROFILE_ENV: &str = "NIXFLEET_TEST_SYSTEM_PROFILE";
/// A record from another boot is not rolled back (rebooting into the new
/// system was the user's choice).
pub use crate::host_facts::boot_id;

fn redirected(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// The system profile's path (the link itself, not its target).
pub fn system_profile() -> PathBuf {
    redirected(TEST_SYSTEM_PROFILE_ENV, SYSTEM_PROFILE)
}

/// The generation the profile points at: its link `system` points at
/// `system-<N>-link`.
pub fn profile_generation(profile: &Path) -> Option<u64> {
    let target = std::fs::read_link(profile).ok()?;
    let name = target.file_name()?.to_str()?;
    let base = profile.file_name()?.to_str()?;
    name.strip_prefix(base)?
        .strip_prefix('-')?
        .strip_suffix("-link")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generation_is_read_from_the_profile_link() {
        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("system");
        assert_eq!(profile_generation(&profile), None);
        std::os::unix::fs::symlink("system-42-link", &profile).unwrap();
        assert_eq!(profile_generation(&profile), Some(42));
        let other = dir.path().join("other");
        std::os::unix::fs::symlink("/nix/store/x-nixos-system", &other).unwrap();
        assert_eq!(profile_generation(&other), None);
    }
}
