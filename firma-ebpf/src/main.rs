//! Firma's cgroup eBPF programs: transparent redirection of a tagged workload's TCP connects to
//! the sidecar.
//!
//! A cgroup is *tagged* by attaching these programs to it (the attach itself is the tag), so the
//! programs never ask "is this workload tagged?". Per connection:
//!
//! 1. `connect4`/`connect6` save the original destination, cgroup id and pid keyed by socket
//!    cookie and rewrite the destination to the sidecar's transparent listener. IPv4-mapped IPv6
//!    destinations are treated as IPv4. Excluded: the listener and localhost addresses, configured
//!    CIDRs (LPM tries) and ports, DNS (unless `redirect_dns`), and sockets carrying the
//!    sidecar's `SO_MARK`. UDP to port 443 (QUIC) is refused so clients fall back to TCP.
//! 2. `sock_ops` copies the entry to a map keyed by the client's (address, port) as soon as the
//!    port is bound (`TCP_CONNECT_CB`, before the SYN leaves), which is what the sidecar can look
//!    up after `accept()`; it deletes both entries when the socket reaches `TCP_CLOSE`.
//! 3. `getpeername4`/`getpeername6` make the app see the original peer.
//! 4. `sendmsg4`/`sendmsg6` refuse unconnected UDP to port 443.
//! 5. DNS guard (with `FLAG_REDIRECT_DNS`): UDP and TCP to port 53, whatever the resolver address,
//!    go to the sidecar's DNS listener (`dns_port` on the listener addresses). `connect4/6` and
//!    `sendmsg4/6` rewrite the destination and record the original one by socket cookie (TCP in
//!    the connection maps above, UDP in `FIRMA_DNS_BY_COOKIE`); `firma_dns_egress`
//!    (`cgroup_skb/egress`) re-keys a UDP socket's record by its (address, port) as each query
//!    leaves, which is what the sidecar looks up on receipt; `recvmsg4/6` make replies come from
//!    the resolver the app asked. Localhost and excluded CIDRs/ports are *not* exempt: a local
//!    resolver would be a way around the guard. While `dns_port` is 0, or a record cannot be
//!    stored, DNS is refused.
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
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_socket_cookie},
    macros::{cgroup_skb, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use firma_maps::{
    COUNTER_REDIRECTED, COUNTER_UDP443_REFUSED, COUNTERS, FAMILY_V4, FAMILY_V6, FLAG_BLOCK_QUIC, FLAG_REDIRECT_DNS, MAX_BINDINGS, MAX_EXCLUDED_CIDRS,
    MAX_EXCLUDED_PORTS, MAX_TRACKED_CONNECTIONS, MAX_TRACKED_DNS, OrigDst, PeerKey, RedirectConfig,
    WorkloadBinding, as_v4_mapped, v4_mapped,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const AF_INET: u32 = 2;
const QUIC_PORT: u16 = 443;
const DNS_PORT: u16 = 53;
const IPPROTO_UDP: u8 = 17;

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

/// What `connect` should do with one destination.
enum Verdict {
    Untouched,
    Refuse,
    Redirect,
    /// Port 53 under the DNS guard: to the DNS listener.
    Dns,
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

/// Localhost (127.0.0.1, 0.0.0.0), the listener, or an excluded CIDR. Other 127/8 addresses are
/// redirected like any remote (tests and demos use them); exclude `127.0.0.0/8` to stop that.
#[inline(always)]
fn v4_excluded(cfg: &RedirectConfig, addr: [u8; 4]) -> bool {
    addr == [127, 0, 0, 1]
        || addr == [0, 0, 0, 0]
        || addr == cfg.listen_v4
        || FIRMA_EXCL_V4.get(Key::new(32, addr)).is_some()
}

#[inline(always)]
fn v6_excluded(cfg: &RedirectConfig, addr: &[u8; 16]) -> bool {
    let mut loopback = [0u8; 16];
    loopback[15] = 1;
    *addr == loopback
        || *addr == [0u8; 16]
        || *addr == cfg.listen_v6
        || FIRMA_EXCL_V6.get(Key::new(128, *addr)).is_some()
}

/// The decision shared by every connect hook; `addr` is v4-mapped for IPv4.
#[inline(always)]
fn classify(ctx: &SockAddrContext, cfg: &RedirectConfig, addr: &[u8; 16], port: u16) -> Verdict {
    if dns_guarded(ctx, cfg, port) {
        return Verdict::Dns;
    }
    // SAFETY: `sock_addr` is the kernel-provided context.
    let sock_type = unsafe { (*ctx.sock_addr).type_ };
    if sock_type == SOCK_DGRAM {
        if port == QUIC_PORT && cfg.flags & FLAG_BLOCK_QUIC != 0 {
            count(COUNTER_UDP443_REFUSED);
            return Verdict::Refuse;
        }
        return Verdict::Untouched;
    }
    if sock_type != SOCK_STREAM || sock_mark(ctx) == cfg.mark || port_excluded(cfg, port) {
        return Verdict::Untouched;
    }
    let excluded = match as_v4_mapped(addr) {
        Some(v4) => v4_excluded(cfg, v4),
        None => v6_excluded(cfg, addr),
    };
    if excluded {
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
        Verdict::Refuse => {
            debug!(&ctx, "refused UDP/443 (QUIC)");
            REFUSE
        }
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
        Verdict::Refuse => {
            debug!(&ctx, "refused UDP/443 (QUIC)");
            REFUSE
        }
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

#[inline(always)]
fn refuse_quic(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return REFUSE;
    };
    // SAFETY: 4-byte read of the context.
    let port = port_from_user(unsafe { (*ctx.sock_addr).user_port });
    if port == QUIC_PORT && cfg.flags & FLAG_BLOCK_QUIC != 0 {
        debug!(ctx, "refused UDP/443 (QUIC) sendmsg");
        count(COUNTER_UDP443_REFUSED);
        REFUSE
    } else {
        ALLOW
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn firma_sendmsg4(ctx: SockAddrContext) -> i32 {
    if let Some(cfg) = config() {
        // SAFETY: 4-byte reads of the context.
        let (ip, user_port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
        let port = port_from_user(user_port);
        if dns_guarded(&ctx, cfg, port) {
            return dns_redirect4(&ctx, cfg, v4_mapped(ip.to_ne_bytes()), port);
        }
    }
    refuse_quic(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn firma_sendmsg6(ctx: SockAddrContext) -> i32 {
    if let Some(cfg) = config() {
        // SAFETY: 4-byte read of the context.
        let port = port_from_user(unsafe { (*ctx.sock_addr).user_port });
        if dns_guarded(&ctx, cfg, port) {
            let addr = read_user_ip6(&ctx);
            return dns_redirect6(&ctx, cfg, &addr, port);
        }
    }
    refuse_quic(&ctx)
}

/// DNS guard: is this port-53 traffic (any destination, any socket type) to send to the DNS
/// listener? Never the sidecar's own (marked) sockets.
#[inline(always)]
fn dns_guarded(ctx: &SockAddrContext, cfg: &RedirectConfig, port: u16) -> bool {
    port == DNS_PORT && cfg.flags & FLAG_REDIRECT_DNS != 0 && sock_mark(ctx) != cfg.mark
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

/// DNS guard, UDP: as a tagged socket's datagram to the DNS listener leaves, file its record
/// under the client's (address, port), which only now is certain (a connected UDP socket is
/// bound after `connect4/6` ran). Never drops anything.
#[cgroup_skb(egress)]
pub fn firma_dns_egress(ctx: SkBuffContext) -> i32 {
    let _ = dns_track_egress(&ctx);
    1
}

#[inline(always)]
fn dns_track_egress(ctx: &SkBuffContext) -> Option<()> {
    let cfg = config()?;
    if cfg.dns_port == 0 || cfg.flags & FLAG_REDIRECT_DNS == 0 {
        return None;
    }
    let first: u8 = ctx.load(0).ok()?;
    let (src, l4) = match first >> 4 {
        4 => {
            let proto: u8 = ctx.load(9).ok()?;
            let dst: [u8; 4] = ctx.load(16).ok()?;
            if proto != IPPROTO_UDP || dst != cfg.listen_v4 {
                return None;
            }
            let src: [u8; 4] = ctx.load(12).ok()?;
            (v4_mapped(src), usize::from(first & 0x0f) * 4)
        }
        6 => {
            let next: u8 = ctx.load(6).ok()?;
            let dst: [u8; 16] = ctx.load(24).ok()?;
            if next != IPPROTO_UDP || dst != cfg.listen_v6 {
                return None;
            }
            (ctx.load::<[u8; 16]>(8).ok()?, 40)
        }
        _ => return None,
    };
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    if u16::from_be_bytes([ports[2], ports[3]]) != cfg.dns_port {
        return None;
    }
    // SAFETY: helper valid in cgroup_skb programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is copied out.
    let orig = unsafe { FIRMA_DNS_BY_COOKIE.get(cookie) }.copied()?;
    let key = PeerKey {
        addr: src,
        port: u16::from_be_bytes([ports[0], ports[1]]),
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
