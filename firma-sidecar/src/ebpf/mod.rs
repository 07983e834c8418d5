//! Kernel side of transparent mode: load the eBPF object, pin it, attach it to workload cgroups,
//! and answer "where did this accepted connection want to go, and who opened it?".
//!
//! Pin layout under `pin_dir` (bpffs):
//! `maps/<MAP>` (shared by every program instance, re-used on restart), `progs/<prog>`, and
//! `links/<cgroup id>/<prog>` (one directory per attached cgroup; removing the files detaches).
//! See `README.md` beside this file for the failure modes.

pub mod allow;
pub mod bpffs;
pub mod cgroup;
mod error;
mod logs;
pub mod metrics;
pub mod pins;
pub mod probe;
mod programs;
pub mod refusal_maps;
pub mod refusals;
mod settings;
mod workloads;

pub use cgroup::{Cgroup2, CgroupError, CgroupRef};
pub use error::EbpfError;
pub use logs::LogPump;
pub use programs::LINKS_PER_CGROUP;
pub use settings::{Cidr, RedirectSettings};
pub use workloads::Bound;

use crate::conn::Workload;
use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key};
use aya::{Ebpf, EbpfLoader};
use firma_common::maps::{
    COUNTER_EGRESS_DROPPED, COUNTER_LOOPBACK_REFUSED, COUNTER_REDIRECTED, COUNTER_UDP_REFUSED,
    COUNTER_UDP443_REFUSED, MAP_BINDINGS, MAP_BY_COOKIE, MAP_BY_PEER, MAP_CONFIG, MAP_COUNTERS,
    MAP_DNS_BY_PEER, MAP_EXCLUDED_PORTS, MAP_EXCLUDED_V4, MAP_EXCLUDED_V6, MAP_LOOPBACK_ALLOW,
    MAP_REFUSALS, MAP_REFUSALS_SEEN, MAP_UDP_ALLOW, OrigDst, PeerKey, RedirectConfig,
    WorkloadBinding,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use workloads::Registry;

/// The eBPF object built by `build.rs` (empty when the toolchain was missing at build time).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/firma-ebpf.o"));

/// The embedded eBPF object, or why there is none.
pub fn embedded_object() -> Result<&'static [u8], EbpfError> {
    if OBJECT.is_empty() {
        Err(EbpfError::NoObject)
    } else {
        Ok(OBJECT)
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> EbpfError {
    move |e| EbpfError::Map {
        map,
        detail: e.to_string(),
    }
}

/// A cgroup to attach or detach: a path or a Kubernetes pod UID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Cgroup(String),
    Pod(String),
}

/// What `attach` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AttachOutcome {
    pub cgroup_path: String,
    pub cgroup_id: u64,
    /// Links created now; 0 means the cgroup was already attached (re-adopted, not doubled).
    pub links_created: usize,
}

/// What `detach` did: the same numbers the log line reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DetachOutcome {
    pub cgroup_path: String,
    pub cgroup_id: u64,
    /// Pinned links removed (7 for a fully attached cgroup).
    pub links_removed: usize,
}

/// Mutable kernel state, behind one lock (attach/detach/configure are rare).
struct Control {
    _ebpf: Ebpf,
    programs: programs::Programs,
    config: Array<MapData, RedirectConfig>,
    excluded_v4: LpmTrie<MapData, [u8; 4], u8>,
    excluded_v6: LpmTrie<MapData, [u8; 16], u8>,
    excluded_ports: BpfHashMap<MapData, u16, u8>,
    udp_allow: BpfHashMap<MapData, PeerKey, u8>,
    loopback_allow: BpfHashMap<MapData, PeerKey, u8>,
    bindings: BpfHashMap<MapData, u64, WorkloadBinding>,
}

/// The loaded (or re-adopted) redirector. Shared as `Arc<Redirector>` by the transparent
/// listener (lookups, lock-free) and the control socket (attach/detach).
pub struct Redirector {
    control: Mutex<Control>,
    by_peer: BpfHashMap<MapData, PeerKey, OrigDst>,
    by_cookie: BpfHashMap<MapData, u64, OrigDst>,
    /// Per-CPU event counters written by the programs (`COUNTER_*`), read for metrics.
    counters: Option<PerCpuArray<MapData, u64>>,
    dns_by_peer: BpfHashMap<MapData, PeerKey, OrigDst>,
    /// Kernel refusal tallies and what of them is already audited ([`refusals`]).
    refusals: Mutex<refusal_maps::Maps>,
    registry: Registry,
    cgroup2: Cgroup2,
    pin_dir: PathBuf,
    settings: RedirectSettings,
    adopted_programs: usize,
}

impl Redirector {
    /// Refusal tallies that grew since they were last audited ([`refusal_maps::Maps::pending`]).
    pub fn pending_refusals(&self) -> Vec<refusal_maps::Pending> {
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pending()
    }

