//! SIGHUP in host mode: the config file's `[[tunnel]]` tables are read again and the
//! difference applied, so a static setup adds and removes tunnels without a restart (and
//! without touching the tunnels it did not change, or those a platform added at run time).
//! Only the tables are re-read: other settings still need a restart.

use std::collections::HashMap;
use std::path::PathBuf;

use jumpgate_config::load_toml;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::{HostHandle, TunnelSpec};
use crate::config::RunArgs;

/// What tells two versions of a file's tunnel apart (the credential compared, never printed).
fn same(a: &TunnelSpec, b: &TunnelSpec) -> bool {
    a.services == b.services && a.credential == b.credential && a.jump_keys == b.jump_keys
}

/// The tunnels `file` lists now, validated as at start-up.
fn read(file: &std::path::Path) -> Result<Vec<TunnelSpec>, String> {
    let args: RunArgs = load_toml(file).map_err(|e| e.to_string())?;
    let settings = super::config::settings(true, None, None, &args.tunnel, false)
        .map_err(|e| e.to_string())?;
    Ok(settings.map(|s| s.tunnels).unwrap_or_default())
}

/// Applies the file's tunnels on every SIGHUP until `stop`; `initial`: those added at start.
pub async fn watch(
    handle: HostHandle,
    file: Option<PathBuf>,
    initial: Vec<TunnelSpec>,
    stop: CancellationToken,
) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => hup,
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP, tunnels are not reloaded: {e}");
            return;
        }
    };
    let mut from_file: HashMap<String, TunnelSpec> =
        initial.into_iter().map(|s| (s.name.clone(), s)).collect();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        let Some(file) = &file else {
            tracing::info!("SIGHUP: no config file, no tunnels to reload");
            continue;
        };
        let specs = match read(file) {
            Ok(specs) => specs,
            Err(e) => {
                tracing::error!("SIGHUP: not reloading tunnels, the config file is invalid: {e}");
                continue;
            }
        };
        let wanted: HashMap<String, TunnelSpec> =
            specs.into_iter().map(|s| (s.name.clone(), s)).collect();
        for name in from_file.keys() {
            if !wanted.contains_key(name) {
                let _ = handle.remove(name, false);
            }
        }
        for (name, spec) in &wanted {
            if from_file.get(name).is_some_and(|old| same(old, spec)) {
                continue;
            }
            let (handle, spec, name) = (handle.clone(), spec.clone(), name.clone());
            tokio::spawn(async move {
                if let Err(e) = handle.add(spec).await {
                    tracing::warn!(tunnel = %name, "{e}");
                }
            });
        }
        tracing::info!(
            tunnels = wanted.len(),
            "SIGHUP: config file's tunnels reloaded"
        );
        from_file = wanted;
    }
}
