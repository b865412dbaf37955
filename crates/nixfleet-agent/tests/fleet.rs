//! A CI-sized reconnect storm: 50 real agents lose the dashboard at the
//! same instant, it is down a few seconds and comes back on the same port.
//! The agents' full-jitter backoff must spread their returns over more
//! than one second, with no one second holding half of them (with the
//! old ±10 % around 1, 2, 4 s they landed together, within about a
//! second), and every one of them must come back.
//! `scripts/fleet.sh N` measures the same at any size with the mock.

mod common;

use common::*;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::time::Instant;

const AGENTS: usize = 50;
/// How long the dashboard is down: the scenario, not a synchronisation.
const OUTAGE: Duration = Duration::from_secs(3);
/// The agents' backoff cap; every agent is back well within it plus the
/// outage, so the generous wait below only guards against a hang.
const BACKOFF_MAX: u64 = 20;

/// The first `register` of each hostname after `since`, once all `AGENTS`
/// hostnames have one.
fn returns(log: &[Seen], since: Instant) -> Option<HashMap<String, Instant>> {
    let mut first = HashMap::new();
    for seen in log
        .iter()
        .filter(|s| s.kind() == Some("register") && s.at() >= since)
    {
        if let Some(name) = seen.payload()["hostname"].as_str() {
            first.entry(name.to_owned()).or_insert(seen.at());
        }
    }
    (first.len() == AGENTS).then_some(first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agents_come_back_spread_out_after_a_dashboard_restart() {
    let mut dashboard = Dashboard::start().await;
    let started = Instant::now();
    let mut agents = Vec::with_capacity(AGENTS);
    for i in 1..=AGENTS {
        let mut options = AgentOptions::new(dashboard.url());
        options.hostname = format!("fleet-{i}");
        options.interval = 30;
        options.ping_interval = 15;
        options.ping_timeout = 45;
        options.backoff_max = BACKOFF_MAX;
        agents.push(Agent::start(options).await);
    }
    dashboard
        .wait_for(60 * SECOND, "every agent registered", |log| {
            returns(log, started)
        })
        .await;

    dashboard.kill();
    tokio::time::sleep(OUTAGE).await;
    dashboard.restart().await;
    let restarted = Instant::now();
    let back = dashboard
        .wait_for(
            Duration::from_secs(BACKOFF_MAX) + OUTAGE + 60 * SECOND,
            "every agent back after the restart",
            |log| returns(log, restarted),
        )
        .await;

    let names: HashSet<String> = (1..=AGENTS).map(|i| format!("fleet-{i}")).collect();
    assert_eq!(back.keys().cloned().collect::<HashSet<_>>(), names);
    let first = back.values().min().unwrap();
    let last = back.values().max().unwrap();
    let spread = *last - *first;
    assert!(
        spread > SECOND,
        "the 50 returns came within {spread:?}: the fleet reconnected in lock-step"
    );
    // And no one second holds half of them (in lock-step, all of them
    // landed in one; full jitter puts about a fifth in the busiest).
    let mut times: Vec<Instant> = back.values().copied().collect();
    times.sort();
    let busiest = (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t - times[i] < SECOND)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        busiest <= AGENTS / 2,
        "{busiest} of {AGENTS} came back within one second: {:?}",
        times.iter().map(|t| *t - times[0]).collect::<Vec<_>>()
    );
    for agent in &agents {
        assert!(
            !agent.stderr().contains("panicked"),
            "an agent panicked:\n{}",
            agent.stderr()
        );
    }
}
