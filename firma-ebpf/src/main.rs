//! Firma's cgroup eBPF programs: transparent redirection of a tagged workload's TCP connects to
//! the sidecar.
//!
//! A cgroup is *tagged* by attaching these programs to it (the attach itself is the tag), so the
//! programs never ask "is this workload tagged?". Per connection:
//!
//! 1. `connect4`/`connect6` save the original destination, cgroup id and pid keyed by socket
//!    cookie and rewrite the destination to the sidecar's transparent listener. IPv4-mapped IPv6
//!    destinations are treated as IPv4. Excluded: configured CIDRs (LPM tries) and ports, DNS
//!    (unless `redirect_dns`), and sockets carrying the sidecar's `SO_MARK`.
//!    Loopback (127/8, ::1, the unspecified addresses, v4-mapped forms) is never redirected: it
//!    is refused unless `FIRMA_LO_ALLOW` lists the (address, port) or the port, and the
//!    sidecar's own ports are refused whatever that map says.
//! 2. `sock_ops` copies the entry to a map keyed by the client's (address, port) as soon as the
//!    port is bound (`TCP_CONNECT_CB`, before the SYN leaves), which is what the sidecar can look
//!    up after `accept()`; it deletes both entries when the socket reaches `TCP_CLOSE`.
//! 3. `getpeername4`/`getpeername6` make the app see the original peer.
//! 4. UDP is closed: `connect4/6` (connected UDP) and `sendmsg4/6` (unconnected) refuse every
//!    UDP and UDP-Lite destination except DNS to the guard (5.), `FIRMA_UDP_ALLOW` exceptions,
//!    allowed loopback, and port 443 only while QUIC blocking is off. Sockets of any other
//!    protocol (ICMP ping, SCTP...) are refused at `connect`.
//! 5. DNS guard (with `FLAG_REDIRECT_DNS`): UDP and TCP to port 53, whatever the resolver address,
//!    go to the sidecar's DNS listener (`dns_port` on the listener addresses). `connect4/6` and
//!    `sendmsg4/6` rewrite the destination and record the original one by socket cookie (TCP in
//!    the connection maps above, UDP in `FIRMA_DNS_BY_COOKIE`); `firma_egress`
//!    (`cgroup_skb/egress`) re-keys a UDP socket's record by its (address, port) as each query
//!    leaves, which is what the sidecar looks up on receipt; `recvmsg4/6` make replies come from
//!    the resolver the app asked. Localhost and excluded CIDRs/ports are *not* exempt: a local
//!    resolver would be a way around the guard. While `dns_port` is 0, or a record cannot be
//!    stored, DNS is refused.
//! 6. `firma_egress` (`cgroup_skb/egress`) is the last word on every packet a tagged socket
//!    sends: TCP passes (the connect hooks decided it), UDP/UDP-Lite pass only to the same
//!    destinations as above, everything else (ICMP echo from ping sockets, SCTP, IPv6 extension
//!    headers...) is dropped. It catches what no socket hook sees (a connected UDP-Lite socket,
//!    `sendto` on a ping socket).
//!
//! Every refusal is counted (`FIRMA_COUNTERS`) and tallied per workload cgroup, reason and
//! protocol in `FIRMA_REFUSALS` (per-CPU, with the last destination as a sample), which the
//! sidecar turns into aggregated audit events.
//!
//! Return values of cgroup sock_addr programs: 1 lets the syscall continue, 0 refuses it (EPERM).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_socket_cookie,
        bpf_ktime_get_boot_ns, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use firma_maps::{
    COUNTER_EGRESS_DROPPED, COUNTER_LOOPBACK_REFUSED, COUNTER_REDIRECTED, COUNTER_UDP_REFUSED,
    COUNTER_UDP443_REFUSED, COUNTERS, FAMILY_V4, FAMILY_V6, FLAG_BLOCK_QUIC, FLAG_REDIRECT_DNS,
    MAX_ALLOWANCES, MAX_BINDINGS, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, MAX_REFUSAL_KEYS,
    MAX_TRACKED_CONNECTIONS, MAX_TRACKED_DNS, OrigDst, PeerKey, REFUSED_EGRESS, REFUSED_LOOPBACK,
    REFUSED_QUIC, REFUSED_SIDECAR_PORT, REFUSED_UDP, RedirectConfig, Refusal, RefusalKey,
    WorkloadBinding, as_v4_mapped, v4_mapped,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const AF_INET: u32 = 2;
const QUIC_PORT: u16 = 443;
const DNS_PORT: u16 = 53;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_UDPLITE: u8 = 136;

#[map]
static FIRMA_CONFIG: Array<RedirectConfig> = Array::pinned(1, 0);
#[map]
static FIRMA_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);
#[map]
static FIRMA_BY_PEER: LruHashMap<PeerKey, OrigDst> = LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);
#[map]
static FIRMA_EXCL_V4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(MAX_EXCLUDED_CIDRS, 0);
#[map]
static FIRMA_EXCL_V6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(MAX_EXCLUDED_CIDRS, 0);
#[map]
static FIRMA_EXCL_PORTS: HashMap<u16, u8> = HashMap::pinned(MAX_EXCLUDED_PORTS, 0);
#[map]
static FIRMA_DNS_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_TRACKED_DNS, 0);
#[map]
static FIRMA_DNS_BY_PEER: LruHashMap<PeerKey, OrigDst> = LruHashMap::pinned(MAX_TRACKED_DNS, 0);
/// Read by userspace only; kept in the pinned object so bindings outlive the sidecar.
#[map]
static FIRMA_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS, 0);

