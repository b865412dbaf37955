//! The command table (protocol.md, "Commands"): what the dashboard may ask
//! for by name, what each command may do, which status compartments it
//! works on, and what may be asked while a command runs.
//!
//! A command is a name from this fixed table; nothing the dashboard sends
//! ever becomes an argument or reaches a shell.

use crate::status::Compartment;

/// Most bytes of output a read-only check's log keeps (the cap of every
/// other command is `log_max_bytes`). A check prints a few lines: this is
/// only reached by a broken Nix or git printing without end; past it the
/// lines are counted, like past any log's cap.
pub const CHECK_LOG_MAX_BYTES: u64 = 1024 * 1024;

/// Every command runs as a plan of steps under its supervisor (see
/// `commands/mod.rs`). `stop` and the agent's own requests are not here:
/// see [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Pull,
    Switch,
    PullSwitch,
    Boot,
    Rollback,
    Test,
    /// v3: `nix flake update` (every input).
    Update,
    /// v3 registry name: `nix flake update nixfleet` (only that input).
    BumpFlake,
    /// v3: pull, bump the `nixfleet` input, switch bypassing the negative
    /// narinfo cache.
    ForceUpdate,
    /// v3 registry name for the same.
    ForceRebuild,
    RefreshGit,
    RefreshLock,
    RefreshSystem,
    RefreshAll,
}

impl CommandKind {
    pub const ALL: [CommandKind; 14] = [
        CommandKind::Pull,
        CommandKind::Switch,
        CommandKind::PullSwitch,
        CommandKind::Boot,
        CommandKind::Rollback,
        CommandKind::Test,
        CommandKind::Update,
        CommandKind::BumpFlake,
        CommandKind::ForceUpdate,
        CommandKind::ForceRebuild,
        CommandKind::RefreshGit,
        CommandKind::RefreshLock,
        CommandKind::RefreshSystem,
        CommandKind::RefreshAll,
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            CommandKind::Pull => "pull",
            CommandKind::Switch => "switch",
            CommandKind::PullSwitch => "pull-switch",
            CommandKind::Boot => "boot",
            CommandKind::Rollback => "rollback",
            CommandKind::Test => "test",
            CommandKind::Update => "update",
            CommandKind::BumpFlake => "bump-flake",
            CommandKind::ForceUpdate => "force-update",
            CommandKind::ForceRebuild => "force-rebuild",
            CommandKind::RefreshGit => "refresh-git",
            CommandKind::RefreshLock => "refresh-lock",
            CommandKind::RefreshSystem => "refresh-system",
            CommandKind::RefreshAll => "refresh-all",
        }
    }

    /// Whether success may have changed the running system (and so the
    /// agent's own unit or binary).
    pub fn activates(self) -> bool {
        matches!(
            self,
            CommandKind::Switch
                | CommandKind::PullSwitch
                | CommandKind::Rollback
                | CommandKind::ForceUpdate
                | CommandKind::ForceRebuild
        )
    }

    /// Whether a success that changed the running system waits for the
    /// dashboard's confirmation (safe deployments): every switch of a new
    /// configuration, not a rollback.
    pub fn needs_confirmation(self) -> bool {
        self.activates() && self != CommandKind::Rollback
    }

    /// The read-only checks this command is made of, in the order they
    /// run; empty for every command that changes something.
    pub fn checks(self) -> &'static [Check] {
        match self {
            CommandKind::RefreshGit => &[Check::Git],
            CommandKind::RefreshLock => &[Check::Lock],
            CommandKind::RefreshSystem => &[Check::System],
            CommandKind::RefreshAll => &[Check::Git, Check::Lock, Check::System],
            _ => &[],
        }
    }

    /// Whether the command only reads (a `refresh-*` check): its status is
    /// its checks' verdicts, and its steps report no progress dots.
    pub fn is_check(self) -> bool {
        !self.checks().is_empty()
    }

    /// The most output bytes its command log may keep.
    pub fn log_max_bytes(self, configured: u64) -> u64 {
        if self.is_check() {
            configured.min(CHECK_LOG_MAX_BYTES)
        } else {
            configured
        }
    }

    /// The status compartments this command works on (shown as `working`
    /// while it runs).
    pub fn compartments(self) -> &'static [Compartment] {
        use Compartment::*;
        match self {
            CommandKind::Pull | CommandKind::RefreshGit => &[Git],
            CommandKind::PullSwitch => &[Git, System],
            CommandKind::Switch | CommandKind::Rollback | CommandKind::RefreshSystem => &[System],
            CommandKind::Boot => &[],
            CommandKind::Test => &[Tests],
            CommandKind::Update | CommandKind::BumpFlake | CommandKind::RefreshLock => &[Lock],
            CommandKind::ForceUpdate | CommandKind::ForceRebuild => &[Git, Lock, System],
            CommandKind::RefreshAll => &[Git, Lock, System],
        }
    }
}

