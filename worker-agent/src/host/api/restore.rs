//! The tunnels persisted in the state directory: opening their store, and re-adding them when
//! the agent starts, so a restart keeps every job's tunnel.

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::host::store::Store;
use crate::host::{HostHandle, TunnelError};

/// Re-adds every persisted tunnel (at start-up), each in its own task so that one relay's
/// slowness delays none of the others; a record every relay refuses for good is dropped.
pub fn restore(handle: &HostHandle, store: &Arc<Store>, stop: &CancellationToken) -> usize {
    let records = match store.load_all() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot restore tunnels: {e}");
            return 0;
        }
    };
    let mut n = 0;
    for record in records {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{e}");
                continue;
            }
        };
        let spec = match record.spec() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(tunnel = %record.name, "persisted tunnel not restored: {e}");
                continue;
            }
        };
        n += 1;
        let (handle, store, stop) = (handle.clone(), store.clone(), stop.clone());
        tokio::spawn(async move {
            let name = spec.name.clone();
            tokio::select! {
                _ = stop.cancelled() => {}
                r = handle.add(spec) => match r {
                    Ok(_) => tracing::info!(tunnel = %name, "tunnel restored"),
                    Err(TunnelError::Timeout { .. }) => {
                        tracing::info!(tunnel = %name, "tunnel restored; placed once a relay answers");
                    }
                    Err(e) => {
                        tracing::warn!(tunnel = %name, "persisted tunnel dropped: {e}");
                        if let Err(e) = store.remove(&name) {
                            tracing::error!(tunnel = %name, "{e}");
                        }
                    }
                },
            }
        });
    }
    n
}

/// The state directory's tunnel store.
pub fn open_store(state_dir: &Path) -> Result<Arc<Store>, String> {
    Store::open(state_dir)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}
