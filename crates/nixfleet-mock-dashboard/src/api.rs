//! The HTTP JSON API (documented in `main.rs`).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::conn::Outgoing;
use crate::frame::Msg;
use crate::shared::Shared;
use crate::state::SendError;

type ApiResult = Result<Response, ApiError>;

/// `{"error": msg}` with `status`.
pub fn error(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

/// An error response, small enough to pass around in a `Result`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, &self.1)
    }
}

fn api_error(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(status, msg.into())
}

fn host_param(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(host)| host)
        .map_err(|r| api_error(StatusCode::BAD_REQUEST, r.body_text()))
}

pub fn body_json(
    body: Result<Bytes, BytesRejection>,
    empty_is_object: bool,
) -> Result<Value, ApiError> {
    let body = body.map_err(|r| api_error(r.status(), r.body_text()))?;
    if empty_is_object && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&body).map_err(|e| {
        api_error(
            StatusCode::BAD_REQUEST,
            format!("body is not valid JSON: {e}"),
        )
    })
}

fn unknown_host(host: &str) -> ApiError {
    api_error(StatusCode::NOT_FOUND, format!("unknown host: {host}"))
}

pub async fn index() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "nixfleet-mock-dashboard: a mock NixFleet dashboard for tests and demos.\n\
         \n\
         GET  /                               the live web page\n\
         GET  /events                         its feed (Server-Sent Events)   ?host=<name>\n\
         GET  /health\n\
         GET  /ws                             (agents; Authorization: Bearer <token>)\n\
         GET  /api/hosts\n\
         GET  /api/hosts/{host}\n\
         GET  /api/hosts/{host}/messages      ?type=<type>&since=<index>&limit=<n>\n\
         GET  /api/hosts/{host}/connections\n\
         GET  /api/hosts/{host}/commands\n\
         POST /api/hosts/{host}/command       {\"command\": \"switch\"}\n\
         POST /api/command                    {\"command\": \"test\", \"hosts\": [\"a\", \"b\"] | \"all\"}\n\
         POST /api/hosts/{host}/kill          {\"signal\": \"SIGTERM\", \"pid\": 0}\n\
         POST /api/hosts/{host}/send          any JSON, {\"raw\": \"text\"} or {\"binary\": \"text\"}\n\
         POST /api/hosts/{host}/disconnect    {\"code\": 1011, \"reason\": \"...\"}\n\
         GET  /api/rejected\n",
    )
        .into_response()
}

pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not found")
}

pub async fn method_not_allowed() -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

pub async fn list_hosts(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let state = shared.lock();
    let hosts: Vec<Value> = (1..state.hosts.len()).map(|i| state.host_json(i)).collect();
    Json(Value::Array(hosts))
}

pub async fn get_host(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let host = host_param(path)?;
    let state = shared.lock();
    let idx = state.host_index(&host).ok_or_else(|| unknown_host(&host))?;
    Ok(Json(state.host_json(idx)).into_response())
}

pub async fn connections(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let host = host_param(path)?;
    let state = shared.lock();
    let idx = state.host_index(&host).ok_or_else(|| unknown_host(&host))?;
    let conns: Vec<Value> = state
        .conns
        .iter()
        .filter(|c| c.host == idx)
        .map(|c| state.conn_json(c))
        .collect();
    Ok(Json(Value::Array(conns)).into_response())
}

pub async fn rejected(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let state = shared.lock();
    let list: Vec<Value> = state
        .rejected
        .iter()
        .map(|r| json!({ "t": r.t, "remote": r.remote.to_string(), "reason": r.reason }))
        .collect();
    Json(Value::Array(list))
}

#[derive(Deserialize)]
pub struct MessagesQuery {
    #[serde(rename = "type")]
    kind: Option<String>,
    since: Option<String>,
    limit: Option<String>,
}

#[derive(Deserialize)]
struct PayloadProbe<'a> {
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct MessagesOut<'a> {
    host: &'a str,
    next: u64,
    evicted: u64,
    messages: Vec<MsgOut<'a>>,
}

#[derive(Serialize)]
pub struct MsgOut<'a> {
    index: u64,
    t: u64,
    conn: u64,
    #[serde(rename = "type")]
    kind: &'a str,
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<&'a str>,
}

