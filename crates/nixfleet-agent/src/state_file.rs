//! Files under `state_dir` that only the agent may read: the running
//! command's record, the system record, the command logs, the delivery
//! cursor. Created private whatever the umask, and records replaced
//! atomically, so a reader never sees half of one.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Creates `dir` (and parents) private to the agent: 0700 whatever the
/// umask, also when it existed with looser bits.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Opens a file readable and writable by the agent only (0600 whatever
/// the umask).
pub fn private_file(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let file = options.mode(0o600).open(path)?;
    // A file that existed keeps its old mode through open(): fix it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Writes `bytes` to `path` atomically, 0600: a temporary file, written
/// and fsynced, then renamed over `path`. Any step may fail (a full or
/// read-only disk: ENOSPC, EROFS, EIO); the temporary file is then
/// removed and `path` keeps its previous contents, never half of new ones.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_private_with(path, bytes, &mut |_| Ok(()))
}

/// The steps of [`write_private`], where a test injects a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Create,
    Write,
    Sync,
    Rename,
}

fn write_private_with(
    path: &Path,
    bytes: &[u8],
    fault: &mut dyn FnMut(Stage) -> io::Result<()>,
) -> io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut replace = || {
        fault(Stage::Create)?;
        let mut file = private_file(
            &tmp,
            OpenOptions::new().write(true).create(true).truncate(true),
        )?;
        fault(Stage::Write)?;
        file.write_all(bytes)?;
        // On disk before the name points at it: after a crash the name
        // holds the old record or the new one, not an empty file.
        fault(Stage::Sync)?;
        file.sync_all()?;
        drop(file);
        fault(Stage::Rename)?;
        std::fs::rename(&tmp, path)
    };
    // The directory is not fsynced after the rename: a crash may bring
    // back the previous record, whole, which every reader handles; one
    // more open and fsync on every write would buy nothing else.
    replace().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(())
}

/// Writes `value` as JSON to `state_dir/file` atomically (a temporary file,
/// then rename), so a reader never sees half a record.
pub fn save_json(state_dir: &Path, file: &str, value: &impl serde::Serialize) -> io::Result<()> {
    let json = serde_json::to_vec(value).map_err(io::Error::other)?;
    private_dir(state_dir)?;
    write_private(&state_dir.join(file), &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_and_dirs_ignore_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        private_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777)).unwrap();
        private_dir(&sub).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sub), 0o700);
        let file = sub.join("f");
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_private(&file, b"y").unwrap();
        assert_eq!(mode(&file), 0o600);
    }

    /// A disk that refuses at any step of a write leaves the previous
    /// record whole and no temporary file behind.
    #[test]
    fn a_refused_write_keeps_the_previous_file_intact() {
        let dir = tempfile::tempdir().unwrap();
        let value = serde_json::json!({"command": "switch", "pid": 42});
        save_json(dir.path(), "record.json", &value).unwrap();
        let path = dir.path().join("record.json");
        let before = std::fs::read(&path).unwrap();
        let errors = [libc::ENOSPC, libc::EROFS, libc::EIO];
        for stage in [Stage::Create, Stage::Write, Stage::Sync, Stage::Rename] {
            for errno in errors {
                let written = write_private_with(&path, b"{\"half\":", &mut |at| match at {
                    at if at == stage => Err(io::Error::from_raw_os_error(errno)),
                    _ => Ok(()),
                });
                let error = written.expect_err("the injected failure is reported");
                assert_eq!(error.raw_os_error(), Some(errno), "{stage:?}");
                assert_eq!(std::fs::read(&path).unwrap(), before, "{stage:?} {errno}");
                assert!(!dir.path().join("record.json.tmp").exists(), "{stage:?}");
            }
        }
        write_private(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }
}
