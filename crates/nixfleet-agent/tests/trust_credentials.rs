//! `repo_url` credentials never reach a command line or `.git/config`
//! (issue 22, item 2), with the real `git` against a real smart-HTTP
//! server (`git http-backend` behind a small server here) that refuses
//! every request without the password.
//!
//! The server holds git's first authenticated request until the test lets
//! it go: while git (and its `git-remote-http`) wait in the middle of the
//! clone or fetch, the test reads every `/proc/<pid>/cmdline` and every file
//! under `repo_dir/.git`. A stand-in `git` first on the agent's PATH also
//! records the argv of every git the agent and its supervisor start.

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

/// What the server's threads share.
struct Shared {
    root: PathBuf,
    git: PathBuf,
    /// `Authorization` header value that is let in.
    expected: String,
    hold: AtomicBool,
    held: tokio::sync::mpsc::UnboundedSender<()>,
    go: Mutex<mpsc::Receiver<()>>,
    authorized: AtomicUsize,
    refused: AtomicUsize,
}

/// A smart-HTTP git server on loopback that wants `user:password`.
struct GitServer {
    port: u16,
    shared: Arc<Shared>,
    held: tokio::sync::mpsc::UnboundedReceiver<()>,
    go: mpsc::Sender<()>,
}

impl GitServer {
    fn start(root: &Path, git: &Path, user: &str, password: &str) -> GitServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (held_tx, held) = tokio::sync::mpsc::unbounded_channel();
        let (go, go_rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            root: root.to_owned(),
            git: git.to_owned(),
            expected: format!("Basic {}", base64(format!("{user}:{password}").as_bytes())),
            hold: AtomicBool::new(false),
            held: held_tx,
            go: Mutex::new(go_rx),
            authorized: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        });
        let accepting = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = accepting.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &shared);
                });
            }
        });
        GitServer {
            port,
            shared,
            held,
            go,
        }
    }

    /// Holds the next authenticated request until [`GitServer::release`].
    fn hold_next(&self) {
        self.shared.hold.store(true, Ordering::SeqCst);
    }

    /// Waits until git's request is held (git is then mid-transfer).
    async fn wait_held(&mut self) {
        tokio::time::timeout(30 * SECOND, self.held.recv())
            .await
            .expect("git reached the server with its credentials")
            .unwrap();
    }

    fn release(&self) {
        self.go.send(()).unwrap();
    }
}

/// One HTTP/1.1 request, answered and closed: 401 without the right
/// `Authorization`, else `git http-backend` as a CGI program.
fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    let length = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let mut stream = stream;
    if headers.get("authorization") != Some(&shared.expected) {
        shared.refused.fetch_add(1, Ordering::SeqCst);
        return stream.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"fleet\"\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    shared.authorized.fetch_add(1, Ordering::SeqCst);
    if shared.hold.swap(false, Ordering::SeqCst) {
        let _ = shared.held.send(());
        let _ = shared.go.lock().unwrap().recv();
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("GET");
    let target = parts.next().unwrap_or("/");
    let response = http_backend(shared, method, target, &headers, &body)?;
    stream.write_all(&response)
}

/// Runs `git http-backend` for one request; returns the HTTP response.
fn http_backend(
    shared: &Shared,
    method: &str,
    target: &str,
    headers: &HashMap<String, String>,
    body: &[u8],
) -> std::io::Result<Vec<u8>> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut command = Command::new(&shared.git);
    command
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_PROJECT_ROOT", &shared.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", "deploy")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    for (header, variable) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "GIT_PROTOCOL"),
    ] {
        if let Some(value) = headers.get(header) {
            command.env(variable, value);
        }
    }
    let mut child = command.spawn()?;
    child.stdin.take().unwrap().write_all(body)?;
    Ok(cgi_to_http(&child.wait_with_output()?.stdout))
}

