//! Hostile join tokens (issue 23, finding 5): what a relay with a join key must refuse, and
//! what a rotation of that key must end. Each test is named after what it proves; together
//! they are the signed-token rows of the hostile-input suite (see tests/tests/hostile.rs for
//! the others).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use jumpgate_proto::{Refusal, RelayHello};
use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

/// The audience a relay whose public host is 127.0.0.1 expects by default.
const AUDIENCE: &str = "jumpgate:127.0.0.1";

/// A token with exactly these claims, signed with `key` (for tokens `mint-token` would not make).
fn signed(key: &Path, claims: serde_json::Value) -> String {
    let pem = std::fs::read(key).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap();
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn mint_token(args: &[&str]) -> std::process::Output {
    Command::new(bin("relay-server"))
        .arg("mint-token")
        .args(args)
        .output()
        .unwrap()
}

/// A relay trusting `public`, and a way to present a token to it as a raw agent.
struct Checker {
    relay: Relay,
}

impl Checker {
    fn start(dir: &Path, public: &Path, extra: &[&str]) -> Checker {
        let mut args = vec!["--join-key-file", public.to_str().unwrap()];
        args.extend_from_slice(extra);
        Checker {
            relay: Relay::start(dir, port_range(5), &args),
        }
    }

    fn answer(&self, name: &str, token: &str) -> RelayHello {
        let (addr, pin) = (self.relay.listen.clone(), self.relay.fingerprint());
        block_on(raw::exchange(&addr, &pin, &raw::hello(name, token, (1, 1))))
    }

    /// The refusal's detail; panics if the token was let in or refused for another reason.
    fn rejected(&self, name: &str, token: &str) -> String {
        match self.answer(name, token) {
            RelayHello::Refused(Refusal::TokenRejected { detail }) => detail,
            other => panic!("token for {name} not rejected as a token: {other:?}"),
        }
    }
}

#[test]
fn a_token_for_another_audience_or_none_is_refused() {
    let dir = scratch();
    let (private, public) = key_pair(dir.path(), "join");
    let relay = Checker::start(dir.path(), &public, &["--join-audience", "fleet-a"]);
    let exp = unix_now() + 600;
    // Minted for another fleet signed with the same key, or any JWT the platform signs without
    // an audience: both refused, with the audience this relay wants.
    let other = signed(
        &private,
        serde_json::json!({"sub": "aud-1", "aud": "fleet-b", "iat": unix_now(), "exp": exp}),
    );
    let detail = relay.rejected("aud-1", &other);
    assert!(
        detail.contains("another audience") && detail.contains("fleet-a"),
        "{detail}"
    );
    let none = signed(
        &private,
        serde_json::json!({"sub": "aud-1", "iat": unix_now(), "exp": exp}),
    );
    let detail = relay.rejected("aud-1", &none);
    assert!(detail.contains("no \"aud\" claim"), "{detail}");
    // The default audience (jumpgate:PUBLIC_HOST) is not this relay's once join_audience is set.
    let default = signed(
        &private,
        serde_json::json!({"sub": "aud-1", "aud": AUDIENCE, "iat": unix_now(), "exp": exp}),
    );
    assert!(relay
        .rejected("aud-1", &default)
        .contains("another audience"));
    // What mint-token makes for this fleet is let in.
    let out = mint_token(&[
        "--key",
        private.to_str().unwrap(),
        "--name",
        "aud-1",
        "--audience",
        "fleet-a",
    ]);
    let good = ok_stdout(&out).trim().to_string();
    let answer = relay.answer("aud-1", &good);
    assert!(matches!(answer, RelayHello::Accepted(_)), "{answer:?}");
}

#[test]
fn a_token_whose_nbf_is_in_the_future_is_refused() {
    let dir = scratch();
    let (private, public) = key_pair(dir.path(), "join");
    let relay = Checker::start(dir.path(), &public, &[]);
    let t = unix_now();
    let early = signed(
        &private,
        serde_json::json!({"sub": "nbf-1", "aud": AUDIENCE, "iat": t, "nbf": t + 120, "exp": t + 3600}),
    );
    let detail = relay.rejected("nbf-1", &early);
    assert!(detail.contains("not valid yet"), "{detail}");
}

#[test]
fn a_token_living_longer_than_the_maximum_is_refused_by_relay_and_mint_token() {
    let dir = scratch();
    let (private, public) = key_pair(dir.path(), "join");
    // The default maximum is 7 days.
    let relay = Checker::start(dir.path(), &public, &[]);
    let t = unix_now();
    let year = signed(
        &private,
        serde_json::json!({"sub": "life-1", "aud": AUDIENCE, "iat": t, "exp": t + 365 * 86400}),
    );
    let detail = relay.rejected("life-1", &year);
    assert!(detail.contains("join_max_lifetime"), "{detail}");
    // No iat or nbf: counted from now.
    let bare = signed(
        &private,
        serde_json::json!({"sub": "life-1", "aud": AUDIENCE, "exp": t + 8 * 86400}),
    );
    assert!(relay
        .rejected("life-1", &bare)
        .contains("join_max_lifetime"));
    // mint-token refuses to make one, by default and under a relay's own shorter maximum.
    let out = mint_token(&[
        "--key",
        private.to_str().unwrap(),
        "--name",
        "life-1",
        "--audience",
        AUDIENCE,
        "--ttl",
        "30d",
    ]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("join_max_lifetime"), "{stderr}");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "public_host = \"jump.example.com\"\njoin_max_lifetime = \"1h\"\n",
    )
    .unwrap();
    let from_config = |ttl: &str| {
        mint_token(&[
            "--key",
            private.to_str().unwrap(),
            "--name",
            "life-1",
            "--config",
            config.to_str().unwrap(),
            "--ttl",
            ttl,
        ])
    };
    let out = from_config("2h");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    // Within it: the audience comes from the relay's configuration too.
    let token = ok_stdout(&from_config("30m")).trim().to_string();
    let payload = token.split('.').nth(1).unwrap();
    let claims = decode_b64url(payload);
    assert!(
        claims.contains("\"aud\":\"jumpgate:jump.example.com\""),
        "{claims}"
    );
}

