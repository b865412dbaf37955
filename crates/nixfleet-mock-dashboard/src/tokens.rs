//! The tokens agents may present: one shared token (`--token`,
//! `--token-file`), or one per host (`--tokens FILE`, lines
//! `hostname token`).
//!
//! Our agent names its host at the upgrade (`X-NixFleet-Hostname`), so
//! another host's token is refused there (ws.rs). The v3 agent sends only
//! `Authorization: Bearer <token>`: the hostname comes later, in its
//! `register`. So a per-host token is accepted at the upgrade when it is
//! any known host's, and the connection remembers whose it was; a
//! `register` for another hostname is refused then (session.rs).

/// Whose token an upgrade presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOwner {
    /// The shared token: any hostname may register.
    Anyone,
    /// This host's token: only this hostname may register.
    Host(String),
}

pub enum Tokens {
    Shared(Box<[u8]>),
    PerHost(Vec<(String, Box<[u8]>)>),
}

impl Tokens {
    /// Whose token `given` is, if anyone's. Every token is compared in
    /// full, without an early exit, so timing tells nothing of them.
    pub fn owner(&self, given: &[u8]) -> Option<TokenOwner> {
        match self {
            Tokens::Shared(token) => same(token, given).then_some(TokenOwner::Anyone),
            Tokens::PerHost(hosts) => {
                let mut owner = None;
                for (host, token) in hosts {
                    if same(token, given) {
                        owner = Some(TokenOwner::Host(host.clone()));
                    }
                }
                owner
            }
        }
    }

    /// Reads `hostname token` lines (blank lines and `#` comments
    /// skipped). A hostname or token given twice is an error: which host a
    /// token belongs to must be unambiguous. The errors never quote a
    /// token.
    pub fn parse_per_host(text: &str, source: &str) -> Result<Tokens, String> {
        let mut hosts: Vec<(String, Box<[u8]>)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = format!("{source} line {}", n + 1);
            let mut words = line.split_whitespace();
            let (Some(host), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("{at}: expected `hostname token`"));
            };
            if hosts.iter().any(|(h, _)| h == host) {
                return Err(format!("{at}: host {host} is listed twice"));
            }
            if hosts.iter().any(|(_, t)| same(t, token.as_bytes())) {
                return Err(format!("{at}: {host}'s token is another host's too"));
            }
            hosts.push((host.to_owned(), token.as_bytes().into()));
        }
        if hosts.is_empty() {
            return Err(format!("{source} lists no host"));
        }
        Ok(Tokens::PerHost(hosts))
    }
}

/// Compares without an early exit on the first differing byte.
fn same(expected: &[u8], given: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != given.len());
    for (i, b) in expected.iter().enumerate() {
        diff |= b ^ given.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_host_tokens_name_their_host() {
        let text = "# fleet\nweb-01 aaa\n\n  web-02\tbbb  \n";
        let tokens = Tokens::parse_per_host(text, "t").unwrap();
        assert_eq!(
            tokens.owner(b"aaa"),
            Some(TokenOwner::Host("web-01".into()))
        );
        assert_eq!(
            tokens.owner(b"bbb"),
            Some(TokenOwner::Host("web-02".into()))
        );
        assert_eq!(tokens.owner(b"aa"), None);
        assert_eq!(tokens.owner(b""), None);
        let shared = Tokens::Shared(b"s".as_slice().into());
        assert_eq!(shared.owner(b"s"), Some(TokenOwner::Anyone));
    }

    #[test]
    fn bad_token_files_say_where_and_never_quote_a_token() {
        let err = |text| Tokens::parse_per_host(text, "f").err().unwrap();
        assert_eq!(err("web-01\n"), "f line 1: expected `hostname token`");
        assert_eq!(err("a x y\n"), "f line 1: expected `hostname token`");
        assert_eq!(
            err("a secret\na other\n"),
            "f line 2: host a is listed twice"
        );
        let twice = err("a secret\nb secret\n");
        assert_eq!(twice, "f line 2: b's token is another host's too");
        assert_eq!(err("# only a comment\n"), "f lists no host");
    }
}
