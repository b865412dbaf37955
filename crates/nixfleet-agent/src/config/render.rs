//! `--check-config`: the effective configuration as TOML, each line with
//! the source of its value; the token redacted.

use super::effective::Config;
use super::values::toml_str;
use std::path::{Path, PathBuf};
use std::time::Duration;

impl Config {
    /// The effective configuration as TOML text, one `key = value` per line
    /// with a `# from …` comment naming the source; the token is shown as
    /// `"<redacted>"`. Warnings follow as `# warning: …` comment lines.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (key, value) in self.toml_values() {
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

    /// Every key's value as TOML, in the order they are printed; `None` for
    /// an optional key that is not set (it gets no line).
    fn toml_values(&self) -> Vec<(&'static str, Option<String>)> {
        let path = |p: &Path| toml_str(&p.to_string_lossy());
        let some_path = |p: &Option<PathBuf>| p.as_deref().map(path);
        let some_str = |s: &Option<String>| s.as_deref().map(toml_str);
        let secs = |d: Duration| Some(d.as_secs().to_string());
        let plain = |v: &dyn ToString| Some(v.to_string());
        let client = self.tls_client.as_ref();
        let repo_url = self.repo_url.as_deref().map(crate::redact::redact_url);
        vec![
            ("url", Some(toml_str(&self.url))),
            ("token", Some(toml_str("<redacted>"))),
            ("repo_dir", Some(path(&self.repo_dir))),
            ("repo_url", some_str(&repo_url)),
            ("branch", Some(toml_str(&self.branch))),
            ("interval", secs(self.interval)),
            ("ssh_key", some_path(&self.ssh_key)),
            ("hostname", Some(toml_str(&self.hostname))),
            ("log_level", Some(toml_str(&self.log_level))),
            ("metrics", Some(toml_str(self.metrics.as_str()))),
            ("stasysmo_dir", Some(path(&self.stasysmo_dir))),
            ("ping_interval", secs(self.ping_interval)),
            ("ping_timeout", secs(self.ping_timeout)),
            ("backoff_max", secs(self.backoff_max)),
            ("stop_grace", secs(self.stop_grace)),
            ("state_dir", Some(path(&self.state_dir))),
            ("ca_file", some_path(&self.ca_file)),
            ("tls_client_cert", client.map(|c| path(&c.cert_path))),
            ("tls_client_key", client.map(|c| path(&c.key_path))),
            ("log_max_bytes", plain(&self.log_max_bytes)),
            ("logs_max_bytes", plain(&self.logs_max_bytes)),
            ("allow_insecure_url", plain(&self.allow_insecure_url)),
            ("theme_color", some_str(&self.theme_color)),
            ("location", some_str(&self.location)),
            ("device_type", some_str(&self.device_type)),
            ("allow_reboot", plain(&self.allow_reboot)),
            ("source_commit", some_str(&self.source_commit)),
            (
                "allowed_signers_file",
                some_path(&self.allowed_signers_file),
            ),
            ("gpg_keyring", some_path(&self.gpg_keyring)),
            ("report_agent_version", some_str(&self.report_agent_version)),
            ("metrics_textfile", some_path(&self.metrics_textfile)),
            ("confirm_timeout", secs(self.confirm_timeout)),
            (
                "rollback_on_failed_tests",
                plain(&self.rollback_on_failed_tests),
            ),
        ]
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
