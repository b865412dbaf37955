//! The client TLS key (`tls_client_key`), from its PEM file to the signing
//! key rustls uses, held like the token: every buffer that holds its bytes
//! is zeroed when dropped, and none of them can be printed.
//!
//! The file is read into one buffer of its final size (a `Vec` that grows
//! while reading would hand back copies of the key with each reallocation)
//! and decoded here rather than by `rustls-pki-types`' PEM reader, whose
//! base64 buffer is neither sized up front nor zeroed. The decoding does
//! not branch or index on the key's bytes (only on line breaks and the
//! `-----` markers), as a PEM decoder for secrets should not. What rustls
//! and ring do with the key afterwards: see `config/validate/client_cert.rs`.

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};
use secrecy::zeroize::Zeroizing;
use std::fmt;
use std::io::Read;
use std::path::Path;

/// The PEM encodings of a private key rustls can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `PRIVATE KEY`
    Pkcs8,
    /// `RSA PRIVATE KEY`
    Pkcs1,
    /// `EC PRIVATE KEY`
    Sec1,
}

/// A private key's DER bytes, zeroed when dropped; `Debug` shows none of
/// them.
pub struct PrivateKey {
    kind: Kind,
    der: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({:?}, [secret key elided])", self.kind)
    }
}

impl PrivateKey {
    /// The first private key in the PEM file at `path`, a file of at most
    /// `max` bytes. Errors never quote the file.
    pub fn read(path: &Path, max: u64) -> Result<PrivateKey, String> {
        let pem = read_whole(path, max)?;
        PrivateKey::from_pem(&pem)
    }

    /// The first `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`
    /// section of `pem`; other sections (`EC PARAMETERS`, certificates)
    /// are skipped.
    pub fn from_pem(pem: &[u8]) -> Result<PrivateKey, String> {
        let none = || "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned();
        let mut kind = None;
        // Never grows: the body is shorter than the file.
        let mut body = Zeroizing::new(Vec::with_capacity(pem.len()));
        for line in pem.split(|&b| b == b'\n') {
            let line = line.trim_ascii();
            match kind {
                None => {
                    let label = line
                        .strip_prefix(b"-----BEGIN ")
                        .and_then(|l| l.strip_suffix(b"-----"));
                    kind = match label {
                        Some(b"PRIVATE KEY") => Some(Kind::Pkcs8),
                        Some(b"RSA PRIVATE KEY") => Some(Kind::Pkcs1),
                        Some(b"EC PRIVATE KEY") => Some(Kind::Sec1),
                        _ => None,
                    };
                }
                Some(kind) if line.starts_with(b"-----END ") => {
                    let der = base64_decode(&body)
                        .ok_or_else(|| "holds a private key that is not valid base64".to_owned())?;
                    if der.is_empty() {
                        return Err(none());
                    }
                    return Ok(PrivateKey { kind, der });
                }
                Some(_) => body.extend_from_slice(line),
            }
        }
        Err(none())
    }

    /// The key for rustls, borrowing these bytes (no copy).
    pub fn der(&self) -> PrivateKeyDer<'_> {
        let der = self.der.as_slice();
        match self.kind {
            Kind::Pkcs8 => PrivatePkcs8KeyDer::from(der).into(),
            Kind::Pkcs1 => PrivatePkcs1KeyDer::from(der).into(),
            Kind::Sec1 => PrivateSec1KeyDer::from(der).into(),
        }
    }
}

/// The whole file, in one zeroed-on-drop buffer allocated once.
fn read_whole(path: &Path, max: u64) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let size = file
        .metadata()
        .map_err(|e| format!("cannot read it: {e}"))?
        .len();
    if size > max {
        return Err(format!("is larger than {max} bytes"));
    }
    // One byte more than its size, to see that it grew meanwhile.
    let mut buf = Zeroizing::new(vec![0u8; size as usize + 1]);
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            return Err("changed while it was read".to_owned());
        }
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("cannot read it: {e}")),
        }
    }
    // Shortening keeps the allocation: the whole of it is zeroed on drop.
    buf.truncate(filled);
    Ok(buf)
}

/// The value of a base64 character (`A-Z a-z 0-9 + /`), or -1, computed
/// without a branch or a table lookup on it: each range test is the sign of
/// `(low - c) & (c - high)`, which is negative only inside (low, high).
fn sextet(c: u8) -> i16 {
    let c = i16::from(c);
    let inside = |low: i16, high: i16| ((low - c) & (c - high)) >> 8;
    let mut value = -1;
    value += inside(0x40, 0x5b) & (c - 64); // 'A'..='Z' → 0..=25
    value += inside(0x60, 0x7b) & (c - 70); // 'a'..='z' → 26..=51
    value += inside(0x2f, 0x3a) & (c + 5); // '0'..='9' → 52..=61
    value += inside(0x2a, 0x2c) & 63; // '+' → 62
    value += inside(0x2e, 0x30) & 64; // '/' → 63
    value
}

