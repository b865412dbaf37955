//! The agent's tasks as `run` starts them, without a dashboard (the
//! connection dials a closed port) and without the signal handlers.

use super::start;
use crate::commands::Progress;
use crate::observe::Snapshot;
use crate::protocol::{Outcome, Status};
use std::collections::BTreeMap;

fn status(ok: bool) -> Status {
    Status {
        status: if ok { Outcome::Ok } else { Outcome::Error },
        command: "pull".to_owned(),
        exit_code: if ok { 0 } else { 1 },
        message: "done".to_owned(),
        generation: String::new(),
    }
}

/// The observer writes files (fsynced) and may fall behind; on this
/// runtime's one thread it cannot run at all while the core works through
/// a burst. Every command's end and every rollback must still be counted
/// once it catches up: at the latest when the agent stops.
#[tokio::test]
async fn counts_survive_a_burst_the_observer_cannot_keep_up_with() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, state) = (dir.path().join("repo"), dir.path().join("state"));
    std::fs::create_dir(&repo).unwrap();
    let config = crate::config::for_test(&repo, &state);
    let (mut core, _inputs, tasks) = start(&std::sync::Arc::new(config), None);

    // No await in this loop: the observer gets no turn until it is over.
    for n in 0..40 {
        core.on_progress(Progress::Finished(status(n % 4 != 0)));
        if n % 8 == 0 {
            core.count_rollback(n % 16 == 0);
        }
    }
    tasks.shutdown.send_replace(true);
    let (connection, systemd, observer) = tasks.tasks;
    let _ = tokio::join!(connection, systemd, observer);

    let counters = Snapshot::load(&state).unwrap().expect("a record").counters;
    let commands = BTreeMap::from([("ok".to_owned(), 30), ("error".to_owned(), 10)]);
    assert_eq!(counters.commands.get("pull"), Some(&commands));
    let rollbacks = BTreeMap::from([("ok".to_owned(), 3), ("failed".to_owned(), 2)]);
    assert_eq!(counters.rollbacks, rollbacks);
}
