//! Unit tests of status.rs, kept apart so the module stays readable.

use super::*;

const NOW: i64 = 1_800_000_000;

#[test]
fn lock_age_thresholds() {
    let at = |days: i64, extra: i64| lock_check(Some(NOW - days * DAY - extra), NOW);
    assert_eq!(at(0, 0), (CheckStatus::Ok, "Updated today".into()));
    assert_eq!(at(1, 5), (CheckStatus::Ok, "Updated yesterday".into()));
    assert_eq!(
        at(7, DAY - 1),
        (CheckStatus::Ok, "Updated 7 days ago".into())
    );
    assert_eq!(
        at(8, 0),
        (
            CheckStatus::Outdated,
            "Updated 8 days ago - consider updating".into()
        )
    );
    assert_eq!(at(30, 0).0, CheckStatus::Outdated);
    assert!(at(30, 0).1.ends_with("consider updating"));
    assert_eq!(
        at(31, 0),
        (
            CheckStatus::Outdated,
            "Updated 31 days ago - needs update".into()
        )
    );
    // A commit from the future (clock skew) counts as today.
    assert_eq!(lock_check(Some(NOW + 3600), NOW).0, CheckStatus::Ok);
    assert_eq!(lock_check(None, NOW).0, CheckStatus::Unknown);
}

fn record(commit: &str, system: &str, matches: bool) -> SystemRecord {
    SystemRecord {
        commit: commit.into(),
        system: system.into(),
        matches,
        note: "rolled back".into(),
    }
}

#[test]
fn system_compartment_states() {
    let a = "a".repeat(40);
    let b = "b".repeat(40);
    let sys = "/nix/store/x-nixos-system";
    let r = record(&a, sys, true);
    assert_eq!(
        system_check(Some(&r), Some(&a), Some(sys)).0,
        CheckStatus::Ok
    );
    let (status, message) = system_check(Some(&r), Some(&b), Some(sys));
    assert_eq!(status, CheckStatus::Outdated);
    assert!(message.contains("HEAD moved to bbbbbbb"), "{message}");
    let (status, message) = system_check(Some(&r), Some(&a), Some("/nix/store/y-other"));
    assert_eq!(status, CheckStatus::Outdated);
    assert!(message.contains("by hand"), "{message}");
    assert_eq!(
        system_check(Some(&record(&a, sys, false)), Some(&a), Some(sys)),
        (CheckStatus::Outdated, "rolled back".into())
    );
    assert_eq!(
        system_check(None, Some(&a), Some(sys)).0,
        CheckStatus::Unknown
    );
    assert_eq!(
        system_check(Some(&r), Some(&a), None).0,
        CheckStatus::Unknown
    );
    assert_eq!(
        system_check(Some(&r), None, Some(sys)).0,
        CheckStatus::Unknown
    );
}

#[test]
fn git_compartment_states() {
    let a = "a".repeat(40);
    let b = "b".repeat(40);
    assert_eq!(git_check(Some(&a), Some(&a), "main").0, CheckStatus::Ok);
    assert_eq!(
        git_check(Some(&a), Some(&b), "main").0,
        CheckStatus::Outdated
    );
    assert_eq!(git_check(Some(&a), None, "main").0, CheckStatus::Unknown);
    assert_eq!(git_check(None, Some(&a), "main").0, CheckStatus::Unknown);
}

#[test]
fn the_system_record_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(SystemRecord::load(dir.path()), None);
    let r = record("c", "/nix/store/s", true);
    r.save(dir.path());
    assert_eq!(SystemRecord::load(dir.path()), Some(r));
}