/// The JSON of a JWT's payload (base64url without padding).
fn decode_b64url(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in text.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn a_token_expired_30s_ago_is_refused() {
    let dir = scratch();
    let (private, public) = key_pair(dir.path(), "join");
    let relay = Checker::start(dir.path(), &public, &[]);
    let t = unix_now();
    let stale = signed(
        &private,
        serde_json::json!({"sub": "late-1", "aud": AUDIENCE, "iat": t - 3600, "exp": t - 30}),
    );
    let detail = relay.rejected("late-1", &stale);
    assert!(detail.contains("expired"), "{detail}");
}

#[test]
fn a_wildcard_subject_is_refused_by_mint_token_and_by_the_relay() {
    let dir = scratch();
    let (private, public) = key_pair(dir.path(), "join");
    for name in ["*", ""] {
        let out = mint_token(&[
            "--key",
            private.to_str().unwrap(),
            "--name",
            name,
            "--audience",
            AUDIENCE,
        ]);
        assert_eq!(out.status.code(), Some(64), "{name:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{name:?}: printed a token");
    }
    let out = mint_token(&[
        "--key",
        private.to_str().unwrap(),
        "--name",
        "*",
        "--audience",
        AUDIENCE,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("every name"), "{stderr}");

    let relay = Checker::start(dir.path(), &public, &[]);
    let t = unix_now();
    for sub in ["*", ""] {
        let token = signed(
            &private,
            serde_json::json!({"sub": sub, "aud": AUDIENCE, "iat": t, "exp": t + 600}),
        );
        let detail = relay.rejected("anyone-1", &token);
        assert!(detail.contains("subject"), "{sub:?}: {detail}");
    }
    // A prefix is still a subject.
    let prefix = signed(
        &private,
        serde_json::json!({"sub": "vh-*", "aud": AUDIENCE, "iat": t, "exp": t + 600}),
    );
    let answer = relay.answer("vh-9", &prefix);
    assert!(matches!(answer, RelayHello::Accepted(_)), "{answer:?}");
}

#[test]
fn rotating_the_join_key_on_reload_ends_old_key_sessions_only() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "rotate");
    let (old_key, join_pub) = key_pair(dir.path(), "join");
    let (new_key, new_pub) = key_pair(dir.path(), "join-next");
    let relay = Relay::start(
        dir.path(),
        port_range(10),
        &["--join-key-file", join_pub.to_str().unwrap()],
    );
    let token_file = |name: &str, key: &Path| {
        let out = mint_token(&[
            "--key",
            key.to_str().unwrap(),
            "--name",
            name,
            "--audience",
            AUDIENCE,
            "--ttl",
            "1h",
        ]);
        let path = dir.path().join(format!("{name}.token"));
        write_secret(&path, ok_stdout(&out).trim());
        path
    };
    let old_token = token_file("rot-old", &old_key);
    let mut old = Agent::start(
        dir.path(),
        &relay,
        "rot-old",
        sshd.port,
        &["--token-file", old_token.to_str().unwrap()],
    );
    let old_port = old.wait_serving(&sshd, UP);

    // The platform rotates: the relay's key file now holds the new public key.
    std::fs::copy(&new_pub, &join_pub).unwrap();
    relay.proc.signal("HUP");
    relay.proc.wait_log("configuration reloaded", UP);
    relay.proc.wait_log(
        "disconnecting agent: its credential (signed token for rot-old) was revoked",
        UP,
    );
    // The old-key agent is refused when it comes back, says why, and stops (77: refused).
    assert_eq!(old.proc.wait_exit(UP).and_then(|s| s.code()), Some(77));
    let log = old.proc.log();
    assert!(
        log.contains("not signed by the key this relay trusts"),
        "{log}"
    );
    let out = sshd.ssh("127.0.0.1", old_port, "echo still-open");
    assert!(!out.status.success(), "the old session's port still serves");

    // A new-key agent connects, and a reload that keeps the key leaves it alone.
    let new_token = token_file("rot-new", &new_key);
    let new = Agent::start(
        dir.path(),
        &relay,
        "rot-new",
        sshd.port,
        &["--token-file", new_token.to_str().unwrap()],
    );
    let new_port = new.wait_serving(&sshd, UP);
    relay.proc.signal("HUP");
    wait_until("the second reload", UP, || {
        (count(&relay.proc.log(), "configuration reloaded") == 2).then_some(())
    });
    assert!(!relay
        .proc
        .log()
        .contains("(signed token for rot-new) was revoked"));
    let out = sshd.ssh("127.0.0.1", new_port, "echo new-key");
    assert_eq!(ok_stdout(&out).trim(), "new-key");
}