/// Adds one to this CPU's slot `index` of [`FIRMA_COUNTERS`] (per-CPU: no atomics needed).
#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = FIRMA_COUNTERS.get_ptr_mut(index) {
        // SAFETY: a valid per-CPU slot; programs do not migrate CPUs while running.
        unsafe { *slot += 1 };
    }
}

#[map]
static FIRMA_BINDINGS: HashMap<u64, WorkloadBinding> = HashMap::pinned(MAX_BINDINGS, 0);
#[map]
static FIRMA_UDP_ALLOW: HashMap<PeerKey, u8> = HashMap::pinned(MAX_ALLOWANCES, 0);
#[map]
static FIRMA_LO_ALLOW: HashMap<PeerKey, u8> = HashMap::pinned(MAX_ALLOWANCES, 0);
#[map]
static FIRMA_REFUSALS: LruPerCpuHashMap<RefusalKey, Refusal> =
    LruPerCpuHashMap::pinned(MAX_REFUSAL_KEYS, 0);
/// Read and written by userspace only (refusals already audited); pinned with the rest.
#[map]
static FIRMA_REFUSALS_SEEN: HashMap<RefusalKey, u64> = HashMap::pinned(MAX_REFUSAL_KEYS, 0);

/// What a hook should do with one destination.
enum Verdict {
    Untouched,
    /// Refused, with a `REFUSED_*` reason.
    Refuse(u8),
    Redirect,
    /// Port 53 under the DNS guard: to the DNS listener.
    Dns,
}

/// Counts a refusal and tallies it for the sidecar's aggregated audit (this CPU's entry of the
/// workload's (reason, protocol) key: the last destination is the sample).
#[inline(always)]
fn record_refusal(cgroup_id: u64, reason: u8, protocol: u16, addr: &[u8; 16], port: u16, pid: u32) {
    count(match reason {
        REFUSED_QUIC => COUNTER_UDP443_REFUSED,
        REFUSED_UDP => COUNTER_UDP_REFUSED,
        REFUSED_EGRESS => COUNTER_EGRESS_DROPPED,
        _ => COUNTER_LOOPBACK_REFUSED,
    });
    let key = RefusalKey {
        cgroup_id,
        reason,
        _pad0: 0,
        protocol,
        _pad: [0; 4],
    };
    // SAFETY: helper valid in every program type.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if let Some(v) = FIRMA_REFUSALS.get_ptr_mut(&key) {
        // SAFETY: this CPU's value of a per-CPU map; programs do not migrate while running.
        unsafe {
            (*v).count += 1;
            (*v).last_ns = now;
            (*v).addr = *addr;
            (*v).port = port;
            (*v).pid = pid;
        }
    } else {
        let first = Refusal {
            count: 1,
            first_ns: now,
            last_ns: now,
            addr: *addr,
            port,
            _pad: 0,
            pid,
        };
        let _ = FIRMA_REFUSALS.insert(&key, &first, 0);
    }
}