/// Standard base64 (RFC 4648, padding optional) into a buffer allocated
/// once; `None` for any other character or a length no encoder writes.
/// Whether a character was valid is gathered and looked at only at the
/// end.
fn base64_decode(text: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let padding = text
        .iter()
        .rev()
        .take(2)
        .take_while(|&&c| c == b'=')
        .count();
    let text = &text[..text.len() - padding];
    let mut out = Zeroizing::new(Vec::with_capacity(text.len() / 4 * 3 + 2));
    let mut invalid = 0u8;
    let (mut bits, mut held) = (0u32, 0u32);
    for &c in text {
        let value = sextet(c);
        invalid |= (value >> 8) as u8;
        bits = ((bits << 6) | (value as u32 & 0x3f)) & 0xffff;
        held += 6;
        if held >= 8 {
            held -= 8;
            out.push((bits >> held) as u8);
        }
    }
    // One character alone cannot end a group; padding must fill one.
    let ragged = text.len() % 4 == 1 || (padding > 0 && !(text.len() + padding).is_multiple_of(4));
    (invalid == 0 && !ragged).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn base64_matches_rfc_4648() {
        for (text, plain) in [
            ("", ""),
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg==", "foob"),
            ("Zm9vYmE=", "fooba"),
            ("Zm9vYmFy", "foobar"),
            ("Zm9vYmFy", "foobar"),
            ("Zm9vYg", "foob"),
        ] {
            let decoded = base64_decode(text.as_bytes()).expect(text);
            assert_eq!(decoded.as_slice(), plain.as_bytes(), "{text}");
        }
        // Every character, each at every value.
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for c in 0..=255u8 {
            let expected = alphabet
                .iter()
                .position(|&a| a == c)
                .map_or(-1, |i| i as i16);
            assert_eq!(sextet(c), expected, "{c}");
        }
        for bad in [
            "Zm9v!",
            "Z",
            "Zm9vY",
            "Zm=9",
            "Zg=",
            "Zm9v YmFy",
            "Zm9v\u{e9}",
        ] {
            assert!(base64_decode(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn keys_decode_as_rustls_pki_types_decodes_them() {
        let pair = rcgen::KeyPair::generate().unwrap();
        let pem = pair.serialize_pem();
        let ours = PrivateKey::from_pem(pem.as_bytes()).unwrap();
        let theirs = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(ours.der(), theirs);
        assert_eq!(ours.kind, Kind::Pkcs8);
        // CRLF line ends, a certificate and EC parameters before the key.
        let cert = rcgen::CertificateParams::new(vec!["h".into()])
            .unwrap()
            .self_signed(&pair)
            .unwrap()
            .pem();
        let params =
            "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n";
        let mixed = format!("{cert}{params}{pem}").replace('\n', "\r\n");
        let again = PrivateKey::from_pem(mixed.as_bytes()).unwrap();
        assert_eq!(again.der(), theirs);
        let sec1 = pem.replace("PRIVATE KEY", "EC PRIVATE KEY");
        let sec1 = PrivateKey::from_pem(sec1.as_bytes()).unwrap();
        assert!(matches!(sec1.der(), PrivateKeyDer::Sec1(_)));
        let pkcs1 = pem.replace("PRIVATE KEY", "RSA PRIVATE KEY");
        let pkcs1 = PrivateKey::from_pem(pkcs1.as_bytes()).unwrap();
        assert!(matches!(pkcs1.der(), PrivateKeyDer::Pkcs1(_)));
    }

    #[test]
    fn no_key_no_bytes_in_errors_or_debug() {
        let pair = rcgen::KeyPair::generate().unwrap();
        let pem = pair.serialize_pem();
        let body = pem.lines().nth(1).unwrap();
        let key = PrivateKey::from_pem(pem.as_bytes()).unwrap();
        let shown = format!("{key:?}");
        assert_eq!(shown, "PrivateKey(Pkcs8, [secret key elided])");
        let broken = pem.replacen(&body[..8], "!!!!!!!!", 1);
        let error = PrivateKey::from_pem(broken.as_bytes()).unwrap_err();
        assert!(!error.contains(&body[8..20]), "{error}");
        assert!(error.contains("not valid base64"), "{error}");
        for no_key in [
            "",
            "hello",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            let error = PrivateKey::from_pem(no_key.as_bytes()).unwrap_err();
            assert!(error.contains("holds no PEM private key"), "{error}");
        }
        let unterminated = pem.lines().take(2).collect::<Vec<_>>().join("\n");
        assert!(PrivateKey::from_pem(unterminated.as_bytes()).is_err());
    }

    #[test]
    fn the_file_is_read_whole_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
        std::fs::write(&path, &pem).unwrap();
        let read = read_whole(&path, 1 << 20).unwrap();
        assert_eq!(read.as_slice(), pem.as_bytes());
        assert_eq!(read.capacity(), pem.len() + 1);
        let error = read_whole(&path, 10).unwrap_err();
        assert!(error.contains("larger than 10 bytes"), "{error}");
        let error = read_whole(&dir.path().join("absent"), 10).unwrap_err();
        assert!(error.starts_with("cannot read it"), "{error}");
        assert!(PrivateKey::read(&path, 1 << 20).is_ok());
    }
}
