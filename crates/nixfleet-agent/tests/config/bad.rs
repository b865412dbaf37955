//! Bad configurations: each exits 78 with one stderr line naming the key
//! and its source, and never shows the token.

use super::*;

struct Case {
    name: &'static str,
    setup: fn(&mut Sandbox),
    /// Substrings of the one stderr line (`{dir}` expanded): the key and,
    /// where there is one, the source.
    expect: &'static [&'static str],
    /// Substrings that must appear in neither stdout nor stderr (besides
    /// the token, which is always checked).
    hidden: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "url missing",
        setup: |s| s.unset("NIXFLEET_URL"),
        expect: &["url is required", "NIXFLEET_URL", "--url"],
        hidden: &[],
    },
    Case {
        name: "url empty (env)",
        setup: |s| s.set("NIXFLEET_URL", ""),
        expect: &["url = \"\"", "(from environment variable NIXFLEET_URL)"],
        hidden: &[],
    },
    Case {
        name: "token missing",
        setup: |s| s.unset("NIXFLEET_TOKEN"),
        expect: &["token is required", "token_file"],
        hidden: &[],
    },
    Case {
        name: "repo_dir missing",
        setup: |s| s.unset("NIXFLEET_REPO_DIR"),
        expect: &["repo_dir is required", "NIXFLEET_REPO_DIR"],
        hidden: &[],
    },
    Case {
        name: "token empty (env)",
        setup: |s| s.set("NIXFLEET_TOKEN", ""),
        expect: &["token (from environment variable NIXFLEET_TOKEN)", "empty"],
        hidden: &[],
    },
    Case {
        name: "token blank (file)",
        setup: |s| {
            s.unset("NIXFLEET_TOKEN");
            s.file("token = \"   \"\n");
        },
        expect: &["token (from {dir}/agent.toml)", "empty"],
        hidden: &[],
    },
    Case {
        name: "token wrong type (file)",
        setup: |s| {
            s.unset("NIXFLEET_TOKEN");
            s.file("token = 987654321\n");
        },
        expect: &["token (from {dir}/agent.toml)", "expected a string"],
        hidden: &["987654321"],
    },
    Case {
        name: "token and token_file in the same file",
        setup: |s| {
            s.unset("NIXFLEET_TOKEN");
            s.file(&format!(
                "token = \"{TOKEN}\"\ntoken_file = \"{{dir}}/token\"\n"
            ));
        },
        expect: &["set only one of token and token_file", "{dir}/agent.toml"],
        hidden: &[],
    },
    Case {
        name: "token file empty (env)",
        setup: |s| {
            s.unset("NIXFLEET_TOKEN");
            let path = s.p("empty_token");
            s.set("NIXFLEET_TOKEN_FILE", &path);
        },
        expect: &[
            "token_file = \"{dir}/empty_token\"",
            "(from environment variable NIXFLEET_TOKEN_FILE)",
            "empty",
        ],
        hidden: &[],
    },
    Case {
        name: "token file missing (file)",
        setup: |s| {
            s.unset("NIXFLEET_TOKEN");
            s.file("token_file = \"{dir}/nope\"\n");
        },
        expect: &["token_file = \"{dir}/nope\"", "(from {dir}/agent.toml)"],
        hidden: &[],
    },
    Case {
        name: "token file is a directory (flag)",
        setup: |s| s.arg("--token-file={dir}/a_dir"),
        expect: &[
            "token_file = \"{dir}/a_dir\"",
            "(from flag --token-file)",
            "directory",
        ],
        hidden: &[],
    },
    Case {
        name: "token file is a dangling symlink (flag)",
        setup: |s| s.arg("--token-file={dir}/dangling"),
        expect: &[
            "token_file = \"{dir}/dangling\"",
            "(from flag --token-file)",
        ],
        hidden: &[],
    },
    Case {
        name: "token credential empty",
        setup: |s| s.cred("token", "\n"),
        expect: &["token (from systemd credential {dir}/creds/token)", "empty"],
        hidden: &[],
    },
    Case {
        name: "token credential is a directory",
        setup: |s| {
            fs::create_dir_all(s.dir.path().join("creds/token")).unwrap();
            let dir = s.p("creds");
            s.set("CREDENTIALS_DIRECTORY", &dir);
        },
        expect: &[
            "token (from systemd credential {dir}/creds/token)",
            "directory",
        ],
        hidden: &[],
    },
    Case {
        name: "token credential holds two words",
        setup: |s| s.cred("token", &format!("{TOKEN} {TOKEN}\n")),
        expect: &[
            "token (from systemd credential {dir}/creds/token)",
            "whitespace",
        ],
        hidden: &[],
    },
    Case {
        name: "url wrong type (file)",
        setup: |s| {
            s.unset("NIXFLEET_URL");
            s.file("url = 5\n");
        },
        expect: &["url = 5 (from {dir}/agent.toml)", "expected a string"],
        hidden: &[],
    },
    Case {
        name: "branch wrong type (file)",
        setup: |s| s.file("branch = true\n"),
        expect: &["branch = true (from {dir}/agent.toml)"],
        hidden: &[],
    },
    Case {
        name: "url http scheme (env)",
        setup: |s| s.set("NIXFLEET_URL", "http://127.0.0.1:9/ws"),
        expect: &[
            "url = \"http://127.0.0.1:9/ws\"",
            "(from environment variable NIXFLEET_URL)",
            "ws://",
        ],
        hidden: &[],
    },
    Case {
        name: "url with userinfo (env)",
        setup: |s| {
            s.set(
                "NIXFLEET_URL",
                &format!("wss://agent:{TOKEN}@dash.example/ws"),
            )
        },
        expect: &[
            "url = ",
            "(from environment variable NIXFLEET_URL)",
            "credentials",
        ],
        hidden: &["wss://agent"],
    },
    Case {
        name: "url carrying the token (flag)",
        setup: |s| s.arg(&format!("--url=wss://dash.example/ws?token={TOKEN}")),
        expect: &["url (from flag --url)", "token"],
        hidden: &[],
    },
    Case {
        name: "unknown key (file)",
        setup: |s| s.file("foo = 1\n"),
        expect: &["unknown key \"foo\" in {dir}/agent.toml"],
        hidden: &[],
    },
    Case {
        name: "misspelt key with the token (file)",
        setup: |s| s.file(&format!("tokne = \"{TOKEN}\"\n")),
        expect: &[
            "unknown key \"tokne\" in {dir}/agent.toml",
            "did you mean token",
        ],
        hidden: &[],
    },
    Case {
        name: "interval zero (file)",
        setup: |s| s.file("interval = 0\n"),
        expect: &["interval = 0 (from {dir}/agent.toml)", "at least 1"],
        hidden: &[],
    },
    Case {
        name: "interval negative (env)",
        setup: |s| s.set("NIXFLEET_INTERVAL", "-5"),
        expect: &[
            "interval = \"-5\" (from environment variable NIXFLEET_INTERVAL)",
            "negative",
        ],
        hidden: &[],
    },
    Case {
        name: "interval negative (file)",
        setup: |s| s.file("interval = -5\n"),
        expect: &["interval = -5 (from {dir}/agent.toml)"],
        hidden: &[],
    },
    Case {
        name: "interval huge (file)",
        setup: |s| s.file("interval = 10000000\n"),
        expect: &[
            "interval = 10000000 (from {dir}/agent.toml)",
            "at most 86400",
        ],
        hidden: &[],
    },
    Case {
        name: "interval huge duration string (flag)",
        setup: |s| s.arg("--interval=100000d"),
        expect: &["interval = \"100000d\" (from flag --interval)"],
        hidden: &[],
    },
    Case {
        name: "interval fractional (file)",
        setup: |s| s.file("interval = 1.5\n"),
        expect: &["interval = 1.5 (from {dir}/agent.toml)", "whole"],
        hidden: &[],
    },
    Case {
        name: "interval bad duration string (env)",
        setup: |s| s.set("NIXFLEET_INTERVAL", "abc"),
        expect: &[
            "interval = \"abc\" (from environment variable NIXFLEET_INTERVAL): expected whole seconds ≥ 1 like 30 or \"2m\"",
        ],
        hidden: &[],
    },
    Case {
        name: "ping_interval sub-second (file)",
        setup: |s| s.file("ping_interval = \"1500ms\"\n"),
        expect: &[
            "ping_interval = \"1500ms\" (from {dir}/agent.toml)",
            "whole",
        ],
        hidden: &[],
    },
    Case {
        name: "ping_timeout not above ping_interval (file)",
        setup: |s| s.file("ping_interval = 30\nping_timeout = \"30s\"\n"),
        expect: &[
            "ping_timeout = 30 (from {dir}/agent.toml)",
            "greater than ping_interval",
        ],
        hidden: &[],
    },
    Case {
        name: "stop_grace negative (env)",
        setup: |s| s.set("NIXFLEET_STOP_GRACE", "-1"),
        expect: &["stop_grace = \"-1\" (from environment variable NIXFLEET_STOP_GRACE)"],
        hidden: &[],
    },
    Case {
        name: "backoff_max zero (file)",
        setup: |s| s.file("backoff_max = \"0s\"\n"),
        expect: &["backoff_max = \"0s\" (from {dir}/agent.toml)"],
        hidden: &[],
    },
    Case {
        name: "metrics unknown (flag)",
        setup: |s| s.arg("--metrics=bogus"),
        expect: &[
            "metrics = \"bogus\" (from flag --metrics)",
            "auto, stasysmo, proc, none",
        ],
        hidden: &[],
    },
    Case {
        name: "log_level unknown (env)",
        setup: |s| s.set("NIXFLEET_LOG_LEVEL", "verbose"),
        expect: &["log_level = \"verbose\" (from environment variable NIXFLEET_LOG_LEVEL)"],
        hidden: &[],
    },
    Case {
        name: "log_level bad filter (file)",
        setup: |s| s.file("log_level = \"info,hyper=loud\"\n"),
        expect: &["log_level = \"info,hyper=loud\" (from {dir}/agent.toml)"],
        hidden: &[],
    },
    Case {
        name: "hostname leading dash (flag)",
        setup: |s| s.arg("--hostname=-evil"),
        expect: &["hostname = \"-evil\" (from flag --hostname)"],
        hidden: &[],
    },
    Case {
        name: "hostname with a slash (file)",
        setup: |s| {
            s.unset("NIXFLEET_HOSTNAME");
            s.file("hostname = \"web/01\"\n");
        },
        expect: &["hostname = \"web/01\" (from {dir}/agent.toml)"],
        hidden: &[],
    },
    Case {
        name: "branch with .. (env)",
        setup: |s| s.set("NIXFLEET_BRANCH", "main..evil"),
        expect: &["branch = \"main..evil\" (from environment variable NIXFLEET_BRANCH)"],
        hidden: &[],
    },
    Case {
        name: "branch looking like an option (flag)",
        setup: |s| s.arg("--branch=--upload-pack=touch /tmp/x"),
        expect: &["branch = \"--upload-pack=touch /tmp/x\" (from flag --branch)"],
        hidden: &[],
    },
    Case {
        name: "repo_url looking like an option (file)",
        setup: |s| s.file("repo_url = \"-oProxyCommand=sh\"\n"),
        expect: &["repo_url = \"-oProxyCommand=sh\" (from {dir}/agent.toml)"],
        hidden: &[],
    },
    Case {
        name: "config file missing (flag)",
        setup: |s| s.arg("--config={dir}/missing.toml"),
        expect: &["config file {dir}/missing.toml", "flag --config"],
        hidden: &[],
    },
    Case {
        name: "config file missing (env)",
        setup: |s| {
            let path = s.p("missing.toml");
            s.set("NIXFLEET_CONFIG", &path);
        },
        expect: &["config file {dir}/missing.toml", "NIXFLEET_CONFIG"],
        hidden: &[],
    },
    Case {
        name: "config file is a directory",
        setup: |s| s.arg("--config={dir}/a_dir"),
        expect: &["config file {dir}/a_dir", "flag --config", "directory"],
        hidden: &[],
    },
    Case {
        name: "invalid TOML holding the token",
        setup: |s| s.file(&format!("url = \"ws://h/ws\"\ntoken = \"{TOKEN}\n")),
        expect: &["config file {dir}/agent.toml is not valid TOML", "line 2"],
        hidden: &[],
    },
    Case {
        name: "ca_file missing (env)",
        setup: |s| {
            let path = s.p("nope.pem");
            s.set("NIXFLEET_CA_FILE", &path);
        },
        expect: &["ca_file = \"{dir}/nope.pem\" (from environment variable NIXFLEET_CA_FILE)"],
        hidden: &[],
    },
    Case {
        name: "ca_file is a directory (flag)",
        setup: |s| s.arg("--ca-file={dir}/a_dir"),
        expect: &[
            "ca_file = \"{dir}/a_dir\" (from flag --ca-file)",
            "directory",
        ],
        hidden: &[],
    },
];

