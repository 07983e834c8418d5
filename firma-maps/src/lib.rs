//! Map layouts shared by the eBPF programs (`firma-ebpf`) and the userspace loader
//! (`firma-sidecar::ebpf`).
//!
//! Everything here is `#[repr(C)]`, has no implicit padding (every pad byte is a named field that
//! both sides zero) and is `Copy`, so the kernel compares keys byte for byte exactly as userspace
//! wrote them. Addresses are kept as raw network-order bytes; IPv4 addresses are stored in their
//! IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) wherever one field holds both families, so a v4
//! socket and a v6 socket connecting to a v4-mapped address produce the same key.
//!
//! Without the `user` feature the crate is `no_std`, has no dependencies and no build script, so
//! `firma-ebpf` depends on it directly when building for `bpfel-unknown-none`. With `user` it adds
//! the `aya::Pod` impls and the std helpers the sidecar uses.
#![no_std]

#[cfg(any(feature = "user", test))]
extern crate std;

/// Name of the single-entry array holding [`RedirectConfig`].
pub const MAP_CONFIG: &str = "FIRMA_CONFIG";
/// Name of the map socket cookie -> [`OrigDst`] (written by `connect4/6`).
pub const MAP_BY_COOKIE: &str = "FIRMA_BY_COOKIE";
/// Name of the map client address [`PeerKey`] -> [`OrigDst`] (written by `sock_ops`).
pub const MAP_BY_PEER: &str = "FIRMA_BY_PEER";
/// Name of the LPM trie of excluded IPv4 CIDRs (`Key<[u8; 4]>` -> `u8`).
pub const MAP_EXCLUDED_V4: &str = "FIRMA_EXCL_V4";
/// Name of the LPM trie of excluded IPv6 CIDRs (`Key<[u8; 16]>` -> `u8`).
pub const MAP_EXCLUDED_V6: &str = "FIRMA_EXCL_V6";
/// Name of the hash set of excluded destination ports (`u16` host order -> `u8`).
pub const MAP_EXCLUDED_PORTS: &str = "FIRMA_EXCL_PORTS";
/// Name of the map socket cookie -> [`OrigDst`] for DNS over UDP (written by `connect4/6` and
/// `sendmsg4/6`, read by `recvmsg4/6` to restore the resolver's address on replies).
pub const MAP_DNS_BY_COOKIE: &str = "FIRMA_DNS_BY_COOKIE";
/// Name of the map client address [`PeerKey`] -> [`OrigDst`] for DNS over UDP (written by the
/// `cgroup_skb/egress` program as the datagram leaves; what the sidecar looks up on receipt).
pub const MAP_DNS_BY_PEER: &str = "FIRMA_DNS_BY_PEER";
/// Name of the map cgroup id -> [`WorkloadBinding`]; only userspace reads it. It lives in the
/// pinned object so a restarted sidecar recovers bindings made at runtime.
pub const MAP_BINDINGS: &str = "FIRMA_BINDINGS";
/// Name of the per-CPU array of event counters (`u64`, indexed by `COUNTER_*`): the programs
/// increment their CPU's slot without atomics; userspace sums the slots at scrape time.
pub const MAP_COUNTERS: &str = "FIRMA_COUNTERS";
/// [`MAP_COUNTERS`] slot: TCP connects redirected to the sidecar.
pub const COUNTER_REDIRECTED: u32 = 0;
/// [`MAP_COUNTERS`] slot: UDP/443 (QUIC) connects and sends refused.
pub const COUNTER_UDP443_REFUSED: u32 = 1;
/// [`MAP_COUNTERS`] slot: other UDP (and UDP-Lite) connects and sends refused (UDP is closed
/// for tagged workloads except DNS to the guard and `allow_udp`).
pub const COUNTER_UDP_REFUSED: u32 = 2;
/// [`MAP_COUNTERS`] slot: loopback connects and sends refused (not in `allow_loopback`, or a
/// port of the sidecar itself).
pub const COUNTER_LOOPBACK_REFUSED: u32 = 3;
/// [`MAP_COUNTERS`] slot: packets dropped by the egress verdict (a datagram or a protocol the
/// socket hooks do not see: ping sockets, SCTP, connected UDP-Lite...).
pub const COUNTER_EGRESS_DROPPED: u32 = 4;
/// Slots in [`MAP_COUNTERS`].
pub const COUNTERS: u32 = 5;

