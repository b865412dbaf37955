//! The configuration loader through the real binary: `--check-config` with a
//! cleared environment, temporary config files, token files and a fake
//! `$CREDENTIALS_DIRECTORY`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_nixfleet-agent");
/// Distinctive, so any leak into stdout/stderr is caught.
const TOKEN: &str = "s3cr3t-TOKEN-value";

// The tests, in two modules: configurations that load, and those that
// must not; the sandbox below serves both.
#[path = "config/bad.rs"]
mod bad;
#[path = "config/good.rs"]
mod good;

/// A temporary directory with fixtures, plus the environment and arguments
/// of one run. The environment starts valid; cases break it.
struct Sandbox {
    dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
    args: Vec<String>,
}

impl Sandbox {
    /// Fixtures: `token` (0600), `token2` (0600), `empty_token`, `a_dir/`,
    /// `dangling` (symlink to nowhere), `repo/`; no environment.
    fn bare() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let s = Sandbox {
            dir,
            env: BTreeMap::new(),
            args: Vec::new(),
        };
        s.write("token", &format!("{TOKEN}\n"), 0o600);
        s.write("token2", &format!("  {TOKEN}  \n"), 0o600);
        s.write("empty_token", " \n", 0o600);
        fs::create_dir(s.dir.path().join("a_dir")).unwrap();
        fs::create_dir(s.dir.path().join("repo")).unwrap();
        std::os::unix::fs::symlink(s.dir.path().join("nowhere"), s.dir.path().join("dangling"))
            .unwrap();
        s
    }

    /// A valid configuration, entirely from the environment.
    fn valid() -> Sandbox {
        let mut s = Sandbox::bare();
        s.set("NIXFLEET_URL", "ws://127.0.0.1:9/ws");
        s.set("NIXFLEET_TOKEN", TOKEN);
        s.set("NIXFLEET_REPO_DIR", &s.p("repo"));
        s.set("NIXFLEET_HOSTNAME", "testhost");
        s.set("NIXFLEET_STATE_DIR", &s.p("state"));
        // Not configuration keys: ignored, not rejected.
        s.set("NIXFLEET_TEST_HOOK", "1");
        s
    }

    /// Path of `name` inside the sandbox.
    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    /// Replaces `{dir}` with the sandbox directory.
    fn expand(&self, text: &str) -> String {
        text.replace("{dir}", self.dir.path().to_str().unwrap())
    }

    fn write(&self, name: &str, content: &str, mode: u32) {
        let path = self.dir.path().join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn set(&mut self, key: &str, value: &str) {
        self.env.insert(key.to_owned(), value.to_owned());
    }

    fn unset(&mut self, key: &str) {
        self.env.remove(key);
    }

    fn arg(&mut self, arg: &str) {
        self.args.push(self.expand(arg));
    }

    /// Writes `agent.toml` (with `{dir}` expanded) and passes `--config`.
    fn file(&mut self, toml: &str) {
        self.write("agent.toml", &self.expand(toml), 0o600);
        let path = self.p("agent.toml");
        self.arg("--config");
        self.args.push(path);
    }

    /// Writes credential `name` and sets `$CREDENTIALS_DIRECTORY`.
    fn cred(&mut self, name: &str, content: &str) {
        self.write(&format!("creds/{name}"), content, 0o600);
        let dir = self.p("creds");
        self.set("CREDENTIALS_DIRECTORY", &dir);
    }

    fn run_with(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .args(&self.args)
            .env_clear()
            .envs(&self.env)
            .output()
            .unwrap()
    }

    fn check(&self) -> Output {
        self.run_with(&["--check-config"])
    }

    /// Runs `--check-config`, expects success, returns stdout.
    fn ok(&self) -> String {
        let out = self.check();
        let (stdout, stderr) = texts(&out);
        assert_eq!(
            out.status.code(),
            Some(0),
            "stdout: {stdout}\nstderr: {stderr}"
        );
        assert!(stderr.is_empty(), "stderr: {stderr}");
        assert!(!stdout.contains(TOKEN), "{stdout}");
        stdout
    }
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The rendered line for `key`.
fn line<'a>(stdout: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key} = ");
    stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {key} line in:\n{stdout}"))
}
