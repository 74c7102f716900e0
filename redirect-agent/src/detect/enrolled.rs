//! The enrolled pods, read straight from the state directory.
//!
//! Stop-gap until the pod store lands in `crate::state`: it reads the same files (one
//! `PodRecord` as JSON per pod in `<state dir>/pods/<name>.json`) and should be replaced by the
//! store's listing function then.

use std::{io, path::Path};

use crate::state::PodRecord;

/// Failure to read the enrolled pods.
#[derive(Debug, thiserror::Error)]
pub enum EnrolledError {
    /// The pods directory or one record could not be read.
    #[error("cannot read enrolled pod state {path}: {source}")]
    Read { path: String, source: io::Error },
    /// A record is not a valid `PodRecord`.
    #[error("cannot parse enrolled pod record {path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
}

/// The state directory: `REDIRECT_STATE_DIR`, or `/run/redirect`.
pub fn state_dir() -> std::path::PathBuf {
    std::env::var_os("REDIRECT_STATE_DIR").map_or_else(|| "/run/redirect".into(), Into::into)
}

/// Every `<state_dir>/pods/*.json`, sorted by pod name. A missing directory means no pod.
pub fn load(state_dir: &Path) -> Result<Vec<PodRecord>, EnrolledError> {
    let dir = state_dir.join("pods");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(EnrolledError::Read {
                path: dir.display().to_string(),
                source,
            })
        }
    };
    let mut pods = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| EnrolledError::Read {
            path: dir.display().to_string(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // Unenrolled while we listed the directory.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(EnrolledError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let pod: PodRecord =
            serde_json::from_str(&text).map_err(|source| EnrolledError::Parse {
                path: path.display().to_string(),
                source,
            })?;
        pods.push(pod);
    }
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(pods)
}
