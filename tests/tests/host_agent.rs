//! Host mode, agent side (issue 28): the real worker-agent run with `--host-mode`, carrying the
//! tunnels of several jobs (each its own name, token, sshd and port) over one host session to
//! the real relay-server; real OpenSSH through each. Tunnels come from the config file's
//! `[[tunnel]]` tables and are added and removed by rewriting it and sending SIGHUP.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(60);

const HOST: &str = "host-token-0123456789abcdef";
const JOBS: [(&str, &str); 3] = [
    ("vh-a", "job-a-token-0123456789abcdef"),
    ("vh-b", "job-b-token-0123456789abcdef"),
    ("vh-c", "job-c-token-0123456789abcdef"),
];

/// A relay whose tokens file lets the host token hold host sessions (names `gpu-*`) and each
/// job's token claim that job's name only.
fn relay(dir: &Path) -> Relay {
    let mut entries = vec![("hosts", HOST, "gpu-*")];
    entries.extend(JOBS.iter().map(|(name, token)| (*name, *token, *name)));
    let file = tokens_file(dir, &entries);
    Relay::start(
        dir,
        port_range(8),
        &["--tokens-file", file.to_str().unwrap()],
    )
}

/// The host agent's config file with a `[[tunnel]]` table for each of `tunnels` (name, sshd).
fn write_config(dir: &Path, tunnels: &[(&str, &Sshd)]) -> PathBuf {
    let mut text = String::from("host_mode = true\n");
    for (name, sshd) in tunnels {
        let token = JOBS.iter().find(|(n, _)| n == name).unwrap().1;
        let token_file = dir.join(format!("{name}.token"));
        write_secret(&token_file, token);
        text.push_str(&format!(
            "\n[[tunnel]]\nname = \"{name}\"\ntoken_file = \"{}\"\nservice = [\"ssh=127.0.0.1:{}\"]\n",
            token_file.display(),
            sshd.port
        ));
    }
    let path = dir.join("host.toml");
    // Atomic, so a reload never reads half a file.
    let tmp = dir.join("host.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn start_host(dir: &Path, relay: &Relay, config: &Path) -> Agent {
    let host_token = dir.join("host.token");
    write_secret(&host_token, HOST);
    Agent::builder(dir, "gpu-1")
        .relay(relay)
        .token_file(&host_token)
        .args([
            "--host-mode",
            "-c",
            config.to_str().unwrap(),
            "--tunnel-status-dir",
            dir.join("tunnels").to_str().unwrap(),
        ])
        .start()
}

/// Tunnel `name`'s port from its status file, once its relay placed it.
fn tunnel_port(dir: &Path, name: &str) -> Option<u16> {
    let v = status_json(&dir.join("tunnels").join(format!("{name}.json")))?;
    (v["relays"][0]["state"] == "connected").then_some(())?;
    v["services"][0]["port"].as_u64().map(|p| p as u16)
}

/// Waits until `sshd` answers as itself through `port`.
fn serving(sshd: &Sshd, port: u16, agent: &Agent) {
    let reached = wait_for(UP, || {
        let out = sshd.ssh("127.0.0.1", port, "echo $JG_WHO");
        (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == sshd.tag)
            .then_some(())
    });
    if reached.is_none() {
        panic!(
            "no ssh to {} through port {port}; agent log:\n{}",
            sshd.tag,
            agent.proc.log()
        );
    }
}

fn have_tools() -> bool {
    require_tools(&[
        ("sshd", "openssh-server"),
        ("ssh", "openssh-client"),
        ("scp", "openssh-client"),
    ])
}

#[test]
fn three_tunnels_each_their_own_port_and_removing_one_leaves_a_transfer_intact() {
    if !have_tools() {
        return;
    }
    let dir = scratch();
    let relay = relay(dir.path());
    let sshds: Vec<Sshd> = JOBS
        .iter()
        .map(|(name, _)| Sshd::start(dir.path(), name))
        .collect();
    let all: Vec<(&str, &Sshd)> = JOBS.iter().map(|(n, _)| *n).zip(sshds.iter()).collect();
    let config = write_config(dir.path(), &all);
    let agent = start_host(dir.path(), &relay, &config);

    // Each tunnel on a port of its own, reaching its own sshd.
    let ports: Vec<u16> = JOBS
        .iter()
        .map(|(name, _)| {
            wait_for(UP, || tunnel_port(dir.path(), name))
                .unwrap_or_else(|| panic!("tunnel {name} never placed; log:\n{}", agent.proc.log()))
        })
        .collect();
    let mut distinct = ports.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{ports:?}");
    for (sshd, port) in sshds.iter().zip(&ports) {
        serving(sshd, *port, &agent);
    }
    agent.proc.wait_log("vh-a: ssh enabled on", UP);
    // One host session: one connected relay in the host's own status file, no services.
    let own = status_json(&agent.status_file).unwrap();
    assert_eq!(own["services"].as_array().map(Vec::len), Some(0), "{own}");

    // A slow scp through vh-b (about 6 s at 40 Mbit/s), running while vh-a is removed.
    let src = dir.path().join("up.bin");
    let hash = random_file(&src, 32 << 20);
    let remote = dir.path().join("remote.bin");
    let mut scp = Command::new("scp")
        .args(sshds[1].client_opts())
        .args(["-l", "40000", "-P", &ports[1].to_string()])
        .arg(&src)
        .arg(format!("root@127.0.0.1:{}", remote.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the transfer to start", UP, || {
        std::fs::metadata(&remote)
            .ok()
            .filter(|m| m.len() > 1 << 20)
            .map(|_| ())
    });

    write_config(dir.path(), &[all[1], all[2]]);
    agent.proc.signal("HUP");
    wait_until("vh-a's status file to go", UP, || {
        (!dir.path().join("tunnels/vh-a.json").exists()).then_some(())
    });
    // The relay ended the tunnel (not just the agent refusing its streams).
    relay.proc.wait_log("tunnel unregistered; lease kept", UP);
    assert!(!sshds[0].ssh("127.0.0.1", ports[0], "true").status.success());
    assert!(
        scp.try_wait().unwrap().is_none(),
        "the transfer ended before the removal; make it slower"
    );
    let out = scp.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "scp through vh-b failed across vh-a's removal: {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.proc.log()
    );
    assert_eq!(sha256_file(&remote), hash);
    // The others are untouched; vh-a comes back on its port when the file lists it again.
    serving(&sshds[2], ports[2], &agent);
    write_config(dir.path(), &all);
    agent.proc.signal("HUP");
    serving(&sshds[0], ports[0], &agent);
    assert!(
        !agent.proc.log().contains(JOBS[0].1),
        "a job's token was logged"
    );
}

