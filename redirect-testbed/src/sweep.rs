//! Removal of what dead test runs left behind (a test process killed by SIGKILL, a CI timeout).

use std::{fs, path::Path};

use crate::{cgroup, netns, state};

/// The run id in a name `rdt-<id>-<rest>`.
fn run_id_of(name: &str) -> Option<&str> {
    name.strip_prefix(state::PREFIX)?
        .split('-')
        .next()
        .filter(|s| !s.is_empty())
}

fn names_in(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the netns, cgroups, subnet locks and run directories of every test run whose owner
/// process is gone. Live runs (of this or any other process) are never touched.
///
/// [`crate::Node::new`] calls this once per process, so a crashed run is cleaned up by the next.
pub fn sweep_stale() {
    let mut ids: Vec<String> = names_in(&state::nodes_dir());
    let cgroup_root = cgroup::testbed_root().ok();
    for name in names_in(Path::new(netns::NETNS_DIR))
        .into_iter()
        .chain(cgroup_root.as_deref().map(names_in).unwrap_or_default())
    {
        if let Some(id) = run_id_of(&name) {
            ids.push(id.to_owned());
        }
    }
    for lock in names_in(&state::subnets_dir()) {
        let holder = fs::read_to_string(state::subnets_dir().join(&lock)).unwrap_or_default();
        if let Some(id) = holder.split_whitespace().nth(2) {
            ids.push(id.to_owned());
        }
    }
    ids.sort();
    ids.dedup();
    for id in ids {
        if !state::run_alive(&id) {
            sweep_run(&id);
        }
    }
}

/// Removes everything that belongs to run `id`, whoever owns it. Errors are ignored: this is
/// best-effort cleanup and a later sweep retries.
pub(crate) fn sweep_run(id: &str) {
    let prefix = format!("{}{id}-", state::PREFIX);
    if let Ok(root) = cgroup::testbed_root() {
        for name in names_in(&root)
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
        {
            let _ = cgroup::kill_and_remove(&root.join(name));
        }
    }
    let mut namespaces: Vec<String> = names_in(Path::new(netns::NETNS_DIR))
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    // Pods before their node, as an orderly teardown would do.
    namespaces.sort_by_key(|n| n.ends_with("-node"));
    for name in namespaces {
        let _ = netns::delete(&name);
    }
    for lock in state::subnets_of(id) {
        let _ = fs::remove_file(lock);
    }
    let _ = fs::remove_dir_all(state::nodes_dir().join(id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_run_ids() {
        assert_eq!(run_id_of("rdt-ab12x-server"), Some("ab12x"));
        assert_eq!(run_id_of("rdt-ab12x-node"), Some("ab12x"));
        assert_eq!(run_id_of("other"), None);
        assert_eq!(run_id_of("rdt--x"), None);
    }
}
