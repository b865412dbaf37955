//! Certificates made for one test (rcgen), and a small HTTPS client for the
//! mock's API when it serves TLS.

// The agent's TLS tests make their certificates with the same CA.
#[allow(dead_code)] // the agent's tests use parts this crate's do not
#[path = "../../../nixfleet-agent/tests/common/test_ca.rs"]
mod test_ca;

pub use test_ca::TestCa;

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GETs over TLS, trusting `ca`, presenting `client` (cert, key PEM) if
/// given.
pub struct Api {
    config: Arc<rustls::ClientConfig>,
}

impl Api {
    pub fn new(ca: &TestCa, client: Option<&(String, String)>) -> Api {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Api {
            config: Arc::new(config),
        }
    }

    pub async fn get(&self, addr: &str, path: &str) -> (u16, Value) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        // A server closing without close_notify is fine here.
        let _ = tls.read_to_string(&mut response).await;
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// Polls until `cond` holds for what `path` answers.
    pub async fn wait_for(&self, addr: &str, path: &str, cond: impl Fn(&Value) -> bool) -> Value {
        let start = std::time::Instant::now();
        loop {
            let (status, body) = self.get(addr, path).await;
            if status == 200 && cond(&body) {
                return body;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "timed out on {path}: {body}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