/// [`record_refusal`] from a socket hook: the cgroup and pid of the caller.
#[inline(always)]
fn refuse(ctx: &SockAddrContext, reason: u8, addr: &[u8; 16], port: u16) -> i32 {
    // SAFETY: helpers valid in cgroup sock_addr programs; 4-byte read of the context.
    let (cgroup_id, pid_tgid, protocol) = unsafe {
        (
            bpf_get_current_cgroup_id(),
            bpf_get_current_pid_tgid(),
            (*ctx.sock_addr).protocol,
        )
    };
    record_refusal(
        cgroup_id,
        reason,
        protocol as u16,
        addr,
        port,
        (pid_tgid >> 32) as u32,
    );
    REFUSE
}

#[inline(always)]
fn config() -> Option<&'static RedirectConfig> {
    FIRMA_CONFIG.get(0)
}

/// Network-order port in the low 16 bits of `user_port` -> host order.
#[inline(always)]
fn port_from_user(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

#[inline(always)]
fn port_to_user(port: u16) -> u32 {
    u32::from(port.to_be())
}

#[inline(always)]
fn sock_mark(ctx: &SockAddrContext) -> u32 {
    // SAFETY: the verifier types `sk` as PTR_TO_SOCKET (never null for sock_addr programs) and
    // allows reading `mark`.
    unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark }
}

#[inline(always)]
fn port_excluded(cfg: &RedirectConfig, port: u16) -> bool {
    (port == DNS_PORT && cfg.flags & FLAG_REDIRECT_DNS == 0)
        // SAFETY: read-only lookup of a plain value.
        || unsafe { FIRMA_EXCL_PORTS.get(port) }.is_some()
}

/// An excluded CIDR (never redirected).
#[inline(always)]
fn cidr_excluded(addr: &[u8; 16]) -> bool {
    match as_v4_mapped(addr) {
        Some(v4) => FIRMA_EXCL_V4.get(Key::new(32, v4)).is_some(),
        None => FIRMA_EXCL_V6.get(Key::new(128, *addr)).is_some(),
    }
}

/// This host: 127/8, ::1, and the unspecified addresses (a connect to 0.0.0.0 or :: reaches
/// local listeners), v4-mapped forms included.
#[inline(always)]
fn is_loopback(addr: &[u8; 16]) -> bool {
    match as_v4_mapped(addr) {
        Some(v4) => v4[0] == 127 || (v4[0] == 0 && v4[1] == 0 && v4[2] == 0 && v4[3] == 0),
        None => {
            let mut low = 0u8;
            let mut i = 0;
            while i < 15 {
                low |= addr[i];
                i += 1;
            }
            low == 0 && (addr[15] == 0 || addr[15] == 1)
        }
    }
}

/// Loopback: the sidecar's own ports never; otherwise only an `allow_loopback` entry, for this
/// exact address or for any loopback address (all-zero key).
#[inline(always)]
fn loopback_verdict(cfg: &RedirectConfig, addr: &[u8; 16], port: u16) -> Verdict {
    if port == cfg.port || (cfg.dns_port != 0 && port == cfg.dns_port) {
        return Verdict::Refuse(REFUSED_SIDECAR_PORT);
    }
    let exact = PeerKey {
        addr: *addr,
        port,
        _pad: 0,
    };
    let any = PeerKey {
        addr: [0; 16],
        port,
        _pad: 0,
    };
    // SAFETY: read-only lookups of plain values.
    let allowed =
        unsafe { FIRMA_LO_ALLOW.get(&exact).is_some() || FIRMA_LO_ALLOW.get(&any).is_some() };
    if allowed {
        Verdict::Untouched
    } else {
        Verdict::Refuse(REFUSED_LOOPBACK)
    }
}

/// UDP (and UDP-Lite) to a destination that is not the DNS guard's: loopback rules, then
/// port 53 when the operator turned the guard off, `allow_udp`, port 443 when QUIC blocking
/// is off; everything else refused.
#[inline(always)]
fn udp_verdict(cfg: &RedirectConfig, addr: &[u8; 16], port: u16) -> Verdict {
    if is_loopback(addr) {
        return loopback_verdict(cfg, addr, port);
    }
    if port == DNS_PORT && cfg.flags & FLAG_REDIRECT_DNS == 0 {
        return Verdict::Untouched;
    }
    let key = PeerKey {
        addr: *addr,
        port,
        _pad: 0,
    };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { FIRMA_UDP_ALLOW.get(&key) }.is_some() {
        return Verdict::Untouched;
    }
    if port == QUIC_PORT {
        if cfg.flags & FLAG_BLOCK_QUIC != 0 {
            return Verdict::Refuse(REFUSED_QUIC);
        }
        return Verdict::Untouched;
    }
    Verdict::Refuse(REFUSED_UDP)
}

