//! `tls_client_cert` and `tls_client_key`: the certificate this host shows
//! a `wss://` dashboard (or the proxy in front of it) that asks for one.
//! Both files are read here, once, and the pair is checked: a key that
//! does not belong to the certificate would fail every handshake, so it
//! stops the agent with exit 78 instead. No message ever holds the key's
//! bytes: its parse errors are summarised, not shown.

use super::{Validator, check_path};
use crate::config::effective::ClientIdentity;
use crate::config::files::{check_readable_file, read_capped, warn_loose_permissions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};

/// Larger PEM files than this are refused (a certificate chain is a few KiB).
const MAX_PEM_BYTES: u64 = 1024 * 1024;

impl Validator<'_> {
    /// Both keys or neither; each a readable PEM file; the key the one of
    /// the certificate's public key.
    pub(crate) fn tls_client(
        &mut self,
        cert: Option<String>,
        key: Option<String>,
    ) -> Result<Option<ClientIdentity>, String> {
        let (cert, key) = match (cert, key) {
            (None, None) => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            (Some(cert), None) => {
                let why = "tls_client_key is not set (the certificate needs its private key)";
                return Err(self.bad("tls_client_cert", &cert, why));
            }
            (None, Some(key)) => {
                let why = "tls_client_cert is not set (the key needs its certificate)";
                return Err(self.bad("tls_client_key", &key, why));
            }
        };
        let chain = self.client_chain(&cert)?;
        let private = self.client_key(&key)?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&private).map_err(|_| {
            let why = "is not an RSA, ECDSA or Ed25519 private key rustls can use";
            self.bad("tls_client_key", &key, why)
        })?;
        CertifiedKey::new(chain.clone(), signing)
            .keys_match()
            .map_err(|_| {
                let why = format!("does not match the certificate in tls_client_cert {cert}");
                self.bad("tls_client_key", &key, &why)
            })?;
        warn_loose_permissions(Path::new(&key), "tls_client_key", &mut self.warnings);
        Ok(Some(ClientIdentity::new(
            PathBuf::from(cert),
            PathBuf::from(key),
            chain,
            private,
        )))
    }

    fn client_chain(&self, cert: &str) -> Result<Vec<CertificateDer<'static>>, String> {
        let bad = |why: &str| self.bad("tls_client_cert", cert, why);
        let pem = self.pem_file(cert).map_err(|why| bad(&why))?;
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&format!("bad PEM: {e}")))?;
        if chain.is_empty() {
            return Err(bad("holds no PEM certificate"));
        }
        Ok(chain)
    }

    fn client_key(&self, key: &str) -> Result<PrivateKeyDer<'static>, String> {
        let bad = |why: &str| self.bad("tls_client_key", key, why);
        let pem = self.pem_file(key).map_err(|why| bad(&why))?;
        // The parser's own error could quote part of the file: not shown.
        PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|_| bad("holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"))
    }

    fn pem_file(&self, path: &str) -> Result<Vec<u8>, String> {
        check_path(path)?;
        check_readable_file(Path::new(path))?;
        read_capped(Path::new(path), MAX_PEM_BYTES)
    }
}
