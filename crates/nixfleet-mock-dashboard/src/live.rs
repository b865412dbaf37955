//! `GET /events[?host=NAME]`: the web page's live feed, as Server-Sent
//! Events.
//!
//! The feed is pulled, not pushed: each subscriber keeps only a cursor into
//! the host's message store and a version number of the host list, and
//! wakes on the state's change signal. It reads from the store only when
//! the HTTP connection can take more (hyper polls the stream only then), at
//! most every [`MIN_GAP`] and at most [`BATCH`] messages at a time. So a
//! browser that reads slowly, or not at all, costs the mock nothing but its
//! cursor and one batch: agents' connections never wait for it, and memory
//! does not grow with what it missed. When the cursor falls more than
//! [`MAX_BEHIND`] messages behind, the subscriber jumps ahead to the newest
//! [`BATCH`] and sends a `skipped` event with the number of output lines it
//! passed over (the API still has them); statuses, rejections and progress
//! in the skipped stretch are still delivered.
//!
//! Events (each `data` is one JSON value):
//!
//! * `hosts` `{"now": ms, "hosts": [<API host object + "view">]}` — the
//!   whole host list, once at the start;
//! * `hosts_changed` `{"now": ms, "hosts": [...]}` — afterwards, only the
//!   hosts that changed since the subscriber's last read, each whole
//!   except its `view.metrics`, which holds only the samples taken since
//!   that read (the page appends them; a sample may come twice, with the
//!   same `t`). With 1,000 hosts a heartbeat costs one host's bytes, not
//!   the fleet's;
//! * `timeline` `{"host": str, "events": [...], "connections": [...]}` —
//!   the selected host's timeline and connections, at the start and on
//!   change;
//! * `messages` `[<message as the messages API returns it>]` — the selected
//!   host's messages except heartbeats, in order; the event `id` is the last
//!   index, so a reconnecting `EventSource` resumes after it
//!   (`Last-Event-ID`);
//! * `skipped` `{"lines": n, "messages": n, "from": i, "to": i}` — output
//!   lines passed over (and messages evicted from the store before the
//!   subscriber got to them), `from`/`to` the index range to ask the API for.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::api::{MsgOut, error};
use crate::frame::{Kind, Msg, now_ms};
use crate::host::Host;
use crate::shared::Shared;

/// Messages sent at most per event.
pub const BATCH: u64 = 2_000;
/// How far behind the newest message a subscriber may fall before it
/// skips ahead.
pub const MAX_BEHIND: u64 = 20_000;
/// Messages a new subscriber gets from before it subscribed.
const BACKLOG: u64 = 2_000;
/// Least time between two reads of the state by one subscriber.
const MIN_GAP: Duration = Duration::from_millis(50);
/// Non-output messages delivered from one skipped stretch at most (they
/// are statuses and rejections, so this is never reached in practice).
const MAX_KEPT_WHEN_SKIPPING: usize = 1_000;

#[derive(Deserialize)]
pub struct EventsQuery {
    host: Option<String>,
}

