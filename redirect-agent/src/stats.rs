//! Reading a pod's counters: the per-CPU values summed.

use std::collections::BTreeMap;

use redirect_common::Counter;

use crate::datapath::{Datapath, DatapathError};

/// Every counter of the pod in `slot`, by name.
pub fn pod_counters(
    dp: &mut Datapath,
    slot: u32,
) -> Result<BTreeMap<&'static str, u64>, DatapathError> {
    let counters = dp.counters()?;
    let mut out = BTreeMap::new();
    for c in Counter::ALL {
        let values = counters
            .get(&c.index(slot), 0)
            .map_err(|e| DatapathError::Map {
                name: "COUNTERS",
                source: e,
            })?;
        out.insert(c.name(), values.iter().sum());
    }
    Ok(out)
}
