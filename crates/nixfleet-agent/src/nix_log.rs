//! Nix's structured log (`--log-format internal-json`), turned back into
//! the plain lines a user would read and into live build counts.
//!
//! Nix writes one event per stderr line: `@nix ` and a JSON object whose
//! `action` is `msg` (a message with a verbosity `level`), `start` / `stop`
//! (an activity with an `id`, a `type` and a `text`) or `result` (something
//! an activity reports: a build log line, its phase, its progress, how much
//! of a kind of work it expects). The numbers are Nix's `ActivityType` and
//! `ResultType` (src/libutil/logging.hh), stable since Nix 2.0.
//!
//! [`NixLog`] is a pure state machine: one line in, zero or more plain lines
//! out, counts updated. It does no I/O and keeps no clock, so a restarted
//! agent can rebuild the counts by replaying earlier lines with a sink that
//! discards them. Anything that is not an `@nix ` line, and any `@nix ` line
//! that does not parse (cut, garbled, from a future Nix), comes out
//! unchanged: nothing is lost, and a log that is not structured at all
//! streams exactly as before.
//!
//! The counts follow Nix's own progress bar: per activity type, what the
//! stopped activities of that type did, plus what the running ones report,
//! with the expected total raised to what `setExpected` announced. Builds
//! are what the `builds` activity (104) reports, downloads what the `copy
//! paths` activity (103) reports, bytes what each `copy path` (100) and
//! `file transfer` (101) reports.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// What Nix puts in front of every structured line.
pub const PREFIX: &str = "@nix ";

/// Messages and activities up to this verbosity are shown: Info, what
/// `nix-build` and the non-interactive `nixos-rebuild` print by default.
/// The agent passes `-v` so that a flake build (whose `nix build` defaults
/// one level lower) also reports what it will build and fetch; anything
/// more verbose than Info is only what `-v` would add for `nix-build`.
const SHOWN_LEVEL: u64 = 3;
/// Activities tracked at once. Nix keeps a few dozen open; the bound only
/// matters for garbage input, whose extra activities are still rendered
/// but not counted.
const MAX_ACTIVITIES: usize = 4096;
/// Running builds listed in a snapshot (the counts still include all).
pub const MAX_LISTED_BUILDS: usize = 32;
/// Longest derivation name or phase kept.
const MAX_NAME_CHARS: usize = 200;

/// Nix's `ActivityType` numbers used here.
mod activity {
    pub const COPY_PATH: u64 = 100;
    pub const FILE_TRANSFER: u64 = 101;
    pub const COPY_PATHS: u64 = 103;
    pub const BUILDS: u64 = 104;
    pub const BUILD: u64 = 105;
    pub const POST_BUILD_HOOK: u64 = 110;
    pub const BUILD_WAITING: u64 = 111;
}

/// Nix's `ResultType` numbers used here.
mod result {
    pub const BUILD_LOG_LINE: u64 = 101;
    pub const SET_PHASE: u64 = 104;
    pub const PROGRESS: u64 = 105;
    pub const SET_EXPECTED: u64 = 106;
    pub const POST_BUILD_LOG_LINE: u64 = 107;
}

/// The activity types whose totals are kept, in [`NixLog::totals`] order.
const COUNTED: [u64; 4] = [
    activity::BUILDS,
    activity::COPY_PATHS,
    activity::COPY_PATH,
    activity::FILE_TRANSFER,
];

fn counted_slot(kind: u64) -> Option<usize> {
    COUNTED.iter().position(|&k| k == kind)
}

/// Done / expected / running / failed, for builds or downloads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub done: u64,
    pub expected: u64,
    pub running: u64,
    pub failed: u64,
}

/// Store path bytes copied (substituted or copied from another store).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Bytes {
    pub done: u64,
    pub expected: u64,
    /// Bytes fetched over the network (compressed), for what it is worth.
    pub downloaded: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunningBuild {
    /// The derivation's name without hash and `.drv`, e.g. `hello-2.12.1`.
    pub drv: String,
    /// The build's current phase (`buildPhase`, …), when it said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// The counts at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub builds: Counts,
    /// Store paths substituted or copied ("copy paths").
    pub downloads: Counts,
    pub bytes: Bytes,
    /// The running builds, oldest first, at most [`MAX_LISTED_BUILDS`].
    pub running: Vec<RunningBuild>,
}

