//! Redirect settings: `[sidecar.interceptor.transparent]` parsed into what the kernel maps hold.

use super::allow::{self, LoopbackAllowance};
use super::error::EbpfError;
use crate::config::TransparentConfig;
use aya::maps::lpm_trie::Key;
use firma_common::maps::{FLAG_BLOCK_QUIC, FLAG_REDIRECT_DNS, RedirectConfig};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

/// An address prefix, e.g. `10.0.0.0/8` or `fd00::/8` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

pub(super) enum CidrKey {
    V4(Key<[u8; 4]>),
    V6(Key<[u8; 16]>),
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, EbpfError> {
        let bad = || EbpfError::Setting {
            key: "excluded_cidrs",
            value: s.into(),
            expected: "an address or address/prefix, e.g. \"10.0.0.0/8\"",
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }

    pub(super) fn key(&self) -> CidrKey {
        match self.addr {
            IpAddr::V4(v4) => CidrKey::V4(Key::new(u32::from(self.prefix), v4.octets())),
            IpAddr::V6(v6) => CidrKey::V6(Key::new(u32::from(self.prefix), v6.octets())),
        }
    }
}

/// Everything the kernel side needs from the config.
#[derive(Debug, Clone)]
pub struct RedirectSettings {
    pub pin_dir: PathBuf,
    /// Transparent listener port on 127.0.0.1 and [::1].
    pub port: u16,
    pub mark: u32,
    pub block_quic: bool,
    pub redirect_dns: bool,
    /// The DNS listener's port (UDP and TCP on the listener addresses); 0 = none (DNS of tagged
    /// workloads is then refused while `redirect_dns` is on).
    pub dns_port: u16,
    pub excluded_cidrs: Vec<Cidr>,
    pub excluded_ports: Vec<u16>,
    /// UDP exceptions (`allow_udp`): every other UDP destination is refused.
    pub allow_udp: Vec<SocketAddr>,
    /// Loopback allowances (`allow_loopback`): every other loopback destination is refused.
    pub allow_loopback: Vec<LoopbackAllowance>,
}

impl RedirectSettings {
    pub fn from_config(cfg: &TransparentConfig) -> Result<Self, EbpfError> {
        if cfg.port == 0 {
            return Err(EbpfError::Setting {
                key: "port",
                value: "0".into(),
                expected: "a fixed port (the kernel programs redirect to it)",
            });
        }
        if cfg.socket_mark == 0 {
            return Err(EbpfError::Setting {
                key: "socket_mark",
                value: "0".into(),
                expected: "a non-zero mark (0 is every unmarked socket)",
            });
        }
        Ok(Self {
            pin_dir: cfg.pin_dir.clone(),
            port: cfg.port,
            mark: cfg.socket_mark,
            block_quic: cfg.block_quic,
            redirect_dns: cfg.redirect_dns,
            dns_port: 0,
            excluded_cidrs: cfg
                .excluded_cidrs
                .iter()
                .map(|c| Cidr::parse(c))
                .collect::<Result<_, _>>()?,
            excluded_ports: cfg.excluded_ports.clone(),
            allow_udp: cfg
                .allow_udp
                .iter()
                .map(|s| {
                    allow::parse_udp(s).map_err(|why| EbpfError::Setting {
                        key: "allow_udp",
                        value: why,
                        expected: "ADDR:PORT, not loopback",
                    })
                })
                .collect::<Result<_, _>>()?,
            allow_loopback: cfg
                .allow_loopback
                .iter()
                .map(|s| {
                    allow::parse_loopback(s).map_err(|why| EbpfError::Setting {
                        key: "allow_loopback",
                        value: why,
                        expected: "PORT or ADDR:PORT with a loopback ADDR",
                    })
                })
                .collect::<Result<_, _>>()?,
        })
    }

    pub(super) fn kernel_config(&self) -> RedirectConfig {
        let mut flags = 0;
        if self.block_quic {
            flags |= FLAG_BLOCK_QUIC;
        }
        if self.redirect_dns {
            flags |= FLAG_REDIRECT_DNS;
        }
        RedirectConfig {
            listen_v4: Ipv4Addr::LOCALHOST.octets(),
            listen_v6: Ipv6Addr::LOCALHOST.octets(),
            port: self.port,
            dns_port: if self.redirect_dns { self.dns_port } else { 0 },
            mark: self.mark,
            flags,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cidrs() {
        assert_eq!(
            Cidr::parse("10.0.0.0/8").unwrap(),
            Cidr {
                addr: "10.0.0.0".parse().unwrap(),
                prefix: 8
            }
        );
        assert_eq!(Cidr::parse("fd00::1").unwrap().prefix, 128);
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope/8").is_err());
    }
}
