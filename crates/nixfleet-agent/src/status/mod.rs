//! The v3 status compartments (`update_status` in heartbeats): git, lock,
//! system and tests.
//!
//! Everything here is cheap on purpose: the compartments are re-evaluated
//! from a few small files (git refs, one symlink, one record in
//! `state_dir`), never by evaluating the flake. The one expensive check,
//! the dry-run build behind `refresh-system`, runs as a command (see
//! commands/) and only reports its verdict here.
//!
//! - `git`: HEAD against the last fetched `origin/<branch>` (no network);
//!   `error` while the tip or HEAD is a commit the signature check refused.
//! - `lock`: age of the commit that last changed `flake.lock` (upstream's
//!   thresholds); one `git log` when HEAD or the file changed, else only
//!   arithmetic.
//! - `system`: after every successful switch the agent records which repo
//!   commit produced which `/run/current-system`. `ok` while both still
//!   match, `outdated` when HEAD moved past the built commit or the running
//!   system changed underneath (someone switched by hand).
//! - `tests`: the last `test` command's result, `outdated` after a switch.

use crate::child_env::ChildEnv;
use crate::host_facts::{CURRENT_SYSTEM, current_system, head_commit, resolve_ref};
use crate::protocol::{Check, CheckStatus, UpdateStatus};
use crate::signature::RefusedCommit;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tracing::warn;

mod verdicts;
pub use verdicts::{git_check, lock_check, system_check};

const SYSTEM_RECORD_FILE: &str = "system-record.json";
/// How long the lock's `git log` may take.
const LOCK_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
const DAY: i64 = 24 * 60 * 60;
/// Lock age thresholds (upstream's): up to a week is current, up to a
/// month "consider updating", older "needs update".
const LOCK_OK_DAYS: i64 = 7;
const LOCK_STALE_DAYS: i64 = 30;

/// One of the four compartments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compartment {
    Git,
    Lock,
    System,
    Tests,
}

/// Which repo commit produced which running system, written after every
/// successful switch and every `refresh-system`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemRecord {
    /// Full commit of the repo's HEAD when the system was built.
    pub commit: String,
    /// `/run/current-system`'s target then.
    pub system: String,
    /// Whether that system is what the commit builds (false after a
    /// rollback, or when a dry run found a difference).
    pub matches: bool,
    /// Why it does not match (shown as the message).
    #[serde(default)]
    pub note: String,
}

impl SystemRecord {
    pub fn load(state_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(state_dir.join(SYSTEM_RECORD_FILE)).ok()?).ok()
    }

    pub fn save(&self, state_dir: &Path) {
        if let Err(error) = crate::state_file::save_json(state_dir, SYSTEM_RECORD_FILE, self) {
            warn!(error = %error, path = %state_dir.join(SYSTEM_RECORD_FILE).display(), "cannot record the switched system");
        }
    }
}

pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What identifies the lock's age query: HEAD and the file's stat.
type LockKey = (Option<String>, Option<(u64, i64)>);

fn lock_key(repo_dir: &Path, head: Option<&str>) -> LockKey {
    use std::os::unix::fs::MetadataExt;
    let stat = std::fs::metadata(repo_dir.join("flake.lock"))
        .ok()
        .map(|m| (m.len(), m.mtime()));
    (head.map(str::to_owned), stat)
}

/// The answer of one lock query.
#[derive(Debug)]
pub struct LockAnswer {
    key: LockKey,
    result: Result<Option<i64>, String>,
}

impl LockAnswer {
    /// The answer of a `git log` that ran elsewhere (the `refresh-lock`
    /// check's step), for the repository as it is now.
    pub fn new(repo_dir: &Path, result: Result<Option<i64>, String>) -> Self {
        let key = lock_key(repo_dir, head_commit(repo_dir).as_deref());
        LockAnswer { key, result }
    }