#[test]
fn a_group_or_world_writable_join_key_file_stops_the_relay_with_exit_64() {
    let dir = scratch();
    let (_, public) = key_pair(dir.path(), "join");
    // The relay's exit code and stderr; it must exit by itself, before serving.
    let start = |tag: &str| {
        let (status, log) = Relay::builder(dir.path())
            .bare()
            .name(tag)
            .args(["--listen", "127.0.0.1:0", "--public-host", "127.0.0.1"])
            .args(["--admin", "off", "--port-range", "20000-20001"])
            .state_dir(&dir.path().join("state"))
            .arg("--join-key-file")
            .arg(&public)
            .exit_within(UP);
        (status.code(), log)
    };
    for mode in [0o666, 0o664] {
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(mode)).unwrap();
        let (code, log) = start(&format!("relay-{mode:o}"));
        assert_eq!(code, Some(64), "mode {mode:o}; log:\n{log}");
        assert!(
            log.contains("join_key_file")
                && log.contains("writable by group or others")
                && log.contains(&format!("chmod 644 {}", public.display())),
            "{log}"
        );
        // check-config finds it too, before anyone restarts the relay on it.
        let check = Command::new(bin("relay-server"))
            .args([
                "check-config",
                "--listen",
                "127.0.0.1:0",
                "--public-host",
                "127.0.0.1",
            ])
            .args(["--port-range", "20000-20001", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--join-key-file")
            .arg(&public)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert_eq!(
            check.status.code(),
            Some(64),
            "check-config, mode {mode:o}: {stderr}"
        );
        assert!(stderr.contains("writable by group or others"), "{stderr}");
    }
    // Readable by everyone is fine: it is a public key.
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
    Checker::start(dir.path(), &public, &[]);
}
