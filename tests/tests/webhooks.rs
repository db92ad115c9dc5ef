//! Lifecycle webhooks reach a real HTTP server in order, signed, and retried on failure.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::sync::mpsc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use jumpgate_tests::*;
use sha2::Sha256;

const UP: Duration = Duration::from_secs(30);

struct Hook {
    event: String,
    signature: String,
    body: String,
}

/// An HTTP server that answers 500 to the very first request and 200 after that.
fn hook_server() -> (u16, mpsc::Receiver<Hook>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let (mut event, mut signature, mut len) = (String::new(), String::new(), 0usize);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                let value = line
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_string())
                    .unwrap_or_default();
                if lower.starts_with("x-jumpgate-event:") {
                    event = value;
                } else if lower.starts_with("x-jumpgate-signature:") {
                    signature = value;
                } else if lower.starts_with("content-length:") {
                    len = value.parse().unwrap();
                }
            }
            let mut body = vec![0u8; len];
            reader.read_exact(&mut body).unwrap();
            let mut conn = conn;
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = tx.send(Hook {
                event,
                signature,
                body: String::from_utf8(body).unwrap(),
            });
        }
    });
    (port, rx)
}

#[test]
fn tunnel_events_arrive_in_order_signed_and_retried() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "hook");
    let (hook_port, hooks) = hook_server();
    let secret_file = dir.path().join("webhook.secret");
    std::fs::write(&secret_file, "webhook-signing-secret\n").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = format!("http://127.0.0.1:{hook_port}/jumpgate/events");
    let relay = Relay::start(
        dir.path(),
        port_range(3),
        &[
            "--webhook-url",
            &url,
            "--webhook-secret-file",
            secret_file.to_str().unwrap(),
            "--lease-ttl",
            "3s",
        ],
    );
    let mut agent = Agent::start(dir.path(), &relay, "hooked", sshd.port, &[]);
    // Up end to end before it is stopped, so that it stops rather than gets lost.
    let port = agent.wait_serving(&sshd, UP);
    agent.proc.signal("TERM");
    agent.proc.wait_exit(UP);

    let mut got = Vec::new();
    while got.len() < 4 {
        let hook = hooks
            .recv_timeout(UP)
            .unwrap_or_else(|_| panic!("only {} webhook requests arrived", got.len()));
        got.push(hook);
    }
    // The first delivery was answered 500 and retried with the same event.
    assert_eq!(got[0].event, "tunnel_up");
    assert_eq!(got[1].event, "tunnel_up");
    assert_eq!(got[0].body, got[1].body);
    relay
        .proc
        .wait_log("webhook delivery failed (HTTP 500); retrying", UP);
    let events: Vec<&str> = got[1..].iter().map(|h| h.event.as_str()).collect();
    assert_eq!(events, ["tunnel_up", "tunnel_down", "lease_expired"]);

    let mut last_seq = 0;
    for hook in &got[1..] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"webhook-signing-secret").unwrap();
        mac.update(hook.body.as_bytes());
        let expect: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hook.signature,
            format!("sha256={expect}"),
            "bad signature on {}",
            hook.body
        );
        let v: serde_json::Value = serde_json::from_str(&hook.body).unwrap();
        assert_eq!(v["event"], hook.event.as_str());
        assert_eq!(v["agent"], "hooked");
        assert_eq!(v["service"], "ssh");
        assert_eq!(v["port"], port);
        let seq = v["seq"].as_u64().unwrap();
        assert!(seq > last_seq);
        last_seq = seq;
    }
    let up: serde_json::Value = serde_json::from_str(&got[1].body).unwrap();
    assert_eq!(up["host"], "127.0.0.1");
    let down: serde_json::Value = serde_json::from_str(&got[2].body).unwrap();
    assert_eq!(down["reason"], "agent is stopping");
}
