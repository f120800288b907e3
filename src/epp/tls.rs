//! TLS for the ext_proc port (`--secure-serving`): a certificate from `--cert-path`
//! (`tls.crt` + `tls.key`, as the reference expects), optionally reloaded when the files change
//! (`--enable-cert-reload`), or a self-signed one generated at startup.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("no certificate found in {0}")]
    NoCertificate(PathBuf),
    #[error("invalid private key in {path}: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("generating a self-signed certificate: {0}")]
    SelfSigned(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Serves whichever certificate is current; swapped atomically on reload.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified_key(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::BadKey {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(CertifiedKey::new(certs, signing))
}

/// Loads `<dir>/tls.crt` and `<dir>/tls.key`.
pub fn load_from_dir(dir: &Path) -> Result<CertifiedKey, TlsError> {
    let crt = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let crt_pem = read(&crt)?;
    let key_pem = read(&key)?;
    load_from_pem(&crt_pem, &key_pem, &crt, &key)
}

/// Builds the certified key from PEM text (`crt_path`/`key_path` only name them in errors).
/// Certificates that do not parse are skipped; none at all is an error, as is a bad key.
pub fn load_from_pem(
    crt_pem: &[u8],
    key_pem: &[u8],
    crt_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(crt_pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(crt_path.to_path_buf()));
    }
    let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::BadKey {
        path: key_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    certified_key(certs, key_der, key_path)
}

/// A fresh self-signed certificate (the reference's default when no `--cert-path` is given).
pub fn self_signed() -> Result<CertifiedKey, TlsError> {
    let cert = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "switchyard-epp".to_string(),
    ])
    .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::try_from(cert.key_pair.serialize_der())
        .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
    certified_key(vec![der], key, Path::new("<self-signed>"))
}

/// Builds the acceptor. With `reload`, a background task re-reads the files when they change.
pub fn acceptor(
    cert_dir: Option<&Path>,
    reload: bool,
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let key = match cert_dir {
        Some(dir) => load_from_dir(dir)?,
        None => self_signed()?,
    };
    let store = Arc::new(CertStore {
        current: ArcSwap::from_pointee(key),
    });
    if let (Some(dir), true) = (cert_dir, reload) {
        spawn_reloader(dir.to_path_buf(), store.clone());
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn spawn_reloader(dir: PathBuf, store: Arc<CertStore>) {
    type Stamp = (Option<SystemTime>, Option<SystemTime>);
    fn stamp(d: &Path) -> Stamp {
        (mtime(&d.join("tls.crt")), mtime(&d.join("tls.key")))
    }
    tokio::spawn(async move {
        // The stat and the read run on the blocking pool: a slow or hung volume (a Secret mount
        // on a struggling node) must not stall a runtime worker that serves ext_proc streams.
        let d = dir.clone();
        let mut last = tokio::task::spawn_blocking(move || stamp(&d))
            .await
            .unwrap_or_default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let (d, seen) = (dir.clone(), last);
            let polled = tokio::task::spawn_blocking(move || {
                let now = stamp(&d);
                (now != seen).then(|| (now, load_from_dir(&d)))
            })
            .await;
            let Ok(Some((now, loaded))) = polled else {
                continue;
            };
            last = now;
            match loaded {
                Ok(key) => {
                    store.current.store(Arc::new(key));
                    tracing::info!(dir = %dir.display(), "reloaded TLS certificate");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate reload failed; keeping the previous one")
                }
            }
        }
    });
}

/// Limits of the TLS accept path (`--tls-handshake-timeout`, `--tls-max-concurrent-handshakes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    pub timeout: Duration,
    pub max_concurrent: usize,
}

/// Accepts TCP connections and runs each TLS handshake in its own task, under a timeout and a
/// cap on handshakes in progress, so a client that connects and sends nothing (or trickles its
/// ClientHello) costs one task until the timeout, never the accept loop. Connections that arrive
/// while `max_concurrent` handshakes are in progress are closed at once. Finished handshakes are
/// handed to the server through the returned stream; the loop ends when the stream is dropped.
pub fn spawn_tls_accept(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    limits: HandshakeLimits,
) -> (
    tokio::task::JoinHandle<()>,
    tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(limits.max_concurrent.max(1));
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent));
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "ext_proc accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::warn!(%peer, max = limits.max_concurrent, "too many TLS handshakes in progress; connection closed (--tls-max-concurrent-handshakes)");
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let done = tokio::time::timeout(limits.timeout, acceptor.accept(tcp)).await;
                drop(permit);
                match done {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsConn(tls))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => {
                        tracing::debug!(%peer, timeout = ?limits.timeout, "TLS handshake timed out; connection closed (--tls-handshake-timeout)")
                    }
                }
            });
        }
    });
    (task, tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A TLS connection tonic can serve (it needs to know the peer address).
pub struct TlsConn(pub TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Option<SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.peer_addr().ok()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
