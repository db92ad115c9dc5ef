//! The systemd side of operating jumpgate: the shipped units verify, and the relay speaks the
//! notify protocol (ready, reloading, stopping) that `Type=notify` relies on.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use jumpgate_tests::*;

#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    if !require_tool("systemd-analyze", "systemd") {
        return;
    }
    let dir = scratch();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for unit in ["relay-server", "worker-agent"] {
        let text =
            std::fs::read_to_string(root.join(format!("deploy/systemd/{unit}.service"))).unwrap();
        assert!(text.contains("Type=notify") && text.contains("NoNewPrivileges=yes"));
        // Point ExecStart at the binaries just built, since verify checks they exist.
        let text = text.replace(
            &format!("/usr/local/bin/{unit}"),
            bin(unit).to_str().unwrap(),
        );
        std::fs::write(dir.path().join(format!("{unit}.service")), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("relay-server.service"))
        .arg(dir.path().join("worker-agent.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    assert!(
        !stderr.contains("relay-server.service") && !stderr.contains("worker-agent.service"),
        "warnings:\n{stderr}"
    );
}

#[test]
fn relay_notifies_ready_reloading_and_stopping() {
    let dir = scratch();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let range = port_range(2);
    let mut relay = Proc::spawn(
        "relay",
        Command::new(bin("relay-server"))
            .args([
                "--listen",
                &format!("127.0.0.1:{}", free_port()),
                "--public-host",
                "127.0.0.1",
                "--admin",
                "off",
            ])
            .args([
                "--port-range",
                &format!("{}-{}", range.0, range.1),
                "--drain-timeout",
                "1s",
            ])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("NOTIFY_SOCKET", &sock_path),
        dir.path(),
    );
    let next = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("no notification from the relay");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(next().starts_with("READY=1"));
    relay.signal("HUP");
    assert!(next().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert_eq!(next(), "READY=1");
    relay.signal("TERM");
    assert!(next().starts_with("STOPPING=1"));
    assert_eq!(
        relay
            .wait_exit(Duration::from_secs(20))
            .and_then(|s| s.code()),
        Some(0)
    );
}
