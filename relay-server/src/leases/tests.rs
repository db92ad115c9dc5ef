use super::*;
use jumpgate_lease::{AllocError, ServiceAsk};

use crate::claims::CredentialCaps;

fn range() -> PortRange {
    PortRange::new(20000, 20010).unwrap()
}

fn open(path: &Path) -> Result<LeaseStore, RelayError> {
    LeaseStore::open(path, range(), Duration::from_secs(60), Box::new(|_, _| {}))
}

fn ask(service: &str, preferred: Option<u16>) -> ServiceAsk {
    ServiceAsk {
        service: service.into(),
        preferred,
        strict: false,
    }
}

#[tokio::test]
async fn leases_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.json");
    let store = open(&path).unwrap();
    let placed = store
        .place("a", "cert:a", None, &[ask("ssh", None)], |p| {
            std::net::TcpListener::bind(("127.0.0.1", p)).ok()
        })
        .await
        .unwrap();
    let port = placed.grants[0].port;
    store.persist().await.unwrap();
    let again = open(&path).unwrap();
    let view = again.views().await.unwrap();
    assert_eq!(view.len(), 1);
    assert_eq!((view[0].key.agent.as_str(), view[0].port), ("a", port));
}

#[tokio::test]
async fn caps_count_names_and_leases_of_one_identity() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("leases.json")).unwrap();
    let caps = Some(CredentialCaps {
        names: 2,
        leases: 3,
        sessions: 2,
    });
    let place = |agent: &'static str, identity: &'static str, asks: &'static [ServiceAsk]| {
        let store = &store;
        async move {
            store
                .place(agent, identity, caps, asks, |_| Some(()))
                .await
                .map(|_| ())
        }
    };
    let one: &'static [ServiceAsk] = Box::leak(Box::new([ask("ssh", None)]));
    let two: &'static [ServiceAsk] = Box::leak(Box::new([ask("ssh", None), ask("web", None)]));
    place("a", "token:team", one).await.unwrap();
    place("b", "token:team", two).await.unwrap();
    // A third name is over the names cap; renewing a held name is not.
    let third = place("c", "token:team", one).await.unwrap_err();
    assert!(matches!(third, PlaceError::CredentialFull(ref d) if d.contains("2 agent names")));
    place("a", "token:team", one).await.unwrap();
    // Growing "a" to two leases would make four.
    let grown = place("a", "token:team", two).await.unwrap_err();
    assert!(matches!(grown, PlaceError::CredentialFull(ref d) if d.contains("3 leased ports")));
    // Other identities are counted apart; releasing gives room back.
    place("c", "token:other", two).await.unwrap();
    store.release("b").await.unwrap();
    place("d", "token:team", two).await.unwrap();
}

#[test]
fn corrupt_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.json");
    std::fs::write(
        &path,
        b"{\"format\":1,\"range\":\"1-2\",\"leases\":[{\"agent\":",
    )
    .unwrap();
    let err = open(&path).err().unwrap().to_string();
    assert!(err.contains("leases.json"), "{err}");
    std::fs::write(&path, b"").unwrap();
    assert!(open(&path).is_err());
}

/// Placement binds outside the lock and attempts again when a port turns out taken: the
/// result is what the table decides with that port known unbindable, and only granted ports
/// keep a listener.
#[tokio::test]
async fn a_taken_preferred_port_falls_back_like_the_table_says() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("leases.json")).unwrap();
    let mut asked = Vec::new();
    let placed = store
        .place(
            "a",
            "cert:a",
            None,
            &[ask("ssh", Some(20005)), ask("web", None)],
            |p| {
                asked.push(p);
                // 20005 is held by "another process"; everything else binds.
                (p != 20005).then(|| std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap())
            },
        )
        .await
        .unwrap();
    let ssh = &placed.grants[0];
    assert_ne!(ssh.port, 20005);
    assert!(
        ssh.note
            .as_deref()
            .unwrap_or("")
            .contains("preferred port 20005"),
        "{:?}",
        ssh.note
    );
    let mut granted: Vec<u16> = placed.grants.iter().map(|g| g.port).collect();
    let mut held: Vec<u16> = placed.listeners.keys().copied().collect();
    granted.sort_unstable();
    held.sort_unstable();
    assert_eq!(granted, held);
    assert!(asked.contains(&20005));
    assert_eq!(store.usage().await.unwrap().0, 2);
}

#[tokio::test]
async fn only_the_holder_of_a_name_gets_its_leases() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("leases.json")).unwrap();
    let bind = |_| std::net::TcpListener::bind(("127.0.0.1", 0)).ok();
    let first = store
        .place("a", "token:team-a", None, &[ask("ssh", None)], bind)
        .await
        .unwrap();
    store.deactivate("a").await;
    let err = store
        .place("a", "token:team-b", None, &[ask("ssh", None)], bind)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, PlaceError::HeldByAnother), "{err}");
    let again = store
        .place("a", "token:team-a", None, &[ask("ssh", None)], bind)
        .await
        .unwrap();
    assert_eq!(again.grants[0].port, first.grants[0].port);
    assert_eq!(
        store.holder("a").await.unwrap().as_deref(),
        Some("token:team-a")
    );
    assert_eq!(store.holdings("token:team-a").await.unwrap(), (1, 1));
    store.release("a").await.unwrap();
    assert!(store
        .place("a", "token:team-b", None, &[ask("ssh", None)], bind)
        .await
        .is_ok());
}

#[tokio::test]
async fn a_host_that_takes_every_port_is_unsettled_or_exhausted_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("leases.json")).unwrap();
    let err = store
        .place("a", "cert:a", None, &[ask("ssh", None)], |_| {
            None::<std::net::TcpListener>
        })
        .await
        .err()
        .unwrap();
    // 11 ports, each found taken once: the table runs out before the round limit.
    assert!(
        matches!(err, PlaceError::Alloc(AllocError::Exhausted { .. })),
        "{err}"
    );
    assert_eq!(store.usage().await.unwrap(), (0, 11));
}
