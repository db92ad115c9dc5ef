//! Relays sharing their leases through a real PostgreSQL (`lease_store = "postgres"`): one port
//! per agent across the fleet, uniqueness under a race, an outage of the database, a database
//! that is not there at start.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

/// A shared agent token file (0600) for every relay and agent of a test.
fn shared_token(dir: &Path) -> PathBuf {
    let path = dir.join("fleet-token");
    write_secret(&path, "fleet-shared-token-0123456789abcdef");
    path
}

/// A relay of the fleet on loopback address `ip`, with its own state dir under `dir`.
fn fleet_relay(dir: &Path, ip: &str, pg: &Postgres, range: (u16, u16), token: &Path) -> Relay {
    fleet_relay_at(dir, ip, free_port(), pg, range, token, &[])
}

/// [`fleet_relay`] with its agent port at `port`.
fn fleet_relay_at(
    dir: &Path,
    ip: &str,
    port: u16,
    pg: &Postgres,
    range: (u16, u16),
    token: &Path,
    more: &[&str],
) -> Relay {
    let own = dir.join(format!("relay-{ip}"));
    Relay::builder(&own)
        .listen(&format!("{ip}:{port}"))
        .range(range)
        .store_postgres(pg)
        .args(["--proxy-bind", ip, "--token-file"])
        .arg(token)
        .args(["--relay-id", &format!("relay-{ip}")])
        .args(more)
        .start()
}

/// The ports of service `ssh` the agent's status file shows for each relay, once it is
/// connected to `n` relays.
fn ports_by_relay(agent: &Agent, n: usize) -> Vec<u16> {
    wait_for(UP, || {
        let text = std::fs::read_to_string(&agent.status_file).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let relays = v["relays"].as_array()?;
        if relays.len() != n || relays.iter().any(|r| r["state"] != "connected") {
            return None;
        }
        relays
            .iter()
            .map(|r| r["services"][0]["port"].as_u64().map(|p| p as u16))
            .collect()
    })
    .unwrap_or_else(|| {
        panic!(
            "agent never connected to {n} relays; log:\n{}",
            agent.proc.log()
        )
    })
}

/// One agent, two relays on one database: the same port from both, ssh through both, one lease
/// in the database; a restarted agent process takes the name over on both, keeping the port.
#[test]
fn one_agent_gets_the_same_port_from_two_relays_and_ssh_works_through_both() {
    if !Postgres::available() || !require_tool("ssh", "openssh-client") {
        return;
    }
    let dir = scratch();
    let pg = Postgres::start(dir.path());
    let sshd = Sshd::start(dir.path(), "fleet");
    let token = shared_token(dir.path());
    let range = port_range(6);
    let r1 = fleet_relay(dir.path(), "127.0.0.1", &pg, range, &token);
    let r2 = fleet_relay(dir.path(), "127.0.0.2", &pg, range, &token);
    let (fp1, fp2) = (r1.fingerprint(), r2.fingerprint());
    let token_arg = token.display().to_string();
    let flags = [
        "--server",
        &r2.listen,
        "--token-file",
        &token_arg,
        "--fingerprint",
        &fp1,
        "--fingerprint",
        &fp2,
    ];
    let agent = Agent::start(dir.path(), &r1, "fleet-a", sshd.port, &flags);
    let ports = ports_by_relay(&agent, 2);
    assert_eq!(ports[0], ports[1], "one port across the fleet: {ports:?}");
    let port = ports[0];
    for host in ["127.0.0.1", "127.0.0.2"] {
        let out = sshd.ssh(host, port, &format!("echo via-{host}"));
        assert_eq!(ok_stdout(&out).trim(), format!("via-{host}"));
    }
    // The database holds one lease, and both relays hold a session with the agent.
    assert_eq!(
        pg.psql("SELECT port FROM jumpgate_ports WHERE agent = 'fleet-a'")
            .trim(),
        port.to_string()
    );
    assert_eq!(
        pg.psql("SELECT relay FROM jumpgate_sessions WHERE agent = 'fleet-a' ORDER BY relay")
            .trim(),
        "relay-127.0.0.1\nrelay-127.0.0.2"
    );
    assert_eq!(
        pg.psql("SELECT string_agg(id, ',' ORDER BY id) FROM jumpgate_relays")
            .trim(),
        "relay-127.0.0.1,relay-127.0.0.2"
    );
    assert_eq!(
        pg.psql("SELECT max(version) FROM jumpgate_schema").trim(),
        "1"
    );

    // The job's container restarts while its old agent still looks alive (stopped, its
    // connections open): the new agent process takes the name over on both relays and keeps
    // the port.
    let mut agent = agent;
    agent.proc.signal("STOP");
    let again_dir = dir.path().join("restarted");
    let again = Agent::start(&again_dir, &r1, "fleet-a", sshd.port, &flags);
    assert_eq!(ports_by_relay(&again, 2), vec![port, port]);
    for relay in [&r1, &r2] {
        relay.proc.wait_log("replaces the one from", UP);
    }
    agent.proc.kill();
    for host in ["127.0.0.1", "127.0.0.2"] {
        let out = sshd.ssh(host, port, &format!("echo again-via-{host}"));
        assert_eq!(ok_stdout(&out).trim(), format!("again-via-{host}"));
    }
}

