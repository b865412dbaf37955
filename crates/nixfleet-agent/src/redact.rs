//! Credentials that ride in a repository URL (`https://user:secret@host/…`,
//! `https://TOKEN@host/…`, `ssh://user:secret@host/…`): git needs them, but
//! nothing the agent logs, prints or sends may show them. The token is
//! kept out by construction (it never reaches a message); a URL is shown in
//! many places, so it is shown through [`redact_url`], and text that a
//! child wrote (git echoing its URL) passes through [`Scrubber`].

const REDACTED: &str = "<redacted>";

/// The byte range of `url`'s user info when it may be secret: every user
/// info of a `scheme://` URL, except a bare user name in an ssh URL
/// (`ssh://git@host/…`); in scp-like syntax (`user@host:path`), a user info
/// with a `:`.
pub fn secret_user_info(url: &str) -> Option<std::ops::Range<usize>> {
    match url.find("://") {
        Some(scheme_end) => {
            let start = scheme_end + 3;
            let authority_end = url[start..]
                .find(['/', '?', '#'])
                .map_or(url.len(), |i| start + i);
            let at = url[start..authority_end].rfind('@')? + start;
            let user_info = &url[start..at];
            let scheme = url[..scheme_end].to_ascii_lowercase();
            let ssh = matches!(scheme.as_str(), "ssh" | "git+ssh" | "ssh+git");
            (!ssh || user_info.contains(':')).then_some(start..at)
        }
        None => {
            let at = url.find('@')?;
            let user_info = &url[..at];
            (user_info.contains(':') && !user_info.contains('/')).then_some(0..at)
        }
    }
}

/// `url` with its secret user info replaced by `<redacted>`.
pub fn redact_url(url: &str) -> String {
    match secret_user_info(url) {
        Some(range) => {
            let mut out = url.to_owned();
            out.replace_range(range, REDACTED);
            out
        }
        None => url.to_owned(),
    }
}

/// Removes the secrets of some URLs from arbitrary text.
#[derive(Debug, Clone, Default)]
pub struct Scrubber {
    secrets: Vec<String>,
}

/// A password shorter than this is not looked for on its own (it would
/// mangle ordinary output); the whole user info always is.
const MIN_SCRUBBED_PASSWORD: usize = 4;

impl Scrubber {
    /// Scrubs the secret user info of `url`, if it has one.
    pub fn for_url(url: Option<&str>) -> Self {
        let mut secrets = Vec::new();
        if let Some(url) = url
            && let Some(range) = secret_user_info(url)
        {
            let user_info = &url[range];
            secrets.push(user_info.to_owned());
            if let Some((_, password)) = user_info.split_once(':')
                && password.len() >= MIN_SCRUBBED_PASSWORD
            {
                secrets.push(password.to_owned());
            }
        }
        Scrubber { secrets }
    }

    /// `text` with every secret replaced by `<redacted>`.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), REDACTED);
            }
        }
        out
    }

    /// `line` (raw bytes of a child's output, not necessarily UTF-8) with
    /// every secret replaced, or `None` when it holds none.
    pub fn scrub_bytes(&self, line: &[u8]) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        for secret in &self.secrets {
            let current = out.as_deref().unwrap_or(line);
            let finder = memchr::memmem::Finder::new(secret.as_bytes());
            if finder.find(current).is_none() {
                continue;
            }
            let mut replaced = Vec::with_capacity(current.len());
            let mut rest = current;
            while let Some(at) = finder.find(rest) {
                replaced.extend_from_slice(&rest[..at]);
                replaced.extend_from_slice(REDACTED.as_bytes());
                rest = &rest[at + secret.len()..];
            }
            replaced.extend_from_slice(rest);
            out = Some(replaced);
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_user_info_is_redacted_and_plain_ssh_users_are_kept() {
        let cases = [
            (
                "https://deploy:s3cr3t@git.example.com/fleet.git",
                "https://<redacted>@git.example.com/fleet.git",
            ),
            (
                "https://ghp_token@github.com/org/fleet.git",
                "https://<redacted>@github.com/org/fleet.git",
            ),
            (
                "ssh://git:pw@host:22/fleet.git",
                "ssh://<redacted>@host:22/fleet.git",
            ),
            ("ssh://git@host/fleet.git", "ssh://git@host/fleet.git"),
            (
                "git@github.com:org/fleet.git",
                "git@github.com:org/fleet.git",
            ),
            ("user:pw@host:fleet.git", "<redacted>@host:fleet.git"),
            (
                "https://host/path@with-at/fleet.git",
                "https://host/path@with-at/fleet.git",
            ),
            ("/srv/git/fleet.git", "/srv/git/fleet.git"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn scrubbing_removes_the_user_info_and_a_long_enough_password() {
        let scrubber = Scrubber::for_url(Some("https://deploy:s3cr3t@h/x.git"));
        assert_eq!(
            scrubber.scrub("fatal: https://deploy:s3cr3t@h/x.git and s3cr3t again"),
            "fatal: https://<redacted>@h/x.git and <redacted> again"
        );
        assert!(Scrubber::for_url(Some("git@github.com:org/fleet.git")).is_empty());
        assert!(Scrubber::for_url(None).is_empty());
        assert_eq!(
            scrubber.scrub_bytes(b"\xff https://deploy:s3cr3t@h \xfe s3cr3t"),
            Some(b"\xff https://<redacted>@h \xfe <redacted>".to_vec())
        );
        assert_eq!(scrubber.scrub_bytes(b"nothing here"), None);
        let short = Scrubber::for_url(Some("https://u:pw@h/x.git"));
        assert_eq!(short.scrub("u:pw@ and pw"), "<redacted>@ and pw");
    }
}
