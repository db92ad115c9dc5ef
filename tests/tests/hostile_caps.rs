//! Hostile credentials against what one credential may hold (issue 23, findings 1-3), with the
//! real relay and raw hellos, against the file store and a real PostgreSQL alike: renaming
//! services cannot pile up ports past `max_leases`, a `--no-port` session leaves no claim on its
//! name once it ends and an operator can release any holder, `--no-port` names count towards
//! `max_names`, and `max_sessions` caps one credential's live sessions on a relay; the
//! per-credential gauges show what the caps count.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jumpgate_proto::{AgentHello, Refusal, RelayHello, PREFACE};
use jumpgate_tests::*;
use jumpgate_transport::frame_io::{read_frame, write_frame};
use tokio::io::AsyncWriteExt;

const UP: Duration = Duration::from_secs(30);

/// A relay with `tokens` (and a name router, for `--no-port` agents), on PostgreSQL when `pg`
/// is given, else on its lease file.
fn relay(dir: &Path, pg: Option<&Postgres>, tokens: &Path, extra: &[&str]) -> Relay {
    let relay = Relay::builder(dir).range(port_range(30));
    let relay = match pg {
        Some(pg) => relay.store_postgres(pg),
        None => relay,
    };
    relay
        .arg("--tokens-file")
        .arg(tokens)
        .args(["--router-listen", "127.0.0.1:0"])
        .args(extra)
        .start()
}

/// A tokens file (0600) from `[[token]]` bodies.
fn tokens(dir: &Path, entries: &[&str]) -> PathBuf {
    let path = dir.join("tokens.toml");
    let body: Vec<String> = entries
        .iter()
        .map(|e| format!("[[token]]\n{e}\n"))
        .collect();
    write_secret(&path, &body.join("\n"));
    path
}

/// A hello for `name` with `token` asking for `services` (each `--no-port` if `no_port`).
fn hello(name: &str, token: &str, services: &[&str], no_port: bool) -> AgentHello {
    let mut hello = raw::hello(name, token, (1, 1));
    let template = hello.services[0].clone();
    hello.services = services
        .iter()
        .map(|s| {
            let mut service = template.clone();
            service.name = s.to_string();
            service.no_port = no_port;
            service
        })
        .collect();
    hello
}

/// Sends `hello` to `relay` and returns the answer; the connection then closes, which ends
/// the session if one was placed.
fn send(relay: &Relay, hello: &AgentHello) -> RelayHello {
    block_on(raw::exchange(&relay.listen, &relay.fingerprint(), hello))
}

fn full(detail: &str) -> RelayHello {
    RelayHello::Refused(Refusal::CredentialFull {
        detail: detail.into(),
    })
}

/// `(agent, service, port)` of every leased port, sorted.
fn leases(relay: &Relay) -> Vec<(String, String, u16)> {
    let (status, body) = relay.admin("GET", "/api/tunnels");
    assert_eq!(status, 200, "{body}");
    let tunnels: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let mut v: Vec<(String, String, u16)> = tunnels
        .iter()
        .filter(|t| t["port"].as_u64() != Some(0))
        .map(|t| {
            (
                t["agent"].as_str().unwrap().to_string(),
                t["service"].as_str().unwrap().to_string(),
                t["port"].as_u64().unwrap() as u16,
            )
        })
        .collect();
    v.sort();
    v
}

/// The value of the sample `line` (metric name and labels) in the relay's `/metrics`.
fn metric(relay: &Relay, line: &str) -> Option<u64> {
    let (status, body) = relay.admin("GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok())
}

/// An agent of `name` reachable only through the router, with the token in `token_file`,
/// connected.
fn no_port_agent(dir: &Path, relay: &Relay, name: &str, token_file: &Path) -> Agent {
    let agent = Agent::start(
        dir,
        relay,
        name,
        1,
        &["--no-port", "--token-file", token_file.to_str().unwrap()],
    );
    wait_until(&format!("{name} connected"), UP, || agent.status());
    agent
}

fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(format!("{name}.token"));
    write_secret(&path, token);
    path
}

/// A `#[test]` per store for `check(pg, dir)`: `$file` on the lease file, `$pg` on a real
/// PostgreSQL (skipped where [`Postgres::available`] says so, never under CI).
macro_rules! both_stores {
    ($check:ident: $file:ident, $pg:ident) => {
        #[test]
        fn $file() {
            let dir = scratch();
            $check(None, dir.path());
        }

        #[test]
        fn $pg() {
            let Some((dir, pg)) = Postgres::in_scratch() else {
                return;
            };
            $check(Some(&pg), dir.path());
        }
    };
}

const TEAM: &str = "team-token-0123456789abcdef";

