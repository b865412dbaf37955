//! `load_inner` with an explicit environment: where the token comes from,
//! and that no error or warning ever carries it.

use super::{Fixture, TOKEN};
use crate::config::*;
use secrecy::ExposeSecret;
use std::fs;

#[test]
fn token_precedence_by_value() {
    let mut f = Fixture::new();
    let tf_env = f.write("env-token", "from-env-file\n", 0o600);
    let tf_flag = f.write("flag-token", "  from-flag-file  \n", 0o600);
    let creds = f.path("creds");
    f.write("creds/token", "from-credential\n", 0o600);
    let file = f.write("agent.toml", "token = \"from-config-file\"\n", 0o600);
    f.set("NIXFLEET_CONFIG", file.to_str().unwrap());

    let token = |f: &Fixture, cli: &Cli| {
        let c = f.load(cli).unwrap();
        (c.token.expose_secret().to_owned(), c.token_source)
    };
    let cli = Cli::default();
    assert_eq!(token(&f, &cli).0, "from-config-file");

    // env token_file beats the file's inline token
    f.set("NIXFLEET_TOKEN_FILE", tf_env.to_str().unwrap());
    let (t, src) = token(&f, &cli);
    assert_eq!(t, "from-env-file");
    assert_eq!(
        src,
        TokenSource::File {
            path: tf_env.clone(),
            origin: "environment variable NIXFLEET_TOKEN_FILE".into()
        }
    );

    // the credential beats the environment
    f.set("CREDENTIALS_DIRECTORY", creds.to_str().unwrap());
    let (t, src) = token(&f, &cli);
    assert_eq!(t, "from-credential");
    assert_eq!(
        src,
        TokenSource::Credential {
            path: creds.join("token")
        }
    );

    // --token-file beats the credential, and is trimmed
    let cli = Cli {
        token_file: Some(tf_flag.clone()),
        ..Cli::default()
    };
    let (t, src) = token(&f, &cli);
    assert_eq!(t, "from-flag-file");
    assert_eq!(src.path(), Some(tf_flag.as_path()));
}

#[test]
fn inline_env_token_beats_file_token_file() {
    let mut f = Fixture::new();
    let tf = f.write("tok", "from-token-file", 0o600);
    let file = f.write(
        "agent.toml",
        &format!("token_file = {}\n", toml_str(tf.to_str().unwrap())),
        0o600,
    );
    f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
    f.set("NIXFLEET_TOKEN", "from-env-inline");
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(c.token.expose_secret(), "from-env-inline");
}

#[test]
fn token_and_token_file_in_one_layer() {
    let mut f = Fixture::new();
    let tf = f.write("tok", TOKEN, 0o600);
    f.set("NIXFLEET_TOKEN", TOKEN);
    f.set("NIXFLEET_TOKEN_FILE", tf.to_str().unwrap());
    let e = f.error(&Cli::default());
    assert!(e.contains("set only one of token and token_file"), "{e}");
    assert!(e.contains("NIXFLEET_TOKEN_FILE"), "{e}");
}

#[test]
fn token_file_problems_name_key_and_source() {
    let mut f = Fixture::new();
    f.write("empty", "  \n", 0o600);
    fs::create_dir(f.path("adir")).unwrap();
    std::os::unix::fs::symlink(f.path("nowhere"), f.path("dangling")).unwrap();
    for (name, expect) in [
        ("empty", "empty"),
        ("missing", "No such file"),
        ("adir", "directory"),
        ("dangling", "No such file"),
    ] {
        let cli = Cli {
            token_file: Some(f.path(name)),
            ..Cli::default()
        };
        let e = f.error(&cli);
        assert!(e.contains("token_file = "), "{e}");
        assert!(e.contains("flag --token-file"), "{e}");
        assert!(e.contains(expect), "{e}");
    }
    f.set("NIXFLEET_TOKEN_FILE", f.path("empty").to_str().unwrap());
    let e = f.error(&Cli::default());
    assert!(
        e.contains("(from environment variable NIXFLEET_TOKEN_FILE)"),
        "{e}"
    );
}

#[test]
fn loose_token_file_permissions_warn_without_content() {
    let mut f = Fixture::new();
    let tf = f.write("tok", TOKEN, 0o644);
    f.set("NIXFLEET_TOKEN_FILE", tf.to_str().unwrap());
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].contains(tf.to_str().unwrap()));
    assert!(c.warnings[0].contains("0644"));
    assert!(!c.warnings[0].contains(TOKEN));
    assert!(!c.render().contains(TOKEN));
}

#[test]
fn world_readable_config_file_holding_the_token_warns() {
    let mut f = Fixture::new();
    let file = f.write("agent.toml", &format!("token = \"{TOKEN}\"\n"), 0o444);
    f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
    let c = f.load(&Cli::default()).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].contains("config file holding the token"));
    assert!(c.warnings[0].contains(file.to_str().unwrap()));
    assert!(!c.warnings[0].contains(TOKEN));
}

#[test]
fn type_errors_never_echo_the_token() {
    let mut f = Fixture::new();
    let file = f.write("agent.toml", "token = 987654321\n", 0o600);
    f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
    let e = f.error(&Cli::default());
    assert!(e.contains("token (from "), "{e}");
    assert!(e.contains(file.to_str().unwrap()), "{e}");
    assert!(!e.contains("987654321"), "{e}");

    let file = f.write("agent2.toml", "url = 5\n", 0o600);
    f.set("NIXFLEET_CONFIG", file.to_str().unwrap());
    f.env.remove("NIXFLEET_URL");
    f.set("NIXFLEET_TOKEN", TOKEN);
    let e = f.error(&Cli::default());
    assert!(e.contains("url = 5 (from "), "{e}");
    assert!(e.contains("expected a string"), "{e}");
}

#[test]
fn url_holding_the_token_is_rejected_without_echo() {
    let mut f = Fixture::new();
    f.set("NIXFLEET_TOKEN", TOKEN);
    f.set("NIXFLEET_URL", format!("wss://host/ws?token={TOKEN}"));
    let e = f.error(&Cli::default());
    assert!(
        e.contains("url (from environment variable NIXFLEET_URL)"),
        "{e}"
    );
    f.set("NIXFLEET_URL", format!("http://host/ws?token={TOKEN}"));
    let e = f.error(&Cli::default());
    assert!(e.contains("unsupported scheme"), "{e}");
}
