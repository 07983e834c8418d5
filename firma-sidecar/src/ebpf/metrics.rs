//! Transparent mode's kernel-side metrics (`firma_sidecar_ebpf_*`): the programs' per-CPU
//! counters and the attached workloads, read from the redirector at scrape time.

use super::Redirector;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;

static METRICS: OnceLock<EbpfMetrics> = OnceLock::new();

struct EbpfMetrics {
    redirected: Counter,
    udp443_refused: Counter,
    /// udp_refused, loopback_refused, egress_dropped.
    side_doors: [Counter; 3],
    workloads: Gauge,
}

/// What transparent mode's kernel side reports at scrape time.
pub trait KernelState: Send + Sync {
    /// (redirected connects, refused UDP/443), summed over CPUs.
    fn counters(&self) -> (u64, u64);
    /// Attached workload cgroups, and whether each has all its programs' links pinned.
    fn workloads(&self) -> Vec<bool>;
    /// (refused UDP but 443, refused loopback, dropped at egress), summed over CPUs.
    fn side_doors(&self) -> [u64; 3] {
        [0; 3]
    }
}

impl KernelState for Redirector {
    fn counters(&self) -> (u64, u64) {
        self.kernel_counters()
    }

    fn side_doors(&self) -> [u64; 3] {
        self.side_door_counters()
    }

    fn workloads(&self) -> Vec<bool> {
        self.status()
            .into_iter()
            .map(|(_, links)| links == super::LINKS_PER_CGROUP)
            .collect()
    }
}

/// Creates the eBPF metrics under `ebpf_` in `r` (first call only).
pub fn register(r: &mut Registry) {
    if METRICS.get().is_some() {
        return;
    }
    let r = r.sub_registry_with_prefix("ebpf");
    let redirected = Counter::default();
    let udp443_refused = Counter::default();
    let workloads = Gauge::default();
    r.register(
        "redirected_connects",
        "TCP connects of tagged workloads redirected to the sidecar (kernel per-CPU counter)",
        redirected.clone(),
    );
    r.register(
        "udp443_refused",
        "UDP/443 (QUIC) connects and sends of tagged workloads refused (kernel per-CPU counter)",
        udp443_refused.clone(),
    );
    let side_doors: [Counter; 3] = Default::default();
    for (name, help, c) in [
        (
            "udp_refused",
            "UDP and UDP-Lite connects and sends of tagged workloads refused, port 443 aside (closed UDP; kernel per-CPU counter)",
            &side_doors[0],
        ),
        (
            "loopback_refused",
            "Loopback connects and sends of tagged workloads refused (closed loopback, the sidecar's own ports; kernel per-CPU counter)",
            &side_doors[1],
        ),
        (
            "egress_dropped",
            "Packets of tagged workloads dropped at egress or sockets refused for their protocol (ICMP ping, SCTP...; kernel per-CPU counter)",
            &side_doors[2],
        ),
    ] {
        r.register(name, help, c.clone());
    }
    r.register(
        "attached_workloads",
        "Workload cgroups attached (tagged) now",
        workloads.clone(),
    );
    let _ = METRICS.set(EbpfMetrics {
        redirected,
        udp443_refused,
        side_doors,
        workloads,
    });
}

/// Copies the kernel's counters into the metrics (at scrape time).
pub fn refresh(k: &dyn KernelState) {
    let Some(m) = METRICS.get() else { return };
    let (redirected, refused) = k.counters();
    m.redirected.inner().store(redirected, Ordering::Relaxed);
    m.udp443_refused.inner().store(refused, Ordering::Relaxed);
    for (c, v) in m.side_doors.iter().zip(k.side_doors()) {
        c.inner().store(v, Ordering::Relaxed);
    }
    m.workloads
        .set(i64::try_from(k.workloads().len()).unwrap_or(i64::MAX));
}
