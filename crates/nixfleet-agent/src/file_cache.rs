//! Values derived from small files (the repository's HEAD, the NixOS
//! version, a lock file's hash), recomputed only when one of the files they
//! were read from changed.
//!
//! A heartbeat reports such values every few seconds on every host, and they
//! change a few times a day. Checking a file's metadata is one `statx` and
//! no allocation; reading and parsing it is several system calls and
//! allocations. So a [`Derived`] value remembers the metadata of every path
//! its computation looked at, absent ones included, and recomputes only
//! when one of them differs.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A file modified this recently may still be written to within the same
/// timestamp tick without its metadata changing: a value read from it is
/// recomputed once more on the next use (git's "racily clean" rule).
const SETTLING_TIME: Duration = Duration::from_secs(2);

#[cfg(test)]
thread_local! {
    /// How many times this thread looked at a file's metadata, for tests of
    /// what an idle heartbeat costs.
    pub static METADATA_LOOKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The metadata of `path` (following symlinks): every look at a file that
/// a derived value depends on goes through here.
fn metadata_of(path: &Path) -> Option<Metadata> {
    #[cfg(test)]
    METADATA_LOOKS.with(|looks| looks.set(looks.get() + 1));
    std::fs::metadata(path).ok()
}

/// What a file's metadata says about its content. Replacing a file (git
/// and Nix write aside and rename) changes the inode; writing in place
/// changes the size or the modification and change times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The stamp of `path` (following symlinks), `None` when it cannot be
    /// read (absent, no permission).
    pub fn of(path: &Path) -> Option<Stamp> {
        metadata_of(path).map(|m| Stamp::from(&m))
    }

    fn modified(&self) -> SystemTime {
        let (secs, nanos) = self.mtime;
        match u64::try_from(secs) {
            Ok(secs) => SystemTime::UNIX_EPOCH + Duration::new(secs, nanos as u32),
            Err(_) => SystemTime::UNIX_EPOCH,
        }
    }
}