/// Four reconnects of one name, each renaming both of its services, under `max_leases = 2`:
/// after each the credential holds exactly the two ports of the services it asked for last
/// (before: 8 ports, the renamed services' leases uncounted and kept for `lease_ttl`), and a
/// second name is refused by the lease cap.
fn renaming_services(pg: Option<&Postgres>, dir: &Path) {
    let tokens = tokens(
        dir,
        &[&format!(
            "label = \"team\"\ntoken = \"{TEAM}\"\nagents = [\"team-*\"]\nmax_leases = 2"
        )],
    );
    let relay = relay(dir, pg, &tokens, &[]);
    for round in ["a", "b", "c", "d"] {
        let services = [format!("{round}1"), format!("{round}2")];
        let services: Vec<&str> = services.iter().map(String::as_str).collect();
        let reply = send(&relay, &hello("team-1", TEAM, &services, false));
        assert!(
            matches!(reply, RelayHello::Accepted(_)),
            "{round}: {reply:?}"
        );
        let held = leases(&relay);
        let names: Vec<(&str, &str)> = held
            .iter()
            .map(|(a, s, _)| (a.as_str(), s.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![("team-1", services[0]), ("team-1", services[1])],
            "round {round}: the credential holds {held:?}"
        );
    }
    relay
        .proc
        .wait_log("the agent no longer asks for service \"c1\"", UP);
    assert_eq!(
        send(&relay, &hello("team-2", TEAM, &["ssh"], false)),
        full("2 leased ports")
    );
}

both_stores!(
    renaming_services:
    renaming_services_never_gives_a_credential_more_ports_than_its_lease_cap_file_store,
    renaming_services_never_gives_a_credential_more_ports_than_its_lease_cap_postgres
);

/// Two relays of a fleet, `max_leases = 2`: the name's live session on relay A serves a1 and a2;
/// the same name asking relay B for b1 and b2 is refused by the lease cap, and A's two leases
/// stay (before: B freed a1 and a2 in the database while A kept listening on them, 4 open ports
/// under a cap of 2, and ports the database called free still held by A).
#[test]
fn a_name_live_on_another_relay_cannot_rename_its_services_past_the_lease_cap() {
    let Some((dir, pg)) = Postgres::in_scratch() else {
        return;
    };
    let dir = dir.path();
    let tokens = tokens(
        dir,
        &[&format!(
            "label = \"team\"\ntoken = \"{TEAM}\"\nagents = [\"team-*\"]\nmax_leases = 2"
        )],
    );
    // One port range, each relay on its own loopback address, as fleet relays on one machine.
    let range = port_range(30);
    let fleet_relay = |id: &str, ip: &str| {
        Relay::builder(&dir.join(id))
            .on(ip)
            .range(range)
            .store_postgres(&pg)
            .args(["--relay-id", id, "--proxy-bind", ip, "--tokens-file"])
            .arg(&tokens)
            .start()
    };
    let a = fleet_relay("relay-a", "127.0.0.1");
    let b = fleet_relay("relay-b", "127.0.0.2");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The session on A stays open (its connection held) for the rest of the test.
    let (reply, _session) = rt.block_on(async {
        let mut s = raw::tls(&a.listen, &a.fingerprint()).await;
        s.write_all(PREFACE).await.unwrap();
        write_frame(&mut s, &hello("team-1", TEAM, &["a1", "a2"], false))
            .await
            .unwrap();
        let reply: RelayHello = tokio::time::timeout(UP, read_frame(&mut s))
            .await
            .unwrap()
            .unwrap();
        (reply, s)
    });
    let RelayHello::Accepted(accepted) = reply else {
        panic!("relay A: {reply:?}");
    };
    let on_a: Vec<(String, String, u16)> = accepted
        .services
        .iter()
        .map(|s| ("team-1".to_string(), s.name.clone(), s.port))
        .collect();
    assert_eq!(leases(&b), on_a, "relay B sees A's leases");
    assert_eq!(
        send(&b, &hello("team-1", TEAM, &["b1", "b2"], false)),
        full("2 leased ports")
    );
    assert_eq!(leases(&b), on_a, "A's leases stay after B's refusal");
    // A still listens on both ports, as the database says it may.
    for (_, service, port) in &on_a {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            "{service}: relay A no longer listens on {port}"
        );
    }
}

