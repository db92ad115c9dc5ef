//! Fleet membership as the agent sees it: a relay lists its peers (static `peers` here; a shared
//! lease store's registry in a database-backed fleet), an agent given one relay connects to the
//! others too, and drops a relay that left the fleet after its grace period.

use std::time::{Duration, Instant};

use jumpgate_proto::{RelayHello, RelayMember};
use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

fn write_peers(config: &std::path::Path, peers: &[&str]) {
    let list: Vec<String> = peers.iter().map(|p| format!("{p:?}")).collect();
    std::fs::write(config, format!("peers = [{}]\n", list.join(", "))).unwrap();
}

/// Relay A lists itself and B; an agent given only A gets a tunnel on B too (with the file store
/// each relay grants its own port), reachable with ssh. Once B is taken out of A's peers (SIGHUP),
/// the agent closes its session with B after `--member-grace`, not before, and A's tunnel stays.
#[test]
fn an_agent_learns_a_relay_from_another_and_drops_it_when_it_leaves() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "fleet");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let token = dir.path().join("fleet.token");
    write_secret(&token, "fleet-token-0123456789abcdef");
    let token_arg = token.to_str().unwrap();
    let b = Relay::start(&db, port_range(5), &["--token-file", token_arg]);
    let config = dir.path().join("relay-a.toml");
    write_peers(&config, &[&b.listen]);
    let a = Relay::start(
        &da,
        port_range(5),
        &[
            "--token-file",
            token_arg,
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let (pin_a, pin_b) = (a.fingerprint(), b.fingerprint());
    let started = Instant::now();
    let agent = Agent::start(
        dir.path(),
        &a,
        "fleet-agent",
        sshd.port,
        &[
            "--token-file",
            token_arg,
            "--fingerprint",
            &pin_a,
            "--fingerprint",
            &pin_b,
            "--member-grace",
            "2s",
        ],
    );
    let (port_a, port_b) = wait_for(UP, || {
        let v = status_json(&agent.status_file)?;
        let relays = v["relays"].as_array()?;
        let connected = relays.len() == 2 && relays.iter().all(|r| r["state"] == "connected");
        connected.then(|| {
            assert_eq!(relays[0]["server"], a.listen.as_str(), "{v}");
            assert!(relays[0].get("learned").is_none(), "{v}");
            assert_eq!(relays[1]["server"], b.listen.as_str(), "{v}");
            assert_eq!(relays[1]["learned"], true, "{v}");
            (
                relays[0]["services"][0]["port"].as_u64().unwrap() as u16,
                relays[1]["services"][0]["port"].as_u64().unwrap() as u16,
            )
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "agent never connected to both relays:\n{}\nrelay a:\n{}",
            agent.proc.log(),
            a.proc.log()
        )
    });
    eprintln!(
        "agent connected to A and to B learned from A {:?} after its start",
        started.elapsed()
    );
    agent
        .proc
        .wait_log("relay learned from the fleet; connecting", UP);
    b.proc.wait_log("agent connected", UP);
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port_b, "echo via-b")).trim(),
        "via-b"
    );
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port_a, "echo via-a")).trim(),
        "via-a"
    );
    // B lists only itself, which does not keep it: A's list is what brought it in.
    write_peers(&config, &[]);
    let reloaded_at = Instant::now();
    a.proc.signal("HUP");
    a.proc.wait_log("configuration reloaded", UP);
    let left = wait_for(UP, || {
        let v = status_json(&agent.status_file)?;
        (v["relays"].as_array()?.len() == 1).then_some(v)
    })
    .unwrap_or_else(|| panic!("agent never dropped relay B:\n{}", agent.proc.log()));
    let after = reloaded_at.elapsed();
    eprintln!("agent dropped B {after:?} after A's reload (grace 2s)");
    assert!(
        after >= Duration::from_secs(2),
        "dropped {after:?} after the reload, within the 2s grace"
    );
    assert_eq!(left["relays"][0]["server"], a.listen.as_str(), "{left}");
    assert_eq!(left["relays"][0]["state"], "connected", "{left}");
    agent
        .proc
        .wait_log("relay left the fleet; closing its session", UP);
    b.proc.wait_log("agent disconnected", UP);
    assert_eq!(
        count(&b.proc.log(), "agent connected"),
        1,
        "{}",
        b.proc.log()
    );
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port_a, "echo still-via-a")).trim(),
        "still-via-a"
    );
    let text = ok_stdout(&agent.status_cli());
    assert_eq!(
        text,
        format!(
            "ssh enabled on 127.0.0.1:{port_a} (relay {}, connected)\n",
            a.listen
        )
    );
}

