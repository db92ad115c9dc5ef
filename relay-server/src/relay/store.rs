//! The lease store as the relay opens it at start: the file or PostgreSQL store the
//! configuration names, wired to close the ports of leases that end; the ports of restored
//! leases kept before any agent reconnects; a shared store's live relays as fleet members; and
//! a warning when the port range meets the kernel's ephemeral ports.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::LeaseStoreConfig;
use crate::fleet::{self, MemberSource};
use crate::leases::{self, LeaseStore, StoreError};
use crate::users::ports::Ports;
use crate::webhook::{Event, Webhooks};
use crate::{RelayConfig, RelayError};

/// Opens the store `config` names, as member `bound_port` of the fleet. A lease that expires
/// here closes its port and is reported to the webhooks; with a shared store, a lease that
/// ended on another relay closes its port here too.
pub(super) async fn open(
    config: &RelayConfig,
    bound_port: u16,
    webhooks: &Arc<Webhooks>,
    ports: &Arc<Ports>,
) -> Result<LeaseStore, RelayError> {
    let on_expired: leases::OnExpired = {
        let (webhooks, ports) = (webhooks.clone(), ports.clone());
        Box::new(move |key, port| {
            ports.close(port);
            webhooks.emit(Event::LeaseExpired {
                agent: key.agent.clone(),
                service: key.service.clone(),
                port,
            })
        })
    };
    let me = leases::Member {
        id: config.relay_id.clone(),
        agent_addr: config.advertised(bound_port),
        public_host: config.public_host.clone(),
        ws_url: config.ws_public_url.clone(),
    };
    Ok(match &config.lease_store {
        LeaseStoreConfig::File => LeaseStore::open(
            &config.lease_file(),
            config.port_range,
            config.lease_ttl,
            on_expired,
        )?
        .with_member(me),
        LeaseStoreConfig::Postgres(settings) => {
            LeaseStore::connect(
                settings,
                config.port_range,
                config.lease_ttl,
                on_expired,
                me,
                Arc::new(leases::now_secs),
            )
            .await?
            // A lease that ended elsewhere: stop keeping its port here (its webhook event
            // came from the relay that ended it).
            .with_on_gone({
                let ports = ports.clone();
                Box::new(move |key, port| {
                    if ports.is_kept_for(port, &key.agent) {
                        ports.close(port);
                    }
                })
            })
        }
    })
}

/// Binds and keeps the port of every lease restored from the state dir, so its agent finds it
/// again and no other process takes it while the relay restarts its sessions.
pub(super) async fn keep_leased_ports(
    leases: &LeaseStore,
    ports: &Ports,
    bind_ip: std::net::IpAddr,
) -> Result<(), StoreError> {
    for lease in leases.views().await? {
        let bound = std::net::TcpListener::bind((bind_ip, lease.port)).and_then(|l| {
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)
        });
        match bound {
            Ok(listener) => ports.keep(
                listener,
                lease.port,
                &lease.key.agent,
                &lease.key.service,
                None,
            ),
            Err(e) => tracing::warn!(
                agent = %lease.key.agent, service = %lease.key.service, port = lease.port,
                "cannot keep the port of a restored lease on {bind_ip}:{} (--proxy-bind / proxy_bind): {e}; the agent gets another port if it is still taken when it reconnects", lease.port
            ),
        }
    }
    Ok(())
}

/// A shared store's registry of live relays, as the fleet members agents are told about;
/// `None` for a store of this relay alone.
pub(super) fn members(leases: &Arc<LeaseStore>) -> Option<MemberSource> {
    leases.is_shared().then(|| {
        let leases = leases.clone();
        fleet::source(move || {
            let leases = leases.clone();
            async move {
                let live = leases.members().await.map_err(|e| e.to_string())?;
                Ok(live
                    .into_iter()
                    .map(|m| jumpgate_proto::RelayMember {
                        id: m.id,
                        addr: m.agent_addr,
                        ws: m.ws_url,
                    })
                    .collect())
            }
        })
    })
}

/// Warns when the allocation range overlaps the kernel's ephemeral port range: outgoing
/// connections on the jump host would then take ports the relay means to hand out.
pub(super) fn warn_if_ephemeral_overlap(range: jumpgate_lease::PortRange) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut parts = text
        .split_whitespace()
        .filter_map(|p| p.parse::<u16>().ok());
    let (Some(lo), Some(hi)) = (parts.next(), parts.next()) else {
        return;
    };
    let (from, to) = (range.lo().max(lo), range.hi().min(hi));
    if from <= to {
        tracing::warn!(
            "port range {range} overlaps the kernel's ephemeral range {lo}-{hi}: outgoing connections may take ports \
             the relay hands out. Reserve them with: sysctl -w net.ipv4.ip_local_reserved_ports={from}-{to} \
             (persist it in /etc/sysctl.d/), or move the range below {lo}"
        );
    }
}
