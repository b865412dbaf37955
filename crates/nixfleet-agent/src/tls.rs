//! TLS for `wss://` dashboards: the system trust store plus an optional
//! extra CA file, and the host's own client certificate when one is set
//! (`tls_client_cert`, `tls_client_key`). Certificates are always
//! verified; there is no switch to turn that off.

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::Arc;

/// Builds the client configuration. Done once, on the first `wss://`
/// connection, so a `ws://` agent never pays for parsing the trust store.
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<Arc<CertifiedKey>>,
) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(error = %error, "skipping part of the system trust store");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "loaded the system trust store");
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
        let mut found = 0;
        for cert in certs {
            let cert = cert.map_err(|e| format!("bad PEM in ca_file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("bad CA certificate in ca_file {}: {e}", path.display()))?;
            found += 1;
        }
        if found == 0 {
            return Err(format!("ca_file {} holds no certificate", path.display()));
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted CA certificates: the system trust store is empty and no ca_file is set"
                .into(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots);
    let config = match identity {
        // The pair was checked, and the key parsed (its bytes then zeroed),
        // when the configuration was loaded: rustls gets the parsed key,
        // shared with the configuration, never the key's bytes.
        Some(certified) => {
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