/// The member list goes only to agents that speak protocol version 2: a version-1 agent's hello
/// is accepted as before, without members, and a version-2 hello lists the relay and its peers.
#[test]
fn member_lists_go_to_new_agents_and_old_agents_keep_working() {
    let dir = scratch();
    let relay = Relay::start(
        dir.path(),
        port_range(5),
        &[
            "--peers",
            "relay-b.example:7000",
            "--advertise",
            "relay-a.example:7000",
        ],
    );
    let token = std::fs::read_to_string(relay.token_file()).unwrap();
    let pin = relay.fingerprint();
    let accepted = |versions, name: &str| match block_on(raw::exchange(
        &relay.listen,
        &pin,
        &raw::hello(name, token.trim(), versions),
    )) {
        RelayHello::Accepted(a) => a,
        other => panic!("not accepted: {other:?}"),
    };
    let old = accepted((1, 1), "old-agent");
    assert_eq!(old.version, 1);
    assert!(old.members.is_empty() && old.relay.is_none(), "{old:?}");
    let new = accepted((1, 2), "new-agent");
    assert_eq!(new.version, 2);
    let addrs: Vec<&str> = new.members.iter().map(|m| m.addr.as_str()).collect();
    assert_eq!(addrs, ["relay-a.example:7000", "relay-b.example:7000"]);
    // The relay's own entry: its id tells this relay process apart from any other.
    let itself = new.relay.clone().unwrap();
    assert_eq!(itself, new.members[0]);
    assert!(itself.id.ends_with("@relay-a.example:7000"), "{itself:?}");
    assert_eq!(
        new.members[1],
        RelayMember {
            id: "relay-b.example:7000".into(),
            addr: "relay-b.example:7000".into(),
            ws: None,
        }
    );
    let again = accepted((2, 2), "new-agent");
    assert_eq!(again.relay, new.relay, "one id for the life of the relay");
}

/// Two relays listing each other, both given to the agent (one by the name `localhost`, which
/// the agent resolves and dials by address): a member that is a configured server is not
/// dialled twice, so each relay holds exactly one session and none is ever taken over.
#[test]
fn configured_relays_that_list_each_other_are_not_doubled() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "pair");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let token = dir.path().join("pair.token");
    write_secret(&token, "pair-token-0123456789abcdef");
    let token_arg = token.to_str().unwrap();
    let (config_a, config_b) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
    write_peers(&config_a, &[]);
    let a = Relay::start(
        &da,
        port_range(5),
        &[
            "--token-file",
            token_arg,
            "--config",
            config_a.to_str().unwrap(),
        ],
    );
    write_peers(&config_b, &[&a.listen]);
    let b = Relay::start(
        &db,
        port_range(5),
        &[
            "--token-file",
            token_arg,
            "--config",
            config_b.to_str().unwrap(),
        ],
    );
    write_peers(&config_a, &[&b.listen]);
    a.proc.signal("HUP");
    a.proc.wait_log("configuration reloaded", UP);
    let a_by_name = a.listen.replace("127.0.0.1", "localhost");
    let agent = Agent::start(
        dir.path(),
        &a,
        "pair-agent",
        sshd.port,
        &[
            "--server",
            &a_by_name,
            "--server",
            &b.listen,
            "--token-file",
            token_arg,
            "--fingerprint",
            &a.fingerprint(),
            "--fingerprint",
            &b.fingerprint(),
        ],
    );
    // The harness's --server (A by address) and --server localhost:PORT are one relay too.
    let v = wait_for(UP, || {
        let v = status_json(&agent.status_file)?;
        let relays = v["relays"].as_array()?;
        relays
            .iter()
            .all(|r| r["state"] == "connected")
            .then_some(v)
    })
    .unwrap_or_else(|| panic!("agent never connected:\n{}", agent.proc.log()));
    let port_b = v["relays"][1]["services"][0]["port"].as_u64().unwrap() as u16;
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port_b, "echo via-b")).trim(),
        "via-b"
    );
    // Give pushes and plans time to do something wrong, then count sessions.
    a.proc.wait_log("agent connected", UP);
    b.proc.wait_log("agent connected", UP);
    std::thread::sleep(Duration::from_secs(2));
    let v = status_json(&agent.status_file).unwrap();
    assert_eq!(v["relays"].as_array().unwrap().len(), 2, "{v}");
    assert!(
        v["relays"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r.get("learned").is_none()),
        "{v}"
    );
    for (relay, name) in [(&a, "a"), (&b, "b")] {
        let log = relay.proc.log();
        assert_eq!(count(&log, "agent connected"), 1, "relay {name}:\n{log}");
        assert_eq!(
            count(&log, "replaces the one from"),
            0,
            "relay {name}:\n{log}"
        );
    }
    assert!(
        !agent.proc.log().contains("relay learned from the fleet"),
        "{}",
        agent.proc.log()
    );
}

