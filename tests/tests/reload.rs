//! SIGHUP re-reads policy live: allowlists change and revoked tokens are cut off, while
//! established sessions that remain allowed keep going.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

fn nc_from(src: &str, port: u16) -> String {
    let out = std::process::Command::new("nc")
        .args(["-s", src, "-w", "3", "127.0.0.1", &port.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sighup_changes_allowlist_and_revokes_tokens_without_dropping_sessions() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "hup");
    let tokens = dir.path().join("tokens.toml");
    let write_tokens = |entries: &str| {
        std::fs::write(&tokens, entries).unwrap();
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    let keep = "keep-token-0123456789abcdef";
    let doomed = "doomed-token-0123456789abcdef";
    write_tokens(&format!(
        "[[token]]\nlabel = \"keep\"\ntoken = \"{keep}\"\nagents = [\"keeper\"]\n\n\
         [[token]]\nlabel = \"doomed\"\ntoken = \"{doomed}\"\nagents = [\"doomed-*\"]\n"
    ));
    let config = dir.path().join("relay.toml");
    let write_config = |allow: &str| {
        std::fs::write(
            &config,
            format!(
                "tokens_file = \"{}\"\nallow_cidr = [{allow}]\n",
                tokens.display()
            ),
        )
        .unwrap();
    };
    write_config("\"127.0.0.0/8\"");
    let relay = Relay::start(
        dir.path(),
        port_range(5),
        &["--config", config.to_str().unwrap()],
    );
    let token_of = |name: &str, value: &str| {
        let p = dir.path().join(name);
        write_secret(&p, value);
        p
    };
    let keep_file = token_of("keep.token", keep);
    let doomed_file = token_of("doomed.token", doomed);
    let keeper = Agent::start(
        dir.path(),
        &relay,
        "keeper",
        sshd.port,
        &["--token-file", keep_file.to_str().unwrap()],
    );
    let mut victim = Agent::start(
        dir.path(),
        &relay,
        "doomed-1",
        sshd.port,
        &["--token-file", doomed_file.to_str().unwrap()],
    );
    let port = keeper.wait_port(UP);
    victim.wait_port(UP);
    assert!(
        nc_from("127.0.0.2", port).contains("SSH-2.0"),
        "127.0.0.2 is allowed at first"
    );
    let mut session = EchoSession::start(&sshd, port);

    // Narrow the allowlist and revoke one token, then reload.
    write_config("\"127.0.0.1/32\"");
    write_tokens(&format!(
        "[[token]]\nlabel = \"keep\"\ntoken = \"{keep}\"\nagents = [\"keeper\"]\n"
    ));
    relay.proc.signal("HUP");
    relay.proc.wait_log("configuration reloaded", UP);
    relay.proc.wait_log(
        "disconnecting agent: its credential (token \"doomed\") was revoked",
        UP,
    );

    assert!(
        !nc_from("127.0.0.2", port).contains("SSH-2.0"),
        "127.0.0.2 must be refused after the reload"
    );
    relay
        .proc
        .wait_log("source address not in the relay's allowlist", UP);
    // The revoked agent's reconnect is refused, and it stops.
    assert_eq!(victim.proc.wait_exit(UP).and_then(|s| s.code()), Some(77));
    // The established session from an allowed address never noticed.
    session.send(100);
    session.finish();
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo after-reload")).trim(),
        "after-reload"
    );

    // A broken config on reload is reported and changes nothing.
    std::fs::write(&config, "allow_cidr = [\"not-a-cidr\"]\n").unwrap();
    relay.proc.signal("HUP");
    relay
        .proc
        .wait_log("reload failed, keeping the running configuration", UP);
    assert!(!nc_from("127.0.0.2", port).contains("SSH-2.0"));
    assert_eq!(
        ok_stdout(&sshd.ssh("127.0.0.1", port, "echo unchanged")).trim(),
        "unchanged"
    );
}
