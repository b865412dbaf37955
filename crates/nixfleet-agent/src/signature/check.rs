//! The hidden mode `nixfleet-agent --verify-commit <tip|head> <repo> <rev>
//! <state_dir> <allowed_signers_file> <gpg_keyring>` (empty for a key not
//! set). It prints what it found as one line (stdout when the commit is
//! accepted, stderr when not: the line the command's status quotes) and
//! exits 0 when the commit may be deployed, 1 when not, 64 (EX_USAGE) on
//! bad arguments: only the agent's own supervisor calls it, so those are a
//! bug of ours, not a user's configuration error.

use super::{RefusedCommit, SigningKeys, Subject, VERIFY_ARG, short};
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};

/// The one file the agent itself changes in the working tree (`update`,
/// `bump-flake`, `force-update`): its inputs are those the signed
/// `flake.nix` names, so a build with it changed is still the signed
/// configuration.
const AGENT_WRITTEN: &str = "flake.lock";
/// Longest quote of git's or gpg's words in a message.
const MAX_QUOTE: usize = 200;

struct Request {
    subject: Subject,
    repo: PathBuf,
    rev: String,
    state_dir: PathBuf,
    keys: SigningKeys,
}

/// Why a commit is not deployed.
enum Refusal {
    /// The commit is refused: the compartment's words and the status line.
    Commit {
        commit: String,
        compartment: String,
        line: String,
    },
    /// Nothing to check, or the check itself could not run.
    Other(String),
}

/// sysexits' EX_USAGE.
const EXIT_USAGE: u8 = 64;

/// Entry point of `nixfleet-agent --verify-commit`.
pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(2).collect();
    let Some(request) = parse(&args) else {
        eprintln!(
            "nixfleet-agent {VERIFY_ARG}: expected <tip|head> <repo> <rev> <state_dir> <allowed_signers_file> <gpg_keyring>"
        );
        return ExitCode::from(EXIT_USAGE);
    };
    match verify(&request) {
        Ok(line) => {
            RefusedCommit::clear(&request.state_dir);
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(Refusal::Commit {
            commit,
            compartment,
            line,
        }) => {
            let record = RefusedCommit {
                commit,
                message: compartment,
            };
            record.save(&request.state_dir);
            eprintln!("{line}");
            ExitCode::FAILURE
        }
        Err(Refusal::Other(line)) => {
            eprintln!("{line}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: &[OsString]) -> Option<Request> {
    let [subject, repo, rev, state_dir, signers, keyring] = args else {
        return None;
    };
    let subject = match subject.to_str()? {
        "tip" => Subject::Tip,
        "head" => Subject::Head,
        _ => return None,
    };
    let optional = |p: &OsString| (!p.is_empty()).then(|| PathBuf::from(p));
    Some(Request {
        subject,
        repo: PathBuf::from(repo),
        rev: rev.to_str()?.to_owned(),
        state_dir: PathBuf::from(state_dir),
        keys: SigningKeys::new(optional(signers), optional(keyring))?,
    })
}

fn verify(request: &Request) -> Result<String, Refusal> {
    let commit = resolve(&request.repo, &request.rev)?;
    if !has_signature(&request.repo, &commit)? {
        let short = short(&commit);
        return Err(Refusal::Commit {
            compartment: format!("unsigned commit {short}"),
            line: format!(
                "commit {short} is not signed; only commits signed by a key in \
                 allowed_signers_file or gpg_keyring are deployed"
            ),
            commit,
        });
    }
    let good = check_signature(request, &commit)?;
    if request.subject == Subject::Head {
        check_working_tree(&request.repo, &commit)?;
    }
    Ok(format!("commit {}: {good}", short(&commit)))
}

/// The full id of the commit `rev` names.
fn resolve(repo: &Path, rev: &str) -> Result<String, Refusal> {
    let spec = format!("{rev}^{{commit}}");
    let output = git(
        repo,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            "--end-of-options",
            &spec,
        ],
    )?;
    let commit = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || commit.is_empty() {
        return Err(Refusal::Other(format!(
            "no commit {rev} to verify in {}",
            repo.display()
        )));
    }
    Ok(commit)
}

/// Whether the commit object carries a signature header at all (so that
/// "unsigned" and "signed by someone else" are told apart).
fn has_signature(repo: &Path, commit: &str) -> Result<bool, Refusal> {
    let output = git(repo, &["cat-file", "commit", commit])?;
    if !output.status.success() {
        return Err(Refusal::Other(format!(
            "cannot read commit {}",
            short(commit)
        )));
    }
    let mut headers = output
        .stdout
        .split(|&b| b == b'\n')
        .take_while(|l| !l.is_empty());
    let signed =
        headers.any(|line| line.starts_with(b"gpgsig ") || line.starts_with(b"gpgsig-sha256 "));
    Ok(signed)
}

/// `git verify-commit` against the configured keys only; on success, git's
/// words about the good signature.
fn check_signature(request: &Request, commit: &str) -> Result<String, Refusal> {
    let home = Scratch::create(&request.state_dir)?;
    if let Some(keyring) = &request.keys.gpg_keyring {
        import_keys(&home.0, keyring)?;
    }
    let signers = request
        .keys
        .allowed_signers
        .as_deref()
        .unwrap_or(Path::new("/dev/null"));
    let signers = format!("gpg.ssh.allowedSignersFile={}", signers.display());
    let output = Command::new("git")
        .args(["-c", "gpg.program=gpg", "-c", "gpg.ssh.program=ssh-keygen"])
        .args([
            "-c",
            "gpg.x509.program=gpgsm",
            "-c",
            "gpg.minTrustLevel=undefined",
        ])
        .args(["-c", &signers, "verify-commit", commit])
        .current_dir(&request.repo)
        .envs(isolated_env(&home.0))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Refusal::Other(format!("cannot run git: {e}")))?;
    let words = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        let good = words
            .lines()
            .find(|l| l.contains("Good"))
            .unwrap_or("good signature");
        return Ok(quote(good.trim_start_matches("gpg: ").trim()));
    }
    let why = words
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let short = short(commit);
    Err(Refusal::Commit {
        commit: commit.to_owned(),
        compartment: format!("commit {short} not signed by an allowed key"),
        line: format!(
            "commit {short} is not signed by a key in allowed_signers_file or gpg_keyring: {}",
            quote(why.trim())
        ),
    })
}