/// The decision shared by every connect and sendmsg hook; `addr` is v4-mapped for IPv4.
#[inline(always)]
fn classify(ctx: &SockAddrContext, cfg: &RedirectConfig, addr: &[u8; 16], port: u16) -> Verdict {
    if sock_mark(ctx) == cfg.mark {
        return Verdict::Untouched;
    }
    // SAFETY: `sock_addr` is the kernel-provided context; 4-byte reads.
    let (sock_type, protocol) = unsafe { ((*ctx.sock_addr).type_, (*ctx.sock_addr).protocol) };
    let tcp = sock_type == SOCK_STREAM && protocol == u32::from(IPPROTO_TCP);
    let udp = sock_type == SOCK_DGRAM
        && (protocol == u32::from(IPPROTO_UDP) || protocol == u32::from(IPPROTO_UDPLITE));
    if !tcp && !udp {
        // ICMP ping sockets, SCTP, MPTCP...: Firma carries none of them.
        return Verdict::Refuse(REFUSED_EGRESS);
    }
    if port == DNS_PORT && cfg.flags & FLAG_REDIRECT_DNS != 0 {
        return Verdict::Dns;
    }
    if udp {
        return udp_verdict(cfg, addr, port);
    }
    if is_loopback(addr) {
        return loopback_verdict(cfg, addr, port);
    }
    if port_excluded(cfg, port) || cidr_excluded(addr) {
        Verdict::Untouched
    } else {
        Verdict::Redirect
    }
}

/// Remembers the original destination under the socket cookie.
#[inline(always)]
fn remember(ctx: &SockAddrContext, addr: [u8; 16], port: u16, family: u16) -> bool {
    remember_in(&FIRMA_BY_COOKIE, ctx, addr, port, family)
}

#[inline(always)]
fn remember_in(
    map: &LruHashMap<u64, OrigDst>,
    ctx: &SockAddrContext,
    addr: [u8; 16],
    port: u16,
    family: u16,
) -> bool {
    // SAFETY: helpers valid in cgroup sock_addr programs.
    let (cookie, pid_tgid, cgroup_id) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_current_pid_tgid(),
            bpf_get_current_cgroup_id(),
        )
    };
    let orig = OrigDst {
        addr,
        port,
        family,
        pid: (pid_tgid >> 32) as u32,
        cgroup_id,
    };
    map.insert(cookie, orig, 0).is_ok()
}

