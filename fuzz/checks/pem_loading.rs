//! `--cert-path` PEM loading: `tls.crt` and `tls.key` contents.
//!
//! Input: the certificate file, a NUL byte, the key file (no NUL: all certificate, empty key).

use std::path::Path;

use switchyard::epp::tls::{load_from_pem, TlsError};

pub fn run(data: &[u8]) {
    let (crt, key) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    match load_from_pem(crt, key, Path::new("tls.crt"), Path::new("tls.key")) {
        Ok(certified) => assert!(!certified.cert.is_empty()),
        Err(TlsError::NoCertificate(p)) => assert_eq!(p, Path::new("tls.crt")),
        Err(TlsError::BadKey { path, reason }) => {
            assert_eq!(path, Path::new("tls.key"));
            assert!(!reason.is_empty());
        }
        Err(other) => panic!("unexpected error kind: {other}"),
    }
}