pub async fn events(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(r) => return error(StatusCode::BAD_REQUEST, &r.body_text()),
    };
    // The browser resends the last event id when it reconnects.
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|last| last.saturating_add(1));
    let changes = shared.lock().subscribe();
    let subscriber = Subscriber {
        shared,
        changes,
        host: query.host.filter(|h| !h.is_empty()),
        cursor: resume,
        hosts_seen: None,
        hosts_read_at: 0,
        timeline_seen: None,
        last_read: None,
        more: true,
        pending: VecDeque::new(),
    };
    let stream = futures_util::stream::unfold(subscriber, |mut s| async move {
        let event = s.next().await?;
        Some((Ok::<_, Infallible>(event), s))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

struct Subscriber {
    shared: Arc<Shared>,
    changes: watch::Receiver<()>,
    host: Option<String>,
    /// Index of the next message of `host` to send; `None` until the host
    /// exists (then it starts [`BACKLOG`] messages back).
    cursor: Option<u64>,
    hosts_seen: Option<u64>,
    /// When (unix ms) the host list was last read: the metrics samples
    /// from then on are new to the page.
    hosts_read_at: u64,
    timeline_seen: Option<u64>,
    last_read: Option<Instant>,
    /// Read again without waiting for a change (more messages are waiting).
    more: bool,
    pending: VecDeque<Event>,
}

/// What one read of the state produced, turned into events outside the lock.
#[derive(Default)]
struct Read {
    hosts: Option<Value>,
    hosts_changed: Option<Value>,
    timeline: Option<Value>,
    skipped: Option<Value>,
    messages: Vec<(u64, Msg)>,
}

impl Subscriber {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if !self.more && self.changes.changed().await.is_err() {
                return None;
            }
            // End the stream at shutdown (the mock wakes every subscriber
            // when it closes the agents' connections), so that open pages
            // do not hold up the graceful shutdown.
            if self.shared.shutting_down.load(Ordering::Relaxed) {
                return None;
            }
            if let Some(last) = self.last_read {
                tokio::time::sleep_until(last + MIN_GAP).await;
            }
            self.last_read = Some(Instant::now());
            self.changes.borrow_and_update();
            let read = self.read();
            self.queue(read);
        }
    }

    fn read(&mut self) -> Read {
        let mut read = Read::default();
        let state = self.shared.lock();
        if self.hosts_seen != Some(state.summary_version) {
            let now = now_ms();
            match self.hosts_seen {
                None => read.hosts = Some(json!({ "now": now, "hosts": state.page_hosts(None) })),
                Some(seen) => {
                    let hosts = state.page_hosts(Some((seen, self.hosts_read_at)));
                    read.hosts_changed = Some(json!({ "now": now, "hosts": hosts }));
                }
            }
            self.hosts_seen = Some(state.summary_version);
            self.hosts_read_at = now;
        }
        self.more = false;
        let Some(idx) = self.host.as_deref().and_then(|h| state.host_index(h)) else {
            return read;
        };
        let host = &state.hosts[idx];
        if self.timeline_seen != Some(host.view.events_version) {
            self.timeline_seen = Some(host.view.events_version);
            let connections: Vec<Value> = state
                .conns
                .iter()
                .filter(|c| c.host == idx)
                .map(|c| state.conn_json(c))
                .collect();
            read.timeline = Some(json!({
                "host": host.name, "events": host.view.events(), "connections": connections,
            }));
        }
        let cursor = read_messages(self.cursor, host, &mut read);
        self.more = cursor < host.next_index;
        self.cursor = Some(cursor);
        read
    }

    fn queue(&mut self, read: Read) {
        if let Some(hosts) = read.hosts {
            self.pending
                .push_back(Event::default().event("hosts").data(hosts.to_string()));
        }
        if let Some(changed) = read.hosts_changed {
            self.pending.push_back(
                Event::default()
                    .event("hosts_changed")
                    .data(changed.to_string()),
            );
        }
        if let Some(timeline) = read.timeline {
            self.pending.push_back(
                Event::default()
                    .event("timeline")
                    .data(timeline.to_string()),
            );
        }
        if let Some(skipped) = read.skipped {
            self.pending
                .push_back(Event::default().event("skipped").data(skipped.to_string()));
        }
        if let Some((last, _)) = read.messages.last() {
            let last = *last;
            let out: Vec<MsgOut<'_>> = read
                .messages
                .iter()
                .map(|(i, m)| MsgOut::new(*i, m))
                .collect();
            match serde_json::to_string(&out) {
                Ok(data) => self.pending.push_back(
                    Event::default()
                        .event("messages")
                        .id(last.to_string())
                        .data(data),
                ),
                Err(e) => tracing::warn!("cannot serialise messages for the page: {e}"),
            }
        }
    }
}

/// The next batch of `host`'s messages after the cursor, skipping ahead
/// first when the cursor fell too far behind (or behind the store);
/// returns the cursor after them.
fn read_messages(last: Option<u64>, host: &Host, read: &mut Read) -> u64 {
    let first = host.evicted;
    let head = host.next_index;
    let mut cursor = last
        .unwrap_or_else(|| head.saturating_sub(BACKLOG))
        .clamp(first, head);
    let evicted = cursor.saturating_sub(last.unwrap_or(cursor));
    let skip_from = cursor - evicted;
    let mut skipped_lines = 0u64;
    if head - cursor > MAX_BEHIND {
        let to = head - BATCH;
        skipped_lines = keep_when_skipping(host, cursor, to, &mut read.messages);
        cursor = to;
    }
    if evicted > 0 || skipped_lines > 0 {
        read.skipped = Some(json!({
            "lines": skipped_lines, "messages": evicted, "from": skip_from, "to": cursor,
        }));
    }
    let offset = usize::try_from(cursor - first).unwrap_or(usize::MAX);
    let mut taken = 0;
    for msg in host.messages.iter().skip(offset).take(BATCH as usize) {
        if msg.kind != Kind::Heartbeat {
            read.messages.push((cursor + taken, msg.clone()));
        }
        taken += 1;
    }
    cursor + taken
}

/// Passes over `host`'s messages from index `from` to `to`: keeps the few
/// that are neither output nor heartbeats (statuses, rejections, progress)
/// in `kept`; returns how many output lines it passed over.
fn keep_when_skipping(host: &Host, from: u64, to: u64, kept: &mut Vec<(u64, Msg)>) -> u64 {
    let first = host.evicted;
    let offset = usize::try_from(from - first).unwrap_or(usize::MAX);
    let count = usize::try_from(to - from).unwrap_or(usize::MAX);
    let mut skipped_lines = 0u64;
    for (i, msg) in host.messages.iter().enumerate().skip(offset).take(count) {
        match msg.kind {
            Kind::Output => skipped_lines += 1,
            Kind::Heartbeat => {}
            _ if kept.len() < MAX_KEPT_WHEN_SKIPPING => {
                kept.push((first + i as u64, msg.clone()));
            }
            _ => {}
        }
    }
    skipped_lines
}
