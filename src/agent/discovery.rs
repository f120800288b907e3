//! The gateway's address from its Gateway's status (`status.addresses[0].value`), for the chart's
//! default of no `INFERENCE_GATEWAY_URL`; upstream's client reads the same field
//! (`k8s_helper.py` `wait_for_gateway_ip`).

use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject};

pub fn gateway_resource() -> ApiResource {
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("reading Gateway {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        source: Box<kube::Error>,
    },
    #[error("Gateway {namespace}/{name} has no address after {timeout:?}")]
    NoAddress {
        namespace: String,
        name: String,
        timeout: Duration,
    },
}

/// `http://ADDRESS` (IPv6 in brackets), polling until the Gateway has an address.
pub async fn gateway_url(
    client: kube::Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<String, DiscoveryError> {
    let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &gateway_resource());
    let wait = async {
        loop {
            let gateway = api
                .get_opt(name)
                .await
                .map_err(|source| DiscoveryError::Read {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    source: Box::new(source),
                })?;
            let address = gateway.as_ref().and_then(|g| {
                g.data["status"]["addresses"]
                    .as_array()?
                    .iter()
                    .find_map(|a| a["value"].as_str().filter(|v| !v.is_empty()))
                    .map(str::to_string)
            });
            if let Some(address) = address {
                let host = if address.contains(':') {
                    format!("[{address}]")
                } else {
                    address
                };
                return Ok(format!("http://{host}"));
            }
            tokio::time::sleep(poll).await;
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(result) => result,
        Err(_) => Err(DiscoveryError::NoAddress {
            namespace: namespace.to_string(),
            name: name.to_string(),
            timeout,
        }),
    }
}
