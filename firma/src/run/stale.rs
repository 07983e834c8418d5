//! Leftovers of runs whose firma was killed (SIGKILL, OOM, power loss mid-run): their cgroup,
//! pins and run directory stay, on purpose, while processes remain in the cgroup (the pinned
//! links keep refusing their connects: fail closed). Once such a cgroup is empty, or gone, the
//! next `firma run` removes the rest.

use std::path::Path;

const PREFIX: &str = "firma-run-";

/// The pid in `firma-run-<pid>-<hex>`.
fn owner(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the leftovers of dead runs whose cgroup holds no process any more.
pub fn collect(cgroup_mount: &Path, bpffs: &Path, runs: &Path) {
    let mut all: Vec<String> = names(cgroup_mount);
    all.extend(names(bpffs));
    all.extend(names(runs));
    all.sort();
    all.dedup();
    for name in all {
        let Some(pid) = owner(&name) else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue; // its firma is alive (or the pid was reused: leave it)
        }
        let cg = cgroup_mount.join(&name);
        let populated = std::fs::read_to_string(cg.join("cgroup.events"))
            .is_ok_and(|t| t.lines().any(|l| l.trim() == "populated 1"));
        if populated {
            eprintln!(
                "firma: run {name} was killed and its processes still run, with their connects refused; left in place (kill them: echo 1 > {}/cgroup.kill)",
                cg.display()
            );
            continue;
        }
        let _ = std::fs::remove_dir(&cg);
        let _ = std::fs::remove_dir_all(bpffs.join(&name));
        let _ = std::fs::remove_dir_all(runs.join(&name));
        eprintln!("firma: removed the leftovers of run {name} (its firma was killed)");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn owner_pid_from_the_name() {
        assert_eq!(super::owner("firma-run-4242-1c9e0a"), Some(4242));
        assert_eq!(super::owner("firma-run-x-1"), None);
        assert_eq!(super::owner("firma-e2e-1-2"), None);
    }
}