    /// Records that `total` refusals of `key` are in the audit.
    pub fn mark_refusals_audited(&self, key: &firma_common::maps::RefusalKey, total: u64) {
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mark_audited(key, total);
    }

    /// Loads the embedded object into `settings.pin_dir` (re-adopting whatever is pinned there),
    /// writes the redirect settings and re-reads the bindings of already attached cgroups.
    pub fn start(settings: RedirectSettings) -> Result<(Self, Option<LogPump>), EbpfError> {
        Self::start_with(embedded_object()?, Cgroup2::discover()?, settings)
    }

    /// As [`Redirector::start`] with an explicit object and cgroup2 hierarchy.
    pub fn start_with(
        object: &[u8],
        cgroup2: Cgroup2,
        settings: RedirectSettings,
    ) -> Result<(Self, Option<LogPump>), EbpfError> {
        let pin_dir = settings.pin_dir.clone();
        bpffs::ensure_pin_dir(&pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        let logs_pin = maps_dir.join("AYA_LOGS");
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_pin_path("AYA_LOGS", logs_pin.as_path())
            .load(object)
            .map_err(|e| EbpfError::Load(e.to_string()))?;
        let logger = LogPump::new(&mut ebpf);
        let programs = programs::Programs::load_or_adopt(&mut ebpf, &pin_dir.join("progs"))?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(EbpfError::MissingProgram(name))
        };
        let config = Array::try_from(take(&mut ebpf, MAP_CONFIG)?).map_err(map_err(MAP_CONFIG))?;
        let excluded_v4 = LpmTrie::try_from(take(&mut ebpf, MAP_EXCLUDED_V4)?)
            .map_err(map_err(MAP_EXCLUDED_V4))?;
        let excluded_v6 = LpmTrie::try_from(take(&mut ebpf, MAP_EXCLUDED_V6)?)
            .map_err(map_err(MAP_EXCLUDED_V6))?;
        let excluded_ports = BpfHashMap::try_from(take(&mut ebpf, MAP_EXCLUDED_PORTS)?)
            .map_err(map_err(MAP_EXCLUDED_PORTS))?;
        let bindings =
            BpfHashMap::try_from(take(&mut ebpf, MAP_BINDINGS)?).map_err(map_err(MAP_BINDINGS))?;
        let by_peer =
            BpfHashMap::try_from(take(&mut ebpf, MAP_BY_PEER)?).map_err(map_err(MAP_BY_PEER))?;
        let by_cookie = BpfHashMap::try_from(take(&mut ebpf, MAP_BY_COOKIE)?)
            .map_err(map_err(MAP_BY_COOKIE))?;
        // Absent only when programs pinned by an older sidecar were adopted with their maps.
        let counters = ebpf
            .take_map(MAP_COUNTERS)
            .and_then(|m| PerCpuArray::try_from(m).ok());
        let dns_by_peer = BpfHashMap::try_from(take(&mut ebpf, MAP_DNS_BY_PEER)?)
            .map_err(map_err(MAP_DNS_BY_PEER))?;
        let udp_allow = BpfHashMap::try_from(take(&mut ebpf, MAP_UDP_ALLOW)?)
            .map_err(map_err(MAP_UDP_ALLOW))?;
        let loopback_allow = BpfHashMap::try_from(take(&mut ebpf, MAP_LOOPBACK_ALLOW)?)
            .map_err(map_err(MAP_LOOPBACK_ALLOW))?;
        let refusal_maps = refusal_maps::Maps {
            tallies: aya::maps::PerCpuHashMap::try_from(take(&mut ebpf, MAP_REFUSALS)?)
                .map_err(map_err(MAP_REFUSALS))?,
            seen: BpfHashMap::try_from(take(&mut ebpf, MAP_REFUSALS_SEEN)?)
                .map_err(map_err(MAP_REFUSALS_SEEN))?,
        };
        let adopted_programs = programs.adopted;
        let mut control = Control {
            _ebpf: ebpf,
            programs,
            config,
            excluded_v4,
            excluded_v6,
            excluded_ports,
            udp_allow,
            loopback_allow,
            bindings,
        };
        control.write_settings(&settings)?;
        let registry = Registry::default();
        let this = Self {
            control: Mutex::new(control),
            by_peer,
            by_cookie,
            counters,
            dns_by_peer,
            refusals: Mutex::new(refusal_maps),
            registry,
            cgroup2,
            pin_dir,
            settings,
            adopted_programs,
        };
        this.readopt()?;
        Ok((this, logger))
    }

    /// (redirected TCP connects, refused UDP/443) counted by the programs since the counter
    /// map was created, summed over CPUs.
    pub fn kernel_counters(&self) -> (u64, u64) {
        (
            self.kernel_counter(COUNTER_REDIRECTED),
            self.kernel_counter(COUNTER_UDP443_REFUSED),
        )
    }

