//! Reading files the configuration names, without trusting them: sizes are
//! capped, directories and special files refused, paths must be UTF-8.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A path as a string for a layer; `what` names where it came from.
pub(super) fn path_string(path: &Path, what: &str) -> Result<String, String> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("path {} (from {what}) is not valid UTF-8", path.display()))
}

/// The file exists, is a regular file (after symlinks) and can be opened.
pub(super) fn check_readable_file(path: &Path) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?;
    if meta.is_dir() {
        return Err("is a directory, not a file".to_owned());
    }
    if !meta.is_file() {
        return Err("is not a regular file".to_owned());
    }
    fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    Ok(())
}

pub(super) fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("is larger than {max} bytes"));
    }
    Ok(bytes)
}

/// Warns when a file holding a secret can be read by group or others.
pub(super) fn warn_loose_permissions(path: &Path, what: &str, warnings: &mut Vec<String>) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            warnings.push(format!(
                "{what} {} is accessible by group or others (mode {:04o}); chmod 600 it",
                path.display(),
                mode & 0o7777
            ));
        }
    }
}