/// Runs one bad case; returns a description of what went wrong, if anything.
fn run_case(case: &Case) -> Option<String> {
    let mut s = Sandbox::valid();
    (case.setup)(&mut s);
    let out = s.check();
    let (stdout, stderr) = texts(&out);
    // Shown with --nocapture: handy to review the messages.
    println!("{:<45} {}", case.name, stderr.trim_end());
    let mut problems = Vec::new();
    if out.status.code() != Some(78) {
        problems.push(format!("exit status {:?}, expected 78", out.status.code()));
    }
    if !stdout.is_empty() {
        problems.push("stdout is not empty".to_owned());
    }
    if !(stderr.ends_with('\n') && stderr.matches('\n').count() == 1) {
        problems.push("stderr is not exactly one line".to_owned());
    }
    if !stderr.starts_with("nixfleet-agent: config error: ") {
        problems.push("stderr does not start with \"nixfleet-agent: config error: \"".to_owned());
    }
    for expected in case.expect {
        let expected = s.expand(expected);
        if !stderr.contains(&expected) {
            problems.push(format!("stderr lacks {expected:?}"));
        }
    }
    for hidden in case.hidden.iter().chain(&[TOKEN]) {
        if stdout.contains(hidden) || stderr.contains(hidden) {
            problems.push(format!("output reveals {hidden:?}"));
        }
    }
    if problems.is_empty() {
        None
    } else {
        Some(format!(
            "{}: {}\n    stderr: {stderr:?}\n    stdout: {stdout:?}",
            case.name,
            problems.join("; ")
        ))
    }
}

