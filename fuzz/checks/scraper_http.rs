//! The scraper's HTTP layer: a model server answering `/metrics` with arbitrary bytes.
//!
//! Input: the raw HTTP response the server writes (then it closes the connection). One loopback
//! connection per input, a 200 ms scrape timeout as the per-input time budget.

use std::time::{Duration, Instant};

use switchyard::epp::endpoint::Endpoint;
use switchyard::epp::scrape::{ScrapeError, Scraper};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_millis(200);

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
}

pub fn run(data: &[u8]) {
    let response = data.to_vec();
    RT.with(|rt| rt.block_on(scrape_once(response)));
}

async fn scrape_once(response: Vec<u8>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let Ok((mut conn, _)) = listener.accept().await else {
            return;
        };
        // Read the request head, then answer with the input and close.
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = conn.write_all(&response).await;
        let _ = conn.shutdown().await;
    });
    let scraper = Scraper::new(TIMEOUT);
    let started = Instant::now();
    let result = scraper.scrape(&Endpoint::from_addr(addr)).await;
    let took = started.elapsed();
    server.abort();
    // The timeout bounds every scrape (connect to last byte), whatever the server sends.
    assert!(
        took < TIMEOUT + Duration::from_millis(500),
        "scrape took {took:?}"
    );
    match result {
        Ok(m) => {
            assert!(m.kv_cache_usage.is_finite() && m.kv_cache_usage >= 0.0);
            assert!(m.updated_at.is_none());
        }
        Err(ScrapeError::Status { status, .. }) => assert_ne!(status, 200),
        Err(_) => {}
    }
}
