//! `POST /api/command`: one command to many hosts at once (a list, or
//! `"all"`), for fleet tests; the per-host form is in `api.rs`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::api::{body_json, error};
use crate::conn::Outgoing;
use crate::shared::Shared;
use crate::state::SendError;

const USAGE: &str = "body must be {\"command\": \"<name>\", \"hosts\": [\"<host>\", …] | \"all\"}";

/// Which hosts a request names.
enum Targets {
    All,
    Named(Vec<String>),
}

fn parse(v: &Value) -> Result<(String, Targets), String> {
    let command = v.get("command").and_then(Value::as_str).ok_or(USAGE)?;
    let targets = match v.get("hosts") {
        Some(Value::String(all)) if all == "all" => Targets::All,
        Some(Value::Array(list)) => Targets::Named(
            list.iter()
                .map(|h| h.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or(USAGE)?,
        ),
        _ => return Err(USAGE.to_owned()),
    };
    Ok((command.to_owned(), targets))
}

/// Sends the command to each named host (every registered host for
/// `"all"`) under one lock; answers `200 {"sent": [{"host", "conn"}],
/// "failed": [{"host", "error"}]}`: a host that is unknown or not connected
/// is listed, it does not fail the others.
pub async fn command(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = match body_json(body, false) {
        Ok(v) => parse(&v),
        Err(e) => return e.into_response(),
    };
    let (command, targets) = match parsed {
        Ok(p) => p,
        Err(msg) => return error(StatusCode::BAD_REQUEST, &msg),
    };
    let frame = json!({ "type": "command", "payload": { "command": command } }).to_string();
    let mut state = shared.lock();
    let names = match targets {
        Targets::All => state.hosts.iter().skip(1).map(|h| h.name.clone()).collect(),
        Targets::Named(names) => names,
    };
    let (mut sent, mut failed) = (Vec::new(), Vec::new());
    for host in names {
        match state.send_to_host(&host, Outgoing::Text(frame.clone())) {
            Ok(conn) => {
                state.note_sent(&host, "command", json!(command));
                state.note_command(&host, &command);
                sent.push(json!({ "host": host, "conn": conn }));
            }
            Err(why) => {
                let reason = match why {
                    SendError::UnknownHost => format!("unknown host: {host}"),
                    SendError::NotConnected => format!("host {host} is not connected"),
                };
                failed.push(json!({ "host": host, "error": reason }));
            }
        }
    }
    drop(state);
    tracing::info!(
        sent = sent.len(),
        failed = failed.len(),
        "API: sent command {command} to many hosts"
    );
    Json(json!({ "sent": sent, "failed": failed })).into_response()
}