#[test]
fn bad_configurations_exit_78_with_one_line_naming_key_and_source() {
    assert!(CASES.len() >= 20);
    // The starting point of every case is valid.
    Sandbox::valid().ok();
    let failures: Vec<String> = CASES.iter().filter_map(run_case).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn unreadable_token_file() {
    // Root reads mode-000 files, and tests may run as root: only assert the
    // error when the file really is unreadable to us (the directory and
    // dangling-symlink cases above cover unreadable files for root too).
    let mut s = Sandbox::valid();
    s.write("locked_token", TOKEN, 0o000);
    s.arg("--token-file={dir}/locked_token");
    if fs::File::open(s.p("locked_token")).is_ok() {
        eprintln!("running as root: a mode-000 token file is readable; checking it loads");
        let out = s.ok();
        assert!(line(&out, "token").contains("locked_token"), "{out}");
        return;
    }
    let out = s.check();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert_eq!(stderr.matches('\n').count(), 1, "{stderr}");
    assert!(stderr.contains("token_file = "), "{stderr}");
    assert!(stderr.contains("(from flag --token-file)"), "{stderr}");
    assert!(stderr.contains("ermission denied"), "{stderr}");
    assert!(!stdout.contains(TOKEN) && !stderr.contains(TOKEN));
}