/// The per-credential gauges while the database is down: `jumpgate_credential_gauges_up 0` and
/// no names or leases series (before: the series vanished with nothing saying why), one warning
/// per streak of failed scrapes however many scrapes fail, and back to 1 with the series once
/// the database answers again.
#[test]
fn per_credential_gauges_say_when_the_store_cannot_be_read() {
    let Some((dir, mut pg)) = Postgres::in_scratch() else {
        return;
    };
    let dir = dir.path();
    let tokens = tokens(
        dir,
        &[&format!(
            "label = \"team\"\ntoken = \"{TEAM}\"\nagents = [\"team-*\"]"
        )],
    );
    let relay = relay(dir, Some(&pg), &tokens, &[]);
    let reply = send(&relay, &hello("team-1", TEAM, &["ssh"], false));
    assert!(matches!(reply, RelayHello::Accepted(_)), "{reply:?}");
    let up = "jumpgate_credential_gauges_up";
    let leases = "jumpgate_credential_leases{credential=\"token:team\"}";
    assert_eq!(metric(&relay, up), Some(1));
    assert_eq!(metric(&relay, leases), Some(1));
    let warning = "per-credential gauges left out of /metrics";
    let warnings = || relay.proc.log().matches(warning).count();
    for streak in 1..=2 {
        pg.stop();
        for _ in 0..3 {
            assert_eq!(metric(&relay, up), Some(0), "streak {streak}");
            assert_eq!(metric(&relay, leases), None, "streak {streak}");
        }
        assert_eq!(warnings(), streak, "one warning per streak");
        pg.start_server();
        wait_until("the gauges up again", UP, || {
            (metric(&relay, up) == Some(1)).then_some(())
        });
        assert_eq!(metric(&relay, leases), Some(1));
    }
    relay
        .proc
        .wait_log("per-credential gauges: the lease store answers again", UP);
}

const OWNER: &str = "owner-token-0123456789abcdef";
const SQUATTER: &str = "squatter-token-0123456789abcdef";

/// The rightful credential of `job-1` and a wider one that also covers it.
fn owner_and_squatter(dir: &Path) -> PathBuf {
    tokens(
        dir,
        &[
            &format!("label = \"owner\"\ntoken = \"{OWNER}\"\nagents = [\"job-1\"]"),
            &format!("label = \"squatter\"\ntoken = \"{SQUATTER}\"\nagents = [\"job-*\"]"),
        ],
    )
}

/// A `--no-port` session of another credential covering the name holds it while it lasts and
/// leaves nothing once it ends: the rightful credential gets the name (before, PostgreSQL kept a
/// holder row for ever and refused it `NameHeld`; the file store kept none).
fn no_port_session_leaves_nothing(pg: Option<&Postgres>, dir: &Path) {
    let relay = relay(dir, pg, &owner_and_squatter(dir), &[]);
    let reply = send(&relay, &hello("job-1", SQUATTER, &["ssh"], true));
    assert!(matches!(reply, RelayHello::Accepted(_)), "{reply:?}");
    relay.proc.wait_log("agent disconnected", UP);
    let reply = send(&relay, &hello("job-1", OWNER, &["ssh"], false));
    assert!(matches!(reply, RelayHello::Accepted(_)), "{reply:?}");
}

both_stores!(
    no_port_session_leaves_nothing:
    a_no_port_session_leaves_no_claim_on_its_name_once_it_ends_file_store,
    a_no_port_session_leaves_no_claim_on_its_name_once_it_ends_postgres
);

/// A name held only by a `--no-port` session on another relay of the fleet (no lease, no
/// session here) is the operator's to release from any relay: `DELETE ...?release=true`
/// answers 200 (before: 404, and the holder stayed), and the rightful credential gets it.
#[test]
fn an_operator_releases_a_name_held_only_by_a_no_port_session_on_another_relay() {
    let Some((dir, pg)) = Postgres::in_scratch() else {
        return;
    };
    let relay = relay(dir.path(), Some(&pg), &owner_and_squatter(dir.path()), &[]);
    // What another relay writes for a no-port session it holds (its heartbeat far ahead, so it
    // stays live for the whole test).
    pg.psql(
        "INSERT INTO jumpgate_relays VALUES ('other', '127.0.0.9:7000', 'other', 4102444800); \
         INSERT INTO jumpgate_sessions VALUES ('job-1', 'other'); \
         INSERT INTO jumpgate_holders VALUES ('job-1', 'token:squatter')",
    );
    let owner = hello("job-1", OWNER, &["ssh"], false);
    let held = RelayHello::Refused(Refusal::NameHeld {
        name: "job-1".into(),
    });
    assert_eq!(send(&relay, &owner), held, "live on the other relay");
    let (status, body) = relay.admin("DELETE", "/api/agents/job-1?release=true");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        pg.psql("SELECT count(*) FROM jumpgate_holders WHERE agent = 'job-1'")
            .trim(),
        "0"
    );
    let reply = send(&relay, &owner);
    assert!(matches!(reply, RelayHello::Accepted(_)), "{reply:?}");
}

