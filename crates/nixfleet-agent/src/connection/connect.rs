//! Opening one connection: TCP with a small send buffer, TLS for wss://,
//! and the WebSocket upgrade that carries the token. Bounded by
//! `ping_timeout`, and given up at once on shutdown.

use super::write_progress::{Tracked, WriteProgress};
use crate::config::Config;
use crate::shutdown;
use crate::watchdog::{Probe, answering_probes};
use secrecy::ExposeSecret;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, handshake::client::Request};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tracing::{error, info};

/// Frames from the dashboard larger than this are refused (protocol.md).
pub const MAX_INBOUND_FRAME: usize = 1024 * 1024;
/// tungstenite's read buffer (its default is 128 KiB).
const INBOUND_READ_BUFFER: usize = 4 * 1024;

/// One connection to the dashboard, as the session reads and writes it.
pub(super) type Socket = WebSocketStream<MaybeTlsStream<Tracked<TcpStream>>>;

pub(super) enum ConnectError {
    Shutdown,
    Failed(String),
}

/// What every connection attempt needs; the TLS configuration is built on
/// the first wss:// attempt and kept for the next ones.
pub(super) struct Dialer {
    config: Arc<Config>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Shared with each socket, which notes when it last accepted bytes.
    written: Arc<WriteProgress>,
}

/// The upgrade header that names this host (dashboards ignore it).
const HOSTNAME_HEADER: &str = "x-nixfleet-hostname";

impl Dialer {
    pub(super) fn new(config: Arc<Config>, written: Arc<WriteProgress>) -> Self {
        Dialer {
            config,
            tls: None,
            written,
        }
    }

    /// One attempt, answering the watchdog's probes while it waits.
    pub(super) async fn connect(
        &mut self,
        shutdown: &shutdown::Listener,
        probes: &mut mpsc::Receiver<Probe>,
    ) -> Result<Socket, ConnectError> {
        let request = self.request().map_err(ConnectError::Failed)?;
        let connector = self.connector().map_err(ConnectError::Failed)?;
        let ws_config = websocket_config();
        let connect_timeout = self.config.ping_timeout;
        let written = self.written.clone();
        let attempt = tokio::time::timeout(connect_timeout, async move {
            let stream = dial(&request).await.map_err(tungstenite::Error::Io)?;
            tokio_tungstenite::client_async_tls_with_config(
                request,
                Tracked::new(stream, written),
                Some(ws_config),
                Some(connector),
            )
            .await
        });
        let mut shutdown = shutdown.clone();
        let attempt = async {
            tokio::select! {
                result = attempt => Some(result),
                () = shutdown::requested(&mut shutdown) => None,
            }
        };
        match answering_probes(attempt, probes).await {
            None => Err(ConnectError::Shutdown),
            Some(Err(_elapsed)) => Err(ConnectError::Failed(format!(
                "connecting timed out after {}s",
                connect_timeout.as_secs()
            ))),
            Some(Ok(Err(error))) => {
                let has_cert = self.config.tls_client.is_some();
                Err(ConnectError::Failed(describe_connect_error(
                    &error, has_cert,
                )))
            }
            Some(Ok(Ok((socket, _response)))) => {
                info!(url = %self.config.url, "connected");
                Ok(socket)
            }
        }
    }

    /// Plain TCP for `ws://`; for `wss://` the TLS settings, built on the
    /// first attempt (reading `ca_file` and the client identity) and kept.
    fn connector(&mut self) -> Result<Connector, String> {
        if !self.config.url.starts_with("wss://") {
            return Ok(Connector::Plain);
        }
        if self.tls.is_none() {
            self.tls = Some(crate::tls::client_config(
                self.config.ca_file.as_deref(),
                self.config.tls_client.as_ref().map(|c| c.certified()),
            )?);
        }
        Ok(Connector::Rustls(self.tls.clone().expect("set above")))
    }