#[cgroup_sock_addr(connect4)]
pub fn firma_connect4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return REFUSE;
    };
    // SAFETY: `sock_addr` is the kernel-provided context; 4-byte reads as the verifier requires.
    let (ip, user_port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    let v4 = ip.to_ne_bytes();
    let port = port_from_user(user_port);
    let addr = v4_mapped(v4);
    match classify(&ctx, cfg, &addr, port) {
        Verdict::Untouched => ALLOW,
        Verdict::Refuse(reason) => refuse(&ctx, reason, &addr, port),
        Verdict::Redirect => {
            if cfg.port == 0 || !remember(&ctx, addr, port, FAMILY_V4) {
                warn!(&ctx, "no redirect config or map full; refusing connect");
                return REFUSE;
            }
            count(COUNTER_REDIRECTED);
            // SAFETY: writes to user_ip4/user_port are allowed for connect4.
            unsafe {
                (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(cfg.listen_v4);
                (*ctx.sock_addr).user_port = port_to_user(cfg.port);
            }
            ALLOW
        }
        Verdict::Dns => dns_redirect4(&ctx, cfg, addr, port),
    }
}

#[inline(always)]
fn read_user_ip6(ctx: &SockAddrContext) -> [u8; 16] {
    // SAFETY: 4-byte reads of user_ip6, as the verifier requires.
    let w = unsafe {
        [
            (*ctx.sock_addr).user_ip6[0],
            (*ctx.sock_addr).user_ip6[1],
            (*ctx.sock_addr).user_ip6[2],
            (*ctx.sock_addr).user_ip6[3],
        ]
    };
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[inline(always)]
fn write_user_ip6(ctx: &SockAddrContext, addr: &[u8; 16]) {
    let word = |i: usize| {
        u32::from_ne_bytes([
            addr[i * 4],
            addr[i * 4 + 1],
            addr[i * 4 + 2],
            addr[i * 4 + 3],
        ])
    };
    // SAFETY: 4-byte writes of user_ip6 are allowed for connect6/getpeername6.
    unsafe {
        (*ctx.sock_addr).user_ip6[0] = word(0);
        (*ctx.sock_addr).user_ip6[1] = word(1);
        (*ctx.sock_addr).user_ip6[2] = word(2);
        (*ctx.sock_addr).user_ip6[3] = word(3);
    }
}

#[cgroup_sock_addr(connect6)]
pub fn firma_connect6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return REFUSE;
    };
    let addr = read_user_ip6(&ctx);
    // SAFETY: 4-byte read of the context.
    let port = port_from_user(unsafe { (*ctx.sock_addr).user_port });
    match classify(&ctx, cfg, &addr, port) {
        Verdict::Untouched => ALLOW,
        Verdict::Refuse(reason) => refuse(&ctx, reason, &addr, port),
        Verdict::Redirect => {
            let mapped = as_v4_mapped(&addr).is_some();
            let family = if mapped { FAMILY_V4 } else { FAMILY_V6 };
            if cfg.port == 0 || !remember(&ctx, addr, port, family) {
                warn!(&ctx, "no redirect config or map full; refusing connect");
                return REFUSE;
            }
            count(COUNTER_REDIRECTED);
            // A v4-mapped destination stays v4-mapped (a dual-stack socket), aimed at the v4
            // listener; a real IPv6 destination goes to the v6 listener.
            let target = if mapped {
                v4_mapped(cfg.listen_v4)
            } else {
                cfg.listen_v6
            };
            write_user_ip6(&ctx, &target);
            // SAFETY: write of user_port is allowed for connect6.
            unsafe { (*ctx.sock_addr).user_port = port_to_user(cfg.port) };
            ALLOW
        }
        Verdict::Dns => dns_redirect6(&ctx, cfg, &addr, port),
    }
}

/// An unconnected datagram: the DNS guard, or the UDP rules (a datagram socket never gets the
/// TCP redirect).
#[inline(always)]
fn sendmsg_verdict(
    ctx: &SockAddrContext,
    cfg: &RedirectConfig,
    addr: &[u8; 16],
    port: u16,
) -> Verdict {
    match classify(ctx, cfg, addr, port) {
        Verdict::Redirect => Verdict::Refuse(REFUSED_EGRESS),
        v => v,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn firma_sendmsg4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return REFUSE;
    };
    // SAFETY: 4-byte reads of the context.
    let (ip, user_port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    let port = port_from_user(user_port);
    let addr = v4_mapped(ip.to_ne_bytes());
    match sendmsg_verdict(&ctx, cfg, &addr, port) {
        Verdict::Dns => dns_redirect4(&ctx, cfg, addr, port),
        Verdict::Refuse(reason) => refuse(&ctx, reason, &addr, port),
        _ => ALLOW,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn firma_sendmsg6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return REFUSE;
    };
    let addr = read_user_ip6(&ctx);
    // SAFETY: 4-byte read of the context.
    let port = port_from_user(unsafe { (*ctx.sock_addr).user_port });
    match sendmsg_verdict(&ctx, cfg, &addr, port) {
        Verdict::Dns => dns_redirect6(&ctx, cfg, &addr, port),
        Verdict::Refuse(reason) => refuse(&ctx, reason, &addr, port),
        _ => ALLOW,
    }
}

/// Records a DNS destination: TCP like any redirected connection (`sock_ops` re-keys it by client
/// address), UDP in the DNS cookie map. `false` (refuse) when there is no DNS listener.
#[inline(always)]
fn dns_remember(
    ctx: &SockAddrContext,
    cfg: &RedirectConfig,
    addr: [u8; 16],
    port: u16,
    family: u16,
) -> bool {
    if cfg.dns_port == 0 {
        return false;
    }
    // SAFETY: `sock_addr` is the kernel-provided context.
    let sock_type = unsafe { (*ctx.sock_addr).type_ };
    if sock_type == SOCK_STREAM {
        remember(ctx, addr, port, family)
    } else {
        remember_in(&FIRMA_DNS_BY_COOKIE, ctx, addr, port, family)
    }
}

/// connect4/sendmsg4 under the DNS guard: to `listen_v4:dns_port`, or refused.
#[inline(always)]
fn dns_redirect4(ctx: &SockAddrContext, cfg: &RedirectConfig, addr: [u8; 16], port: u16) -> i32 {
    if !dns_remember(ctx, cfg, addr, port, FAMILY_V4) {
        warn!(
            ctx,
            "DNS guard: no DNS listener configured or map full; refusing"
        );
        return REFUSE;
    }
    // SAFETY: writes to user_ip4/user_port are allowed for connect4 and sendmsg4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(cfg.listen_v4);
        (*ctx.sock_addr).user_port = port_to_user(cfg.dns_port);
    }
    ALLOW
}

