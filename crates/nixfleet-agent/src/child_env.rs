//! The environment every child process of the agent gets: commands, their
//! supervisor, the agent's own git queries. A whitelist: the agent's own
//! secrets (`NIXFLEET_*`, the token, the credentials directory) never
//! reach a child.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;

/// The children's environment, built once and shared.
pub type ChildEnv = Arc<Vec<(OsString, OsString)>>;

/// Variables a child may inherit from the agent. Everything else, notably
/// every `NIXFLEET_*` variable and the token, stays with the agent.
const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LOCALE_ARCHIVE",
    "TZ",
    "TZDIR",
    "SSL_CERT_FILE",
    "NIX_SSL_CERT_FILE",
    "NIX_PATH",
    "NIX_REMOTE",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
];

/// The environment every command runs with.
pub fn child_environment(
    agent_env: impl Iterator<Item = (OsString, OsString)>,
    ssh_key: Option<&Path>,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = agent_env
        .filter(|(key, _)| key.to_str().is_some_and(|k| INHERITED_ENV.contains(&k)))
        .collect();
    let mut set_default = |key: &str, value: &str| {
        if !env.iter().any(|(k, _)| k == key) {
            env.push((key.into(), value.into()));
        }
    };
    set_default(
        "PATH",
        "/run/current-system/sw/bin:/usr/local/bin:/usr/bin:/bin",
    );
    set_default("HOME", "/root");
    set_default("LANG", "C.UTF-8");
    env.push(("GIT_TERMINAL_PROMPT".into(), "0".into()));
    if let Some(key) = ssh_key {
        env.push(("GIT_SSH_COMMAND".into(), git_ssh_command(key).into()));
    }
    env
}

/// git runs `GIT_SSH_COMMAND` through a shell, so the key path is quoted.
/// `accept-new` trusts a host on first contact but refuses changed keys;
/// `no` would accept any key and is never used.
fn git_ssh_command(key: &Path) -> String {
    let quoted = key.to_string_lossy().replace('\'', r"'\''");
    format!("ssh -i '{quoted}' -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_environment_is_a_whitelist() {
        let agent_env = [
            ("PATH", "/bin"),
            ("NIXFLEET_TOKEN", "secret"),
            ("NIXFLEET_URL", "ws://x"),
            ("CREDENTIALS_DIRECTORY", "/run/credentials/x"),
            ("LANG", "de_DE.UTF-8"),
            ("RANDOM_THING", "1"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = child_environment(agent_env.into_iter(), Some(Path::new("/keys/it's")));
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.to_str().unwrap())
        };
        assert_eq!(get("PATH"), Some("/bin"));
        assert_eq!(get("LANG"), Some("de_DE.UTF-8"));
        assert_eq!(get("HOME"), Some("/root"));
        assert_eq!(get("NIXFLEET_TOKEN"), None);
        assert_eq!(get("NIXFLEET_URL"), None);
        assert_eq!(get("CREDENTIALS_DIRECTORY"), None);
        assert_eq!(get("RANDOM_THING"), None);
        assert_eq!(
            get("GIT_SSH_COMMAND"),
            Some(
                r"ssh -i '/keys/it'\''s' -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new"
            )
        );
    }
}