impl Snapshot {
    /// Builds and downloads done, and expected.
    pub fn steps(&self) -> (u64, u64) {
        (
            self.builds.done.saturating_add(self.downloads.done),
            self.builds.expected.saturating_add(self.downloads.expected),
        )
    }
}

/// One open activity.
#[derive(Debug, Default)]
struct Activity {
    kind: u64,
    /// Builds and post-build hooks: the name their log lines are prefixed
    /// with (the package name, as Nix's `-L` shows it).
    prefix: Option<String>,
    /// Builds: the derivation name shown in the running list.
    drv: Option<String>,
    phase: Option<String>,
    done: u64,
    expected: u64,
    running: u64,
    failed: u64,
    /// What this activity announced with `setExpected`, per counted type;
    /// withdrawn when it stops.
    announced: [u64; COUNTED.len()],
}

/// Totals of one activity type over its stopped activities, and what was
/// announced for it.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    done: u64,
    /// What the stopped activities last expected. Nix's progress bar uses
    /// `done` here, so a failed build's total shrinks when it ends; keeping
    /// what was expected lets the last report say "1 of 3 built".
    expected: u64,
    failed: u64,
    announced: u64,
}

/// The state machine; see the module documentation.
#[derive(Debug, Default)]
pub struct NixLog {
    /// Whether any structured line was seen: only then are there counts
    /// worth reporting.
    structured: bool,
    /// Ordered by id, which Nix hands out increasingly: oldest first.
    activities: BTreeMap<u64, Activity>,
    totals: [Totals; COUNTED.len()],
}

/// What a line handed out is, for how a dashboard colours it: Nix writes
/// its whole log to stderr, so the file descriptor says nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// Not Nix's structured log: the line as the program wrote it, on the
    /// stream it wrote it to.
    AsIs,
    /// Rendered from Nix's structured log, not an error.
    Info,
    /// Nix's error message (level 0), e.g. a failed build's.
    Error,
}

/// Nix's verbosity `lvlError`.
const ERROR_LEVEL: u64 = 0;

/// What one line did to the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing that a snapshot shows changed.
    None,
    /// The counts, the running builds or their phases may have changed.
    Counts,
}

/// One event, borrowing from the line where it can. Unknown fields (newer
/// Nix versions add some) are ignored.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    action: Cow<'a, str>,
    #[serde(default)]
    id: u64,
    #[serde(default)]
    level: u64,
    #[serde(default, rename = "type")]
    kind: u64,
    #[serde(default, borrow)]
    text: Cow<'a, str>,
    #[serde(default, borrow)]
    msg: Cow<'a, str>,
    #[serde(default)]
    fields: Vec<Value>,
}

impl NixLog {
    pub fn new() -> Self {
        NixLog::default()
    }

    /// Whether the output has been Nix's structured log.
    pub fn is_structured(&self) -> bool {
        self.structured
    }