/// connect6/sendmsg6 under the DNS guard: a v4-mapped resolver goes to the v4 listener (mapped),
/// an IPv6 one to `listen_v6`, both on `dns_port`; or refused.
#[inline(always)]
fn dns_redirect6(ctx: &SockAddrContext, cfg: &RedirectConfig, addr: &[u8; 16], port: u16) -> i32 {
    let mapped = as_v4_mapped(addr).is_some();
    let family = if mapped { FAMILY_V4 } else { FAMILY_V6 };
    if !dns_remember(ctx, cfg, *addr, port, family) {
        warn!(
            ctx,
            "DNS guard: no DNS listener configured or map full; refusing"
        );
        return REFUSE;
    }
    let target = if mapped {
        v4_mapped(cfg.listen_v4)
    } else {
        cfg.listen_v6
    };
    write_user_ip6(ctx, &target);
    // SAFETY: write of user_port is allowed for connect6 and sendmsg6.
    unsafe { (*ctx.sock_addr).user_port = port_to_user(cfg.dns_port) };
    ALLOW
}

/// The resolver a UDP socket asked, when `port` (of a datagram being received) is the DNS
/// listener's.
#[inline(always)]
fn dns_reply_origin(ctx: &SockAddrContext, cfg: &RedirectConfig, port: u16) -> Option<OrigDst> {
    if cfg.dns_port == 0 || port != cfg.dns_port {
        return None;
    }
    // SAFETY: helper valid in cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is copied out.
    unsafe { FIRMA_DNS_BY_COOKIE.get(cookie) }.copied()
}