#[test]
fn after_a_relay_kill_every_tunnel_comes_back_on_its_port() {
    if !have_tools() {
        return;
    }
    let dir = scratch();
    let mut relay = relay(dir.path());
    let sshds: Vec<Sshd> = JOBS
        .iter()
        .map(|(name, _)| Sshd::start(dir.path(), name))
        .collect();
    let all: Vec<(&str, &Sshd)> = JOBS.iter().map(|(n, _)| *n).zip(sshds.iter()).collect();
    let config = write_config(dir.path(), &all);
    // One more tunnel, with a token for another job's name: the relay refuses it alone.
    let stolen = dir.path().join("vh-x.token");
    write_secret(&stolen, JOBS[0].1);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[tunnel]]\nname = \"vh-x\"\ntoken_file = \"{}\"\nservice = [\"ssh=127.0.0.1:{}\"]\n",
        stolen.display(),
        sshds[0].port
    ));
    std::fs::write(&config, text).unwrap();
    let agent = start_host(dir.path(), &relay, &config);
    let ports: Vec<u16> = JOBS
        .iter()
        .map(|(name, _)| wait_for(UP, || tunnel_port(dir.path(), name)).unwrap())
        .collect();
    // Refused by every relay: the add fails with the relay's reason, and the tunnel is not
    // kept (no status file), so the platform sees the error rather than a tunnel that never
    // comes up.
    agent.proc.wait_log("tunnel \"vh-x\" refused: ", UP);
    assert!(
        agent.proc.log().contains("may not use the name \"vh-x\""),
        "{}",
        agent.proc.log()
    );
    assert!(!dir.path().join("tunnels/vh-x.json").exists());
    for (sshd, port) in sshds.iter().zip(&ports) {
        serving(sshd, *port, &agent);
    }

    relay.kill_and_restart();
    for (sshd, port) in sshds.iter().zip(&ports) {
        serving(sshd, *port, &agent);
    }
    for ((name, _), port) in JOBS.iter().zip(&ports) {
        assert_eq!(
            wait_for(UP, || tunnel_port(dir.path(), name)),
            Some(*port),
            "{name}"
        );
    }
    assert!(
        !agent.proc.log().contains(JOBS[0].1),
        "a job's token was logged"
    );
}