    /// Takes one line of the command's output (without its newline) and
    /// hands each plain line a user would see to `out`, in order.
    pub fn feed(&mut self, line: &str, out: &mut impl FnMut(&str, Meaning)) -> Effect {
        let Some(json) = line.strip_prefix(PREFIX) else {
            out(line, Meaning::AsIs);
            return Effect::None;
        };
        let Ok(event) = serde_json::from_str::<Event<'_>>(json) else {
            out(line, Meaning::AsIs);
            return Effect::None;
        };
        self.structured = true;
        match event.action.as_ref() {
            "msg" => {
                if event.level <= SHOWN_LEVEL {
                    let meaning = if event.level == ERROR_LEVEL {
                        Meaning::Error
                    } else {
                        Meaning::Info
                    };
                    emit_text(&event.msg, "", meaning, out);
                }
                Effect::None
            }
            "start" => self.start(&event, out),
            "stop" => self.stop(event.id),
            "result" => self.result(&event, out),
            // A future action: machine-readable by definition, nothing a
            // user would have read.
            _ => Effect::None,
        }
    }

    fn start(&mut self, event: &Event<'_>, out: &mut impl FnMut(&str, Meaning)) -> Effect {
        // Nix's plain logger prints an activity's text with "..." when its
        // level is shown; waiting for a build slot is never printed.
        if event.level <= SHOWN_LEVEL
            && !event.text.is_empty()
            && event.kind != activity::BUILD_WAITING
        {
            emit_text(&event.text, "...", Meaning::Info, out);
        }
        if self.activities.len() >= MAX_ACTIVITIES && !self.activities.contains_key(&event.id) {
            return Effect::None;
        }
        let mut new = Activity {
            kind: event.kind,
            ..Activity::default()
        };
        if matches!(event.kind, activity::BUILD | activity::POST_BUILD_HOOK) {
            let drv = event
                .fields
                .first()
                .and_then(Value::as_str)
                .map(derivation_name)
                .unwrap_or_default();
            new.prefix = Some(package_name(drv).to_owned());
            if event.kind == activity::BUILD {
                new.drv = Some(cut(drv));
            }
        }
        let counted = new.drv.is_some() || counted_slot(event.kind).is_some();
        // A repeated id replaces the activity; withdraw what the old one
        // contributed first.
        self.stop(event.id);
        self.activities.insert(event.id, new);
        if counted {
            Effect::Counts
        } else {
            Effect::None
        }
    }

    fn stop(&mut self, id: u64) -> Effect {
        let Some(act) = self.activities.remove(&id) else {
            return Effect::None;
        };
        let mut effect = if act.drv.is_some() {
            Effect::Counts
        } else {
            Effect::None
        };
        if let Some(slot) = counted_slot(act.kind) {
            let totals = &mut self.totals[slot];
            totals.done = totals.done.saturating_add(act.done);
            totals.expected = totals.expected.saturating_add(act.expected.max(act.done));
            totals.failed = totals.failed.saturating_add(act.failed);
            effect = Effect::Counts;
        }
        for (slot, announced) in act.announced.iter().enumerate() {
            if *announced > 0 {
                let totals = &mut self.totals[slot];
                totals.announced = totals.announced.saturating_sub(*announced);
                effect = Effect::Counts;
            }
        }
        effect
    }

    fn result(&mut self, event: &Event<'_>, out: &mut impl FnMut(&str, Meaning)) -> Effect {
        let act = self.activities.get_mut(&event.id);
        match event.kind {
            result::BUILD_LOG_LINE | result::POST_BUILD_LOG_LINE => {
                let Some(text) = event.fields.first().and_then(Value::as_str) else {
                    return Effect::None;
                };
                let name = act.and_then(|a| a.prefix.as_deref()).unwrap_or("unnamed");
                let post = if event.kind == result::POST_BUILD_LOG_LINE {
                    " (post)"
                } else {
                    ""
                };
                let prefix = format!("{name}{post}> ");
                emit_prefixed(&prefix, text, out);
                Effect::None
            }
            result::SET_PHASE => {
                let Some(act) = act else { return Effect::None };
                let phase = event.fields.first().and_then(Value::as_str).map(cut);
                act.phase = phase;
                if act.drv.is_some() {
                    Effect::Counts
                } else {
                    Effect::None
                }
            }
            result::PROGRESS => {
                let Some(act) = act else { return Effect::None };
                let number = |i: usize| event.fields.get(i).and_then(Value::as_u64).unwrap_or(0);
                act.done = number(0);
                act.expected = number(1);
                act.running = number(2);
                act.failed = number(3);
                Effect::Counts
            }
            result::SET_EXPECTED => {
                let Some(act) = act else { return Effect::None };
                let of_type = event.fields.first().and_then(Value::as_u64);
                let Some(slot) = of_type.and_then(counted_slot) else {
                    return Effect::None;
                };
                let expected = event.fields.get(1).and_then(Value::as_u64).unwrap_or(0);
                let totals = &mut self.totals[slot];
                totals.announced = totals
                    .announced
                    .saturating_sub(act.announced[slot])
                    .saturating_add(expected);
                act.announced[slot] = expected;
                Effect::Counts
            }
            _ => Effect::None,
        }
    }

    /// The counts now.
    pub fn snapshot(&self) -> Snapshot {
        let stats = |kind: u64| -> Counts {
            let Some(slot) = counted_slot(kind) else {
                return Counts::default();
            };
            let totals = self.totals[slot];
            let mut counts = Counts {
                done: totals.done,
                expected: totals.expected,
                running: 0,
                failed: totals.failed,
            };
            for act in self.activities.values().filter(|a| a.kind == kind) {
                counts.done = counts.done.saturating_add(act.done);
                counts.expected = counts.expected.saturating_add(act.expected);
                counts.running = counts.running.saturating_add(act.running);
                counts.failed = counts.failed.saturating_add(act.failed);
            }
            counts.expected = counts.expected.max(totals.announced);
            counts
        };
        let copied = stats(activity::COPY_PATH);
        Snapshot {
            builds: stats(activity::BUILDS),
            downloads: stats(activity::COPY_PATHS),
            bytes: Bytes {
                done: copied.done,
                expected: copied.expected,
                downloaded: stats(activity::FILE_TRANSFER).done,
            },
            running: self
                .activities
                .values()
                .filter_map(|a| {
                    a.drv.as_ref().map(|drv| RunningBuild {
                        drv: drv.clone(),
                        phase: a.phase.clone(),
                    })
                })
                .take(MAX_LISTED_BUILDS)
                .collect(),
        }
    }
}