    /// Asks git now (bounded by a timeout).
    pub async fn query(repo_dir: &Path, env: &[(std::ffi::OsString, std::ffi::OsString)]) -> Self {
        let key = lock_key(repo_dir, head_commit(repo_dir).as_deref());
        let result = if key.1.is_none() {
            Ok(None)
        } else {
            lock_commit_time(repo_dir, env).await
        };
        LockAnswer { key, result }
    }

    /// The compartment's verdict, or why there is none.
    pub fn verdict(&self) -> Result<(CheckStatus, String), String> {
        if self.key.1.is_none() {
            return Ok((CheckStatus::Unknown, "flake.lock not found".to_owned()));
        }
        match &self.result {
            Ok(time) => Ok(lock_check(*time, unix_now())),
            Err(why) => Err(why.clone()),
        }
    }
}

/// The unix time of the last commit that changed `flake.lock`, by
/// `git log` (bounded by a timeout). `Ok(None)`: not in the history.
pub async fn lock_commit_time(
    repo_dir: &Path,
    env: &[(std::ffi::OsString, std::ffi::OsString)],
) -> Result<Option<i64>, String> {
    let mut command = tokio::process::Command::new("git");
    command
        .args(["log", "-1", "--format=%ct", "--", "flake.lock"])
        .current_dir(repo_dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(LOCK_QUERY_TIMEOUT, command.output())
        .await
        .map_err(|_| "git log timed out".to_owned())?
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr.lines().next().unwrap_or("").trim();
        return Err(format!("git log failed: {line}"));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.trim().parse().ok())
}

/// A system verdict that stands while HEAD and the running system stay
/// what they were when it was reached.
#[derive(Debug, Clone)]
struct SystemOverride {
    head: Option<String>,
    current: Option<String>,
    check: Check,
}

impl SystemOverride {
    fn new(
        head: Option<String>,
        current: Option<String>,
        status: CheckStatus,
        message: String,
    ) -> Self {
        SystemOverride {
            head,
            current,
            check: Check {
                status,
                message,
                checked_at: rfc3339_now(),
            },
        }
    }
}

/// The compartments, owned by the agent core, published for heartbeats.
pub struct Compartments {
    repo_dir: PathBuf,
    branch: String,
    state_dir: PathBuf,
    child_env: ChildEnv,
    status: UpdateStatus,
    publish: watch::Sender<UpdateStatus>,
    record: Option<SystemRecord>,
    /// A result that stands until HEAD or the running system change (a
    /// failed switch, a failed dry run).
    system_override: Option<SystemOverride>,
    working: Vec<Compartment>,
    lock_key: Option<LockKey>,
    lock_time: Option<Result<Option<i64>, String>>,
    lock_query_running: bool,
    lock_answers: mpsc::Sender<LockAnswer>,
    /// The last commit a signature check refused (read when a command
    /// ends): the git compartment's error while it is the tip or HEAD.
    refused: Option<RefusedCommit>,
    /// An automatic rollback's report: the system compartment's error until
    /// the next successful switch.
    rolled_back: Option<String>,
}

impl Compartments {
    pub fn new(
        repo_dir: PathBuf,
        branch: String,
        state_dir: PathBuf,
        child_env: ChildEnv,
        lock_answers: mpsc::Sender<LockAnswer>,
    ) -> (Self, watch::Receiver<UpdateStatus>) {
        let (publish, receiver) = watch::channel(UpdateStatus::default());
        let record = SystemRecord::load(&state_dir);
        let mut compartments = Compartments {
            repo_dir,
            branch,
            state_dir,
            child_env,
            status: UpdateStatus::default(),
            publish,
            record,
            system_override: None,
            working: Vec::new(),
            lock_key: None,
            lock_time: None,
            lock_query_running: false,
            lock_answers,
            refused: None,
            rolled_back: None,
        };
        compartments.refused = RefusedCommit::load(&compartments.state_dir);
        compartments.tests_set(CheckStatus::Unknown, "no test run since the agent started");
        compartments.reevaluate();
        (compartments, receiver)
    }

    /// Another reader of what is published (the observer's).
    pub fn subscribe(&self) -> watch::Receiver<UpdateStatus> {
        self.publish.subscribe()
    }