/// With `max_names = 1`, a credential whose one live agent is `--no-port` cannot claim a second
/// name, with or without ports (before: 1 + any number of live router-reachable names); the
/// gauges show one name and one session for it.
fn no_port_names_count(pg: Option<&Postgres>, dir: &Path) {
    let tokens = tokens(
        dir,
        &[&format!(
            "label = \"team\"\ntoken = \"{TEAM}\"\nagents = [\"team-*\"]\nmax_names = 1"
        )],
    );
    let relay = relay(dir, pg, &tokens, &[]);
    let _agent = no_port_agent(dir, &relay, "team-1", &token_file(dir, "team", TEAM));
    for no_port in [true, false] {
        assert_eq!(
            send(&relay, &hello("team-2", TEAM, &["ssh"], no_port)),
            full("1 agent names"),
            "no_port: {no_port}"
        );
    }
    let names = "jumpgate_credential_names{credential=\"token:team\"}";
    assert_eq!(metric(&relay, names), Some(1));
    let sessions = "jumpgate_credential_sessions{credential=\"token:team\"}";
    assert_eq!(metric(&relay, sessions), Some(1));
}

both_stores!(
    no_port_names_count:
    no_port_names_count_towards_max_names_file_store,
    no_port_names_count_towards_max_names_postgres
);

/// A tokens-file entry's `max_sessions = 2`: a third live session of the credential on the relay
/// is refused, saying which cap, while its names cap has room; the same name taking its own
/// session over at the cap is admitted; a session that ends gives its room back; the gauges
/// count the sessions and names.
#[test]
fn a_credential_cannot_hold_more_sessions_on_a_relay_than_max_sessions() {
    let dir = scratch();
    let dir = dir.path();
    let tokens = tokens(
        dir,
        &[&format!(
            "label = \"team\"\ntoken = \"{TEAM}\"\nagents = [\"team-*\"]\nmax_names = 10\nmax_sessions = 2"
        )],
    );
    let relay = relay(dir, None, &tokens, &[]);
    let file = token_file(dir, "team", TEAM);
    let mut first = no_port_agent(dir, &relay, "team-1", &file);
    let _second = no_port_agent(dir, &relay, "team-2", &file);
    let sessions = "jumpgate_credential_sessions{credential=\"token:team\"}";
    assert_eq!(metric(&relay, sessions), Some(2));
    assert_eq!(
        metric(
            &relay,
            "jumpgate_credential_names{credential=\"token:team\"}"
        ),
        Some(2)
    );
    assert_eq!(
        send(&relay, &hello("team-3", TEAM, &["ssh"], true)),
        full("2 sessions on this relay (stop one of its agents)")
    );
    relay
        .proc
        .wait_log("it has 2 sessions on this relay, its maximum", UP);
    // A reconnect of a live name replaces its session: not a third one.
    let reply = send(&relay, &hello("team-1", TEAM, &["ssh"], true));
    assert!(matches!(reply, RelayHello::Accepted(_)), "{reply:?}");
    // team-1 ends (its agent, which may be reconnecting, too); team-2's session stays.
    first.proc.kill();
    wait_until("team-1's sessions gone", UP, || {
        (metric(&relay, sessions) == Some(1)).then_some(())
    });
    let reply = send(&relay, &hello("team-3", TEAM, &["ssh"], true));
    assert!(matches!(reply, RelayHello::Accepted(_)), "{reply:?}");
}

/// Holder rows that hold nothing (no lease, no session on a live relay: left by an older relay,
/// or by a `--no-port` session whose relay died) neither block the name's rightful credential
/// nor stay: maintenance deletes them (before: `NameHeld` for ever).
#[test]
fn a_holder_row_that_holds_nothing_neither_blocks_its_name_nor_stays() {
    let Some((dir, pg)) = Postgres::in_scratch() else {
        return;
    };
    let relay = relay(dir.path(), Some(&pg), &owner_and_squatter(dir.path()), &[]);
    pg.psql(
        "INSERT INTO jumpgate_relays VALUES ('dead', '127.0.0.9:7000', 'dead', 1); \
         INSERT INTO jumpgate_sessions VALUES ('job-2', 'dead'); \
         INSERT INTO jumpgate_holders VALUES ('job-1', 'token:squatter'), ('job-2', 'token:squatter')",
    );
    let reply = send(&relay, &hello("job-1", OWNER, &["ssh"], false));
    assert!(matches!(reply, RelayHello::Accepted(_)), "{reply:?}");
    wait_until("the leftover holder row deleted", UP, || {
        let left = pg.psql("SELECT count(*) FROM jumpgate_holders WHERE agent = 'job-2'");
        (left.trim() == "0").then_some(())
    });
}
