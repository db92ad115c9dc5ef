//! The relay's command line: configuration mistakes exit 64 and name what is wrong.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::os::unix::fs::PermissionsExt;

use assert_cmd::Command;

fn relay() -> Command {
    Command::cargo_bin("relay-server").unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn unknown_config_key_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        "port_range = \"10000-10010\"\npublic_host = \"h\"\nlisten_addr = \"x\"\n",
    )
    .unwrap();
    let out = relay()
        .arg("check-config")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("listen_addr"), "{}", stderr(&out));
}

#[test]
fn bad_values_and_flags_exit_64() {
    let out = relay()
        .args(["check-config", "--port-range", "9-1", "--public-host", "h"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("port_range"), "{}", stderr(&out));

    let out = relay().args(["--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));

    let out = relay()
        .args([
            "check-config",
            "--port-range",
            "10-20",
            "--listen",
            "0.0.0.0:7000",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("public_host"), "{}", stderr(&out));
}

#[test]
fn check_config_accepts_a_good_file_and_masks_nothing_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:7000\"\npublic_host = \"relay.example.com\"\nport_range = \"10000-50000\"\nlease_ttl = \"12h\"\n",
    )
    .unwrap();
    let out = relay()
        .arg("check-config")
        .arg("-c")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("relay.example.com"));
    assert!(text.contains("43200s"), "{text}");
}

#[test]
fn fingerprint_is_created_once_and_stable() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let pin = |_: ()| {
        let out = relay()
            .arg("fingerprint")
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let first = pin(());
    assert!(
        first.starts_with("sha256:") && first.len() == 7 + 64,
        "{first}"
    );
    assert_eq!(pin(()), first);
    let mode = std::fs::metadata(state.join("tls-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "generated key must be private");
}

#[test]
fn world_readable_token_file_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token-value\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = relay()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--public-host",
            "127.0.0.1",
            "--port-range",
            "20000-20001",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--token-file")
        .arg(&token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("chmod 600 {}", token.display())),
        "{err}"
    );
    assert!(!err.contains("s3cret-token-value"));
}

/// Every subcommand reads the configuration through the same validation: a certificate without
/// its key is refused everywhere with the same message (flag or file), before anything is done.
#[test]
fn a_certificate_without_key_is_refused_by_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    std::fs::write(&cfg, "tls_cert = \"/nonexistent/relay.crt\"\n").unwrap();
    let state = dir.path().join("state");
    let runs: [&[&str]; 6] = [
        &["--port-range", "10000-10010", "--public-host", "h"],
        &[
            "check-config",
            "--port-range",
            "10000-10010",
            "--public-host",
            "h",
        ],
        &["fingerprint"],
        &["tunnels"],
        &["ssh-config"],
        &[
            "ssh-config",
            "--router",
            "--router-listen",
            "127.0.0.1:7443",
        ],
    ];
    for args in runs {
        for from_file in [false, true] {
            let mut cmd = relay();
            cmd.args(args).arg("--state-dir").arg(&state);
            if from_file {
                cmd.arg("--config").arg(&cfg);
            } else {
                cmd.args(["--tls-cert", "/nonexistent/relay.crt"]);
            }
            let out = cmd.output().unwrap();
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
            assert!(
                err.contains(
                    "invalid tls_cert/tls_key: give both --tls-cert and --tls-key, or neither"
                ),
                "{args:?}: {err}"
            );
        }
    }
    assert!(
        !state.exists(),
        "nothing may be created for a refused config"
    );
}

#[test]
fn an_admin_token_that_cannot_be_a_header_exits_64_without_showing_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "s3cret-admin\nX-Injected: 1\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = relay()
        .args(["tunnels", "--admin", "127.0.0.1:1", "--admin-token-file"])
        .arg(&token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "the admin token in {} holds characters",
            token.display()
        )),
        "{err}"
    );
    assert!(
        !err.contains("s3cret-admin") && !err.contains("X-Injected"),
        "{err}"
    );
}

#[test]
fn a_database_behind_a_local_name_but_a_remote_hostaddr_gets_tls_and_bad_pairs_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let check = |url: &str| {
        let cfg = dir.path().join("relay.toml");
        std::fs::write(
            &cfg,
            format!(
                "public_host = \"relay.example.com\"\nport_range = \"10000-50000\"\n\
                 lease_store = \"postgres\"\nlease_store_url = \"{url}\"\n"
            ),
        )
        .unwrap();
        relay()
            .arg("check-config")
            .arg("-c")
            .arg(&cfg)
            .output()
            .unwrap()
    };
    // `host` is only the name TLS checks; `hostaddr` is where the connection goes.
    let out = check("host=localhost hostaddr=203.0.113.5 user=jumpgate dbname=jumpgate");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tls: Require"), "{text}");
    let out = check("host=localhost hostaddr=127.0.0.1 user=jumpgate dbname=jumpgate");
    assert!(String::from_utf8_lossy(&out.stdout).contains("tls: Disable"));
    // Hosts and hostaddrs that do not pair up are refused before anything connects.
    let out = check("host=localhost,db.example hostaddr=127.0.0.1 user=jumpgate");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("lease_store_url"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("one hostaddr per host"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_listener_that_cannot_bind_names_its_setting() {
    let dir = tempfile::tempdir().unwrap();
    // Another process (another relay, say) holds this address.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let run = |listen: &str, admin: &str, router: Option<&str>| {
        let mut cmd = relay();
        cmd.args([
            "--listen",
            listen,
            "--admin",
            admin,
            "--port-range",
            "40000-40009",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"));
        if let Some(router) = router {
            cmd.args(["--router-listen", router]);
        }
        cmd.timeout(std::time::Duration::from_secs(20))
            .output()
            .unwrap()
    };
    for (out, flag, key, what) in [
        (
            run(&taken, "off", None),
            "--listen",
            "`listen`",
            "the agent port",
        ),
        (
            run(&free(), &taken, None),
            "--admin",
            "`admin`",
            "the admin API",
        ),
        (
            run(&free(), "off", Some(&taken)),
            "--router-listen",
            "`router_listen`",
            "the name router",
        ),
    ] {
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(69), "{err}");
        assert!(
            err.contains(&format!("cannot listen on {taken} for {what}")),
            "{err}"
        );
        assert!(err.contains(flag) && err.contains(key), "{err}");
        assert!(err.contains("another process"), "{err}");
    }
}
