//! Signed join tokens: a platform mints one per job (here with `relay-server mint-token`), the
//! relay holds only the public key, and a token claims exactly the name it was minted for.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use jumpgate_proto::{Refusal, RelayHello};
use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

/// The audience a relay whose public host is 127.0.0.1 expects by default.
const AUDIENCE: &str = "jumpgate:127.0.0.1";

fn mint(key: &Path, name: &str, ttl: &str) -> String {
    let out = Command::new(bin("relay-server"))
        .args(["mint-token", "--key"])
        .arg(key)
        .args(["--name", name, "--ttl", ttl, "--audience", AUDIENCE])
        .output()
        .unwrap();
    ok_stdout(&out).trim().to_string()
}

/// A token signed with `key` whose `exp` is `exp` (for tokens `mint-token` would not make).
fn signed_with(key: &Path, sub: &str, exp: u64) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        aud: &'a str,
        exp: u64,
    }
    let pem = std::fs::read(key).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap();
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    jsonwebtoken::encode(
        &header,
        &Claims {
            sub,
            aud: AUDIENCE,
            exp,
        },
        &key,
    )
    .unwrap()
}

#[test]
fn a_minted_token_claims_its_own_name_and_nothing_else() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "join");
    let (private, public) = key_pair(dir.path(), "join");
    let relay = Relay::start(
        dir.path(),
        port_range(10),
        &["--join-key-file", public.to_str().unwrap()],
    );
    let (addr, pin) = (relay.listen.clone(), relay.fingerprint());
    let refused = |name: &str, token: &str| match block_on(raw::exchange(
        &addr,
        &pin,
        &raw::hello(name, token, (1, 1)),
    )) {
        RelayHello::Refused(r) => r,
        other => panic!("{name} was let in: {other:?}"),
    };

    // The job's agent connects with its token and users reach it.
    let token = mint(&private, "vh-exec-123", "1h");
    let token_file = dir.path().join("job.token");
    std::fs::write(&token_file, &token).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = Agent::start(
        dir.path(),
        &relay,
        "vh-exec-123",
        sshd.port,
        &["--token-file", token_file.to_str().unwrap()],
    );
    let port = agent.wait_port(UP);
    let out = sshd.ssh("127.0.0.1", port, "echo minted");
    assert_eq!(ok_stdout(&out).trim(), "minted");
    relay
        .proc
        .wait_log("credential=signed token for vh-exec-123", UP);

    // The same token cannot claim another job's name.
    assert_eq!(
        refused("vh-exec-124", &token),
        Refusal::NameNotAllowed {
            name: "vh-exec-124".into()
        }
    );
    // A token for every `vh-*` name is another identity: it cannot take the job's name over.
    let wide = mint(&private, "vh-*", "1h");
    assert_eq!(
        refused("vh-exec-123", &wide),
        Refusal::NameHeld {
            name: "vh-exec-123".into()
        }
    );
    // Expired, or signed by another key: refused with the reason.
    let expired = signed_with(&private, "vh-exec-125", unix_now() - 3600);
    let Refusal::TokenRejected { detail } = refused("vh-exec-125", &expired) else {
        panic!("an expired token must be rejected as such");
    };
    assert!(detail.contains("expired"), "{detail}");
    let (stranger, _) = key_pair(dir.path(), "stranger");
    let forged = mint(&stranger, "vh-exec-125", "1h");
    let Refusal::TokenRejected { detail } = refused("vh-exec-125", &forged) else {
        panic!("a token signed by another key must be rejected as such");
    };
    assert!(
        detail.contains("not signed by the key this relay trusts"),
        "{detail}"
    );
    // Nothing above disturbed the job's tunnel.
    let out = sshd.ssh("127.0.0.1", port, "echo still-here");
    assert_eq!(ok_stdout(&out).trim(), "still-here");
}

#[test]
fn mint_token_refuses_bad_names_and_open_keys_with_usage_errors() {
    let dir = scratch();
    let (private, _) = key_pair(dir.path(), "join");
    let run = |key: &Path, name: &str| {
        Command::new(bin("relay-server"))
            .args(["mint-token", "--key"])
            .arg(key)
            .args(["--name", name, "--audience", AUDIENCE])
            .output()
            .unwrap()
    };
    let out = run(&private, "not a name!");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid name")
            && stderr.contains("\"not a name!\"")
            && stderr.contains("may only contain letters, digits"),
        "the usage error does not name the bad name and the rule: {stderr}"
    );
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&private, "vh-exec-1");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
}