/// The relay an agent learned the fleet from is killed (-9): what it said stays true while it is
/// down, so the session with the relay it named continues past the grace period, tunnel and
/// all; the killed relay comes back and the agent reconnects to it.
#[test]
fn a_killed_relay_does_not_take_the_fleet_it_named_with_it() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "kill");
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let token = dir.path().join("kill.token");
    write_secret(&token, "kill-token-0123456789abcdef");
    let token_arg = token.to_str().unwrap();
    let b = Relay::start(&db, port_range(5), &["--token-file", token_arg]);
    let mut a = Relay::start(
        &da,
        port_range(5),
        &["--token-file", token_arg, "--peers", &b.listen],
    );
    let agent = Agent::start(
        dir.path(),
        &a,
        "kill-agent",
        sshd.port,
        &[
            "--token-file",
            token_arg,
            "--fingerprint",
            &a.fingerprint(),
            "--fingerprint",
            &b.fingerprint(),
            "--member-grace",
            "1s",
        ],
    );
    let both_connected = || {
        wait_for(UP, || {
            let v = status_json(&agent.status_file)?;
            let relays = v["relays"].as_array()?;
            (relays.len() == 2 && relays.iter().all(|r| r["state"] == "connected")).then_some(v)
        })
        .unwrap_or_else(|| panic!("agent not connected to both relays:\n{}", agent.proc.log()))
    };
    let v = both_connected();
    let port_b = v["relays"][1]["services"][0]["port"].as_u64().unwrap() as u16;
    let mut session = EchoSession::start(&sshd, port_b);
    a.proc.kill();
    agent.proc.wait_log("connection to relay lost", UP);
    // Three grace periods with A down: B stays, and so does the ssh session through it.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let v = status_json(&agent.status_file).unwrap();
        assert_eq!(v["relays"].as_array().unwrap().len(), 2, "{v}");
        assert_eq!(v["relays"][1]["state"], "connected", "{v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    session.send(3);
    a.kill_and_restart();
    both_connected();
    session.send(3);
    session.finish();
    assert!(
        !agent.proc.log().contains("relay left the fleet"),
        "{}",
        agent.proc.log()
    );
    assert_eq!(
        count(&b.proc.log(), "agent connected"),
        1,
        "{}",
        b.proc.log()
    );
}

/// One relay reachable at two addresses given to the agent (127.0.0.1 and 127.0.0.2, as the A
/// records of one name or a private and a public address would be): the second session replaces
/// the first once, the relay names itself alike on both, and the agent keeps one session and
/// parks the other address instead of letting the two take each other over again and again.
#[test]
fn two_addresses_of_one_relay_keep_one_session() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "twice");
    let port = free_port();
    let relay = Relay::builder(dir.path())
        .bare()
        .listen(&format!("0.0.0.0:{port}"))
        .args(["--public-host", "127.0.0.1", "--admin", "off"])
        .range(port_range(5))
        .state_dir(&dir.path().join("relay-state"))
        .env("RUST_LOG", "info")
        .start();
    let status_file = dir.path().join("twice.json");
    let agent = Agent::builder(dir.path(), "twice")
        .server(&format!("127.0.0.1:{port}"))
        .server(&format!("127.0.0.2:{port}"))
        .token_file(&relay.token_file())
        .fingerprint(&relay.fingerprint())
        .target(sshd.port)
        .status_file(&status_file)
        .start();
    let (relay, agent) = (&relay.proc, &agent.proc);
    agent.wait_log(
        "this address reaches a relay the agent already has a session with",
        UP,
    );
    let v = wait_for(UP, || {
        let v = status_json(&status_file)?;
        let relays = v["relays"].as_array()?;
        (relays.len() == 1 && relays[0]["state"] == "connected").then_some(v)
    })
    .unwrap_or_else(|| panic!("agent never settled on one session:\n{}", agent.log()));
    let port_ssh = v["services"][0]["port"].as_u64().unwrap() as u16;
    let session = EchoSession::start(&sshd, port_ssh);
    // Long enough for a ping-pong of takeovers (each redial comes within a second) to show.
    std::thread::sleep(Duration::from_secs(3));
    session.finish();
    let log = relay.log();
    assert_eq!(count(&log, "replaces the one from"), 1, "{log}");
    assert_eq!(count(&log, "agent connected"), 2, "{log}");
    assert_eq!(count(&agent.out(), "ssh enabled on"), 1, "{}", agent.out());
}
