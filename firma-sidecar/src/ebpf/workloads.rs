//! Attached workloads in memory: cgroup id -> binding, and resolution of the cgroup a connection
//! came from (possibly a descendant of the attached one, e.g. a container in a pod).

use super::cgroup::{Cgroup2, CgroupRef};
use firma_common::maps::WorkloadBinding;
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;

/// One attached cgroup and its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bound {
    pub cgroup_id: u64,
    pub cgroup_path: String,
    #[serde(skip)]
    pub dir: PathBuf,
    pub agent_id: String,
    pub session_id: Option<String>,
}

impl Bound {
    pub fn from_binding(cg: &CgroupRef, b: &WorkloadBinding) -> Self {
        Self {
            cgroup_id: cg.id,
            cgroup_path: cg.path.clone(),
            dir: cg.dir.clone(),
            agent_id: b.agent_id(),
            session_id: b.session_id(),
        }
    }
}

/// Bounded cache of descendant cgroup id -> (attached ancestor id, descendant path).
const DESCENDANT_CACHE_MAX: usize = 4_096;

#[derive(Default)]
pub struct Registry {
    bound: RwLock<HashMap<u64, Bound>>,
    descendants: RwLock<HashMap<u64, (u64, String)>>,
}

impl Registry {
    pub fn insert(&self, b: Bound) {
        write(&self.bound).insert(b.cgroup_id, b);
        write(&self.descendants).clear();
    }

    pub fn remove(&self, id: u64) {
        write(&self.bound).remove(&id);
        write(&self.descendants).clear();
    }

    pub fn all(&self) -> Vec<Bound> {
        let mut v: Vec<Bound> = read(&self.bound).values().cloned().collect();
        v.sort_by(|a, b| a.cgroup_path.cmp(&b.cgroup_path));
        v
    }

    pub fn find_by_path(&self, path: &str) -> Option<Bound> {
        read(&self.bound)
            .values()
            .find(|b| b.cgroup_path == path)
            .cloned()
    }

    /// The binding that applies to cgroup `id` and the path of `id` itself.
    pub fn resolve(&self, cgroup2: &Cgroup2, id: u64) -> Option<(Bound, String)> {
        if let Some(b) = read(&self.bound).get(&id) {
            return Some((b.clone(), b.cgroup_path.clone()));
        }
        if let Some((anc, path)) = read(&self.descendants).get(&id).cloned() {
            return read(&self.bound).get(&anc).map(|b| (b.clone(), path));
        }
        let roots = self.all();
        for root in roots {
            if let Some(found) = cgroup2.find_below(&root.dir, id) {
                let mut cache = write(&self.descendants);
                if cache.len() >= DESCENDANT_CACHE_MAX {
                    cache.clear();
                }
                cache.insert(id, (root.cgroup_id, found.path.clone()));
                return Some((root, found.path));
            }
        }
        None
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