/// git without the global and system configuration, gpg on the scratch
/// home only.
fn isolated_env(home: &Path) -> [(&'static str, OsString); 3] {
    [
        ("GNUPGHOME", home.as_os_str().to_owned()),
        ("GIT_CONFIG_GLOBAL", "/dev/null".into()),
        ("GIT_CONFIG_NOSYSTEM", "1".into()),
    ]
}

/// Imports every key file of `gpg_keyring` (the file, or the regular files
/// of the directory in name order) into the scratch home.
fn import_keys(home: &Path, keyring: &Path) -> Result<(), Refusal> {
    let files = if keyring.is_dir() {
        let entries = fs::read_dir(keyring).map_err(|e| {
            Refusal::Other(format!(
                "cannot read gpg_keyring {}: {e}",
                keyring.display()
            ))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    } else {
        vec![keyring.to_owned()]
    };
    for file in files {
        let output = Command::new("gpg")
            .args(["--batch", "--no-autostart", "--quiet", "--import", "--"])
            .arg(&file)
            .envs(isolated_env(home))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Refusal::Other(format!("cannot run gpg: {e}")))?;
        if !output.status.success() {
            let words = String::from_utf8_lossy(&output.stderr);
            let why = words.lines().last().unwrap_or("").trim().to_owned();
            return Err(Refusal::Other(format!(
                "cannot import gpg_keyring {}: {}",
                file.display(),
                quote(&why)
            )));
        }
    }
    Ok(())
}

/// Before a build: tracked files must be as the commit has them (but for
/// the lock the agent itself updates), or the build would not be the
/// signed configuration.
fn check_working_tree(repo: &Path, commit: &str) -> Result<(), Refusal> {
    let output = git(
        repo,
        &["status", "--porcelain", "-z", "--untracked-files=no"],
    )?;
    if !output.status.success() {
        return Err(Refusal::Other("git status failed in repo_dir".to_owned()));
    }
    let changed: Vec<String> = output
        .stdout
        .split(|&b| b == 0)
        .filter(|entry| entry.len() > 3)
        .map(|entry| String::from_utf8_lossy(&entry[3..]).into_owned())
        .filter(|path| path != AGENT_WRITTEN)
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let short = short(commit);
    Err(Refusal::Commit {
        commit: commit.to_owned(),
        compartment: format!("local changes on commit {short}"),
        line: format!(
            "repo_dir has changes not in the signed commit {short} ({}); only signed commits are deployed",
            quote(&changed.join(", "))
        ),
    })
}

/// A quick git query with the command's environment.
fn git(repo: &Path, args: &[&str]) -> Result<Output, Refusal> {
    Command::new("git")
        .args(args)
        .current_dir(repo)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Refusal::Other(format!("cannot run git: {e}")))
}

fn quote(text: &str) -> String {
    let mut end = text.len().min(MAX_QUOTE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// A private, empty `GNUPGHOME` for one check, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn create(state_dir: &Path) -> Result<Self, Refusal> {
        let dir = state_dir.join(format!("verify-gnupg.{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Refusal::Other(format!("cannot create {}: {e}", dir.display())))?;
        // Nothing may start an agent that would outlive the check.
        let _ = fs::write(dir.join("gpg.conf"), "no-autostart\n");
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
