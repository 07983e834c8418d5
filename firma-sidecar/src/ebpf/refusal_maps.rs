//! The kernel's refusal tallies (`FIRMA_REFUSALS`) and what is already audited of them
//! (`FIRMA_REFUSALS_SEEN`): which tallies grew since their last event. The events themselves
//! are written by [`super::refusals`].

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap};
use firma_common::maps::{Refusal, RefusalKey, as_v4_mapped};
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The two pinned maps.
pub struct Maps {
    pub tallies: PerCpuHashMap<MapData, RefusalKey, Refusal>,
    pub seen: BpfHashMap<MapData, RefusalKey, u64>,
}

/// Refusals of one key not yet audited.
#[derive(Debug, Clone)]
pub struct Pending {
    pub key: RefusalKey,
    /// New since the last audited event of this key.
    pub count: u64,
    /// Counted since the tally was created.
    pub total: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub pid: u32,
}

impl Pending {
    /// The sample destination as text (`ADDR:PORT`, or `ADDR` when the protocol has no port).
    pub fn destination(&self) -> String {
        let ip = match as_v4_mapped(&self.addr) {
            Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
            None => IpAddr::V6(Ipv6Addr::from(self.addr)),
        };
        if self.port == 0 {
            ip.to_string()
        } else {
            SocketAddr::new(ip, self.port).to_string()
        }
    }
}

impl Maps {
    /// Keys whose tally grew since it was last audited, summed over CPUs (the sample is the
    /// CPU that refused last).
    pub fn pending(&mut self) -> Vec<Pending> {
        let maps = self;
        let entries: Vec<(RefusalKey, aya::maps::PerCpuValues<Refusal>)> =
            maps.tallies.iter().filter_map(Result::ok).collect();
        let mut live = HashSet::with_capacity(entries.len());
        let mut out = Vec::new();
        for (key, per_cpu) in entries {
            live.insert(key);
            let mut total = 0u64;
            let mut first = u64::MAX;
            let mut last: Option<Refusal> = None;
            for v in per_cpu.iter().filter(|v| v.count > 0) {
                total = total.wrapping_add(v.count);
                first = first.min(v.first_ns);
                if last.is_none_or(|l| v.last_ns > l.last_ns) {
                    last = Some(*v);
                }
            }
            let Some(last) = last else { continue };
            // A tally the LRU evicted and the kernel re-created starts again below `seen`.
            let seen = maps.seen.get(&key, 0).unwrap_or(0);
            let seen = if seen > total { 0 } else { seen };
            if total > seen {
                out.push(Pending {
                    key,
                    count: total - seen,
                    total,
                    first_ns: first,
                    last_ns: last.last_ns,
                    addr: last.addr,
                    port: last.port,
                    pid: last.pid,
                });
            }
        }
        let stale: Vec<RefusalKey> = maps
            .seen
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(k))
            .collect();
        for k in stale {
            let _ = maps.seen.remove(&k);
        }
        out
    }

    /// Records that `total` refusals of `key` are in the audit.
    pub fn mark_audited(&mut self, key: &RefusalKey, total: u64) {
        if let Err(e) = self.seen.insert(key, total, 0) {
            tracing::warn!(error = %e, "cannot record audited refusals; they may be audited again");
        }
    }
}
