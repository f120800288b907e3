//! Free-port helpers for tests that start external processes (Envoy, the EPP binary), which need
//! a concrete port number up front rather than binding port 0 themselves.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// `n` distinct free TCP ports on 127.0.0.1. All probe listeners are held until every port is
/// chosen, so the ports are distinct; another process could still take one before the caller
/// binds it (callers retry on a bind failure where that matters).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// One free TCP port on 127.0.0.1 (see [`free_ports`]).
pub fn free_port() -> std::io::Result<u16> {
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    Ok(l.local_addr()?.port())
}
