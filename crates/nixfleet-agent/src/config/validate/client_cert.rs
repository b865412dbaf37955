//! `tls_client_cert` and `tls_client_key`: the certificate this host shows
//! a `wss://` dashboard (or the proxy in front of it) that asks for one.
//! Both files are read here, once, and the pair is checked: a key that
//! does not belong to the certificate would fail every handshake, so it
//! stops the agent with exit 78 instead. No message ever holds the key's
//! bytes: its parse errors are summarised, not shown.
//!
//! The key is kept as the token is: its PEM and DER bytes live only in
//! zeroed-on-drop buffers (`private_key`) while ring parses them into the
//! signing key, and are zeroed as soon as that is done; no copy of them
//! stays in the configuration. What stays is ring's parsed key inside
//! rustls' `CertifiedKey`, which the TLS configuration needs until the
//! agent exits. ring keeps it in its own form (RSA: the private exponent
//! and primes as big integers; ECDSA: the scalar; Ed25519: the seed) and,
//! as its own comments say, does not zero it when dropped; nothing of it
//! is printable (its `Debug` names the algorithm only). A SEC1 `EC PRIVATE
//! KEY` is re-wrapped by rustls as PKCS#8 in a temporary buffer it does not
//! zero: a PKCS#8 key (`PRIVATE KEY`, what `openssl genpkey` writes)
//! avoids that. The agent is not dumpable (`hardening`), so no core file
//! holds any of it; the memory is not locked against swap.

use super::{Validator, check_path};
use crate::config::effective::ClientIdentity;
use crate::config::files::{check_readable_file, read_capped, warn_loose_permissions};
use crate::private_key::PrivateKey;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::{CertifiedKey, SigningKey};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
        let signing = self.client_key(&key)?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|_| {
            let why = format!("does not match the certificate in tls_client_cert {cert}");
            self.bad("tls_client_key", &key, &why)
        })?;
        warn_loose_permissions(Path::new(&key), "tls_client_key", &mut self.warnings);
        Ok(Some(ClientIdentity::new(
            PathBuf::from(cert),
            PathBuf::from(key),
            Arc::new(certified),
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

    /// The signing key rustls uses; the key's bytes are zeroed on return.
    fn client_key(&self, key: &str) -> Result<Arc<dyn SigningKey>, String> {
        let bad = |why: &str| self.bad("tls_client_key", key, why);
        check_path(key).map_err(|why| bad(&why))?;
        check_readable_file(Path::new(key)).map_err(|why| bad(&why))?;
        let private = PrivateKey::read(Path::new(key), MAX_PEM_BYTES).map_err(|why| bad(&why))?;
        rustls::crypto::ring::sign::any_supported_type(&private.der())
            .map_err(|_| bad("is not an RSA, ECDSA or Ed25519 private key rustls can use"))
    }

    fn pem_file(&self, path: &str) -> Result<Vec<u8>, String> {
        check_path(path)?;
        check_readable_file(Path::new(path))?;
        read_capped(Path::new(path), MAX_PEM_BYTES)
    }
}
