//! The lease file in the state dir: its layout and version, read at start and written after
//! every change an agent is told about.

use std::path::Path;

use jumpgate_lease::{LeaseSnapshot, LeaseTable, PortRange};
use serde::{Deserialize, Serialize};

use crate::error::RelayError;

/// Version of the lease file's layout.
const FILE_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseFile {
    format: u32,
    range: String,
    #[serde(flatten)]
    snapshot: LeaseSnapshot,
}

/// Reads the lease file at `path`, or an empty table if there is none. A file that exists but
/// cannot be parsed is an error: silently starting over would hand users' ports to others.
pub(crate) fn load(path: &Path, range: PortRange, ttl_secs: u64) -> Result<LeaseTable, RelayError> {
    let bad = |detail: String| RelayError::LeaseFile {
        path: path.to_path_buf(),
        detail,
    };
    let bytes = match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(LeaseTable::new(range, ttl_secs))
        }
        Err(e) => return Err(bad(e.to_string())),
        Ok(bytes) => bytes,
    };
    let file: LeaseFile =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a valid lease file ({e})")))?;
    if file.format != FILE_FORMAT {
        return Err(bad(format!(
            "format {} is not the supported format {FILE_FORMAT}",
            file.format
        )));
    }
    let (table, dropped) =
        LeaseTable::restore(range, ttl_secs, file.snapshot).map_err(|e| bad(e.to_string()))?;
    for rec in dropped {
        tracing::warn!(
            agent = %rec.agent, service = %rec.service, port = rec.port,
            "dropping lease outside the new port range {range}"
        );
    }
    tracing::info!(path = %path.display(), leases = table.in_use(), "restored leases");
    Ok(table)
}

/// The file's bytes for `snapshot` of a table over `range`.
pub(crate) fn encode(range: PortRange, snapshot: LeaseSnapshot) -> std::io::Result<Vec<u8>> {
    let file = LeaseFile {
        format: FILE_FORMAT,
        range: range.to_string(),
        snapshot,
    };
    serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)
}
