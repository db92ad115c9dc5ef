//! A relay that asks too much (issue 23, finding 8): the real worker-agent binary against a
//! relay that grants 64 lanes and asks for 50 more, while the agent allows itself `--max-lanes
//! 2`. The agent opens one extra lane, not fifty.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jumpgate_proto::{
    Accepted, AgentHello, Allocation, Control, LaneGrant, RelayHello, Secret, PREFACE,
};
use jumpgate_transport::frame_io::{read_frame, write_frame};
use jumpgate_transport::mux::{Mode, MuxSettings, Session};
use jumpgate_transport::tls::{self, Fingerprint};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

/// Kills the agent when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A relay that accepts any agent, grants it `grant` connections and, once the agent's control
/// stream speaks, asks for `ask` lanes. Counts the lane hellos it receives.
async fn greedy_relay(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    grant: u16,
    ask: u16,
    lanes: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let mut held = Vec::new();
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted.unwrap().0,
        };
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut preface = vec![0u8; PREFACE.len()];
        tls.read_exact(&mut preface).await.unwrap();
        let hello: AgentHello = read_frame(&mut tls).await.unwrap();
        if hello.lane_of.is_some() {
            lanes.fetch_add(1, Ordering::SeqCst);
            write_frame(&mut tls, &RelayHello::LaneJoined)
                .await
                .unwrap();
            held.push(tls);
            continue;
        }
        let accepted = Accepted {
            version: hello.max_version,
            public_host: "127.0.0.1".into(),
            services: hello
                .services
                .iter()
                .map(|s| Allocation {
                    name: s.name.clone(),
                    port: 20022,
                    note: None,
                })
                .collect(),
            heartbeat_interval_ms: 10_000,
            heartbeat_timeout_ms: 30_000,
            router: None,
            lanes: Some(LaneGrant {
                key: Secret::new("lane-key-0123456789abcdef"),
                max: grant,
            }),
            members: Vec::new(),
            relay: None,
        };
        write_frame(&mut tls, &RelayHello::Accepted(accepted))
            .await
            .unwrap();
        let mut session = Session::start(tls.compat(), Mode::Server, MuxSettings::default());
        tokio::spawn(session.driver.run(stop.clone()));
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut control = session.inbound.recv().await.unwrap();
            let _first: Control = read_frame(&mut control).await.unwrap();
            write_frame(&mut control, &Control::OpenLane { count: ask })
                .await
                .unwrap();
            // Keep the session (and its control stream) open until the test ends.
            stop.cancelled().await;
            drop(control);
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cannot_make_the_agent_open_more_lanes_than_max_lanes() {
    let dir = tempfile::tempdir().unwrap();
    let cert = tls::generate_self_signed(&["localhost".into()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("relay.crt"), dir.path().join("relay.key"));
    std::fs::write(&cert_file, &cert.cert_pem).unwrap();
    std::fs::write(&key_file, &cert.key_pem).unwrap();
    let certs = tls::load_certs(&cert_file).unwrap();
    let pin = Fingerprint::of(&certs[0]).to_string();
    let config = tls::server_config(certs, tls::load_key(&key_file).unwrap(), None).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let lanes = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let relay = tokio::spawn(greedy_relay(
        listener,
        TlsAcceptor::from(config),
        64,
        50,
        lanes.clone(),
        stop.clone(),
    ));

    let token = dir.path().join("token");
    std::fs::write(&token, "agent-secret-token\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let log = dir.path().join("agent.log");
    let _agent = Killed(
        Command::new(assert_cmd::cargo::cargo_bin("worker-agent"))
            .args(["--server", &addr.to_string(), "--name", "lanes-1"])
            .args(["--fingerprint", &pin, "--max-lanes", "2"])
            .args(["--service", "ssh=127.0.0.1:1"])
            .arg("--token-file")
            .arg(&token)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // The one lane it may open arrives; then give fifty a chance to follow.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while lanes.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no lane came; agent log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        lanes.load(Ordering::SeqCst),
        1,
        "--max-lanes 2 is the session's connection plus one lane"
    );
    stop.cancel();
    let _ = relay.await;
}
