//! Where a task's sandbox comes from: a runtime URL given on the command line, or a fresh
//! agent-sandbox claim reached through the sandbox router with the `X-Sandbox-*` headers
//! upstream's client sends (`X-Sandbox-ID`, `-Namespace`, `-Port`, `-Timeout`, and `-Pod-IP`
//! when the Sandbox reports one).

use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::claim::{Claim, ClaimConfig, ClaimError};
use super::http::HttpClient;
use super::sandbox_client::SandboxClient;

#[derive(Clone)]
pub enum SandboxSource {
    /// A runtime you started yourself (`--sandbox-url`): shared by every task.
    Direct { url: String },
    /// A claim per task, reached through the router.
    Claim {
        client: kube::Client,
        router_url: String,
        claim: ClaimConfig,
        /// The runtime's port inside the sandbox pod (`X-Sandbox-Port`).
        port: u16,
    },
}

// kube::Client has no Debug; the description says all that matters.
impl std::fmt::Debug for SandboxSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl SandboxSource {
    /// Short description for logs and the task's first event.
    pub fn describe(&self) -> String {
        match self {
            SandboxSource::Direct { url } => url.clone(),
            SandboxSource::Claim {
                router_url, claim, ..
            } => format!(
                "claim from warm pool {}/{} via {router_url}",
                claim.namespace, claim.warm_pool
            ),
        }
    }
}

/// A task's sandbox; [`Session::close`] gives a claimed one back.
#[derive(Debug)]
pub struct Session {
    pub client: SandboxClient,
    claim: Option<Claim>,
}

fn value(text: &str) -> Result<HeaderValue, ClaimError> {
    HeaderValue::from_str(text).map_err(|_| ClaimError::Failed {
        name: String::new(),
        reason: "InvalidHeader".into(),
        message: format!("{text:?} cannot be sent as a header"),
    })
}

/// The router headers for `claim` (upstream `connector.py`'s `send_request`).
pub fn router_headers(
    claim: &Claim,
    port: u16,
    timeout: Duration,
) -> Result<Vec<(HeaderName, HeaderValue)>, ClaimError> {
    let mut headers = vec![
        (
            HeaderName::from_static("x-sandbox-id"),
            value(&claim.sandbox)?,
        ),
        (
            HeaderName::from_static("x-sandbox-namespace"),
            value(&claim.namespace)?,
        ),
        (
            HeaderName::from_static("x-sandbox-port"),
            value(&port.to_string())?,
        ),
        (
            HeaderName::from_static("x-sandbox-timeout"),
            value(&timeout.as_secs_f64().to_string())?,
        ),
    ];
    if let Some(ip) = &claim.pod_ip {
        headers.push((HeaderName::from_static("x-sandbox-pod-ip"), value(ip)?));
    }
    Ok(headers)
}

impl Session {
    pub async fn open(
        source: &SandboxSource,
        http: HttpClient,
        timeout: Duration,
    ) -> Result<Session, ClaimError> {
        match source {
            SandboxSource::Direct { url } => Ok(Session {
                client: SandboxClient::new(url, Vec::new(), http, timeout),
                claim: None,
            }),
            SandboxSource::Claim {
                client,
                router_url,
                claim,
                port,
            } => {
                let claim = Claim::acquire(client.clone(), claim).await?;
                let headers = match router_headers(&claim, *port, timeout) {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = claim.release().await;
                        return Err(e);
                    }
                };
                Ok(Session {
                    client: SandboxClient::new(router_url, headers, http, timeout),
                    claim: Some(claim),
                })
            }
        }
    }

    /// The claim's name, when the sandbox is claimed.
    pub fn claim_name(&self) -> Option<&str> {
        self.claim.as_ref().map(|c| c.name.as_str())
    }

    /// Deletes the claim, if any.
    pub async fn close(self) -> Result<(), ClaimError> {
        match self.claim {
            Some(claim) => claim.release().await,
            None => Ok(()),
        }
    }
}
