//! Unit tests of the loader: value checks, and `load_inner` with an explicit
//! environment (no process environment is touched).

mod layers;
mod tokens;
mod values;

use super::*;
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

const TOKEN: &str = "s3cr3t-TOKEN-value";

/// A temporary directory for files and an environment of its own, so that
/// each test loads with exactly the layers it sets up.
struct Fixture {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut env = HashMap::new();
        env.insert("NIXFLEET_URL".into(), "ws://127.0.0.1:9/ws".into());
        env.insert("NIXFLEET_REPO_DIR".into(), "/srv/fleet".into());
        Fixture { dir, env }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, content: &str, mode: u32) -> PathBuf {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn set(&mut self, key: &str, value: impl Into<String>) {
        self.env.insert(key.into(), value.into());
    }

    fn load(&self, cli: &Cli) -> Result<Config, ConfigError> {
        let env = |k: &str| self.env.get(k).cloned();
        load_inner(cli, &env, Some("testhost".into()))
    }

    fn error(&self, cli: &Cli) -> String {
        match self.load(cli) {
            Ok(_) => panic!("expected an error"),
            Err(e) => {
                assert!(!e.0.contains('\n'));
                assert!(!e.0.contains(TOKEN), "{}", e.0);
                e.0
            }
        }
    }
}