/// A relay of protocol version 2 (before host sessions), spoken by hand: it accepts every hello,
/// places each service on a made-up port, answers heartbeats, records each session's hello and
/// control frames, and lets the test open a user's stream into any session by name.
mod old_relay {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use jumpgate_proto::{
        Accepted, AgentHello, Allocation, Control, RelayHello, StreamOpen, StreamReply, PREFACE,
    };
    use jumpgate_transport::frame_io::{read_frame, write_frame};
    use jumpgate_transport::mux::{Mode, MuxSettings, Opener, Session};
    use jumpgate_transport::tls::{self, Fingerprint};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    /// What the relay saw of one session, by agent name.
    #[derive(Default)]
    pub struct Seen {
        pub hellos: Vec<AgentHello>,
        pub frames: HashMap<String, Vec<Control>>,
        openers: HashMap<String, Opener>,
    }

    pub struct OldRelay {
        pub addr: String,
        pub pin: String,
        pub seen: Arc<Mutex<Seen>>,
        pub rt: tokio::runtime::Runtime,
    }

    /// The port this relay gives service `service` of agent `name` (stable, made up).
    pub fn port_of(name: &str, service: &str) -> u16 {
        let h = name
            .bytes()
            .chain(service.bytes())
            .fold(7u16, |h, b| h.wrapping_mul(31).wrapping_add(u16::from(b)));
        20_000 + h % 10_000
    }

    impl OldRelay {
        pub fn start() -> OldRelay {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let cert = tls::generate_self_signed(&["127.0.0.1".into()]).unwrap();
            let certs = vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()];
            let pin = Fingerprint::of(&certs[0]).to_string();
            let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
            let acceptor =
                tokio_rustls::TlsAcceptor::from(tls::server_config(certs, key, None).unwrap());
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let seen: Arc<Mutex<Seen>> = Arc::default();
            let seen2 = seen.clone();
            rt.spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (acceptor, seen) = (acceptor.clone(), seen2.clone());
                    tokio::spawn(async move {
                        let Ok(mut s) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let mut preface = vec![0u8; PREFACE.len()];
                        if s.read_exact(&mut preface).await.is_err() {
                            return;
                        }
                        let Ok(hello) = read_frame::<_, AgentHello>(&mut s).await else {
                            return;
                        };
                        let accepted = Accepted {
                            version: 2,
                            public_host: "127.0.0.1".into(),
                            services: hello
                                .services
                                .iter()
                                .map(|r| Allocation {
                                    name: r.name.clone(),
                                    port: port_of(&hello.name, &r.name),
                                    note: None,
                                })
                                .collect(),
                            heartbeat_interval_ms: 1000,
                            heartbeat_timeout_ms: 10_000,
                            router: None,
                            lanes: None,
                            members: vec![],
                            relay: None,
                        };
                        if write_frame(&mut s, &RelayHello::Accepted(accepted))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        let name = hello.name.clone();
                        let mux = Session::start(s.compat(), Mode::Server, MuxSettings::default());
                        let stop = tokio_util::sync::CancellationToken::new();
                        tokio::spawn(mux.driver.run(stop.clone()));
                        {
                            let mut seen = seen.lock().unwrap();
                            seen.hellos.push(hello);
                            seen.openers.insert(name.clone(), mux.opener);
                        }
                        let mut inbound = mux.inbound;
                        let Some(ctrl) = inbound.recv().await else {
                            return;
                        };
                        let (mut r, mut w) = tokio::io::split(ctrl);
                        while let Ok(frame) = read_frame::<_, Control>(&mut r).await {
                            if let Control::Ping { seq } = frame {
                                let _ = write_frame(&mut w, &Control::Pong { seq }).await;
                            }
                            let mut seen = seen.lock().unwrap();
                            seen.frames.entry(name.clone()).or_default().push(frame);
                        }
                        stop.cancel();
                    });
                }
            });
            OldRelay {
                addr,
                pin,
                seen,
                rt,
            }
        }

        /// A user's connection into session `name`'s `ssh` service, as the relay would open
        /// it: the first line the target sends (an sshd's banner), or why not.
        pub fn first_line(&self, name: &str) -> Result<String, String> {
            let opener = self.seen.lock().unwrap().openers.get(name).cloned();
            let opener = opener.ok_or("no session of that name")?;
            self.rt.block_on(async {
                let mut s = opener.open().await.map_err(|e| e.to_string())?;
                let open = StreamOpen {
                    service: "ssh".into(),
                    peer: "127.0.0.1:1".into(),
                    tunnel: None,
                };
                write_frame(&mut s, &open)
                    .await
                    .map_err(|e| e.to_string())?;
                match read_frame::<_, StreamReply>(&mut s)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    StreamReply::Connected => {}
                    other => return Err(format!("{other:?}")),
                }
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while !line.ends_with(b"\n") {
                    s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
                    line.push(byte[0]);
                }
                let _ = s.shutdown().await;
                Ok(String::from_utf8_lossy(&line).into_owned())
            })
        }
    }
}

