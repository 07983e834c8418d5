//! The exceptions to closed UDP and closed loopback (`allow_udp`, `allow_loopback` in
//! `[sidecar.interceptor.transparent]`, `--allow-udp` / `--allow-loopback` on `firma run`):
//! parsing shared by the config loader, `firma run` and the kernel maps.

use firma_common::maps::PeerKey;
use std::net::{IpAddr, SocketAddr};

/// One `allow_loopback` entry: a port on every loopback address, or one address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopbackAllowance {
    Port(u16),
    Addr(SocketAddr),
}

impl LoopbackAllowance {
    pub fn port(&self) -> u16 {
        match self {
            Self::Port(p) => *p,
            Self::Addr(a) => a.port(),
        }
    }

    /// The kernel key: an all-zero address stands for every loopback address.
    pub(super) fn key(&self) -> PeerKey {
        match self {
            Self::Port(port) => PeerKey {
                addr: [0; 16],
                port: *port,
                _pad: 0,
            },
            Self::Addr(a) => PeerKey::from_socket_addr(*a),
        }
    }
}

/// This host as a destination: 127/8, ::1, the unspecified addresses, v4-mapped forms
/// included (what the kernel programs treat as loopback).
pub fn is_loopback(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    ip.is_loopback() || ip.is_unspecified()
}

/// `ADDR:PORT` (`[V6]:PORT` for IPv6), not loopback (that is `allow_loopback`'s), port not 0.
pub fn parse_udp(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s.trim().parse().map_err(|_| {
        format!("expected ADDR:PORT like \"10.0.0.5:8125\" or \"[fd00::5]:8125\", got {s:?}")
    })?;
    if a.port() == 0 {
        return Err(format!("{s:?}: port 0 is not a destination"));
    }
    if is_loopback(a.ip()) {
        return Err(format!(
            "{s:?} is a loopback address: list it in allow_loopback (--allow-loopback) instead"
        ));
    }
    Ok(a)
}

/// `PORT` (every loopback address) or `ADDR:PORT` with a loopback ADDR.
pub fn parse_loopback(s: &str) -> Result<LoopbackAllowance, String> {
    let s = s.trim();
    let allowance = match s.parse::<u16>() {
        Ok(p) => LoopbackAllowance::Port(p),
        Err(_) => {
            let a: SocketAddr = s.parse().map_err(|_| {
                format!("expected PORT or ADDR:PORT like \"7777\" or \"127.0.0.1:7777\", got {s:?}")
            })?;
            if !is_loopback(a.ip()) {
                return Err(format!(
                    "{s:?} is not a loopback address (127.0.0.0/8, ::1): UDP exceptions go in allow_udp, TCP goes through the sidecar"
                ));
            }
            LoopbackAllowance::Addr(a)
        }
    };
    if allowance.port() == 0 {
        return Err(format!("{s:?}: port 0 is not a destination"));
    }
    Ok(allowance)
}

/// Refuses an allowance that names one of the sidecar's own ports (its listener, DNS guard,
/// admin listener): those stay unreachable for tagged workloads whatever the config says.
pub fn check_not_sidecar(a: &LoopbackAllowance, own: &[u16]) -> Result<(), String> {
    if own.contains(&a.port()) {
        return Err(format!(
            "port {} is the sidecar's own (transparent listener, DNS guard or admin listener): tagged workloads can never reach it",
            a.port()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_exceptions() {
        assert_eq!(
            parse_udp("10.0.0.5:8125").unwrap(),
            "10.0.0.5:8125".parse().unwrap()
        );
        assert!(parse_udp("[fd00::5]:53").is_ok());
        for bad in [
            "10.0.0.5",
            "x:1",
            "10.0.0.5:0",
            "127.0.0.1:8125",
            "[::1]:1",
            "[::ffff:127.0.0.9]:1",
            "0.0.0.0:9",
        ] {
            assert!(parse_udp(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn loopback_allowances() {
        assert_eq!(
            parse_loopback("7777").unwrap(),
            LoopbackAllowance::Port(7777)
        );
        assert_eq!(
            parse_loopback("127.0.0.2:80").unwrap(),
            LoopbackAllowance::Addr("127.0.0.2:80".parse().unwrap())
        );
        assert!(parse_loopback("[::1]:80").is_ok());
        for bad in ["0", "10.0.0.1:80", "x", "127.0.0.1:0", "70000"] {
            assert!(parse_loopback(bad).is_err(), "{bad:?} accepted");
        }
        let key = LoopbackAllowance::Port(7).key();
        assert_eq!((key.addr, key.port), ([0; 16], 7));
        assert!(check_not_sidecar(&LoopbackAllowance::Port(15001), &[15001, 53]).is_err());
        assert!(check_not_sidecar(&LoopbackAllowance::Port(7), &[15001, 53]).is_ok());
    }
}
