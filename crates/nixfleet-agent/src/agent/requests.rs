//! The agent's own requests: `restart`, `reboot`, `check-version`. They
//! run no command; each answers with one status.

use super::core::Core;
use crate::child_env::ChildEnv;
use crate::commands::output_frame;
use crate::connection::Control;
use crate::outbox::Outbox;
use crate::protocol::{Outcome, Status, Stream};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Between accepting `reboot` and asking systemd for it: time for the
/// status to reach the dashboard.
const REBOOT_DELAY: Duration = Duration::from_secs(3);

impl Core {
    /// `restart`: exit so that the service manager starts the agent again.
    /// A running command is never cut short: the command's output pipes
    /// end with this process, so it would die at its next line; the
    /// restart waits for it to end instead.
    pub(super) fn restart_requested(&mut self) {
        let message = match &self.running {
            _ if self.restart.is_some() || self.restart_after_command => {
                "a restart is already under way".to_owned()
            }
            Some(running) => {
                self.restart_after_command = true;
                format!("restarting once {} has ended", running.kind.name())
            }
            None => "restarting".to_owned(),
        };
        info!("{message}");
        let ticket = self.send_status(
            Status {
                status: Outcome::Ok,
                command: "restart".to_owned(),
                exit_code: 0,
                message,
                generation: crate::host_facts::generation(&self.repo_dir),
            },
            Control::Heartbeat,
        );
        if self.running.is_none() && self.restart.is_none() {
            self.restart = Some(ticket);
        }
    }

    /// `reboot`, only where the configuration allows it: the status first,
    /// then `systemctl reboot` after a short delay.
    pub(super) fn reboot(&mut self) {
        if !self.allow_reboot {
            warn!("refusing reboot: allow_reboot is off");
            self.reject(
                "reboot is not allowed on this host (set allow_reboot = true; NixOS: services.nixfleet.allowReboot)"
                    .to_owned(),
            );
            return;
        }
        warn!("reboot requested; rebooting in {}s", REBOOT_DELAY.as_secs());
        self.send_status(
            Status {
                status: Outcome::Ok,
                command: "reboot".to_owned(),
                exit_code: 0,
                message: format!("rebooting in {}s", REBOOT_DELAY.as_secs()),
                generation: crate::host_facts::generation(&self.repo_dir),
            },
            Control::Heartbeat,
        );
        let (outbox, child_env) = (self.outbox.clone(), self.runner.shared_child_env());
        tokio::spawn(reboot_later(outbox, child_env));
    }

    /// `check-version`: which agent runs, and whether the installed one is
    /// a different one (then `warning`: a restart would change it).
    pub(super) fn check_version(&mut self) {
        let identity = &self.identity;
        let exe = std::fs::read_link("/proc/self/exe")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let lines = [
            agent_version_line(&identity.reported_version),
            format!(
                "source commit {}",
                identity.source_commit.as_deref().unwrap_or("unknown")
            ),
            format!("binary {exe}"),
            format!(
                "store path {}",
                identity
                    .store_path
                    .as_deref()
                    .unwrap_or("(not in the Nix store)")
            ),
            format!(
                "binary sha256 {}",
                identity.binary_hash.as_deref().unwrap_or("unknown")
            ),
        ];
        for line in &lines {
            self.outbox
                .push_frame(output_frame("check-version", Stream::Stdout, line));
        }
        let (status, message) = match self.self_image.changed() {
            Some(why) => (
                Outcome::Warning,
                format!("a different agent is installed ({why}); restart to run it"),
            ),
            None if self.self_image.watches_a_unit() => (
                Outcome::Ok,
                "running the installed agent".to_owned(),
            ),
            None => (
                Outcome::Ok,
                "running; not started by a systemd unit, so there is no installed agent to compare with"
                    .to_owned(),
            ),
        };
        self.send_status(
            Status {
                status,
                command: "check-version".to_owned(),
                exit_code: 0,
                message,
                generation: crate::host_facts::generation(&self.repo_dir),
            },
            Control::Heartbeat,
        );
    }
}

/// `systemctl reboot` after [`REBOOT_DELAY`]; a failure is said as output.
async fn reboot_later(outbox: Arc<Outbox>, child_env: ChildEnv) {
    tokio::time::sleep(REBOOT_DELAY).await;
    let result = tokio::process::Command::new("systemctl")
        .arg("reboot")
        .env_clear()
        .envs(child_env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    let failure = match result {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "systemctl reboot failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(error) => Some(format!("cannot run systemctl: {error}")),
    };
    if let Some(why) = failure {
        warn!("{why}");
        let line = format!("[nixfleet] {why}");
        outbox.push_frame(output_frame("reboot", Stream::Stderr, &line));
    }
}

/// The real version, and what the dashboard is told when that differs
/// (`report_agent_version`): the one place a v3 page shows the truth.
fn agent_version_line(reported: &str) -> String {
    let real = crate::heartbeat::AGENT_VERSION;
    if reported == real {
        format!("agent version {real}")
    } else {
        format!(
            "agent version {real} (reported to the dashboard as {reported}: report_agent_version)"
        )
    }
}
