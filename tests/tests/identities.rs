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

/// One credential cannot hoard the port range: a tokens-file entry's `max_names` / `max_leases`
/// (else `--max-names-per-credential` / `--max-leases-per-credential`) cap what it holds, live
/// or away, with a refusal that says which cap; releasing a name gives its room back, and other
/// credentials are not affected.
#[test]
fn a_credential_cannot_hoard_names_or_ports() {
    let dir = scratch();
    let team = "team-token-0123456789abcdef";
    let other = "other-token-0123456789abcdef";
    let tokens = dir.path().join("tokens.toml");
    write_secret(
        &tokens,
        &format!(
            "[[token]]\nlabel = \"team\"\ntoken = \"{team}\"\nagents = [\"team-*\"]\nmax_names = 2\n\n\
             [[token]]\nlabel = \"other\"\ntoken = \"{other}\"\nagents = [\"other-*\"]\n"
        ),
    );
    let relay = Relay::start(
        dir.path(),
        port_range(20),
        &[
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--max-leases-per-credential",
            "2",
        ],
    );
    let (addr, pin) = (relay.listen.clone(), relay.fingerprint());
    let hello = |name: &str, token: &str, services: usize| {
        let mut hello = raw::hello(name, token, (1, 1));
        let ssh = hello.services[0].clone();
        hello.services = (0..services)
            .map(|i| {
                let mut s = ssh.clone();
                s.name = format!("svc{i}");
                s
            })
            .collect();
        block_on(raw::exchange(&addr, &pin, &hello))
    };
    let accepted = |reply: &RelayHello| matches!(reply, RelayHello::Accepted(_));

    for name in ["team-1", "team-2"] {
        let reply = hello(name, team, 1);
        assert!(accepted(&reply), "{name}: {reply:?}");
    }
    // The entry's own cap: two names (their sessions ended, their leases stay and count).
    let reply = hello("team-3", team, 1);
    assert_eq!(
        reply,
        RelayHello::Refused(Refusal::CredentialFull {
            detail: "2 agent names".into()
        })
    );
    // The relay-wide lease cap for entries without their own: two ports.
    assert!(accepted(&hello("other-1", other, 2)));
    let reply = hello("other-2", other, 1);
    assert_eq!(
        reply,
        RelayHello::Refused(Refusal::CredentialFull {
            detail: "2 leased ports".into()
        })
    );
    relay
        .proc
        .wait_log("holds its maximum of 2 leased ports", UP);

    // Releasing a name gives its room back.
    let (code, body) = relay.admin("DELETE", "/api/agents/team-1?release=true");
    assert_eq!(code, 200, "{body}");
    assert!(accepted(&hello("team-3", team, 1)));
    assert!(accepted(&hello("team-2", team, 1)), "a held name renews");
}
