//! The reconnect phase: the dashboard dies and listens again at once; the
//! agent, whose backoff is at its first step (its last connection got
//! `registered`), comes back after 1 s ± 10 %.

use crate::phases::Phases;
use crate::plan::Plan;
use crate::table::{Verdict, ms};
use std::time::{Duration, Instant};

pub async fn run(phases: &mut Phases<'_>, plan: &Plan) -> Result<(), String> {
    let mut back_to_register = Vec::new();
    let mut down_to_register = Vec::new();
    for _ in 0..plan.reconnects {
        let (back, down) = once(phases).await?;
        back_to_register.push(back);
        down_to_register.push(down);
    }
    back_to_register.sort_by(f64::total_cmp);
    down_to_register.sort_by(f64::total_cmp);
    let median = |v: &[f64]| v[v.len() / 2];
    phases.report.row(
        "reconnect",
        &format!("dashboard back → register ({})", back_to_register.len()),
        format!(
            "{:.0} ms (max {:.0})",
            median(&back_to_register),
            back_to_register[back_to_register.len() - 1]
        ),
        "1st backoff step",
        "",
        Verdict::Info,
    );
    phases.report.row(
        "reconnect",
        "  dashboard down → register",
        format!("{:.0} ms", median(&down_to_register)),
        "backoff 1 s ± 10 %",
        "",
        Verdict::Info,
    );
    Ok(())
}

/// One restart of the dashboard; milliseconds from its return, and from
/// its death, to the agent's register.
async fn once(phases: &mut Phases<'_>) -> Result<(f64, f64), String> {
    let before = phases.dashboard.record().registers.len();
    phases.dashboard.kill();
    let down = Instant::now();
    let back = phases
        .dashboard
        .restart()
        .await
        .map_err(|e| format!("cannot listen again: {e}"))?;
    let registered = phases
        .dashboard
        .wait_for(Duration::from_secs(10), |r| {
            r.registers.get(before).copied()
        })
        .await;
    phases.agent.alive()?;
    let registered = registered.ok_or_else(|| {
        format!(
            "no register within 10 s of the dashboard's return{}",
            phases.agent.tail()
        )
    })?;
    // Let the session settle (registered, a heartbeat) before the next.
    phases
        .dashboard
        .wait_for(Duration::from_secs(3), |r| {
            r.heartbeats.last().filter(|&&h| h > registered).copied()
        })
        .await;
    Ok((ms(registered - back), ms(registered - down)))
}
