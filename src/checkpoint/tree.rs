//! Part of step 2 (freeze): no process is silently left out. Read while the
//! container is frozen, so that nothing forks or exits meanwhile: every
//! process in the container's cgroup must be in the tree CRIU dumps.

use std::collections::HashSet;

use super::freeze::Freezer;
use crate::error::Result;

/// The processes in `freezer`'s cgroup, or one below it, outside the tree
/// of `root`: (pid, comm). CRIU dumps the tree under the container's init,
/// so these would silently be left out of the checkpoint. In a pod that
/// shares one PID namespace, a process that daemonizes is reparented to the
/// pod's init (its pause), out of that tree, while it stays in the
/// container's cgroup; a process that `exec` started is the runtime's
/// child. Read while frozen, so that nothing forks or exits meanwhile.
pub fn outside_tree(freezer: &Freezer, root: i32) -> Result<Vec<(i32, String)>> {
    let tree = tree_of(root);
    let mut procs = Vec::new();
    crate::cgroup::procs_below(freezer.path(), &mut procs)?;
    procs.sort_unstable();
    procs.dedup();
    Ok(procs
        .into_iter()
        .filter(|p| !tree.contains(p) && super::locate::process_alive(*p))
        .map(|p| (p, comm(p)))
        .collect())
}

/// `root` and its descendants, through every thread's `children`, as CRIU
/// walks them.
fn tree_of(root: i32) -> HashSet<i32> {
    let mut tree = HashSet::from([root]);
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter();
        for t in tasks.flatten().flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if tree.insert(child) {
                    todo.push(child);
                }
            }
        }
    }
    tree
}

/// Its command name, and its pid in its own PID namespace where that differs.
fn comm(pid: i32) -> String {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let inner = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|l| l.split_whitespace().last())
        .filter(|p| *p != pid.to_string());
    match inner {
        Some(p) => format!("{comm}, pid {p} in the container"),
        None => comm,
    }
}

/// "pid 4711 (httpd, pid 9 in the container), pid 4712 (nc, …)".
pub fn describe(procs: &[(i32, String)]) -> String {
    let each: Vec<String> = procs
        .iter()
        .map(|(pid, comm)| format!("pid {pid} ({comm})"))
        .collect();
    each.join(", ")
}
