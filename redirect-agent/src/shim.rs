//! TEMPORARY: bridges to the datapath and netns APIs being rewritten in parallel; removed when
//! they land.
#![allow(dead_code)]

use std::path::Path;

use crate::datapath::{Datapath, DatapathError};

pub trait OpenExisting: Sized {
    fn open_existing(root: &Path) -> Result<Option<Self>, DatapathError>;
}

impl OpenExisting for Datapath {
    fn open_existing(root: &Path) -> Result<Option<Self>, DatapathError> {
        if !root.join("progs").exists() || !root.join("maps").exists() {
            return Ok(None);
        }
        Datapath::open(root).map(Some)
    }
}
