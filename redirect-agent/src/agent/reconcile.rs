//! What the agent does at start, before it is ready: the pins are the truth, and every record
//! is checked against them.

use crate::{
    datapath::{Datapath, Handles},
    enroll::{self, EnrollError},
    gc,
    rows::PodRows,
    state::{PodRecord, StateStore},
};

/// What a start found and did.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Interrupted commands rolled back.
    pub recovered: Vec<String>,
    /// Pods found intact (cgroup, netns, links and rows as recorded) and adopted untouched.
    pub adopted: Vec<String>,
    /// Pods whose links or rows were not as recorded, enrolled again in place.
    pub repaired: Vec<String>,
    /// Pods whose cgroup or netns is gone, unenrolled.
    pub collected: Vec<String>,
}

/// Reconciles the records with the kernel; the caller holds the store's lock: rolls back
/// interrupted commands, takes over the pinned datapath (programs of another compatible build
/// are replaced in place, links updated, never detached), unenrolls pods that are gone,
/// enrolls again in place those whose links or rows are not as recorded, and adopts the rest.
/// The datapath's handles stay open in `handles` for the agent's later changes.
pub fn reconcile(store: &mut StateStore, handles: &mut Handles) -> Result<Reconciled, EnrollError> {
    let before: std::collections::BTreeMap<String, String> = store
        .pods()
        .map(|r| (r.name().to_owned(), super::pod_log_name(&r.spec)))
        .collect();
    let mut out = Reconciled {
        recovered: enroll::recover(store, handles)?,
        ..Reconciled::default()
    };
    for n in &out.recovered {
        let who = before
            .get(n)
            .cloned()
            .unwrap_or_else(|| format!("pod={n:?}"));
        log::info!("{who}: rolled back an interrupted change");
    }
    let records = store.list()?;
    if records.is_empty() {
        return Ok(out);
    }
    let dp = handles.build()?;
    for c in dp.program_changes() {
        log::info!(
            "datapath: {} replaced (program {:?} -> {}), {} link(s) updated in place",
            c.program,
            c.old_id,
            c.new_id,
            c.links_updated
        );
    }
    for rec in records {
        let who = super::pod_log_name(&rec.spec);
        match gc::health(&rec) {
            gc::Health::Gone => {
                enroll::unenroll(store, handles, rec.name())?;
                log::info!("{who}: gone (cgroup or network namespace removed), unenrolled");
                out.collected.push(rec.name().to_owned());
            }
            gc::Health::Interrupted => {
                // recover() above left none; a record can only be pending if another writer
                // held the lock, which it cannot.
                log::warn!("{who}: still pending after recovery; left for gc");
            }
            gc::Health::Ok => match intact(handles, &rec) {
                Ok(()) => {
                    log::debug!("{who}: adopted");
                    out.adopted.push(rec.name().to_owned());
                }
                Err(why) => {
                    log::warn!("{who}: {why}; enrolling it again in place");
                    let checked = enroll::inspect(rec.spec.clone())?;
                    enroll::enroll(store, handles, checked)?;
                    log::info!("{who}: repaired");
                    out.repaired.push(rec.name().to_owned());
                }
            },
        }
    }
    Ok(out)
}

/// Whether the pod's links are pinned and its rows are in the maps as its record says.
fn intact(handles: &mut Handles, rec: &PodRecord) -> Result<(), String> {
    if !enroll::links_complete(handles.root(), rec) {
        return Err("links missing".into());
    }
    let dp: &mut Datapath = handles.held().ok_or("no datapath pinned")?;
    let rows = PodRows::new(&rec.spec, rec.slot, rec.cgroup_id);
    let e = |e: crate::datapath::DatapathError| crate::error_chain(&e);
    let config = dp.pods().map_err(e)?.get(&rec.slot, 0).ok();
    if config != Some(rows.config) {
        return Err(format!("PODS[{}] is not as recorded", rec.slot));
    }
    if dp.pod_cgroups().map_err(e)?.get(&rec.cgroup_id, 0).ok() != Some(rec.slot) {
        return Err("its POD_CGROUPS row is missing".into());
    }
    {
        let addrs = dp.pod_addrs().map_err(e)?;
        if rows
            .addrs
            .iter()
            .any(|a| addrs.get(a, 0).ok() != Some(rec.slot))
        {
            return Err("a POD_ADDRS row is missing".into());
        }
    }
    {
        let rules = dp.port_rules().map_err(e)?;
        if rows
            .port_rules
            .iter()
            .any(|(k, bits)| rules.get(k, 0).ok() != Some(*bits))
        {
            return Err("a PORT_RULES row is missing".into());
        }
    }
    {
        let t = dp.cidr4().map_err(e)?;
        if rows
            .cidr4
            .iter()
            .any(|(len, k, v)| t.get(&aya::maps::lpm_trie::Key::new(*len, *k), 0).ok() != Some(*v))
        {
            return Err("a CIDR4 row is missing".into());
        }
    }
    let t = dp.cidr6().map_err(e)?;
    if rows
        .cidr6
        .iter()
        .any(|(len, k, v)| t.get(&aya::maps::lpm_trie::Key::new(*len, *k), 0).ok() != Some(*v))
    {
        return Err("a CIDR6 row is missing".into());
    }
    Ok(())
}
