//! A small HTTP/1.1 client for tests (hyper-util's pooled client): send a request, collect the
//! whole response, and count the body frames that arrived (to see that SSE stays chunked).

use std::time::Duration;

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Per-request limit, so a hung proxy fails the test instead of hanging it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A complete response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Number of non-empty body frames received.
    pub frames: usize,
}

impl HttpResponse {
    /// The body as (lossy) UTF-8, for assertion messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A response header as a string ("" when absent or not UTF-8).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// A pooled HTTP/1.1 client.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    pub fn new() -> Self {
        Self {
            inner: Client::builder(TokioExecutor::new()).build_http(),
            timeout: REQUEST_TIMEOUT,
        }
    }

    /// A client whose requests may take up to `timeout` (a real model on two cores).
    pub fn with_timeout(timeout: Duration) -> Self {
        Self {
            timeout,
            ..Self::new()
        }
    }

    /// Sends one request and reads the whole response (within [`REQUEST_TIMEOUT`] unless
    /// [`HttpClient::with_timeout`] said otherwise).
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<HttpResponse> {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body))?;
        let fut = async {
            let resp = self
                .inner
                .request(req)
                .await
                .with_context(|| format!("sending to {url}"))?;
            let (parts, mut body) = resp.into_parts();
            let mut buf = BytesMut::new();
            let mut frames = 0;
            while let Some(frame) = body.frame().await {
                let frame = frame.with_context(|| format!("reading body from {url}"))?;
                if let Some(data) = frame.data_ref() {
                    if !data.is_empty() {
                        frames += 1;
                        buf.extend_from_slice(data);
                    }
                }
            }
            anyhow::Ok(HttpResponse {
                status: parts.status,
                headers: parts.headers,
                body: buf.freeze(),
                frames,
            })
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .with_context(|| format!("timed out on {url}"))?
    }

    /// `POST url` with a JSON body.
    pub async fn post_json(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<HttpResponse> {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        self.send(Method::POST, url, &all, body.into()).await
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> anyhow::Result<HttpResponse> {
        self.send(Method::GET, url, &[], Bytes::new()).await
    }
}
