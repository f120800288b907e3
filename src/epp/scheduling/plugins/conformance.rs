//! `header-based-testing-filter` (GIE v1.5.0 / llm-d-router
//! `scheduling/test/filter/request_header_based_filter.go`): the conformance suite's EPP config
//! names it so that the `test-epp-endpoint-selection` header decides the endpoint. Test-only by
//! design: any client that can set the header picks the endpoint.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::{Filter, Plugin};
use crate::epp::endpoint::EndpointSnapshot;
use crate::epp::scheduling::SchedulingRequest;

/// The request header the conformance suite selects endpoints with.
pub const TEST_SELECTION_HEADER: &str = "test-epp-endpoint-selection";

/// Keeps the endpoints the header names (`IP` or `IP:port`, comma-separated, IPv6 with or
/// without brackets), in header order, one per IP; no header or no match keeps none.
#[derive(Debug)]
pub struct HeaderBasedTestingFilter {
    pub name: String,
}

impl Plugin for HeaderBasedTestingFilter {
    fn plugin_type(&self) -> &'static str {
        "header-based-testing-filter"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// One header entry: an exact `ip:port`, or an IP matching any port.
fn parse_entry(item: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Ok(sa) = item.parse::<SocketAddr>() {
        return Some((sa.ip(), Some(sa.port())));
    }
    let bare = item.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().ok().map(|ip| (ip, None))
}

impl Filter for HeaderBasedTestingFilter {
    fn filter(&self, request: &SchedulingRequest<'_>, endpoints: &mut Vec<Arc<EndpointSnapshot>>) {
        let value = request
            .header(TEST_SELECTION_HEADER)
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("");
        let mut kept: Vec<Arc<EndpointSnapshot>> = Vec::new();
        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((ip, port)) = parse_entry(item) else {
                continue;
            };
            // Upstream keeps the last endpoint seen per IP for an IP-only entry.
            let found = endpoints.iter().rev().find(|e| {
                e.endpoint.addr.ip() == ip && port.is_none_or(|p| e.endpoint.addr.port() == p)
            });
            if let Some(e) = found {
                if !kept.iter().any(|k| k.endpoint.addr.ip() == ip) {
                    kept.push(e.clone());
                }
            }
        }
        *endpoints = kept;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epp::endpoint::Endpoint;

    fn ep(addr: &str) -> Arc<EndpointSnapshot> {
        Arc::new(EndpointSnapshot {
            endpoint: Arc::new(Endpoint::from_addr(addr.parse().unwrap())),
            metrics: Default::default(),
            dispatch: None,
        })
    }

    fn run(header: Option<&str>) -> Vec<String> {
        let headers: Vec<(String, Vec<u8>)> = header
            .map(|h| vec![(TEST_SELECTION_HEADER.to_string(), h.as_bytes().to_vec())])
            .unwrap_or_default();
        let req = SchedulingRequest {
            request_id: "r",
            target_model: "m",
            api: Default::default(),
            prompt: b"",
            cache_salt: b"",
            fallbacks: 0,
            headers: &headers,
        };
        let mut eps = vec![
            ep("10.0.0.7:3000"),
            ep("10.0.0.8:3000"),
            ep("10.0.0.8:3002"),
            ep("[fd00::1]:3000"),
        ];
        HeaderBasedTestingFilter { name: "f".into() }.filter(&req, &mut eps);
        eps.iter().map(|e| e.endpoint.addr.to_string()).collect()
    }

    #[test]
    fn selects_by_ip_or_exact_port_in_header_order() {
        assert_eq!(
            run(Some("10.0.0.8:3002, 10.0.0.7")),
            ["10.0.0.8:3002", "10.0.0.7:3000"]
        );
        assert_eq!(run(Some("[fd00::1]:3000")), ["[fd00::1]:3000"]);
        assert_eq!(run(Some("fd00::1")), ["[fd00::1]:3000"]);
        // One endpoint per IP, duplicates dropped.
        assert_eq!(run(Some("10.0.0.8,10.0.0.8:3000")), ["10.0.0.8:3002"]);
        assert_eq!(run(Some("10.0.0.9")), Vec::<String>::new());
        assert_eq!(run(Some("10.0.0.7:9999")), Vec::<String>::new());
        assert_eq!(run(None), Vec::<String>::new());
        assert_eq!(run(Some(" ")), Vec::<String>::new());
    }
}