    fn request(&self) -> Result<Request, String> {
        let mut request = self
            .config
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("bad dashboard url: {e}"))?;
        let mut bearer =
            HeaderValue::try_from(format!("Bearer {}", self.config.token.expose_secret()))
                .map_err(|_| {
                    "the token contains characters not allowed in an HTTP header".to_owned()
                })?;
        // Keeps the value out of any Debug output of the request.
        bearer.set_sensitive(true);
        let headers = request.headers_mut();
        headers.insert(header::AUTHORIZATION, bearer);
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("nixfleet-agent/", env!("CARGO_PKG_VERSION"))),
        );
        // Our extension: the host is named before `register`, so a
        // dashboard with one token per host can refuse another host's token
        // at the upgrade (401) rather than after it (docs/protocol.md).
        if let Ok(host) = HeaderValue::try_from(self.config.hostname.as_str()) {
            headers.insert(HOSTNAME_HEADER, host);
        }
        Ok(request)
    }
}

fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        // tungstenite zero-fills the spare room of its read buffer each
        // time the reader is polled, and the session polls it on every
        // wake-up: the default 128 KiB cost 128 KiB of RSS and a 128 KiB
        // memset per heartbeat. Inbound frames are small; a large one
        // still fits (the buffer grows to the frame's size).
        .read_buffer_size(INBOUND_READ_BUFFER)
        .max_message_size(Some(MAX_INBOUND_FRAME))
        .max_frame_size(Some(MAX_INBOUND_FRAME))
}

/// The kernel's send buffer for the dashboard socket, kept small on purpose:
/// output the dashboard has not read yet then waits in the outbox, where
/// heartbeats overtake it and overflow is counted, instead of in the kernel,
/// where a heartbeat would queue behind megabytes of build log.
const SOCKET_SEND_BUFFER: u32 = 128 * 1024;

/// Opens the TCP connection for `request`'s URL, trying each address.
async fn dial(request: &Request) -> std::io::Result<TcpStream> {
    use std::io::{Error, ErrorKind};
    let uri = request.uri();
    let host = uri
        .host()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "the url has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("wss") {
            443
        } else {
            80
        });
    let mut last_error = Error::new(ErrorKind::NotFound, format!("{host} has no address"));
    for address in tokio::net::lookup_host((host, port)).await? {
        let socket = if address.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // Best effort: a kernel that refuses still gives a working socket.
        let _ = socket.set_send_buffer_size(SOCKET_SEND_BUFFER);
        match socket.connect(address).await {
            Ok(stream) => {
                // Lines must leave within 100 ms, and batching is ours.
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

fn describe_connect_error(error: &tungstenite::Error, has_cert: bool) -> String {
    if let Some(refusal) = client_certificate_refusal(error, has_cert) {
        return refusal;
    }
    match error {
        tungstenite::Error::Http(response) => {
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                error!(
                    status = status.as_u16(),
                    "authentication failed: the dashboard rejected the token"
                );
                format!("authentication failed (HTTP {})", status.as_u16())
            } else {
                format!(
                    "the dashboard refused the upgrade (HTTP {})",
                    status.as_u16()
                )
            }
        }
        other => other.to_string(),
    }
}

/// A TLS alert from the dashboard (or the proxy in front of it) about this
/// host's client certificate: it was refused, or one was wanted and none
/// is set. Only the server sends such alerts about the client's
/// certificate, so a received one is never about the server's.
fn client_certificate_refusal(error: &tungstenite::Error, has_cert: bool) -> Option<String> {
    use rustls::AlertDescription as Alert;
    let tls_error = match error {
        tungstenite::Error::Tls(tungstenite::error::TlsError::Rustls(e)) => e,
        tungstenite::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
        _ => return None,
    };
    let rustls::Error::AlertReceived(alert) = tls_error else {
        return None;
    };
    let about_certificate = matches!(
        alert,
        Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::UnsupportedCertificate
            | Alert::CertificateRevoked
            | Alert::CertificateExpired
            | Alert::CertificateUnknown
            | Alert::AccessDenied
    );
    if !about_certificate {
        return None;
    }
    Some(if has_cert {
        format!(
            "the dashboard refused this host's client certificate (tls_client_cert): \
             received fatal alert {alert:?}"
        )
    } else {
        format!(
            "the dashboard wants a client certificate and none is set (tls_client_cert, \
             tls_client_key): received fatal alert {alert:?}"
        )
    })
}