/// Eight agents ask strictly for one port at the same moment, half through each relay (their
/// TLS is up beforehand and a barrier releases all hellos together), round after round: every
/// round exactly one gets the port, every other is refused because it is leased, and the database
/// holds one lease on it, the winner's, and none for the losers.
#[test]
fn agents_racing_for_one_preferred_port_through_two_relays_leave_one_winner_per_round() {
    use jumpgate_proto::{Refusal, RelayHello, PREFACE};
    use jumpgate_transport::frame_io::{read_frame, write_frame};
    use tokio::io::AsyncWriteExt;
    const RACERS: usize = 8;
    const ROUNDS: u16 = 5;
    if !Postgres::available() {
        return;
    }
    let dir = scratch();
    let pg = Postgres::start(dir.path());
    let token = shared_token(dir.path());
    let range = port_range(ROUNDS + 2);
    let r1 = fleet_relay(dir.path(), "127.0.0.1", &pg, range, &token);
    let r2 = fleet_relay(dir.path(), "127.0.0.2", &pg, range, &token);
    let secret = std::fs::read_to_string(&token).unwrap();
    let relays = [
        (r1.listen.clone(), r1.fingerprint()),
        (r2.listen.clone(), r2.fingerprint()),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..ROUNDS {
        // A new port each round: a winner's lease outlives its connection.
        let wanted = range.0 + round;
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(RACERS));
        let racers: Vec<_> = (0..RACERS)
            .map(|i| {
                let (addr, pin) = relays[i % 2].clone();
                let name = format!("racer-{round}-{i}");
                let mut hello = raw::hello(&name, secret.trim(), (1, 1));
                hello.services[0].preferred_port = Some(wanted);
                hello.services[0].strict = true;
                let barrier = barrier.clone();
                rt.spawn(async move {
                    let mut s = raw::tls(&addr, &pin).await;
                    s.write_all(PREFACE).await.unwrap();
                    barrier.wait().await;
                    write_frame(&mut s, &hello).await.unwrap();
                    let reply: RelayHello =
                        tokio::time::timeout(Duration::from_secs(20), read_frame(&mut s))
                            .await
                            .unwrap_or_else(|_| panic!("{name}: no answer from {addr}"))
                            .unwrap();
                    // The connection stays open until the round is checked.
                    (name, reply, s)
                })
            })
            .collect();
        let results: Vec<_> = racers
            .into_iter()
            .map(|r| rt.block_on(r).unwrap())
            .collect();
        let mut winners = Vec::new();
        for (name, reply, _) in &results {
            match reply {
                RelayHello::Accepted(a) => {
                    assert_eq!(a.services[0].port, wanted, "{name} got another port");
                    winners.push(name.clone());
                }
                RelayHello::Refused(Refusal::PreferredPortUnavailable { port, why, .. }) => {
                    assert_eq!(*port, wanted);
                    assert!(why.contains("leased to another agent"), "{name}: {why}");
                }
                other => panic!("round {round}: {name} got {other:?}"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: port {wanted} went to {winners:?}"
        );
        let leases = pg.psql(&format!(
            "SELECT agent || '=' || port FROM jumpgate_ports \
             WHERE port = {wanted} OR agent LIKE 'racer-{round}-%' ORDER BY agent"
        ));
        assert_eq!(
            leases.trim(),
            format!("{}={wanted}", winners[0]),
            "round {round}: the database's leases"
        );
        eprintln!(
            "round {round}: {} won port {wanted} against {} others",
            winners[0],
            RACERS - 1
        );
        drop(results);
    }
}

#[test]
fn tunnels_survive_a_database_outage_and_new_agents_wait_for_it() {
    if !Postgres::available() || !require_tool("ssh", "openssh-client") {
        return;
    }
    let dir = scratch();
    let mut pg = Postgres::start(dir.path());
    let sshd = Sshd::start(dir.path(), "outage");
    let token = shared_token(dir.path());
    let token_arg = token.display().to_string();
    let relay = fleet_relay(dir.path(), "127.0.0.1", &pg, port_range(6), &token);
    let first = Agent::start(
        dir.path(),
        &relay,
        "before",
        sshd.port,
        &["--token-file", &token_arg],
    );
    let port = first.wait_serving(&sshd, UP);
    let mut session = EchoSession::start(&sshd, port);

    let outage = std::time::Instant::now();
    pg.stop();
    // The open session and new user connections keep working: the data path never asks the
    // store.
    session.send(100);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo during-outage")).trim(),
        "during-outage"
    );
    // A new agent is refused for now (not for good) and keeps trying.
    let late = Agent::start(
        dir.path(),
        &relay,
        "late",
        sshd.port,
        &["--token-file", &token_arg],
    );
    relay
        .proc
        .wait_log("refusing an agent for now: lease store unavailable", UP);
    assert!(late.status().is_none(), "{}", late.proc.log());
    // The database stays away for 30 s, the open session moving data all along; past the
    // relays' 30 s membership horizon, a new user connection still gets through.
    while outage.elapsed() < Duration::from_secs(30) {
        session.send(100);
        std::thread::sleep(Duration::from_secs(3));
    }
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo late-in-outage")).trim(),
        "late-in-outage"
    );
    assert!(late.status().is_none(), "{}", late.proc.log());
    assert!(
        relay.proc.log().contains("lease maintenance skipped"),
        "the outage is logged: {}",
        relay.proc.log()
    );
    session.send(100);

    pg.start_server();
    relay
        .proc
        .wait_log("lease store reachable again", Duration::from_secs(30));
    let late_port = late.wait_serving(&sshd, Duration::from_secs(90));
    assert_ne!(late_port, port);
    session.send(100);
    session.finish();
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo after")).trim(),
        "after"
    );
    assert!(
        !late.proc.log().contains("exiting"),
        "the agent must not give up: {}",
        late.proc.log()
    );
}

