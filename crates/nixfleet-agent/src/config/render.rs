//! `--check-config`: the effective configuration as TOML, each line with
//! the source of its value; the token redacted.

use super::effective::Config;
use super::values::toml_str;
use std::path::Path;
use std::time::Duration;

impl Config {
    /// The effective configuration as TOML text, one `key = value` per line
    /// with a `# from …` comment naming the source; the token is shown as
    /// `"<redacted>"`. Warnings follow as `# warning: …` comment lines.
    pub fn render(&self) -> String {
        let path = |p: &Path| toml_str(&p.to_string_lossy());
        let secs = |d: Duration| d.as_secs().to_string();
        let lines: Vec<(&str, Option<String>)> = vec![
            ("url", Some(toml_str(&self.url))),
            ("token", Some(toml_str("<redacted>"))),
            ("repo_dir", Some(path(&self.repo_dir))),
            (
                "repo_url",
                self.repo_url
                    .as_deref()
                    .map(|url| toml_str(&crate::redact::redact_url(url))),
            ),
            ("branch", Some(toml_str(&self.branch))),
            ("interval", Some(secs(self.interval))),
            ("ssh_key", self.ssh_key.as_deref().map(path)),
            ("hostname", Some(toml_str(&self.hostname))),
            ("log_level", Some(toml_str(&self.log_level))),
            ("metrics", Some(toml_str(self.metrics.as_str()))),
            ("stasysmo_dir", Some(path(&self.stasysmo_dir))),
            ("ping_interval", Some(secs(self.ping_interval))),
            ("ping_timeout", Some(secs(self.ping_timeout))),
            ("backoff_max", Some(secs(self.backoff_max))),
            ("stop_grace", Some(secs(self.stop_grace))),
            ("state_dir", Some(path(&self.state_dir))),
            ("ca_file", self.ca_file.as_deref().map(path)),
            (
                "tls_client_cert",
                self.tls_client.as_ref().map(|c| path(&c.cert_path)),
            ),
            (
                "tls_client_key",
                self.tls_client.as_ref().map(|c| path(&c.key_path)),
            ),
            ("log_max_bytes", Some(self.log_max_bytes.to_string())),
            ("logs_max_bytes", Some(self.logs_max_bytes.to_string())),
            (
                "allow_insecure_url",
                Some(self.allow_insecure_url.to_string()),
            ),
            ("theme_color", self.theme_color.as_deref().map(toml_str)),
            ("location", self.location.as_deref().map(toml_str)),
            ("device_type", self.device_type.as_deref().map(toml_str)),
            ("allow_reboot", Some(self.allow_reboot.to_string())),
            ("source_commit", self.source_commit.as_deref().map(toml_str)),
            (
                "allowed_signers_file",
                self.allowed_signers_file.as_deref().map(path),
            ),
            ("gpg_keyring", self.gpg_keyring.as_deref().map(path)),
            (
                "report_agent_version",
                self.report_agent_version.as_deref().map(toml_str),
            ),
            (
                "metrics_textfile",
                self.metrics_textfile.as_deref().map(path),
            ),
            ("confirm_timeout", Some(secs(self.confirm_timeout))),
            (
                "rollback_on_failed_tests",
                Some(self.rollback_on_failed_tests.to_string()),
            ),
        ];
        let mut out = String::new();
        for (key, value) in lines {
            let Some(value) = value else { continue };
            let origin = if key == "token" {
                Some(self.token_source.to_string())
            } else {
                self.origins.get(key).cloned()
            };
            out.push_str(&format!("{key} = {value}"));
            if let Some(origin) = origin {
                out.push_str("  # from ");
                out.push_str(&one_line(&origin));
            }
            out.push('\n');
        }
        for warning in &self.warnings {
            out.push_str("# warning: ");
            out.push_str(&one_line(warning));
            out.push('\n');
        }
        out
    }

    /// The source of `key`'s effective value, e.g. `flag --interval`.
    pub fn origin(&self, key: &str) -> Option<&str> {
        if key == "token" {
            return None;
        }
        self.origins.get(key).map(String::as_str)
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