/// A CGI program's output (headers, a blank line, the body) as an HTTP
/// response.
fn cgi_to_http(out: &[u8]) -> Vec<u8> {
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| (at, at + 4))
        .or_else(|| {
            out.windows(2)
                .position(|w| w == b"\n\n")
                .map(|at| (at, at + 2))
        })
        .unwrap_or((0, 0));
    let mut status = "200 OK".to_owned();
    let mut headers = String::new();
    for line in String::from_utf8_lossy(&out[..split.0]).lines() {
        match line.strip_prefix("Status:") {
            Some(s) => status = s.trim().to_owned(),
            None if !line.is_empty() => headers.push_str(&format!("{line}\r\n")),
            None => {}
        }
    }
    let body = &out[split.1..];
    let mut response = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body);
    response
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Every process whose command line holds `needle`, as `pid: cmdline`.
fn cmdlines_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) {
            found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// Every file under `dir` (recursively) whose bytes hold `needle`.
fn files_with(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_with(&path, needle));
        } else if std::fs::read(&path)
            .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
        {
            found.push(path);
        }
    }
    found
}

/// The password appears on no command line and in no file of the
/// repository; git is running right now (its remote helper has the clean
/// URL on its command line) and has the credentials in its environment.
fn assert_secret_only_in_gits_environment(secret: &str, clean: &str, repo: &Path, when: &str) {
    assert_eq!(cmdlines_with(secret), Vec::<String>::new(), "{when}");
    assert_eq!(
        files_with(&repo.join(".git"), secret),
        Vec::<PathBuf>::new(),
        "{when}"
    );
    let helpers: Vec<String> = cmdlines_with(clean)
        .into_iter()
        .filter(|p| p.contains("remote-http"))
        .collect();
    assert!(!helpers.is_empty(), "{when}: git is not running");
    let pid = helpers[0].split(':').next().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains(&format!("NIXFLEET_GIT_PASSWORD=s3cr3t@{secret}")),
        "{when}: git's environment lacks the password"
    );
}

/// Writes a stand-in `git` into `bin_dir` that appends its argv to
/// `log` (one line per run) and then runs the real git.
fn stand_in_git(bin_dir: &Path, real: &Path, log: &Path) {
    let body = format!(
        "printf '%s ' \"$@\" >> '{log}'\necho >> '{log}'\nexec '{real}' \"$@\"\n",
        log = log.display(),
        real = real.display()
    );
    script(bin_dir, "git", &body);
}

/// The upstream: a working repository and a bare copy served over HTTP.
fn upstream(dir: &Path) -> (PathBuf, PathBuf) {
    let work = dir.join("work");
    std::fs::create_dir(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("flake.nix"), "{ }\n").unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "one"]);
    let served = dir.join("srv");
    std::fs::create_dir(&served).unwrap();
    let bare = served.join("fleet.git");
    git(
        dir,
        &["clone", "-q", "--bare", "work", bare.to_str().unwrap()],
    );
    (work, served)
}

/// A new commit upstream; returns its id.
fn push_commit(work: &Path, served: &Path, text: &str) -> String {
    std::fs::write(work.join("flake.nix"), text).unwrap();
    git(work, &["commit", "-q", "-am", text]);
    let bare = served.join("fleet.git");
    git(work, &["push", "-q", bare.to_str().unwrap(), "main"]);
    git(work, &["rev-parse", "HEAD"])
}

/// Sends `pull`, checks for the secret while git is held mid-transfer,
/// lets it finish; returns the status payload.
async fn pull_checked(
    dashboard: &Dashboard,
    server: &mut GitServer,
    (secret, clean, repo): (&str, &str, &Path),
    n: usize,
    when: &str,
) -> serde_json::Value {
    server.hold_next();
    dashboard.command(dashboard.current_conn().unwrap(), "pull");
    server.wait_held().await;
    assert_secret_only_in_gits_environment(secret, clean, repo, when);
    server.release();
    let status = dashboard.wait_frame("status", n, 30 * SECOND).await;
    status.payload().clone()
}

fn real_git() -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", "command -v git"])
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// An agent in isolated mode on `url`, with no repository yet and the
/// stand-in git; returns it and the stand-in's argv log.
async fn isolated_host(dashboard: &Dashboard, url: &str, real_git: &Path) -> (Agent, PathBuf) {
    let mut options = AgentOptions::new(dashboard.url());
    options.extra_toml.push(format!("repo_url = {url:?}"));
    options.extra_toml.push("branch = \"main\"".into());
    let (agent_dir, bin_dir) = Agent::prepare_to_clone(&options);
    let argv_log = agent_dir.path().join("git-argv.log");
    stand_in_git(&bin_dir, real_git, &argv_log);
    let agent = Agent::spawn(agent_dir, options).await;
    dashboard.wait_frame("register", 1, 10 * SECOND).await;
    (agent, argv_log)
}