/// Sends each line of `text` (Nix messages may span several), with ANSI
/// escapes removed as Nix's own plain logger does when stderr is not a
/// terminal, and `suffix` after the last one.
fn emit_text(text: &str, suffix: &str, meaning: Meaning, out: &mut impl FnMut(&str, Meaning)) {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let mut lines = text.split('\n').peekable();
    while let Some(line) = lines.next() {
        let mut plain = strip_ansi(line.strip_suffix('\r').unwrap_or(line)).into_owned();
        if lines.peek().is_none() {
            plain.push_str(suffix);
        }
        out(&plain, meaning);
    }
}

fn emit_prefixed(prefix: &str, text: &str, out: &mut impl FnMut(&str, Meaning)) {
    let text = text.strip_suffix('\n').unwrap_or(text);
    for line in text.split('\n') {
        let plain = strip_ansi(line.strip_suffix('\r').unwrap_or(line));
        let mut shown = String::with_capacity(prefix.len() + plain.len());
        shown.push_str(prefix);
        shown.push_str(&plain);
        // A build's own output: it is information, whether the build
        // ends well or not (Nix's level-0 message says when it failed and
        // repeats its last lines).
        out(&shown, Meaning::Info);
    }
}

/// Removes terminal escape sequences: CSI (`ESC [` … final byte), OSC
/// (`ESC ]` … BEL or `ESC \`) and two-byte `ESC x`.
pub fn strip_ansi(text: &str) -> Cow<'_, str> {
    if !text.contains('\x1b') {
        return Cow::Borrowed(text);
    }
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            plain.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                for c in chars.by_ref() {
                    if ('\x40'..='\x7e').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                while let Some(c) = chars.next() {
                    if c == '\x07' {
                        break;
                    }
                    if c == '\x1b' && chars.peek() == Some(&'\\') {
                        chars.next();
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    Cow::Owned(plain)
}

/// `/nix/store/<hash>-hello-2.12.1.drv` → `hello-2.12.1`.
fn derivation_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    let name = match base.as_bytes().get(32) {
        Some(b'-') if base.len() > 33 => &base[33..],
        _ => base,
    };
    name.strip_suffix(".drv").unwrap_or(name)
}

/// The package name without its version, split like Nix's `DrvName`: at
/// the first `-` not followed by a letter. `hello-2.12.1` → `hello`.
fn package_name(name: &str) -> &str {
    let bytes = name.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'-' && bytes.get(i + 1).is_some_and(|n| !n.is_ascii_alphabetic()) {
            return &name[..i];
        }
    }
    name
}

fn cut(text: &str) -> String {
    text.chars().take(MAX_NAME_CHARS).collect()
}

#[cfg(test)]
#[path = "nix_log_tests.rs"]
mod tests;