impl<'a> MsgOut<'a> {
    pub fn new(index: u64, msg: &'a Msg) -> MsgOut<'a> {
        let (payload, raw) = if msg.kind.is_envelope() {
            let payload = serde_json::from_str::<PayloadProbe<'_>>(&msg.text)
                .ok()
                .and_then(|p| p.payload);
            (payload, None)
        } else {
            (None, Some(&*msg.text))
        };
        MsgOut {
            index,
            t: msg.t,
            conn: msg.conn,
            kind: msg.kind.as_str(),
            payload,
            raw,
        }
    }
}

fn parse_number<T: std::str::FromStr>(
    name: &str,
    value: Option<&str>,
) -> Result<Option<T>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            api_error(
                StatusCode::BAD_REQUEST,
                format!("query parameter {name} must be a non-negative integer"),
            )
        }),
    }
}

pub async fn messages(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<MessagesQuery>, QueryRejection>,
) -> ApiResult {
    let host = host_param(path)?;
    let Query(query) = query.map_err(|r| api_error(StatusCode::BAD_REQUEST, r.body_text()))?;
    let since: u64 = parse_number("since", query.since.as_deref())?.unwrap_or(0);
    let limit: usize = parse_number("limit", query.limit.as_deref())?.unwrap_or(usize::MAX);
    let kind = query.kind.as_deref();

    // Copy the selection out (cheap: the texts are reference-counted) and
    // build the response without holding the lock.
    let (selected, next, evicted) = {
        let state = shared.lock();
        let idx = state.host_index(&host).ok_or_else(|| unknown_host(&host))?;
        let h = &state.hosts[idx];
        let first = h.evicted;
        let skip = usize::try_from(since.saturating_sub(first)).unwrap_or(usize::MAX);
        let mut selected = Vec::new();
        let mut next = h.next_index;
        if limit > 0 {
            for (offset, msg) in h.messages.iter().enumerate().skip(skip) {
                if kind.is_some_and(|k| k != msg.kind.as_str()) {
                    continue;
                }
                let index = first + offset as u64;
                selected.push((index, msg.clone()));
                if selected.len() >= limit {
                    next = index + 1;
                    break;
                }
            }
        } else {
            next = since.clamp(first, h.next_index);
        }
        (selected, next, h.evicted)
    };
    let out = MessagesOut {
        host: &host,
        next,
        evicted,
        messages: selected.iter().map(|(i, m)| MsgOut::new(*i, m)).collect(),
    };
    match serde_json::to_vec(&out) {
        Ok(body) => Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response()),
        Err(e) => Err(api_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// Queues `out` (or reports why the body was bad) on `host`'s live
/// connection. Precedence: unknown host 404, bad body 400, not connected 409.
/// `timeline`: what the web page's timeline of the host should show for
/// it (commands and kills, not test frames).
fn dispatch(
    shared: &Shared,
    host: &str,
    what: &str,
    out: Result<Outgoing, String>,
    timeline: Option<(&str, Value)>,
) -> ApiResult {
    let mut state = shared.lock();
    if state.host_index(host).is_none() {
        return Err(unknown_host(host));
    }
    let out = out.map_err(|msg| api_error(StatusCode::BAD_REQUEST, msg))?;
    match state.send_to_host(host, out) {
        Ok(conn) => {
            // The log says which command, not only that one was sent.
            match &timeline {
                Some((_, detail)) => tracing::info!(host, conn, "API: sent {what} {detail}"),
                None => tracing::info!(host, conn, "API: sent {what}"),
            }
            if let Some((kind, detail)) = timeline {
                state.note_sent(host, kind, detail);
            }
            Ok(Json(json!({ "ok": true, "conn": conn })).into_response())
        }
        Err(SendError::UnknownHost) => Err(unknown_host(host)),
        Err(SendError::NotConnected) => Err(api_error(
            StatusCode::CONFLICT,
            format!("host {host} is not connected"),
        )),
    }
}

pub async fn command(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let host = host_param(path)?;
    let mut timeline = None;
    let out = match body_json(body, false) {
        Err(e) => return bad_body_or_unknown(&shared, &host, e),
        Ok(v) => match v.get("command").and_then(Value::as_str) {
            Some(command) => {
                timeline = Some(("command", json!(command)));
                Ok((
                    command.to_owned(),
                    Outgoing::Text(
                        json!({ "type": "command", "payload": { "command": command } }).to_string(),
                    ),
                ))
            }
            None => Err("body must be {\"command\": \"<name>\"}".to_owned()),
        },
    };
    let (name, out) = match out {
        Ok((name, out)) => (Some(name), Ok(out)),
        Err(e) => (None, Err(e)),
    };
    let response = dispatch(&shared, &host, "command", out, timeline)?;
    if let Some(name) = name {
        shared.lock().note_command(&host, &name);
    }
    Ok(response)
}

pub async fn commands(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let host = host_param(path)?;
    let state = shared.lock();
    let idx = state.host_index(&host).ok_or_else(|| unknown_host(&host))?;
    Ok(Json(state.hosts[idx].commands.all_json()).into_response())
}

pub async fn kill(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let host = host_param(path)?;
    let out = match body_json(body, true) {
        Err(e) => return bad_body_or_unknown(&shared, &host, e),
        Ok(v) => kill_frame(&v),
    };
    let timeline = match &out {
        Ok(Outgoing::Text(frame)) => serde_json::from_str::<Value>(frame)
            .ok()
            .map(|v| ("kill_command", v["payload"].clone())),
        _ => None,
    };
    dispatch(&shared, &host, "kill_command", out, timeline)
}

fn kill_frame(v: &Value) -> Result<Outgoing, String> {
    let usage =
        "body must be {\"signal\": \"SIGTERM\"|\"SIGKILL\", \"pid\": <integer>} (both optional)";
    if !v.is_object() {
        return Err(usage.to_owned());
    }
    let signal = match v.get("signal") {
        None | Some(Value::Null) => "SIGTERM",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(usage.to_owned()),
    };
    let pid = match v.get("pid") {
        None | Some(Value::Null) => json!(0),
        Some(p @ Value::Number(n)) if n.is_i64() || n.is_u64() => p.clone(),
        Some(_) => return Err(usage.to_owned()),
    };
    Ok(Outgoing::Text(
        json!({ "type": "kill_command", "payload": { "signal": signal, "pid": pid } }).to_string(),
    ))
}

pub async fn send(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let host = host_param(path)?;
    let raw_body = match &body {
        Ok(b) => b.clone(),
        Err(_) => Bytes::new(),
    };
    let out = match body_json(body, false) {
        Err(e) => return bad_body_or_unknown(&shared, &host, e),
        Ok(v) => send_frame(v, &raw_body),
    };
    dispatch(&shared, &host, "a frame", Ok(out), None)
}

fn send_frame(v: Value, raw_body: &[u8]) -> Outgoing {
    if let Value::Object(map) = &v
        && map.len() == 1
    {
        if let Some(Value::String(raw)) = map.get("raw") {
            return Outgoing::Text(raw.clone());
        }
        if let Some(Value::String(data)) = map.get("binary") {
            return Outgoing::Binary(data.clone().into_bytes());
        }
    }
    // Valid JSON is valid UTF-8, so this is the body verbatim.
    match std::str::from_utf8(raw_body) {
        Ok(text) => Outgoing::Text(text.to_owned()),
        Err(_) => Outgoing::Text(v.to_string()),
    }
}

pub async fn disconnect(
    State(shared): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let host = host_param(path)?;
    let out = match body_json(body, true) {
        Err(e) => return bad_body_or_unknown(&shared, &host, e),
        Ok(v) => disconnect_action(&v),
    };
    dispatch(&shared, &host, "disconnect", out, None)
}

fn disconnect_action(v: &Value) -> Result<Outgoing, String> {
    let usage = "body must be {\"code\": <1000..4999>, \"reason\": \"<at most 123 bytes>\", \"abort\": false} (all optional)";
    if !v.is_object() {
        return Err(usage.to_owned());
    }
    match v.get("abort") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => return Ok(Outgoing::Abort),
        Some(_) => return Err(usage.to_owned()),
    }
    let code = match v.get("code") {
        None | Some(Value::Null) => 1000,
        Some(c) => c
            .as_u64()
            .and_then(|c| u16::try_from(c).ok())
            .filter(|c| (1000..=4999).contains(c) && ![1004, 1005, 1006, 1015].contains(c))
            .ok_or_else(|| format!("{usage}; 1004, 1005, 1006 and 1015 may not be sent"))?,
    };
    let reason = match v.get("reason") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(r)) if r.len() <= 123 => r.clone(),
        Some(_) => return Err(usage.to_owned()),
    };
    Ok(Outgoing::Close { code, reason })
}

/// A body that could not be read or parsed: 404 if the host is unknown
/// anyway (the precedence `dispatch` documents), else the 400.
fn bad_body_or_unknown(shared: &Shared, host: &str, bad: ApiError) -> ApiResult {
    if shared.lock().host_index(host).is_none() {
        return Err(unknown_host(host));
    }
    Err(bad)
}
