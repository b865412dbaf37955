//! The compartments' verdicts: pure functions of what was read.

use super::*;

fn short(commit: &str) -> &str {
    commit.get(..7).unwrap_or(commit)
}

/// `git`: HEAD against the last fetched `origin/<branch>`.
pub fn git_check(
    head: Option<&str>,
    upstream: Option<&str>,
    branch: &str,
) -> (CheckStatus, String) {
    match (head, upstream) {
        (None, _) => (CheckStatus::Unknown, "no repository yet".to_owned()),
        (Some(_), None) => (
            CheckStatus::Unknown,
            format!("origin/{branch} not fetched yet (refresh-git fetches it)"),
        ),
        (Some(head), Some(up)) if head == up => (
            CheckStatus::Ok,
            format!("at origin/{branch} ({}) as last fetched", short(head)),
        ),
        (Some(head), Some(up)) => (
            CheckStatus::Outdated,
            format!(
                "HEAD {} differs from origin/{branch} {} (pull to update)",
                short(head),
                short(up)
            ),
        ),
    }
}

/// `lock`: from the unix time of the last commit that changed `flake.lock`.
pub fn lock_check(committed_at: Option<i64>, now: i64) -> (CheckStatus, String) {
    let Some(committed_at) = committed_at else {
        return (
            CheckStatus::Unknown,
            "flake.lock has no git history".to_owned(),
        );
    };
    let days = (now - committed_at).max(0) / DAY;
    let age = match days {
        0 => "Updated today".to_owned(),
        1 => "Updated yesterday".to_owned(),
        n => format!("Updated {n} days ago"),
    };
    if days <= LOCK_OK_DAYS {
        (CheckStatus::Ok, age)
    } else if days <= LOCK_STALE_DAYS {
        (CheckStatus::Outdated, format!("{age} - consider updating"))
    } else {
        (CheckStatus::Outdated, format!("{age} - needs update"))
    }
}

/// `system`: the record of the last switch against HEAD and the running
/// system.
pub fn system_check(
    record: Option<&SystemRecord>,
    head: Option<&str>,
    current: Option<&str>,
) -> (CheckStatus, String) {
    let Some(current) = current else {
        return (
            CheckStatus::Unknown,
            format!("no {CURRENT_SYSTEM} (not NixOS?)"),
        );
    };
    let Some(record) = record else {
        return (
            CheckStatus::Unknown,
            "no switch by this agent recorded yet (refresh-system checks)".to_owned(),
        );
    };
    if record.system != current {
        return (
            CheckStatus::Outdated,
            "the running system changed since the agent's last switch (switched by hand?)"
                .to_owned(),
        );
    }
    if !record.matches {
        return (CheckStatus::Outdated, record.note.clone());
    }
    match head {
        Some(head) if head == record.commit => (
            CheckStatus::Ok,
            format!("running the system built from {}", short(head)),
        ),
        Some(head) => (
            CheckStatus::Outdated,
            format!(
                "HEAD moved to {} since the system was built from {} (switch to apply)",
                short(head),
                short(&record.commit)
            ),
        ),
        None => (
            CheckStatus::Unknown,
            "the repository has no HEAD".to_owned(),
        ),
    }
}