#[test]
fn a_relay_older_than_host_sessions_gets_one_session_per_tunnel() {
    if !have_tools() {
        return;
    }
    let dir = scratch();
    let relay = old_relay::OldRelay::start();
    let sshds: Vec<Sshd> = JOBS[..2]
        .iter()
        .map(|(name, _)| Sshd::start(dir.path(), name))
        .collect();
    let all: Vec<(&str, &Sshd)> = JOBS.iter().map(|(n, _)| *n).zip(sshds.iter()).collect();
    let config = write_config(dir.path(), &all);
    let host_token = dir.path().join("host.token");
    write_secret(&host_token, HOST);
    let agent = Agent::builder(dir.path(), "gpu-1")
        .server(&relay.addr)
        .fingerprint(&relay.pin)
        .token_file(&host_token)
        .args([
            "--host-mode",
            "-c",
            config.to_str().unwrap(),
            "--tunnel-status-dir",
            dir.path().join("tunnels").to_str().unwrap(),
        ])
        .start();

    // Each tunnel's own session, with its own name, token and service, reaches its own sshd,
    // and its status file has the port the relay gave it.
    for ((name, token), sshd) in JOBS.iter().zip(&sshds) {
        let banner = wait_for(UP, || relay.first_line(name).ok())
            .unwrap_or_else(|| panic!("no session for {name}; agent log:\n{}", agent.proc.log()));
        assert!(banner.starts_with("SSH-2.0-"), "{banner:?}");
        let seen = relay.seen.lock().unwrap();
        let hello = seen.hellos.iter().find(|h| h.name == *name).unwrap();
        assert_eq!(hello.token.as_ref().map(|t| t.expose()), Some(*token));
        assert!(!hello.host);
        assert_eq!(hello.services.len(), 1);
        assert_eq!(hello.services[0].target_port, sshd.port);
        drop(seen);
        assert_eq!(
            wait_for(UP, || tunnel_port(dir.path(), name)),
            Some(old_relay::port_of(name, "ssh"))
        );
    }
    let host_hellos: Vec<bool> = relay
        .seen
        .lock()
        .unwrap()
        .hellos
        .iter()
        .filter(|h| h.name == "gpu-1")
        .map(|h| h.host && h.services.is_empty())
        .collect();
    assert_eq!(host_hellos, [true], "one host session, saying so");

    // Removing a tunnel ends its own session there (with a release), and only that one.
    write_config(dir.path(), &[all[1]]);
    agent.proc.signal("HUP");
    wait_until("vh-a's session to be released", UP, || {
        relay.seen.lock().unwrap().frames["vh-a"]
            .contains(&jumpgate_proto::Control::Release)
            .then_some(())
    });
    assert!(relay.first_line("vh-b").unwrap().starts_with("SSH-2.0-"));
    assert!(!relay.seen.lock().unwrap().frames["vh-b"].contains(&jumpgate_proto::Control::Release));
}