/// Name of the hash set of UDP exceptions (`allow_udp`): [`PeerKey`] (v4-mapped address, port)
/// -> `u8` (1).
pub const MAP_UDP_ALLOW: &str = "FIRMA_UDP_ALLOW";
/// Name of the hash set of loopback allowances (`allow_loopback`): [`PeerKey`] -> `u8` (1). An
/// all-zero address stands for every loopback address (`allow_loopback = [PORT]`).
pub const MAP_LOOPBACK_ALLOW: &str = "FIRMA_LO_ALLOW";
/// Name of the per-CPU LRU map of refusals, [`RefusalKey`] -> [`Refusal`]: what the sidecar
/// turns into aggregated audit events (one per workload and reason per interval, never one per
/// datagram). Pinned, so refusals made while the sidecar is down are audited once it is back.
pub const MAP_REFUSALS: &str = "FIRMA_REFUSALS";
/// Name of the map [`RefusalKey`] -> `u64`: how many of a key's refusals are already in the
/// audit. Only userspace uses it; pinned so a restarted sidecar neither repeats nor misses any.
pub const MAP_REFUSALS_SEEN: &str = "FIRMA_REFUSALS_SEEN";
/// Capacity of the exception sets.
pub const MAX_ALLOWANCES: u32 = 1_024;
/// Capacity of [`MAP_REFUSALS`] (workloads x reasons x protocols).
pub const MAX_REFUSAL_KEYS: u32 = 16_384;

/// [`RefusalKey::reason`]: UDP (or UDP-Lite) to a destination that is not an exception.
pub const REFUSED_UDP: u8 = 1;
/// [`RefusalKey::reason`]: UDP to port 443 (QUIC) while `block_quic`.
pub const REFUSED_QUIC: u8 = 2;
/// [`RefusalKey::reason`]: a loopback destination not in `allow_loopback`.
pub const REFUSED_LOOPBACK: u8 = 3;
/// [`RefusalKey::reason`]: a port of the sidecar itself on loopback (never allowed).
pub const REFUSED_SIDECAR_PORT: u8 = 4;
/// [`RefusalKey::reason`]: dropped at egress (a protocol or datagram no socket hook refused).
pub const REFUSED_EGRESS: u8 = 5;

/// Capacity of the connection-tracking maps (LRU: the oldest entry goes first when full).
pub const MAX_TRACKED_CONNECTIONS: u32 = 65_536;
/// Capacity of the DNS tracking maps (LRU; UDP sockets have no close callback to clean up).
pub const MAX_TRACKED_DNS: u32 = 16_384;
/// Capacity of the CIDR tries.
pub const MAX_EXCLUDED_CIDRS: u32 = 1_024;
/// Capacity of the excluded-ports set.
pub const MAX_EXCLUDED_PORTS: u32 = 1_024;
/// Capacity of the bindings map (attached workloads).
pub const MAX_BINDINGS: u32 = 4_096;

/// [`RedirectConfig::flags`]: refuse UDP to port 443 (QUIC) from tagged workloads.
pub const FLAG_BLOCK_QUIC: u32 = 1;
/// [`RedirectConfig::flags`]: send DNS (UDP and TCP port 53, any destination) to the sidecar's
/// DNS listener on [`RedirectConfig::dns_port`]; refused while that port is 0. Without the flag
/// DNS is never touched.
pub const FLAG_REDIRECT_DNS: u32 = 2;

/// `OrigDst::family` values.
pub const FAMILY_V4: u16 = 4;
pub const FAMILY_V6: u16 = 6;

/// Where tagged connections are sent, and what is never redirected. Written by the sidecar at
/// startup; while `port` is 0 (never configured) the programs refuse every TCP connect of a
/// tagged workload instead of letting it through.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RedirectConfig {
    /// IPv4 listener address, network order (normally 127.0.0.1).
    pub listen_v4: [u8; 4],
    /// IPv6 listener address, network order (normally ::1).
    pub listen_v6: [u8; 16],
    /// Listener port, host order.
    pub port: u16,
    /// DNS listener port (UDP and TCP, same addresses), host order; 0 = none.
    pub dns_port: u16,
    /// `SO_MARK` of the sidecar's own sockets; marked sockets are never redirected.
    pub mark: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
}

/// The destination a tagged workload asked for, and who asked.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// Network order; IPv4 destinations in IPv4-mapped form.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u16,
    /// Thread-group id (the process) that called `connect()`.
    pub pid: u32,
    /// cgroup v2 id (inode number of the cgroup directory) of that process.
    pub cgroup_id: u64,
}

/// The client end of a redirected connection as the sidecar sees it from `accept()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerKey {
    /// Network order; IPv4 in IPv4-mapped form.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// What was refused, and to whom: one [`MAP_REFUSALS`] entry per workload cgroup, reason and
