//! Runs a server on a thread of its own with a single-threaded tokio runtime
//! (`--ext-proc-own-thread`).
//!
//! On the shared multi-thread runtime each ext_proc exchange crossed threads: hyper spawns a
//! task per HTTP/2 stream, an idle worker is unparked to steal it, and the connection task and
//! the stream task wake each other across workers (futex, context switch). On one thread the
//! socket readiness, the connection task and the stream tasks are all polled in one loop; same-run
//! A/B in docs/benchmarks.md ("Issue 12, third pass").
//!
//! With TLS the handshakes run on that thread too (bounded by `--tls-max-concurrent-handshakes`
//! and `--tls-handshake-timeout`), so a handshake flood delays ext_proc exchanges.
//!
//! The future is built inside the runtime, so sockets it creates (`TcpListener::from_std`,
//! accepted connections) register with this thread's reactor, not the shared one.

use std::future::Future;
use std::io;

use tokio::task::JoinHandle;

/// Starts a thread named `name` running the future `make` returns. Aborting the returned handle
/// (or the future ending) stops the runtime: every task it spawned (connections, accept loop) is
/// dropped with it, so listeners and sockets close.
pub fn spawn<F, Fut>(name: &str, make: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Dropped when the main task ends or is aborted; the thread then leaves `block_on`.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let task = runtime.spawn(async move {
        let _done = done_tx;
        make().await;
    });
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _ = runtime.block_on(done_rx);
        })?;
    Ok(task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn runs_on_its_own_thread_and_stops_when_aborted() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        let task = spawn("own-thread-test", move || async move {
            let name = std::thread::current().name().map(str::to_string);
            // Dropped with the runtime when the task is aborted.
            let _closed = closed_tx;
            let _ = tx.send(name);
            std::future::pending::<()>().await;
        })
        .unwrap();
        let name = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(name.as_deref(), Some("own-thread-test"));
        task.abort();
        // The sender held by the aborted future is dropped: the receiver sees the close.
        let closed = tokio::time::timeout(Duration::from_secs(30), closed_rx)
            .await
            .unwrap();
        assert!(closed.is_err());
    }

    #[tokio::test]
    async fn a_listener_built_inside_is_served_by_that_thread() {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let task = spawn("own-thread-accept", move || async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                use tokio::io::AsyncWriteExt;
                let name = std::thread::current().name().unwrap_or("").to_string();
                let _ = conn.write_all(name.as_bytes()).await;
            }
        })
        .unwrap();
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut got = String::new();
        use tokio::io::AsyncReadExt;
        tokio::time::timeout(Duration::from_secs(30), conn.read_to_string(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, "own-thread-accept");
        task.abort();
    }
}