    /// (refused UDP other than 443, refused loopback, dropped at egress), summed over CPUs.
    pub fn side_door_counters(&self) -> [u64; 3] {
        [
            self.kernel_counter(COUNTER_UDP_REFUSED),
            self.kernel_counter(COUNTER_LOOPBACK_REFUSED),
            self.kernel_counter(COUNTER_EGRESS_DROPPED),
        ]
    }

    fn kernel_counter(&self, index: u32) -> u64 {
        let Some(c) = &self.counters else {
            return 0;
        };
        c.get(&index, 0)
            .map(|per_cpu| per_cpu.iter().copied().fold(0u64, u64::wrapping_add))
            .unwrap_or(0)
    }

    /// Programs found pinned at start (0 on a fresh machine, 7 after a restart).
    pub fn adopted_programs(&self) -> usize {
        self.adopted_programs
    }

    pub fn settings(&self) -> &RedirectSettings {
        &self.settings
    }

    pub fn cgroup2(&self) -> &Cgroup2 {
        &self.cgroup2
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn links_dir(&self, cgroup_id: u64) -> PathBuf {
        self.pin_dir.join("links").join(cgroup_id.to_string())
    }

    /// Rebuilds the in-memory registry from the pinned bindings map; drops bindings whose links
    /// are gone (detached by hand) or whose cgroup no longer exists.
    fn readopt(&self) -> Result<(), EbpfError> {
        let mut control = self.lock();
        let entries: Vec<(u64, WorkloadBinding)> =
            control.bindings.iter().filter_map(Result::ok).collect();
        for (id, binding) in entries {
            let links = programs::pinned_links(&self.links_dir(id));
            match self.cgroup2.resolve(&binding.cgroup_path()) {
                Ok(cg) if cg.id == id && links > 0 => {
                    tracing::info!(cgroup = %cg.path, agent_id = %binding.agent_id(), links, "re-adopted attached workload");
                    self.registry.insert(Bound::from_binding(&cg, &binding));
                }
                _ => {
                    tracing::warn!(cgroup = %binding.cgroup_path(), "dropping stale workload binding");
                    let _ = programs::detach(&self.links_dir(id));
                    let _ = control.bindings.remove(&id);
                }
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that
        // matters more than refusing to continue; keep serving.
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves a target to its cgroup.
    pub fn resolve(&self, target: &Target) -> Result<CgroupRef, EbpfError> {
        Ok(match target {
            Target::Cgroup(p) => self.cgroup2.resolve(p)?,
            Target::Pod(uid) => self.cgroup2.resolve_pod(uid)?,
        })
    }

    /// Tags a cgroup: binds it to an agent (and session) and attaches every program. Attaching
    /// an attached cgroup only updates its binding.
    pub fn attach(
        &self,
        target: &Target,
        agent_id: &str,
        session_id: Option<&str>,
    ) -> Result<AttachOutcome, EbpfError> {
        let cg = self.resolve(target)?;
        // The sidecar must never be inside a tagged cgroup (docs/architecture.md, "Transparent mode"): its listeners would
        // still work, but anything it connects to without SO_MARK would loop back into itself.
        if let Some(own) = cgroup::own_cgroup_path()
            && cgroup::contains(&cg.path, &own)
        {
            return Err(CgroupError::ContainsSidecar {
                target: cg.path,
                own,
            }
            .into());
        }
        let binding = WorkloadBinding::new(&cg.path, agent_id, session_id)
            .map_err(|e| EbpfError::Binding(cg.path.clone(), e))?;
        let mut control = self.lock();
        // The binding goes in first: a connection redirected right after the links appear must
        // find its identity.
        control
            .bindings
            .insert(cg.id, binding, 0)
            .map_err(map_err(MAP_BINDINGS))?;
        self.registry.insert(Bound::from_binding(&cg, &binding));
        let links_created = control.programs.attach(&cg.dir, &self.links_dir(cg.id))?;
        tracing::info!(cgroup = %cg.path, cgroup_id = cg.id, agent_id, session_id, links_created, "workload attached");
        Ok(AttachOutcome {
            cgroup_path: cg.path,
            cgroup_id: cg.id,
            links_created,
        })
    }

    /// Removes everything `attach` added for the cgroup: its links and its binding.
    pub fn detach(&self, target: &Target) -> Result<DetachOutcome, EbpfError> {
        let (id, path) = match self.resolve(target) {
            Ok(cg) => (cg.id, cg.path),
            // The cgroup may be gone already; find it by its recorded path.
            Err(e) => {
                let Target::Cgroup(given) = target else {
                    return Err(e);
                };
                match self.registry.find_by_path(&self.cgroup2.relative(given)) {
                    Some(b) => (b.cgroup_id, b.cgroup_path),
                    None => return Err(e),
                }
            }
        };
        let mut control = self.lock();
        let removed = programs::detach(&self.links_dir(id))?;
        let had_binding = control.bindings.remove(&id).is_ok();
        self.registry.remove(id);
        if removed == 0 && !had_binding {
            return Err(EbpfError::NotAttached(path));
        }
        tracing::info!(cgroup = %path, cgroup_id = id, links_removed = removed, "workload detached");
        Ok(DetachOutcome {
            cgroup_path: path,
            cgroup_id: id,
            links_removed: removed,
        })
    }

    /// Attached workloads with how many of their links are pinned.
    pub fn status(&self) -> Vec<(Bound, usize)> {
        self.registry
            .all()
            .into_iter()
            .map(|b| {
                let links = programs::pinned_links(&self.links_dir(b.cgroup_id));
                (b, links)
            })
            .collect()
    }

    /// Entries currently tracked (by socket cookie, by client address). Both are bounded: LRU
    /// maps, and `sock_ops` deletes entries when connections close.
    pub fn tracked(&self) -> (usize, usize) {
        (self.by_cookie.keys().count(), self.by_peer.keys().count())
    }

    /// The original destination of an accepted connection, by the client address `accept()`
    /// returned. `None`: not a redirected connection (or its entry is gone): close it.
    pub fn original_destination(&self, peer: SocketAddr) -> Option<OrigDst> {
        self.by_peer.get(&PeerKey::from_socket_addr(peer), 0).ok()
    }

    /// The resolver a tagged workload's UDP DNS query was meant for, and who sent it, by the
    /// query's source address as `recv_from` reports it. `None`: not a redirected query.
    pub fn dns_origin(&self, peer: SocketAddr) -> Option<OrigDst> {
        self.dns_by_peer
            .get(&PeerKey::from_socket_addr(peer), 0)
            .ok()
    }

    /// The workload (binding + the exact cgroup and pid) that opened a redirected connection.
    pub fn workload(&self, orig: &OrigDst) -> Option<Workload> {
        self.workload_of(orig.cgroup_id, orig.pid)
    }

    /// The workload bound to `cgroup_id` (or to an ancestor of it), with `pid`.
    pub fn workload_of(&self, cgroup_id: u64, pid: u32) -> Option<Workload> {
        self.registry
            .resolve(&self.cgroup2, cgroup_id)
            .map(|(bound, path)| Workload {
                cgroup_id,
                cgroup_path: path,
                pid,
                agent_id: bound.agent_id,
                session_id: bound.session_id,
            })
    }
}

impl Control {
    /// Writes the listener, mark and flags, and replaces the excluded CIDRs and ports.
    fn write_settings(&mut self, s: &RedirectSettings) -> Result<(), EbpfError> {
        self.config
            .set(0, s.kernel_config(), 0)
            .map_err(map_err(MAP_CONFIG))?;
        let old_v4: Vec<Key<[u8; 4]>> = self.excluded_v4.keys().filter_map(Result::ok).collect();
        for k in old_v4 {
            let _ = self.excluded_v4.remove(&k);
        }
        let old_v6: Vec<Key<[u8; 16]>> = self.excluded_v6.keys().filter_map(Result::ok).collect();
        for k in old_v6 {
            let _ = self.excluded_v6.remove(&k);
        }
        let old_ports: Vec<u16> = self.excluded_ports.keys().filter_map(Result::ok).collect();
        for k in old_ports {
            let _ = self.excluded_ports.remove(&k);
        }
        for cidr in &s.excluded_cidrs {
            match cidr.key() {
                settings::CidrKey::V4(k) => self.excluded_v4.insert(&k, 1, 0),
                settings::CidrKey::V6(k) => self.excluded_v6.insert(&k, 1, 0),
            }
            .map_err(map_err(MAP_EXCLUDED_V4))?;
        }
        for port in &s.excluded_ports {
            self.excluded_ports
                .insert(port, 1, 0)
                .map_err(map_err(MAP_EXCLUDED_PORTS))?;
        }
        let old: Vec<PeerKey> = self.udp_allow.keys().filter_map(Result::ok).collect();
        for k in old {
            let _ = self.udp_allow.remove(&k);
        }
        for a in &s.allow_udp {
            self.udp_allow
                .insert(PeerKey::from_socket_addr(*a), 1, 0)
                .map_err(map_err(MAP_UDP_ALLOW))?;
        }
        let old: Vec<PeerKey> = self.loopback_allow.keys().filter_map(Result::ok).collect();
        for k in old {
            let _ = self.loopback_allow.remove(&k);
        }
        for a in &s.allow_loopback {
            self.loopback_allow
                .insert(a.key(), 1, 0)
                .map_err(map_err(MAP_LOOPBACK_ALLOW))?;
        }
        Ok(())
    }
}
