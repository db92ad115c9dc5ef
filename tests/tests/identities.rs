//! A name belongs to the identity that holds it: another credential that also covers the name
//! cannot take it over, neither while its agent is connected nor while its lease waits for it.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use jumpgate_proto::{Refusal, RelayHello};
use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

#[test]
fn only_the_holding_identity_may_take_a_name_over() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "identities");
    let team_a = "team-a-token-0123456789abcdef";
    // Team b's entry covers every `team-*` name, team a's included.
    let team_b = "team-b-token-0123456789abcdef";
    let tokens = tokens_file(
        dir.path(),
        &[("team-a", team_a, "team-a-*"), ("team-b", team_b, "team-*")],
    );
    let mut relay = Relay::start(
        dir.path(),
        port_range(20),
        &["--tokens-file", tokens.to_str().unwrap()],
    );
    let token_a = dir.path().join("team-a.token");
    std::fs::write(&token_a, team_a).unwrap();
    std::fs::set_permissions(&token_a, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut agent = Agent::start(
        dir.path(),
        &relay,
        "team-a-1",
        sshd.port,
        &["--token-file", token_a.to_str().unwrap()],
    );
    let port = agent.wait_port(UP);
    let mut session = EchoSession::start(&sshd, port);
    let (addr, pin) = (relay.listen.clone(), relay.fingerprint());
    let held = RelayHello::Refused(Refusal::NameHeld {
        name: "team-a-1".into(),
    });

    // While team a's agent is connected.
    let reply = block_on(raw::exchange(
        &addr,
        &pin,
        &raw::hello("team-a-1", team_b, (1, 1)),
    ));
    assert_eq!(reply, held);
    relay.proc.wait_log(
        "refusing token:team-b the name \"team-a-1\": it is held by token:team-a",
        UP,
    );
    session.send(32);
    session.finish();

    // While its lease waits for it, and after a relay restart (the holder is in the lease file).
    agent.proc.kill();
    relay.kill_and_restart();
    let reply = block_on(raw::exchange(
        &addr,
        &pin,
        &raw::hello("team-a-1", team_b, (1, 1)),
    ));
    assert_eq!(reply, held);

    // The holder itself gets its name and port back; team b's own names are its to take.
    let agent = Agent::start(
        dir.path(),
        &relay,
        "team-a-1",
        sshd.port,
        &["--token-file", token_a.to_str().unwrap()],
    );
    assert_eq!(agent.wait_port(UP), port);
    let reply = block_on(raw::exchange(
        &addr,
        &pin,
        &raw::hello("team-b-1", team_b, (1, 1)),
    ));
    assert!(matches!(reply, RelayHello::Accepted(_)), "{reply:?}");

    // Released by the operator, the name is free for whoever may claim it.
    drop(agent);
    let (status, body) = relay.admin("DELETE", "/api/agents/team-a-1?release=true");
    assert_eq!(status, 200, "{body}");
    let reply = block_on(raw::exchange(
        &addr,
        &pin,
        &raw::hello("team-a-1", team_b, (1, 1)),
    ));
    assert!(matches!(reply, RelayHello::Accepted(_)), "{reply:?}");
}

#[test]
fn a_shared_token_beside_per_agent_credentials_is_warned_about() {
    let dir = scratch();
    let tokens = tokens_file(
        dir.path(),
        &[("team-a", "team-a-token-0123456789abcdef", "team-a-*")],
    );
    let shared = dir.path().join("shared.token");
    std::fs::write(&shared, "shared-token-0123456789abcdef").unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o600)).unwrap();
    let relay = Relay::start(
        dir.path(),
        port_range(4),
        &[
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--token-file",
            shared.to_str().unwrap(),
        ],
    );
    relay.proc.wait_log(
        "a shared token is configured beside per-agent credentials",
        UP,
    );
}
