//! Which systems a run compares (jumpgate, the direct path, and the peers whose binaries the
//! environment gives), and starting them all the same way, so loopback and WAN rows match.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::egress;
use crate::systems::{self, Site, System, Targets};

/// The peers found in the environment (FRPS/FRPC, RATHOLE), and whether the egress paths are
/// measured too.
pub struct Peers {
    frp: Option<(PathBuf, PathBuf)>,
    rathole: Option<PathBuf>,
    egress: bool,
}

impl Peers {
    /// Reads the peers' binaries from the environment, saying which are not measured.
    pub(crate) fn from_env(egress: bool) -> Self {
        let frp = match (std::env::var_os("FRPS"), std::env::var_os("FRPC")) {
            (Some(s), Some(c)) => Some((PathBuf::from(s), PathBuf::from(c))),
            _ => {
                eprintln!("FRPS/FRPC not set: frp is not measured");
                None
            }
        };
        let rathole = std::env::var_os("RATHOLE").map(PathBuf::from);
        if rathole.is_none() {
            eprintln!("RATHOLE not set: rathole is not measured");
        }
        Self {
            frp,
            rathole,
            egress,
        }
    }

    /// Report columns, in the order [`start_systems`] returns them.
    pub(crate) fn names(&self) -> Vec<&'static str> {
        let mut n = vec!["direct", "jumpgate"];
        if self.egress {
            n.extend(egress::Egress::ALL.map(egress::Egress::name));
        }
        if self.frp.is_some() {
            n.push("frp");
            if self.egress {
                n.push(egress::FRP_WS);
            }
        }
        if self.rathole.is_some() {
            n.push("rathole");
        }
        n
    }
}

/// Starts every system (direct, jumpgate and the peers given) forwarding to `targets` on the
/// worker side of `site`; each gets a subdirectory of `dir` for its configuration and logs.
pub fn start_systems(
    bin: &Path,
    targets: Targets,
    site: &Site,
    peers: &Peers,
    dir: &Path,
) -> Result<Vec<System>> {
    let sub = |name: &str| -> Result<PathBuf> {
        let d = dir.join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    };
    let mut systems: Vec<System> = vec![systems::direct(targets, site)];
    systems.push(systems::jumpgate(bin, targets, &sub("jumpgate")?, site)?);
    if peers.egress {
        for (i, e) in egress::Egress::ALL.into_iter().enumerate() {
            let d = sub(&format!("jumpgate-egress-{i}"))?;
            systems.push(egress::jumpgate(bin, targets, &d, site, e)?);
        }
    }
    if let Some((frps, frpc)) = &peers.frp {
        systems.push(systems::frp(frps, frpc, targets, &sub("frp")?, site)?);
        if peers.egress {
            let d = sub("frp-websocket")?;
            systems.push(egress::frp_websocket(frps, frpc, targets, &d, site)?);
        }
    }
    if let Some(rathole) = &peers.rathole {
        systems.push(systems::rathole(rathole, targets, &sub("rathole")?, site)?);
    }
    Ok(systems)
}