/// IP protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RefusalKey {
    pub cgroup_id: u64,
    /// `REFUSED_*`.
    pub reason: u8,
    pub _pad0: u8,
    /// IP protocol number (6 TCP, 17 UDP, 136 UDP-Lite, 1 ICMP, 58 ICMPv6, 132 SCTP, 262
    /// MPTCP...).
    pub protocol: u16,
    pub _pad: [u8; 4],
}

/// This CPU's tally of one [`RefusalKey`] (the map is per-CPU: no atomics, no torn samples).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Refusal {
    pub count: u64,
    /// `bpf_ktime_get_boot_ns` of the first and the last refusal counted here.
    pub first_ns: u64,
    pub last_ns: u64,
    /// The last refused destination (network order, v4-mapped for IPv4) and port (host order).
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
    /// Thread-group id of the last refused sender (0 at egress, where it is not known).
    pub pid: u32,
}

/// Longest cgroup path / agent id / session id a binding can hold.
pub const BINDING_PATH_MAX: usize = 256;
pub const BINDING_ID_MAX: usize = 128;

/// The identity bound to an attached cgroup (`firma sidecar attach --agent-id ...`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadBinding {
    pub cgroup_path: [u8; BINDING_PATH_MAX],
    pub agent_id: [u8; BINDING_ID_MAX],
    pub session_id: [u8; BINDING_ID_MAX],
    pub cgroup_path_len: u16,
    pub agent_id_len: u16,
    pub session_id_len: u16,
    /// 1 when `session_id` is set (an empty session id is not the same as none).
    pub has_session: u16,
}

