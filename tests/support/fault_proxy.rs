//! A TCP proxy in front of one model server that a test can "kill": the listener closes (new
//! connections are refused) and every open connection is reset (RST, as the kernel does for a
//! process killed mid-request), all before [`FaultProxy::kill`] returns. To Envoy and the EPP the
//! replica behind it is then gone, exactly as if its process had died, while the test keeps the
//! in-process mock (and its counters) behind it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// A running proxy; killed on drop.
pub struct FaultProxy {
    /// Where clients connect (the "replica's" address).
    pub addr: SocketAddr,
    kill: watch::Sender<bool>,
    open: Arc<AtomicUsize>,
    task: Option<JoinHandle<usize>>,
}

impl FaultProxy {
    /// Listens on `bind` (port 0: a free one) and forwards every connection to `upstream`.
    pub async fn start(bind: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding fault proxy on {bind}"))?;
        let addr = listener.local_addr()?;
        let (kill, killed) = watch::channel(false);
        let open = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(accept_loop(listener, upstream, killed, open.clone()));
        Ok(Self {
            addr,
            kill,
            open,
            task: Some(task),
        })
    }

    /// Connections open through the proxy right now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Closes the listener and resets every open connection; returns how many were reset.
    /// Idempotent (a second call returns 0).
    pub async fn kill(&mut self) -> usize {
        self.kill.send_replace(true);
        match self.task.take() {
            Some(task) => task.await.unwrap_or(0),
            None => 0,
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.kill.send_replace(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    killed: watch::Receiver<bool>,
    open: Arc<AtomicUsize>,
) -> usize {
    let mut conns = JoinSet::new();
    let mut stop = killed.clone();
    loop {
        tokio::select! {
            _ = stop.wait_for(|k| *k) => break,
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let _ = client.set_nodelay(true);
                open.fetch_add(1, Ordering::SeqCst);
                conns.spawn(pipe(client, upstream, killed.clone(), open.clone()));
            }
            // Reap finished connections so the set stays small.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    // Refuse new connections before anything else happens.
    drop(listener);
    let mut reset = 0;
    while let Some(r) = conns.join_next().await {
        if matches!(r, Ok(true)) {
            reset += 1;
        }
    }
    reset
}

/// Copies both ways until either side closes (false) or the proxy is killed (true: both sides
/// reset).
async fn pipe(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut killed: watch::Receiver<bool>,
    open: Arc<AtomicUsize>,
) -> bool {
    struct Open(Arc<AtomicUsize>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _open = Open(open);
    let Ok(Ok(mut server)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)).await
    else {
        let _ = client.shutdown().await;
        return false;
    };
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        _ = killed.wait_for(|k| *k) => {
            // SO_LINGER 0: close() sends RST instead of FIN, like a crashed process's sockets
            // with unread data; the peer cannot mistake it for a clean end of response.
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
            true
        }
    }
}