    pub fn current(&self) -> &UpdateStatus {
        &self.status
    }

    fn slot(&mut self, which: Compartment) -> &mut Check {
        match which {
            Compartment::Git => &mut self.status.git,
            Compartment::Lock => &mut self.status.lock,
            Compartment::System => &mut self.status.system,
            Compartment::Tests => &mut self.status.tests,
        }
    }

    /// Sets one compartment; `checked_at` moves only when the verdict does,
    /// or when `fresh` says it was checked just now.
    fn set(&mut self, which: Compartment, status: CheckStatus, message: String, fresh: bool) {
        let slot = self.slot(which);
        if fresh || slot.status != status || slot.message != message || slot.checked_at.is_empty() {
            *slot = Check {
                status,
                message,
                checked_at: rfc3339_now(),
            };
        }
    }

    fn tests_set(&mut self, status: CheckStatus, message: &str) {
        self.set(Compartment::Tests, status, message.to_owned(), true);
    }

    fn publish(&self) {
        self.publish.send_if_modified(|published| {
            let changed = *published != self.status;
            if changed {
                *published = self.status.clone();
            }
            changed
        });
    }

    /// A command started working on these compartments.
    pub fn start_working(&mut self, compartments: &[Compartment], message: &str) {
        for &which in compartments {
            if !self.working.contains(&which) {
                self.working.push(which);
            }
            self.set(which, CheckStatus::Working, message.to_owned(), true);
        }
        self.publish();
    }

    /// The command ended: the compartments are evaluated again.
    pub fn stop_working(&mut self) {
        let working = std::mem::take(&mut self.working);
        for which in working {
            // Forces a fresh timestamp below.
            self.slot(which).checked_at.clear();
        }
        self.refused = RefusedCommit::load(&self.state_dir);
        self.reevaluate();
    }

    /// A successful activation (switch, rollback): record what runs now.
    pub fn activated(&mut self, rolled_back: bool) {
        let (Some(commit), Some(system)) = (head_commit(&self.repo_dir), current_system()) else {
            return;
        };
        let record = SystemRecord {
            commit,
            system,
            matches: !rolled_back,
            note: if rolled_back {
                "rolled back to an earlier generation (switch to apply the repo)".to_owned()
            } else {
                String::new()
            },
        };
        record.save(&self.state_dir);
        self.record = Some(record);
        self.system_override = None;
        if !rolled_back {
            self.rolled_back = None;
        }
        self.tests_set(CheckStatus::Outdated, "Tests not run since the last switch");
    }

    /// An unconfirmed switch was rolled back (or the rollback failed): the
    /// system compartment says so until the next successful switch.
    pub fn rolled_back(&mut self, report: &str) {
        self.rolled_back = Some(report.to_owned());
        self.reevaluate();
    }

    /// A switch failed: the system shows the error until HEAD or the running
    /// system change.
    pub fn activation_failed(&mut self, message: &str) {
        self.system_override = Some(SystemOverride::new(
            head_commit(&self.repo_dir),
            current_system(),
            CheckStatus::Error,
            format!("Switch failed: {message}"),
        ));
    }

    /// The verdict of a full dry-run check (`refresh-system`).
    pub fn system_verified(&mut self, verdict: Result<bool, String>) {
        let head = head_commit(&self.repo_dir);
        let current = current_system();
        match (verdict, head, current) {
            (Ok(matches), Some(commit), Some(system)) => {
                let record = SystemRecord {
                    commit,
                    system,
                    matches,
                    note: if matches {
                        String::new()
                    } else {
                        "the repo builds a different system (switch to apply)".to_owned()
                    },
                };
                record.save(&self.state_dir);
                self.record = Some(record);
                self.system_override = None;
            }
            (Ok(_), head, current) => {
                self.system_override = Some(SystemOverride::new(
                    head,
                    current,
                    CheckStatus::Unknown,
                    "no repository HEAD or running system to compare".to_owned(),
                ));
            }
            (Err(why), head, current) => {
                self.system_override =
                    Some(SystemOverride::new(head, current, CheckStatus::Error, why));
            }
        }
    }