/// Over the whole test: every git the agent ran had the clean URL only,
/// and neither the agent's log, its command logs and state, nor the
/// repository hold the secret.
fn assert_never_leaked(agent: &Agent, argv_log: &Path, secret: &str, clean: &str) {
    let argv = std::fs::read_to_string(argv_log).unwrap();
    assert!(!argv.contains(secret), "{argv}");
    let clone = format!("clone --branch main --single-branch -- {clean} ");
    assert!(argv.contains(&clone), "{argv}");
    assert!(
        argv.contains(&format!("remote set-url origin {clean} ")),
        "{argv}"
    );
    assert!(!agent.stderr().contains(secret));
    assert_eq!(files_with(&agent.state_dir, secret), Vec::<PathBuf>::new());
    let git_dir = agent.repo_dir.join(".git");
    assert_eq!(files_with(&git_dir, secret), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn repo_url_credentials_reach_git_only_through_its_environment() {
    let real_git = real_git();
    let dir = tempfile::tempdir().unwrap();
    let (work, served) = upstream(dir.path());
    // Unique, so that no unrelated process or file holds it; `@` is
    // percent-encoded in the URL and decoded for git.
    let secret = format!(
        "Pw{}x{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    );
    let secret: String = secret.chars().filter(char::is_ascii_alphanumeric).collect();
    let password = format!("s3cr3t@{secret}");
    let mut server = GitServer::start(&served, &real_git, "deploy", &password);
    let port = server.port;
    let url = format!("http://deploy:s3cr3t%40{secret}@127.0.0.1:{port}/fleet.git");
    let clean = format!("http://127.0.0.1:{port}/fleet.git");
    let dashboard = Dashboard::start().await;
    let (agent, argv_log) = isolated_host(&dashboard, &url, &real_git).await;
    let repo = agent.repo_dir.clone();
    let checked = (secret.as_str(), clean.as_str(), repo.as_path());

    // The clone.
    let p = pull_checked(&dashboard, &mut server, checked, 1, "during the clone").await;
    assert_eq!(p["status"], "ok", "{p}");
    assert_eq!(git(&repo, &["config", "--get", "remote.origin.url"]), clean);
    assert_eq!(
        std::fs::read_to_string(repo.join("flake.nix")).unwrap(),
        "{ }\n"
    );

    // A fetch of a new commit.
    let second = push_commit(&work, &served, "{ two = 2; }\n");
    let p = pull_checked(&dashboard, &mut server, checked, 2, "during the fetch").await;
    assert_eq!(p["status"], "ok", "{p}");
    assert_eq!(git(&repo, &["rev-parse", "HEAD"]), second);

    // A repository an older agent left with the secret in .git/config is
    // rewritten before the fetch (the scan during it covers .git/config).
    git(&repo, &["config", "remote.origin.url", &url]);
    let third = push_commit(&work, &served, "{ three = 3; }\n");
    let p = pull_checked(&dashboard, &mut server, checked, 3, "after an old config").await;
    assert_eq!(p["status"], "ok", "{p}");
    assert_eq!(git(&repo, &["rev-parse", "HEAD"]), third);
    assert_eq!(git(&repo, &["config", "--get", "remote.origin.url"]), clean);
    let said = dashboard.frames("output").iter().any(|f| {
        f.payload()["line"]
            .as_str()
            .is_some_and(|l| l.contains("holds repo_url's credentials: rewriting it"))
    });
    assert!(said, "the rewrite is said in the command's output");

    assert_never_leaked(&agent, &argv_log, &secret, &clean);
    // The server did want the password, and got it.
    assert!(server.shared.refused.load(Ordering::SeqCst) > 0);
    assert!(server.shared.authorized.load(Ordering::SeqCst) >= 3);
}
