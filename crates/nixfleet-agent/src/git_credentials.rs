//! `repo_url`'s credentials (`https://user:secret@host/…`) reach git
//! through its environment only. On a command line they would be readable
//! by every local user (`ps`, `/proc/<pid>/cmdline`), and in `.git/config`
//! by anyone who can read the repository; a process's environment is
//! readable only by its own user and root. So git is given the URL without
//! them ([`clean_url`]), and a credential helper that prints them from its
//! environment answers git when the server asks ([`credential_env`]).
//!
//! Not `url.<with credentials>.insteadOf <without>`, which looks simpler:
//! git hands the rewritten URL, secret included, to its remote helper on
//! the command line (`git remote-https origin https://user:secret@…`).

use crate::redact::secret_user_info;

/// The helper git runs (through `sh -c`, as for every `!` helper). Constant
/// text: the credentials are only ever in its environment, never spliced
/// into the script. It answers `get` and ignores `store` and `erase`, so
/// nothing is written anywhere.
const HELPER: &str = "!f() { test \"$1\" = get || return 0; \
     printf 'username=%s\\npassword=%s\\n' \"$NIXFLEET_GIT_USERNAME\" \"$NIXFLEET_GIT_PASSWORD\"; }; f";

/// Where the helper finds the credentials.
const USERNAME_VAR: &str = "NIXFLEET_GIT_USERNAME";
const PASSWORD_VAR: &str = "NIXFLEET_GIT_PASSWORD";

/// A URL whose user info is secret, taken apart.
struct Parts<'a> {
    /// Lower-case scheme; empty for scp-like syntax (`user:pw@host:path`).
    scheme: String,
    user: &'a str,
    password: Option<&'a str>,
    /// The URL before the user info and after its `@`.
    before: &'a str,
    after: &'a str,
}

fn parts(url: &str) -> Option<Parts<'_>> {
    let range = secret_user_info(url)?;
    let scheme = url
        .find("://")
        .map_or(String::new(), |end| url[..end].to_ascii_lowercase());
    let user_info = &url[range.clone()];
    let (user, password) = match user_info.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (user_info, None),
    };
    Some(Parts {
        scheme,
        user,
        password,
        before: &url[..range.start],
        after: &url[range.end + 1..],
    })
}

/// Whether git asks a credential helper for this scheme's credentials.
fn is_http(scheme: &str) -> bool {
    scheme == "http" || scheme == "https"
}

/// The URL git is given: without its secret. For http(s) the whole user
/// info goes (the user name may be the token; the helper supplies both);
/// for other schemes only the password, which ssh never uses anyway (it
/// authenticates with keys), so `ssh://git:pw@host/…` becomes
/// `ssh://git@host/…`.
pub fn clean_url(url: &str) -> String {
    match parts(url) {
        Some(p) if is_http(&p.scheme) => format!("{}{}", p.before, p.after),
        Some(p) => format!("{}{}@{}", p.before, p.user, p.after),
        None => url.to_owned(),
    }
}

/// The environment that gives git `url`'s credentials: empty unless `url`
/// is http(s) with user info. Other credential helpers (from root's or the
/// system's git configuration) are switched off for the host first: one
/// such as `store` would write the secret to a file after a successful
/// fetch. Only for the URL's own scheme, host and port, so a redirect or a
/// submodule elsewhere is never given it.
pub fn credential_env(url: &str) -> Vec<(String, String)> {
    let Some(p) = parts(url).filter(|p| is_http(&p.scheme)) else {
        return Vec::new();
    };
    let user = percent_decode(p.user);
    let password = percent_decode(p.password.unwrap_or(""));
    // A line break would let the value add fields to the helper's answer.
    if [&user, &password]
        .iter()
        .any(|v| v.chars().any(char::is_control))
    {
        return Vec::new();
    }
    let authority = p.after.split(['/', '?', '#']).next().unwrap_or("");
    let scoped = format!("credential.{}://{authority}.helper", p.scheme);
    let config = [
        ("credential.helper", ""),
        (scoped.as_str(), ""),
        (scoped.as_str(), HELPER),
    ];
    let mut env = vec![("GIT_CONFIG_COUNT".to_owned(), config.len().to_string())];
    for (i, (key, value)) in config.iter().enumerate() {
        env.push((format!("GIT_CONFIG_KEY_{i}"), (*key).to_owned()));
        env.push((format!("GIT_CONFIG_VALUE_{i}"), (*value).to_owned()));
    }
    env.push((USERNAME_VAR.to_owned(), user));
    env.push((PASSWORD_VAR.to_owned(), password));
    env
}

/// `%XX` sequences decoded, as git decodes a URL's user info; anything
/// else (a lone `%`) is kept as it is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clean_url_has_no_secret_and_keeps_an_ssh_user() {
        let cases = [
            (
                "https://deploy:s3cr3t@git.example.com/fleet.git",
                "https://git.example.com/fleet.git",
            ),
            (
                "https://ghp_token@github.com:443/org/fleet.git",
                "https://github.com:443/org/fleet.git",
            ),
            (
                "ssh://git:pw@host:22/fleet.git",
                "ssh://git@host:22/fleet.git",
            ),
            ("user:pw@host:fleet.git", "user@host:fleet.git"),
            ("ssh://git@host/fleet.git", "ssh://git@host/fleet.git"),
            (
                "git@github.com:org/fleet.git",
                "git@github.com:org/fleet.git",
            ),
            ("/srv/git/fleet.git", "/srv/git/fleet.git"),
        ];
        for (url, clean) in cases {
            assert_eq!(clean_url(url), clean, "{url}");
        }
    }

    fn get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn http_credentials_go_to_a_helper_scoped_to_the_host() {
        let env = credential_env("https://de%40ploy:p%3Aw@git.example.com:8443/org/fleet.git");
        assert_eq!(get(&env, "GIT_CONFIG_COUNT"), Some("3"));
        assert_eq!(get(&env, "GIT_CONFIG_KEY_0"), Some("credential.helper"));
        assert_eq!(get(&env, "GIT_CONFIG_VALUE_0"), Some(""));
        let scoped = "credential.https://git.example.com:8443.helper";
        assert_eq!(get(&env, "GIT_CONFIG_KEY_1"), Some(scoped));
        assert_eq!(get(&env, "GIT_CONFIG_VALUE_1"), Some(""));
        assert_eq!(get(&env, "GIT_CONFIG_KEY_2"), Some(scoped));
        assert_eq!(get(&env, "GIT_CONFIG_VALUE_2"), Some(HELPER));
        assert_eq!(get(&env, USERNAME_VAR), Some("de@ploy"));
        assert_eq!(get(&env, PASSWORD_VAR), Some("p:w"));
        // The helper's text never holds a secret.
        assert!(!HELPER.contains("ploy") && !HELPER.contains("p:w"));

        let token = credential_env("https://ghp_token@github.com/org/fleet.git");
        assert_eq!(get(&token, USERNAME_VAR), Some("ghp_token"));
        assert_eq!(get(&token, PASSWORD_VAR), Some(""));
    }

    #[test]
    fn no_helper_without_http_credentials_or_with_a_line_break() {
        for url in [
            "https://github.com/org/fleet.git",
            "ssh://git:pw@host/fleet.git",
            "git@github.com:org/fleet.git",
            "/srv/git/fleet.git",
            "https://u:p%0Ahost=evil@git.example.com/fleet.git",
        ] {
            assert_eq!(credential_env(url), Vec::new(), "{url}");
        }
    }

    #[test]
    fn percent_decoding_keeps_what_is_not_an_escape() {
        assert_eq!(percent_decode("a%20b%2"), "a b%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