#[test]
fn a_relay_that_cannot_reach_its_store_at_start_exits_75_saying_so() {
    let dir = scratch();
    let token = shared_token(dir.path());
    let nobody = free_port();
    let password = dir.path().join("pw");
    write_secret(&password, "secret-password");
    let (status, log) = Relay::builder(dir.path())
        .bare()
        .args(["--listen", "127.0.0.1:0", "--public-host", "127.0.0.1"])
        .args(["--port-range", "20000-20010", "--admin", "off"])
        .state_dir(&dir.path().join("state"))
        .arg("--token-file")
        .arg(&token)
        .args(["--lease-store", "postgres", "--lease-store-url"])
        .arg(format!("postgres://jumpgate@127.0.0.1:{nobody}/jumpgate"))
        .arg("--lease-store-password-file")
        .arg(&password)
        .exit_within(Duration::from_secs(30));
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(
        log.contains(&format!(
            "cannot use the lease store postgres://jumpgate@127.0.0.1:{nobody}/jumpgate"
        )),
        "{log}"
    );
    assert!(!log.contains("secret-password"), "{log}");
}

#[test]
fn a_password_in_the_url_is_refused_with_exit_64_naming_where_it_goes() {
    let dir = scratch();
    let out = Relay::builder(dir.path())
        .bare()
        .args(["--public-host", "127.0.0.1", "--port-range", "20000-20010"])
        .state_dir(dir.path())
        .args(["--lease-store", "postgres", "--lease-store-url"])
        .arg("postgres://jumpgate:hunter2@db.example/jumpgate")
        .command()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lease_store_password_file"), "{err}");
    assert!(err.contains("JUMPGATE_LEASE_STORE_PASSWORD"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn a_relay_with_another_port_range_than_the_fleet_refuses_to_start() {
    if !Postgres::available() {
        return;
    }
    let dir = scratch();
    let pg = Postgres::start(dir.path());
    let token = shared_token(dir.path());
    let range = port_range(6);
    let _first = fleet_relay(dir.path(), "127.0.0.1", &pg, range, &token);
    let (status, log) = Relay::builder(dir.path())
        .bare()
        .name("relay-other")
        .args(["--listen", "127.0.0.2:0", "--public-host", "127.0.0.2"])
        .range((range.0, range.1 + 1))
        .args(["--admin", "off", "--proxy-bind", "127.0.0.2"])
        .state_dir(&dir.path().join("other-state"))
        .store_postgres(&pg)
        .arg("--token-file")
        .arg(&token)
        .exit_within(UP);
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(log.contains("differs from the fleet's"), "{log}");
}

#[test]
fn a_release_through_one_relay_frees_the_port_on_the_others() {
    if !Postgres::available() {
        return;
    }
    let dir = scratch();
    let pg = Postgres::start(dir.path());
    let token = shared_token(dir.path());
    let token_arg = token.display().to_string();
    let range = port_range(6);
    let r1 = fleet_relay(dir.path(), "127.0.0.1", &pg, range, &token);
    let mut agent = Agent::start(dir.path(), &r1, "kept", 22, &["--token-file", &token_arg]);
    let port = agent.wait_port(UP);
    agent.proc.kill();
    // A relay that starts while the lease exists keeps its port for the agent.
    let _r2 = fleet_relay(dir.path(), "127.0.0.2", &pg, range, &token);
    let reachable = || std::net::TcpStream::connect(("127.0.0.2", port)).is_ok();
    assert!(
        reachable(),
        "relay 2 does not keep the fleet's leased port {port}"
    );
    let (status, body) = r1.admin("DELETE", "/api/agents/kept?release=true");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&port.to_string()), "{body}");
    assert_eq!(
        pg.psql("SELECT count(*) FROM jumpgate_ports WHERE agent = 'kept'")
            .trim(),
        "0"
    );
    // Relay 2 sees the lease gone at its next maintenance round and lets the port go.
    wait_until("relay 2 to close the released port", UP, || {
        (!reachable()).then_some(())
    });
}

#[test]
fn the_store_is_reached_over_verified_tls() {
    if !Postgres::available() {
        return;
    }
    let dir = scratch();
    let mut pg = Postgres::start(dir.path());
    let ca = TestCa::new(dir.path(), "db");
    pg.enable_tls(&ca);
    let token = shared_token(dir.path());
    let own = dir.path().join("tls-relay");
    let _relay = Relay::builder(&own)
        .on("127.0.0.1")
        .range(port_range(4))
        .store_postgres(&pg)
        .args(["--lease-store-tls", "require", "--lease-store-ca"])
        .arg(&ca.cert_path)
        .arg("--token-file")
        .arg(&token)
        .start();
    assert_eq!(
        pg.psql(
            "SELECT count(*) > 0 FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND application_name = 'jumpgate-relay'"
        )
        .trim(),
        "t"
    );

    // A CA that did not sign the server's certificate: no connection, exit 75 saying why.
    let other = TestCa::new(dir.path(), "other");
    let (status, log) = Relay::builder(dir.path())
        .bare()
        .name("relay-wrong-ca")
        .args(["--listen", "127.0.0.1:0", "--public-host", "127.0.0.1"])
        .args(["--port-range", "20000-20003", "--admin", "off"])
        .state_dir(&dir.path().join("wrong-ca-state"))
        .store_postgres(&pg)
        .args(["--lease-store-tls", "require", "--lease-store-ca"])
        .arg(&other.cert_path)
        .arg("--token-file")
        .arg(&token)
        .exit_within(UP);
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(log.to_lowercase().contains("certificate"), "{log}");
}

/// Three relays on 127.0.0.1-3 sharing one database: an agent given only the first finds the
/// other two through the store's registry of live relays, gets the same port on all three, and
/// ssh and scp through each reach its sshd; `/api/tunnels` shows the fleet view. kill -9 of one
/// relay leaves an ssh session through another untouched; the killed relay restarts and rejoins.
#[test]
fn three_relays_one_database_an_agent_given_one_finds_the_others() {
    if !Postgres::available() || !require_tool("ssh", "openssh-client") {
        return;
    }
    let dir = scratch();
    let pg = Postgres::start(dir.path());
    let sshd = Sshd::start(dir.path(), "fleet3");
    let token = shared_token(dir.path());
    let range = port_range(6);
    let ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
    let mut relays: Vec<Relay> = ips
        .iter()
        .map(|ip| fleet_relay(dir.path(), ip, &pg, range, &token))
        .collect();
    let agent = relays
        .iter()
        .fold(Agent::builder(dir.path(), "fleet-3"), |a, r| {
            a.fingerprint_of(&r.state_dir)
        })
        .server(&relays[0].listen)
        .token_file(&token)
        .target(sshd.port)
        .start();
    let ports = ports_by_relay(&agent, 3);
    assert!(ports.iter().all(|p| *p == ports[0]), "{ports:?}");
    let port = ports[0];
    let payload = dir.path().join("payload.bin");
    let sent = random_file(&payload, 256 * 1024);
    for host in ips {
        let out = sshd.ssh(host, port, &format!("echo via-{host}"));
        assert_eq!(ok_stdout(&out).trim(), format!("via-{host}"));
        // scp through this relay: the file arrives whole at the one sshd.
        let copy = dir.path().join(format!("copy-via-{host}.bin"));
        let out = Command::new("scp")
            .args(sshd.client_opts())
            .args(["-P", &port.to_string()])
            .arg(&payload)
            .arg(format!("root@{host}:{}", copy.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "scp via {host}: {out:?}");
        assert_eq!(sha256_file(&copy), sent, "scp via {host}");
    }
    // The fleet view, from any relay: the agent, its port, every relay holding a session.
    let (code, body) = relays[1].admin("GET", "/api/tunnels");
    assert_eq!(code, 200, "{body}");
    let tunnels: serde_json::Value = serde_json::from_str(&body).unwrap();
    let row = &tunnels[0];
    assert_eq!(
        (row["agent"].as_str(), row["port"].as_u64()),
        (Some("fleet-3"), Some(port as u64))
    );
    assert_eq!(
        row["relays"],
        serde_json::json!(["relay-127.0.0.1", "relay-127.0.0.2", "relay-127.0.0.3"]),
        "{body}"
    );

    // kill -9 of relay 3 during a session through relay 2.
    let mut session = EchoSession::start_via(&sshd, "127.0.0.2", port);
    relays[2].proc.kill();
    session.send(64);
    let out = sshd.ssh("127.0.0.1", port, "echo still");
    assert_eq!(ok_stdout(&out).trim(), "still");
    session.send(64);
    session.finish();
    // It restarts with its state and rejoins: the agent is back on all three, same port.
    relays[2].kill_and_restart();
    let again = ports_by_relay(&agent, 3);
    assert!(again.iter().all(|p| *p == port), "{again:?}");
    let out = sshd.ssh("127.0.0.3", port, "echo rejoined");
    assert_eq!(ok_stdout(&out).trim(), "rejoined");
}

/// A relay name that resolves to several addresses counts as several relays: the agent, given
/// only `--server relays.test:PORT` where that name is 127.0.0.1 and 127.0.0.2 (its own
/// /etc/hosts, in a private mount namespace), keeps a session with the relay behind each address,
/// gets the same port from both, shows it once, and ssh works through both, by port and by name
/// through the router of each.
#[test]
fn a_name_with_two_addresses_is_two_relays() {
    if !Postgres::available()
        || !require_tool("ssh", "openssh-client")
        || !require_tool("unshare", "util-linux")
    {
        return;
    }
    let dir = scratch();
    let pg = Postgres::start(dir.path());
    let sshd = Sshd::start(dir.path(), "named");
    let token = shared_token(dir.path());
    let range = port_range(6);
    let port = free_port();
    // One public name for the fleet, as its operators would configure it, and the name router
    // on every relay at one port.
    let router_port = free_port();
    let relay = |ip: &str| {
        let router = format!("{ip}:{router_port}");
        let more = [
            "--public-host",
            "relays.test",
            "--router-listen",
            &router,
            "--allow-cidr",
            "127.0.0.0/8",
        ];
        fleet_relay_at(dir.path(), ip, port, &pg, range, &token, &more)
    };
    let (r1, r2) = (relay("127.0.0.1"), relay("127.0.0.2"));
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 relays.test\n127.0.0.2 relays.test\n").unwrap();
    let hosts = hosts.to_str().unwrap();
    let agent = Agent::builder(dir.path(), "named")
        .wrapper(&[
            "unshare",
            "--mount",
            "sh",
            "-c",
            "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
            hosts,
        ])
        .server(&format!("relays.test:{port}"))
        .token_file(&token)
        .fingerprint(&r1.fingerprint())
        .fingerprint(&r2.fingerprint())
        .target(sshd.port)
        .start();
    let ports = ports_by_relay(&agent, 2);
    assert_eq!(ports[0], ports[1], "one port across the fleet: {ports:?}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&agent.status_file).unwrap()).unwrap();
    let shown = v["services"].as_array().unwrap();
    assert_eq!(shown.len(), 1, "shown once: {v}");
    assert_eq!(shown[0]["host"], "relays.test", "{v}");
    let line = format!("ssh enabled on relays.test:{}", ports[0]);
    assert!(agent.proc.log().contains(&line), "{}", agent.proc.log());
    for ip in ["127.0.0.1", "127.0.0.2"] {
        assert_eq!(
            ok_stdout(&sshd.ssh(ip, ports[0], "echo through-the-name")).trim(),
            "through-the-name",
            "via {ip}"
        );
    }
    // The name router works on every relay: CONNECT by agent name reaches the agent's sshd.
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let mut s = std::net::TcpStream::connect((ip, router_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let target = format!("named:{}", sshd.port);
        s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !String::from_utf8_lossy(&got).contains("SSH-2.0") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.starts_with("HTTP/1.1 200") && got.contains("SSH-2.0"),
            "router on {ip}: {got}"
        );
    }
}