/// One read-only check: a step whose result (not its output) is the point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `git fetch`, then HEAD against `origin/<branch>`.
    Git,
    /// The age of the commit that last changed `flake.lock`.
    Lock,
    /// A dry-run build of the host's toplevel against the running system.
    System,
}

impl Check {
    /// The label of the check's step in the plan and the command log: how
    /// the follower tells which check a step was.
    pub fn label(self) -> &'static str {
        match self {
            Check::Git => "git fetch",
            Check::Lock => "git log flake.lock",
            Check::System => "nix build --dry-run",
        }
    }

    pub fn of_label(label: &str) -> Option<Self> {
        [Check::Git, Check::Lock, Check::System]
            .into_iter()
            .find(|check| check.label() == label)
    }

    /// Whether the step's stdout is data for the verdict (kept, logged,
    /// not sent) rather than output for the dashboard.
    pub fn stdout_is_data(self) -> bool {
        matches!(self, Check::Lock | Check::System)
    }

    /// Whether the step's stderr is shown too (the lock's query never was:
    /// only its first error line, in the verdict).
    pub fn stderr_is_shown(self) -> bool {
        self != Check::Lock
    }
}

/// How the dashboard asked to stop the running command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// SIGTERM to the group, SIGKILL after `stop_grace`.
    Terminate,
    /// SIGKILL to the group now.
    Kill,
}

/// What the dashboard may ask for by name. While a command runs, `stop`
/// acts on it, `restart` waits for it to end, `reboot` and `check-version`
/// answer at once, and another command is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Run(CommandKind),
    /// `stop`, or `kill` (what a v3 dashboard's kill button sends).
    Stop,
    Restart,
    Reboot,
    CheckVersion,
}

impl Request {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "stop" | "kill" => Request::Stop,
            "restart" => Request::Restart,
            "reboot" => Request::Reboot,
            "check-version" => Request::CheckVersion,
            _ => Request::Run(CommandKind::parse(name)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_closed() {
        for kind in CommandKind::ALL {
            assert_eq!(CommandKind::parse(kind.name()), Some(kind));
            assert_eq!(Request::parse(kind.name()), Some(Request::Run(kind)));
        }
        for name in [
            "stop",
            "kill",
            "restart",
            "reboot",
            "check-version",
            "",
            "switch ",
            "SWITCH",
            "rm -rf /",
            "switch; reboot",
        ] {
            assert_eq!(CommandKind::parse(name), None, "{name:?}");
        }
        assert_eq!(Request::parse("kill"), Some(Request::Stop));
        assert_eq!(Request::parse("switch; reboot"), None);
    }

    #[test]
    fn check_steps_are_told_apart_by_label() {
        for check in [Check::Git, Check::Lock, Check::System] {
            assert_eq!(Check::of_label(check.label()), Some(check));
        }
        assert_eq!(Check::of_label("git pull"), None);
        assert_eq!(
            CommandKind::RefreshAll.log_max_bytes(u64::MAX),
            CHECK_LOG_MAX_BYTES
        );
        assert_eq!(CommandKind::Switch.log_max_bytes(7), 7);
    }
}