    /// The result of a `test` command.
    pub fn tested(&mut self, passed: u32, total: u32, stopped: bool) {
        if stopped {
            self.tests_set(CheckStatus::Error, "Stopped by user");
        } else if total == 0 {
            self.tests_set(CheckStatus::Unknown, "no tests for this host");
        } else if passed == total {
            self.tests_set(CheckStatus::Ok, &format!("{passed}/{total} passed"));
        } else {
            self.tests_set(CheckStatus::Error, &format!("{passed}/{total} passed"));
        }
    }

    /// A lock query ended.
    pub fn on_lock_answer(&mut self, answer: LockAnswer) {
        self.lock_query_running = false;
        self.lock_key = Some(answer.key);
        self.lock_time = Some(answer.result);
        self.reevaluate();
    }

    /// Forgets the cached lock age, so the next evaluation asks git again.
    pub fn forget_lock(&mut self) {
        self.lock_key = None;
    }

    /// Re-reads the cheap facts and publishes what changed. Never blocks:
    /// a lock query that is due runs in a task and answers through the
    /// core.
    pub fn reevaluate(&mut self) {
        let head = head_commit(&self.repo_dir);
        if !self.working.contains(&Compartment::Git) {
            let upstream = resolve_ref(
                &self.repo_dir,
                &format!("refs/remotes/origin/{}", self.branch),
            );
            let refused = self.refused.as_ref().filter(|r| {
                [head.as_deref(), upstream.as_deref()].contains(&Some(r.commit.as_str()))
            });
            let (status, message) = match refused {
                Some(refused) => (CheckStatus::Error, refused.message.clone()),
                None => git_check(head.as_deref(), upstream.as_deref(), &self.branch),
            };
            self.set(Compartment::Git, status, message, false);
        }
        if !self.working.contains(&Compartment::Lock) {
            self.evaluate_lock(head.as_deref());
        }
        if !self.working.contains(&Compartment::System) {
            let current = current_system();
            let standing = self
                .system_override
                .as_ref()
                .filter(|o| o.head == head && o.current == current)
                .map(|o| o.check.clone());
            if let Some(report) = &self.rolled_back {
                let report = report.clone();
                self.set(Compartment::System, CheckStatus::Error, report, false);
            } else if let Some(check) = standing {
                self.set(Compartment::System, check.status, check.message, false);
            } else {
                self.system_override = None;
                let (status, message) =
                    system_check(self.record.as_ref(), head.as_deref(), current.as_deref());
                self.set(Compartment::System, status, message, false);
            }
        }
        self.publish();
    }

    fn evaluate_lock(&mut self, head: Option<&str>) {
        if !self.repo_dir.join("flake.lock").exists() {
            self.set(
                Compartment::Lock,
                CheckStatus::Unknown,
                "flake.lock not found".to_owned(),
                false,
            );
            return;
        }
        let key = lock_key(&self.repo_dir, head);
        if self.lock_key.as_ref() != Some(&key) {
            self.query_lock(key);
        }
        match &self.lock_time {
            Some(Ok(time)) => {
                let (status, message) = lock_check(*time, unix_now());
                self.set(Compartment::Lock, status, message, false);
            }
            Some(Err(why)) => {
                let why = why.clone();
                self.set(Compartment::Lock, CheckStatus::Error, why, false);
            }
            None => {}
        }
    }

    fn query_lock(&mut self, key: LockKey) {
        if self.lock_query_running {
            return;
        }
        self.lock_query_running = true;
        let (repo_dir, env, answers) = (
            self.repo_dir.clone(),
            self.child_env.clone(),
            self.lock_answers.clone(),
        );
        tokio::spawn(async move {
            let mut answer = LockAnswer::query(&repo_dir, &env).await;
            // Cached under the key that asked, so a file that changed
            // meanwhile is asked about again.
            answer.key = key;
            let _ = answers.send(answer).await;
        });
    }
}

#[cfg(test)]
mod tests;