/// DNS replies from the listener appear to come from the resolver the app queried.
#[cgroup_sock_addr(recvmsg4)]
pub fn firma_recvmsg4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    // SAFETY: 4-byte reads of the context.
    let (ip, user_port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    if ip.to_ne_bytes() == cfg.listen_v4
        && let Some(orig) = dns_reply_origin(&ctx, cfg, port_from_user(user_port))
        && let Some(v4) = as_v4_mapped(&orig.addr)
    {
        // SAFETY: writes to user_ip4/user_port are allowed for recvmsg4.
        unsafe {
            (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(v4);
            (*ctx.sock_addr).user_port = port_to_user(orig.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn firma_recvmsg6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    let ip = read_user_ip6(&ctx);
    // SAFETY: 4-byte read of the context.
    let port = port_from_user(unsafe { (*ctx.sock_addr).user_port });
    if (ip == cfg.listen_v6 || ip == v4_mapped(cfg.listen_v4))
        && let Some(orig) = dns_reply_origin(&ctx, cfg, port)
    {
        write_user_ip6(&ctx, &orig.addr);
        // SAFETY: write of user_port is allowed for recvmsg6.
        unsafe { (*ctx.sock_addr).user_port = port_to_user(orig.port) };
    }
    ALLOW
}

/// The last word on every packet a tagged socket sends (see the crate docs): TCP passes, UDP and
/// UDP-Lite only where the socket hooks would let them, anything else is dropped. A datagram to
/// the DNS listener also gets its guard record filed under its (address, port), which only now
/// is certain (a connected UDP socket is bound after `connect4/6` ran).
#[cgroup_skb(egress)]
pub fn firma_egress(ctx: SkBuffContext) -> i32 {
    match egress_verdict(&ctx) {
        Ok(()) => 1,
        Err(reason) => {
            // SAFETY: helper valid in cgroup_skb programs.
            let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
            let (protocol, addr, port) = packet_summary(&ctx);
            record_refusal(cgroup_id, reason, u16::from(protocol), &addr, port, 0);
            0
        }
    }
}

/// The L4 protocol, the destination (v4-mapped for IPv4) and the L4 header offset; `None`
/// when the packet cannot be parsed (dropped).
#[inline(always)]
fn parse_ip(ctx: &SkBuffContext) -> Option<(u8, [u8; 16], usize, bool)> {
    let first: u8 = ctx.load(0).ok()?;
    match first >> 4 {
        4 => {
            let proto: u8 = ctx.load(9).ok()?;
            let frag: [u8; 2] = ctx.load(6).ok()?;
            // A non-first fragment has no L4 header.
            let later_fragment = (u16::from_be_bytes(frag) & 0x1fff) != 0;
            let dst: [u8; 4] = ctx.load(16).ok()?;
            Some((
                proto,
                v4_mapped(dst),
                usize::from(first & 0x0f) * 4,
                later_fragment,
            ))
        }
        6 => {
            let next: u8 = ctx.load(6).ok()?;
            let dst: [u8; 16] = ctx.load(24).ok()?;
            Some((next, dst, 40, false))
        }
        _ => None,
    }
}

/// What a dropped packet was, for the refusal record (zeros when unknown).
#[inline(always)]
fn packet_summary(ctx: &SkBuffContext) -> (u8, [u8; 16], u16) {
    match parse_ip(ctx) {
        Some((proto, dst, l4, false)) if proto == IPPROTO_UDP || proto == IPPROTO_UDPLITE => {
            let port = ctx
                .load::<[u8; 4]>(l4)
                .map_or(0, |p| u16::from_be_bytes([p[2], p[3]]));
            (proto, dst, port)
        }
        Some((proto, dst, _, _)) => (proto, dst, 0),
        None => (0, [0; 16], 0),
    }
}

#[inline(always)]
fn egress_verdict(ctx: &SkBuffContext) -> Result<(), u8> {
    let Some(cfg) = config() else {
        return Err(REFUSED_EGRESS);
    };
    let Some((proto, dst, l4, later_fragment)) = parse_ip(ctx) else {
        return Err(REFUSED_EGRESS);
    };
    if proto == IPPROTO_TCP {
        return Ok(());
    }
    if later_fragment || (proto != IPPROTO_UDP && proto != IPPROTO_UDPLITE) {
        return Err(REFUSED_EGRESS);
    }
    let ports: [u8; 4] = ctx.load(l4).map_err(|_| REFUSED_EGRESS)?;
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let to_listener = dst == v4_mapped(cfg.listen_v4) || dst == cfg.listen_v6;
    if to_listener
        && cfg.dns_port != 0
        && dport == cfg.dns_port
        && cfg.flags & FLAG_REDIRECT_DNS != 0
    {
        if proto == IPPROTO_UDP {
            let _ = dns_track(ctx, &dst, [ports[0], ports[1]]);
        }
        return Ok(());
    }
    // SAFETY: reading the mark of the packet (the socket's SO_MARK).
    if unsafe { (*ctx.skb.skb).mark } == cfg.mark {
        return Ok(());
    }
    match udp_verdict(cfg, &dst, dport) {
        Verdict::Refuse(reason) => Err(reason),
        _ => Ok(()),
    }
}

/// Files the guard record of this UDP socket under the datagram's source (address, port).
#[inline(always)]
fn dns_track(ctx: &SkBuffContext, dst: &[u8; 16], sport: [u8; 2]) -> Option<()> {
    let src = match as_v4_mapped(dst) {
        Some(_) => v4_mapped(ctx.load::<[u8; 4]>(12).ok()?),
        None => ctx.load::<[u8; 16]>(8).ok()?,
    };
    // SAFETY: helper valid in cgroup_skb programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is copied out.
    let orig = unsafe { FIRMA_DNS_BY_COOKIE.get(cookie) }.copied()?;
    let key = PeerKey {
        addr: src,
        port: u16::from_be_bytes(sport),
        _pad: 0,
    };
    FIRMA_DNS_BY_PEER.insert(key, orig, 0).ok()
}

/// The original destination of this socket, if it is one we redirected and it is still pointed
/// at the listener (a reused socket reconnected elsewhere keeps its real peer).
#[inline(always)]
fn redirected_orig(ctx: &SockAddrContext, cfg: &RedirectConfig) -> Option<OrigDst> {
    // SAFETY: helper valid in cgroup sock_addr programs; 4-byte read of the context.
    let (cookie, port) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            (*ctx.sock_addr).user_port,
        )
    };
    let port = port_from_user(port);
    if port != cfg.port && !(cfg.dns_port != 0 && port == cfg.dns_port) {
        return None;
    }
    // SAFETY: read-only lookups; the value is copied out. A DNS socket is in the connection
    // maps (TCP) or the DNS map (connected UDP).
    unsafe {
        FIRMA_BY_COOKIE
            .get(cookie)
            .or_else(|| FIRMA_DNS_BY_COOKIE.get(cookie))
    }
    .copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn firma_getpeername4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    if let Some(orig) = redirected_orig(&ctx, cfg)
        && let Some(v4) = as_v4_mapped(&orig.addr)
    {
        // SAFETY: writes to user_ip4/user_port are allowed for getpeername4.
        unsafe {
            (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(v4);
            (*ctx.sock_addr).user_port = port_to_user(orig.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn firma_getpeername6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    if let Some(orig) = redirected_orig(&ctx, cfg) {
        write_user_ip6(&ctx, &orig.addr);
        // SAFETY: write of user_port is allowed for getpeername6.
        unsafe { (*ctx.sock_addr).user_port = port_to_user(orig.port) };
    }
    ALLOW
}

/// The client's own (address, port), v4-mapped for IPv4 and for v4-mapped v6 sockets.
///
/// Every context field is read once, unconditionally and volatile: the verifier rejects a load
/// through a ctx pointer the compiler has offset and selected between branches.
#[inline(always)]
fn client_key(ctx: &SockOpsContext) -> PeerKey {
    // SAFETY: 4-byte reads of fields sock_ops programs may read.
    let (family, remote6, local4, local6, local_port) = unsafe {
        let o = ctx.ops;
        (
            core::ptr::read_volatile(&(*o).family),
            [
                core::ptr::read_volatile(&(*o).remote_ip6[0]),
                core::ptr::read_volatile(&(*o).remote_ip6[1]),
                core::ptr::read_volatile(&(*o).remote_ip6[2]),
                core::ptr::read_volatile(&(*o).remote_ip6[3]),
            ],
            core::ptr::read_volatile(&(*o).local_ip4),
            [
                core::ptr::read_volatile(&(*o).local_ip6[0]),
                core::ptr::read_volatile(&(*o).local_ip6[1]),
                core::ptr::read_volatile(&(*o).local_ip6[2]),
                core::ptr::read_volatile(&(*o).local_ip6[3]),
            ],
            core::ptr::read_volatile(&(*o).local_port),
        )
    };
    let remote6 = words_to_bytes(remote6);
    let addr = if family == AF_INET || as_v4_mapped(&remote6).is_some() {
        // For a v6 socket connecting to a v4-mapped address the kernel fills the v4 source
        // (`local_ip4`) before `TCP_CONNECT_CB`, but the v6 view of it only afterwards.
        v4_mapped(local4.to_ne_bytes())
    } else {
        words_to_bytes(local6)
    };
    PeerKey {
        addr,
        port: local_port as u16,
        _pad: 0,
    }
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[sock_ops]
pub fn firma_sock_ops(ctx: SockOpsContext) -> u32 {
    // SAFETY: helper valid in sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: read-only lookup; the value is copied out.
            let Some(orig) = (unsafe { FIRMA_BY_COOKIE.get(cookie) }).copied() else {
                return 0;
            };
            let key = client_key(&ctx);
            if FIRMA_BY_PEER.insert(key, orig, 0).is_err() {
                warn!(&ctx, "cannot record redirected connection");
            }
            // Ask for state callbacks so the entries go away with the connection.
            let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
            let _ = ctx.set_cb_flags(flags as i32);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let key = client_key(&ctx);
            let _ = FIRMA_BY_PEER.remove(key);
            let _ = FIRMA_BY_COOKIE.remove(cookie);
        }
        _ => {}
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