impl From<&Metadata> for Stamp {
    fn from(m: &Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// A value computed from files, kept until any of them changes.
#[derive(Debug)]
pub struct Derived<T> {
    value: Option<T>,
    inputs: Vec<(PathBuf, Option<Stamp>)>,
    /// An input was modified within [`SETTLING_TIME`] of being read.
    settling: bool,
    /// How many times the value was computed: its inputs may have changed.
    computations: u64,
}

impl<T> Default for Derived<T> {
    fn default() -> Self {
        Derived {
            value: None,
            inputs: Vec::new(),
            settling: false,
            computations: 0,
        }
    }
}

impl<T> Derived<T> {
    /// The value; `compute` runs the first time and whenever a file it read
    /// (through [`Reads`]) last time has changed since.
    pub fn get(&mut self, compute: impl FnOnce(&mut Reads<'_>) -> T) -> &T {
        self.refresh(true, compute);
        self.value.as_ref().expect("computed by refresh")
    }

    /// Like [`Derived::get`], but trusts the cached value without looking
    /// at its files when the caller knows none of them changed
    /// (`maybe_changed` false, from [`crate::file_watch`]); a settling value
    /// is checked regardless.
    pub fn refresh(&mut self, maybe_changed: bool, compute: impl FnOnce(&mut Reads<'_>) -> T) {
        let stale = match self.value {
            None => true,
            Some(_) if self.settling => true,
            Some(_) => maybe_changed && !self.inputs_unchanged(),
        };
        if stale {
            self.inputs.clear();
            let mut reads = Reads {
                inputs: &mut self.inputs,
                settling: false,
                now: SystemTime::now(),
            };
            let value = compute(&mut reads);
            self.settling = reads.settling;
            self.value = Some(value);
            self.computations += 1;
        }
    }

    /// The value as last computed.
    pub fn value(&self) -> Option<&T> {
        self.value.as_ref()
    }

    /// Every path the last computation looked at, present or not.
    pub fn inputs(&self) -> impl Iterator<Item = &Path> {
        self.inputs.iter().map(|(path, _)| path.as_path())
    }

    /// Grows whenever the value is computed (and so its inputs may differ).
    pub fn computations(&self) -> u64 {
        self.computations
    }

    fn inputs_unchanged(&self) -> bool {
        self.inputs
            .iter()
            .all(|(path, stamp)| Stamp::of(path) == *stamp)
    }
}

/// The file access of a [`Derived`] computation: every path looked at
/// through it becomes an input of the value.
pub struct Reads<'a> {
    inputs: &'a mut Vec<(PathBuf, Option<Stamp>)>,
    settling: bool,
    now: SystemTime,
}

impl Reads<'_> {
    /// The metadata of `path` (following symlinks).
    pub fn metadata(&mut self, path: &Path) -> Option<Metadata> {
        let metadata = metadata_of(path);
        self.note(path, metadata.as_ref().map(Stamp::from));
        metadata
    }

    /// The whole file as text. The stamp is taken before reading, so a
    /// change during the read is seen on the next use.
    pub fn read_to_string(&mut self, path: &Path) -> Option<String> {
        self.metadata(path)?;
        std::fs::read_to_string(path).ok()
    }

    /// Where `path` leads once every symlink on it is resolved. What it
    /// leads to is the input: a link replaced to lead elsewhere is seen.
    pub fn canonical(&mut self, path: &Path) -> Option<PathBuf> {
        self.metadata(path)?;
        std::fs::canonicalize(path).ok()
    }

    /// An open file, for computations that stream it (hashes).
    pub fn open(&mut self, path: &Path) -> Option<std::fs::File> {
        self.metadata(path)?;
        std::fs::File::open(path).ok()
    }

    fn note(&mut self, path: &Path, stamp: Option<Stamp>) {
        if let Some(stamp) = stamp
            && self
                .now
                .duration_since(stamp.modified())
                .is_ok_and(|age| age < SETTLING_TIME)
        {
            self.settling = true;
        }
        self.inputs.push((path.to_owned(), stamp));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Sets a file's modification time into the past, as if it had been
    /// written long ago (so that it is settled).
    fn age(path: &Path) {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
    }

    #[test]
    fn recomputes_only_when_an_input_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let absent = dir.path().join("absent");
        std::fs::write(&a, "one").unwrap();
        age(&a);
        let runs = Cell::new(0);
        let mut derived = Derived::default();
        let get = |derived: &mut Derived<String>| {
            derived
                .get(|reads| {
                    runs.set(runs.get() + 1);
                    let extra = reads.read_to_string(&absent).unwrap_or_default();
                    reads.read_to_string(&a).unwrap_or_default() + &extra
                })
                .clone()
        };
        assert_eq!(get(&mut derived), "one");
        assert_eq!(get(&mut derived), "one");
        assert_eq!(runs.get(), 1, "unchanged inputs: no recomputation");

        // Replaced by rename, as git and Nix do, with the same size and time.
        let new = dir.path().join("a.new");
        std::fs::write(&new, "two").unwrap();
        age(&new);
        std::fs::rename(&new, &a).unwrap();
        assert_eq!(get(&mut derived), "two");
        assert_eq!(runs.get(), 2);

        // An input that appears.
        std::fs::write(&absent, "!").unwrap();
        age(&absent);
        assert_eq!(get(&mut derived), "two!");
        assert_eq!(get(&mut derived), "two!");
        assert_eq!(runs.get(), 3);

        // An input that disappears.
        std::fs::remove_file(&absent).unwrap();
        assert_eq!(get(&mut derived), "two");
        assert_eq!(runs.get(), 4);
    }

    #[test]
    fn a_freshly_written_input_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, "one").unwrap();
        let runs = Cell::new(0);
        let mut derived = Derived::default();
        let get = |derived: &mut Derived<String>| {
            derived
                .get(|reads| {
                    runs.set(runs.get() + 1);
                    reads.read_to_string(&a).unwrap_or_default()
                })
                .clone()
        };
        assert_eq!(get(&mut derived), "one");
        // Rewritten in place within the same timestamp tick would not change
        // the metadata: a settling input is therefore read again.
        assert_eq!(get(&mut derived), "one");
        assert_eq!(runs.get(), 2);
        age(&a);
        get(&mut derived);
        get(&mut derived);
        assert_eq!(runs.get(), 3, "settled: read once more, then cached");
    }
}
