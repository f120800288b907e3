//! The agent's one HTTP/1 client (gateway and sandbox runtime): every exchange has a deadline and
//! a cap on the reply body, and failures are typed so callers can tell "try another model" from
//! "give up".

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A complete reply.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Reply {
    /// The body as text for error messages, cut to `max` bytes.
    pub fn snippet(&self, max: usize) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let mut end = text.len().min(max);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].trim().to_string()
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("invalid request to {url}: {reason}")]
    Invalid { url: String, reason: String },
    #[error("cannot reach {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("no complete reply from {url} within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("reply from {url} is larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("reading the reply from {url}: {reason}")]
    Body { url: String, reason: String },
}

/// Shared connection pool; cheap to clone.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        Self {
            inner: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        }
    }

    /// Sends `request` and reads the whole reply; `timeout` bounds the exchange end to end.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
        timeout: Duration,
        limit: usize,
    ) -> Result<Reply, HttpError> {
        let url = request.uri().to_string();
        let exchange = async {
            let response = self.inner.request(request).await.map_err(|e| {
                // hyper-util hides the cause behind its own error; the chain says what failed.
                let mut reason = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    reason = format!("{reason}: {s}");
                    source = s.source();
                }
                HttpError::Connect {
                    url: url.clone(),
                    reason,
                }
            })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        HttpError::TooLarge {
                            url: url.clone(),
                            limit,
                        }
                    } else {
                        HttpError::Body {
                            url: url.clone(),
                            reason: e.to_string(),
                        }
                    }
                })?
                .to_bytes();
            Ok(Reply { status, body })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout {
                url: url.clone(),
                timeout,
            }),
        }
    }
}

/// `base` + `path` with exactly one `/` between them.
pub fn join(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// Percent-encodes a workspace path for a URL path, keeping `/` between segments.
pub fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_and_encode() {
        assert_eq!(join("http://a:1/", "/v1/x"), "http://a:1/v1/x");
        assert_eq!(join("http://a:1", "v1/x"), "http://a:1/v1/x");
        assert_eq!(encode_path("src/a b%.py"), "src/a%20b%25.py");
    }

    #[test]
    fn snippet_cuts_on_char_boundary() {
        let r = Reply {
            status: StatusCode::OK,
            body: Bytes::from("héllo"),
        };
        assert_eq!(r.snippet(2), "h");
        assert_eq!(r.snippet(100), "héllo");
    }
}
