//! Keys about the dashboard connection: `url`, `ca_file`, and the timing
//! of pings and reconnects (`ping_interval`, `ping_timeout`,
//! `backoff_max`). The token is in `token`.

use super::{Validator, check_path};
use crate::config::files::check_readable_file;
use crate::config::values::{num_to_i128, short_str, show_value};
use figment::value::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

impl Validator<'_> {
    /// `url` (required).
    pub(crate) fn url(&self, url: Option<String>) -> Result<String, String> {
        let Some(url) = url else {
            return Err(
                "url is required (set url in the config file, NIXFLEET_URL or --url)".to_owned(),
            );
        };
        check_url(&url).map_err(|p| {
            format!(
                "url = {} (from {}): {p}",
                short_str(&redact_url(&url)),
                self.origin("url")
            )
        })?;
        Ok(url)
    }

    /// A yes/no key (`allow_insecure_url`): `true`/`false`, or from the
    /// environment `true`, `false`, `yes`, `no`, `1`, `0`.
    pub(crate) fn boolean(&self, key: &str, value: Option<Value>) -> Result<bool, String> {
        let parsed = match &value {
            None => Some(false),
            Some(Value::Bool(_, b)) => Some(*b),
            Some(Value::String(_, s)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "1" => Some(true),
                "false" | "no" | "0" => Some(false),
                _ => None,
            },
            Some(Value::Num(_, n)) => match num_to_i128(*n) {
                Some(1) => Some(true),
                Some(0) => Some(false),
                _ => None,
            },
            Some(_) => None,
        };
        parsed.ok_or_else(|| {
            format!(
                "{key} = {} (from {}): expected true or false",
                value.as_ref().map(show_value).unwrap_or_default(),
                self.origin(key)
            )
        })
    }

    /// `ws://` sends the token in clear text: only to this host, unless
    /// `allow_insecure_url` says otherwise.
    pub(crate) fn url_is_private_or_allowed(&self, url: &str, allowed: bool) -> Result<(), String> {
        if allowed || !url.starts_with("ws://") {
            return Ok(());
        }
        let host = url
            .parse::<http::Uri>()
            .ok()
            .and_then(|uri| uri.host().map(str::to_owned))
            .unwrap_or_default();
        if is_loopback(&host) {
            return Ok(());
        }
        Err(format!(
            "url = {} (from {}): ws:// to {host} would send the token unencrypted; \
             use wss://, or set allow_insecure_url = true to accept that",
            short_str(&redact_url(url)),
            self.origin("url")
        ))
    }

    /// `ca_file`: optional; must be a readable file.
    pub(crate) fn ca_file(&self, ca: Option<String>) -> Result<Option<PathBuf>, String> {
        let Some(ca) = ca else { return Ok(None) };
        check_path(&ca).map_err(|p| self.bad("ca_file", &ca, &p))?;
        check_readable_file(Path::new(&ca)).map_err(|p| self.bad("ca_file", &ca, &p))?;
        Ok(Some(PathBuf::from(ca)))
    }

    /// `ping_timeout` must outlast `ping_interval`.
    pub(crate) fn ping_timeout_outlasts_interval(
        &self,
        ping_interval: Duration,
        ping_timeout: Duration,
    ) -> Result<(), String> {
        if ping_timeout > ping_interval {
            return Ok(());
        }
        Err(format!(
            "ping_timeout = {} (from {}) must be greater than ping_interval = {} (from {}): \
             the connection is declared dead after ping_timeout seconds without any frame, \
             so it must outlast the time between two pings",
            ping_timeout.as_secs(),
            self.origin("ping_timeout"),
            ping_interval.as_secs(),
            self.origin("ping_interval"),
        ))
    }
}

/// `url`: `ws://` or `wss://`, a host, a valid port, no userinfo, no fragment.
pub fn check_url(url: &str) -> Result<(), String> {
    const EXAMPLE: &str = "like \"wss://dashboard.example.org/ws\"";
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("not a valid URL ({e}); expected a ws:// or wss:// URL {EXAMPLE}"))?;
    match uri.scheme_str() {
        Some("ws" | "wss") => {}
        Some(other) => {
            return Err(format!(
                "unsupported scheme \"{other}\"; expected ws:// or wss:// {EXAMPLE}"
            ));
        }
        None => return Err(format!("expected a ws:// or wss:// URL {EXAMPLE}")),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("has no host; expected {EXAMPLE}"))?
        .as_str();
    if authority.contains('@') {
        return Err(
            "must not contain credentials (user:password@): the token is sent in \
                    the Authorization header; set token or token_file instead"
                .to_owned(),
        );
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("has no host; expected {EXAMPLE}"));
    }
    // Port: http::Uri accepts "host:" and "host:abc" and "host:99999".
    let after_host = match authority.rfind(']') {
        Some(i) => &authority[i + 1..],
        None => authority.find(':').map_or("", |i| &authority[i..]),
    };
    if let Some(port) = after_host.strip_prefix(':') {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(format!("has an invalid port \"{port}\"")),
        }
    } else if !after_host.is_empty() {
        return Err("has an invalid host".to_owned());
    }
    if url.contains('#') {
        return Err("must not contain a fragment (#…)".to_owned());
    }
    Ok(())
}

/// `localhost`, `127.0.0.0/8` or `::1`: traffic that never leaves the host.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A URL for messages: userinfo and query removed (either may hold secrets).
pub(crate) fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(q) = out.find('?') {
        out.truncate(q);
        out.push_str("?<redacted>");
    }
    let start = out.find("://").map_or(0, |i| i + 3);
    let end = out[start..].find('/').map_or(out.len(), |i| start + i);
    if let Some(at) = out[start..end].rfind('@') {
        out.replace_range(start..start + at, "<redacted>");
    }
    out
}
