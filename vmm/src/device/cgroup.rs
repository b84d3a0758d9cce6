//! The VM's cgroup v2 subtree: device processes each get a leaf in it (made by the spawner,
//! with CLONE_INTO_CGROUP), so that their memory and task limits hold, and so that Bulkhead
//! runs under a delegated cgroup (systemd `Delegate=yes`) without root over the hierarchy.
//!
//! Layout, with P = `--cgroup-parent`, else the VMM's own cgroup:
//! ```text
//! P/bulkhead-<VMM pid>/          the VM's group (memory and pids enabled for its children)
//! P/bulkhead-<VMM pid>/vmm/      the VMM and the spawner, when P is the VMM's own cgroup
//! P/bulkhead-<VMM pid>/<id>/     one leaf per device process, removed when it is reaped
//! ```
//! cgroup v2 lets a group with controllers enabled for its children hold no processes of its
//! own, so without `--cgroup-parent` the VMM first moves itself into the `vmm` leaf, as
//! delegated systemd services do.

use std::fs;
use std::path::{Path, PathBuf};

use log::{info, warn};

/// Where cgroup2 is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup of this process, from /proc/self/cgroup (`0::/path`).
fn own_cgroup() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(Path::new(CGROUP_ROOT).join(rel.trim_start_matches('/')))
}

fn enable_controllers(dir: &Path) -> std::io::Result<()> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&file)?;
    for c in ["memory", "pids"] {
        if !enabled.split_whitespace().any(|e| e == c) {
            fs::write(&file, format!("+{c}"))?;
        }
    }
    Ok(())
}

/// Makes the VM's group and returns it (the parent of the device leaves); `None`, after one
/// warning line, where there is no cgroup2 or no delegation: devices then run without
/// memory.max and pids.max. Call before the spawner is forked, so that it starts in the
/// VMM's leaf too.
pub fn prepare(parent: Option<&Path>) -> Option<PathBuf> {
    let warn_off = |what: String| {
        warn!("no cgroup v2 limits for device processes: {what}");
        None
    };
    if !Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
        return warn_off(format!("cgroup2 is not mounted at {CGROUP_ROOT}"));
    }
    let (base, move_self) = match parent {
        Some(p) => (p.to_path_buf(), false),
        None => match own_cgroup() {
            Some(c) => (c, true),
            None => return warn_off("cannot read /proc/self/cgroup".into()),
        },
    };
    let group = base.join(format!("bulkhead-{}", std::process::id()));
    if let Err(e) = fs::create_dir(&group) {
        return warn_off(format!("cannot create {} ({e})", group.display()));
    }
    if move_self {
        let leaf = group.join("vmm");
        let moved = fs::create_dir(&leaf).and_then(|()| fs::write(leaf.join("cgroup.procs"), "0"));
        if let Err(e) = moved {
            let _ = fs::remove_dir(&leaf);
            let _ = fs::remove_dir(&group);
            return warn_off(format!(
                "cannot move the VMM into {} ({e}); is the cgroup delegated?",
                leaf.display()
            ));
        }
    }
    if let Err(e) = enable_controllers(&base).and_then(|()| enable_controllers(&group)) {
        return warn_off(format!(
            "cannot enable the memory and pids controllers under {} ({e})",
            base.display()
        ));
    }
    info!("device cgroups under {}", group.display());
    Some(group)
}