/// Builds the IPv4-mapped form `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// `Some(a.b.c.d)` when `addr` is `::ffff:a.b.c.d`.
#[inline(always)]
pub fn as_v4_mapped(addr: &[u8; 16]) -> Option<[u8; 4]> {
    let prefix_zero = addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0;
    if prefix_zero && addr[10] == 0xff && addr[11] == 0xff {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are `#[repr(C)]`, `Copy`, made only of integers and integer arrays, with
    // every padding byte spelled out as a field, so any bit pattern is valid.
    unsafe impl aya::Pod for super::RedirectConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::WorkloadBinding {}
    unsafe impl aya::Pod for super::RefusalKey {}
    unsafe impl aya::Pod for super::Refusal {}
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use core::fmt;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::string::String;

    impl PeerKey {
        /// The key for a socket address as `accept()` reports it.
        pub fn from_socket_addr(addr: SocketAddr) -> Self {
            let addr16 = match addr.ip() {
                IpAddr::V4(v4) => v4_mapped(v4.octets()),
                IpAddr::V6(v6) => v6.octets(),
            };
            Self {
                addr: addr16,
                port: addr.port(),
                _pad: 0,
            }
        }
    }

    impl OrigDst {
        /// The destination as a socket address (IPv4 for v4 and v4-mapped destinations).
        pub fn socket_addr(&self) -> SocketAddr {
            let ip = match (self.family, as_v4_mapped(&self.addr)) {
                (FAMILY_V4, Some(v4)) => IpAddr::V4(Ipv4Addr::from(v4)),
                _ => IpAddr::V6(Ipv6Addr::from(self.addr)),
            };
            SocketAddr::new(ip, self.port)
        }
    }

    /// Why a binding cannot be stored.
    #[derive(Debug, PartialEq, Eq)]
    pub enum BindingError {
        TooLong {
            field: &'static str,
            len: usize,
            max: usize,
        },
    }

    impl fmt::Display for BindingError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Self::TooLong { field, len, max } => {
                    write!(f, "{field} is {len} bytes long; at most {max} fit")
                }
            }
        }
    }

    impl core::error::Error for BindingError {}

    fn copy_into<const N: usize>(
        field: &'static str,
        s: &str,
    ) -> Result<([u8; N], u16), BindingError> {
        let bytes = s.as_bytes();
        if bytes.len() > N {
            return Err(BindingError::TooLong {
                field,
                len: bytes.len(),
                max: N,
            });
        }
        let mut out = [0u8; N];
        out[..bytes.len()].copy_from_slice(bytes);
        // N <= 256, so the length always fits.
        Ok((out, bytes.len() as u16))
    }

    fn read_str(buf: &[u8], len: u16) -> String {
        let len = usize::from(len).min(buf.len());
        String::from_utf8_lossy(&buf[..len]).into_owned()
    }

    impl WorkloadBinding {
        pub fn new(
            cgroup_path: &str,
            agent_id: &str,
            session_id: Option<&str>,
        ) -> Result<Self, BindingError> {
            let has_session = u16::from(session_id.is_some());
            let (cgroup_path, cgroup_path_len) = copy_into("cgroup path", cgroup_path)?;
            let (agent_id, agent_id_len) = copy_into("agent id", agent_id)?;
            let (session_id, session_id_len) = copy_into("session id", session_id.unwrap_or(""))?;
            Ok(Self {
                cgroup_path,
                agent_id,
                session_id,
                cgroup_path_len,
                agent_id_len,
                session_id_len,
                has_session,
            })
        }

        pub fn cgroup_path(&self) -> String {
            read_str(&self.cgroup_path, self.cgroup_path_len)
        }

        pub fn agent_id(&self) -> String {
            read_str(&self.agent_id, self.agent_id_len)
        }

        pub fn session_id(&self) -> Option<String> {
            (self.has_session != 0).then(|| read_str(&self.session_id, self.session_id_len))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn peer_key_maps_v4_and_keeps_v6() {
            let k = PeerKey::from_socket_addr("127.0.0.1:4000".parse().unwrap());
            assert_eq!(k.addr, v4_mapped([127, 0, 0, 1]));
            assert_eq!(k.port, 4000);
            let k6 = PeerKey::from_socket_addr("[::1]:5".parse().unwrap());
            assert_eq!(k6.addr, Ipv6Addr::LOCALHOST.octets());
        }

        #[test]
        fn orig_dst_round_trips_both_families() {
            let o = OrigDst {
                addr: v4_mapped([127, 0, 0, 2]),
                port: 443,
                family: FAMILY_V4,
                ..Default::default()
            };
            assert_eq!(o.socket_addr(), "127.0.0.2:443".parse().unwrap());
            let o6 = OrigDst {
                addr: Ipv6Addr::LOCALHOST.octets(),
                port: 8443,
                family: FAMILY_V6,
                ..Default::default()
            };
            assert_eq!(o6.socket_addr(), "[::1]:8443".parse().unwrap());
        }

        #[test]
        fn binding_error_names_field_and_limit() {
            let long = "x".repeat(BINDING_ID_MAX + 1);
            let err = WorkloadBinding::new("/a", "x", Some(&long)).unwrap_err();
            assert_eq!(
                std::format!("{err}"),
                "session id is 129 bytes long; at most 128 fit"
            );
        }

        #[test]
        fn binding_round_trips_and_rejects_long_fields() {
            let b = WorkloadBinding::new("/a/b", "agent-1", Some("s1")).unwrap();
            assert_eq!(b.cgroup_path(), "/a/b");
            assert_eq!(b.agent_id(), "agent-1");
            assert_eq!(b.session_id().as_deref(), Some("s1"));
            let none = WorkloadBinding::new("/a", "x", None).unwrap();
            assert_eq!(none.session_id(), None);
            let long = "x".repeat(BINDING_ID_MAX + 1);
            assert!(matches!(
                WorkloadBinding::new("/a", &long, None),
                Err(BindingError::TooLong {
                    field: "agent id",
                    ..
                })
            ));
        }
    }
}

#[cfg(feature = "user")]
pub use user::BindingError;

// Layout checks hold with or without `user` (`cargo test -p firma-maps`); the helper tests above
// need `--features user` (a workspace-wide `cargo test` enables it through firma-common).
#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<RedirectConfig>(), 32);
        assert_eq!(size_of::<OrigDst>(), 32);
        assert_eq!(size_of::<PeerKey>(), 20);
        assert_eq!(size_of::<RefusalKey>(), 16);
        assert_eq!(size_of::<Refusal>(), 48);
        assert_eq!(
            size_of::<WorkloadBinding>(),
            BINDING_PATH_MAX + 2 * BINDING_ID_MAX + 8
        );
    }

    #[test]
    fn alignments_match_the_largest_field() {
        assert_eq!(align_of::<RedirectConfig>(), 4);
        assert_eq!(align_of::<OrigDst>(), 8);
        assert_eq!(align_of::<PeerKey>(), 2);
        assert_eq!(align_of::<WorkloadBinding>(), 2);
    }

    #[test]
    fn v4_mapped_round_trips() {
        let m = v4_mapped([10, 1, 2, 3]);
        assert_eq!(as_v4_mapped(&m), Some([10, 1, 2, 3]));
        assert_eq!(as_v4_mapped(&[0; 16]), None);
    }
}
