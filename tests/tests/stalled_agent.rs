//! An authenticated agent that stops reading must not stall the relay: its session ends within
//! one heartbeat timeout of the stall (timed from when its connection stopped taking bytes, not
//! from a control write begun later) even while it keeps pinging, an operator's disconnect takes
//! effect at once, and other agents and their users notice nothing.
//!
//! The misbehaving agent is built here by hand: it authenticates, opens its control stream and
//! keeps sending heartbeats, grants the relay a huge window on the first user stream, and never
//! reads a byte. A user pushing data to its port then fills the relay's socket towards it, so the
//! relay's answers on the control stream can no longer be written.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use jumpgate_proto::{encode, Control, RelayHello, PREFACE};
use jumpgate_tests::*;
use jumpgate_transport::tls::{self, Fingerprint, ServerTrust};
use tokio::io::AsyncWriteExt;
use tokio_rustls::TlsConnector;

const UP: Duration = Duration::from_secs(30);

/// One yamux frame header: version 0, `kind`, `flags`, stream, length (or window delta).
fn yamux_header(kind: u8, flags: u16, stream: u32, len: u32) -> Vec<u8> {
    let mut h = vec![0, kind];
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&stream.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

const DATA: u8 = 0;
const WINDOW_UPDATE: u8 = 1;
const SYN: u16 = 1;
/// The agent's control stream (agents open odd streams).
const CONTROL: u32 = 1;
/// The first stream the relay opens for a user (relays open even streams).
const FIRST_USER_STREAM: u32 = 2;

/// A ping on the control stream, as a yamux data frame (`syn` on the first).
fn ping(seq: u64, syn: bool) -> Vec<u8> {
    let body = encode(&Control::Ping { seq }).unwrap();
    let mut frame = yamux_header(DATA, if syn { SYN } else { 0 }, CONTROL, body.len() as u32);
    frame.extend_from_slice(&body);
    frame
}

/// Runs the misbehaving agent `name` on its own thread: sends its allocated port on `port_tx`,
/// then pings every 50 ms (so the relay's answers pile up quickly) and grants window on the first
/// user stream, never reading, until the relay closes the connection or a minute passes.
fn stalled_agent(relay: &Relay, name: &str, token: &str, port_tx: mpsc::Sender<u16>) {
    let (addr, pin) = (relay.listen.clone(), relay.fingerprint());
    let hello = raw::hello(name, token, (1, 1));
    std::thread::spawn(move || {
        block_on(async move {
            // A small receive buffer so the relay's writes back up quickly.
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
            let pin: Fingerprint = pin.parse().unwrap();
            let config = tls::client_config(ServerTrust::Pinned(vec![pin]), None).unwrap();
            let mut tls = TlsConnector::from(config)
                .connect(tls::server_name("localhost").unwrap(), tcp)
                .await
                .unwrap();
            tls.write_all(PREFACE).await.unwrap();
            jumpgate_transport::frame_io::write_frame(&mut tls, &hello)
                .await
                .unwrap();
            let reply: RelayHello = jumpgate_transport::frame_io::read_frame(&mut tls)
                .await
                .unwrap();
            let RelayHello::Accepted(accepted) = reply else {
                panic!("stalled agent refused: {reply:?}");
            };
            port_tx.send(accepted.services[0].port).unwrap();
            // From here on nothing is read.
            let began = Instant::now();
            let mut seq = 0;
            while began.elapsed() < Duration::from_secs(60) {
                let mut out = ping(seq, seq == 0);
                out.extend(yamux_header(WINDOW_UPDATE, 0, FIRST_USER_STREAM, 16 << 20));
                seq += 1;
                let write = tokio::time::timeout(Duration::from_secs(1), tls.write_all(&out));
                match write.await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return, // the relay closed the connection
                    Err(_) => {}          // our own send buffer is full: keep trying
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), tls.flush()).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    });
}

/// How far a [`flood`] got: bytes written so far, and whether its connection broke (or it
/// wrote everything).
#[derive(Clone, Default)]
struct Flood {
    written: Arc<AtomicU64>,
    ended: Arc<AtomicBool>,
}

impl Flood {
    /// Whether the flood is stuck: its connection is open and nothing more was written in
    /// 300 ms, after something was.
    fn stuck(&self) -> bool {
        let before = self.written.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        before > 0
            && self.written.load(Ordering::SeqCst) == before
            && !self.ended.load(Ordering::SeqCst)
    }
}

/// Connects to a user port (panicking if it cannot: a flood that never starts would let the
/// test pass without a stall) and pushes bytes until the connection breaks, on its own thread.
fn flood(port: u16) -> Flood {
    let mut user = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| {
        panic!("the flood cannot connect to the stalled agent's port {port}: {e}")
    });
    let progress = Flood::default();
    let seen = progress.clone();
    std::thread::spawn(move || {
        let chunk = vec![0x5a; 64 * 1024];
        for _ in 0..1024 {
            if user.write_all(&chunk).is_err() {
                break;
            }
            seen.written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        seen.ended.store(true, Ordering::SeqCst);
    });
    progress
}

fn agent_listed(relay: &Relay, name: &str) -> bool {
    let (status, body) = relay.admin("GET", "/api/agents");
    assert_eq!(status, 200, "{body}");
    body.contains(&format!("\"name\":\"{name}\""))
}

#[test]
fn an_agent_that_stops_reading_is_torn_down_and_disturbs_no_one() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "stalled");
    let heartbeat_timeout = Duration::from_secs(4);
    let relay = Relay::start(
        dir.path(),
        port_range(20),
        &["--heartbeat-interval", "1s", "--heartbeat-timeout", "4s"],
    );
    let token = std::fs::read_to_string(relay.token_file()).unwrap();
    let good = Agent::start(dir.path(), &relay, "good-1", sshd.port, &[]);
    let mut session = EchoSession::start(&sshd, good.wait_port(UP));

    let (port_tx, port_rx) = mpsc::channel();
    stalled_agent(&relay, "stalled-1", token.trim(), port_tx);
    let stalled_port = port_rx.recv_timeout(UP).unwrap();
    let flooding_began = Instant::now();
    let flooding = flood(stalled_port);
    // The session really is stalled (the user's bytes stop moving with its connection still
    // open) before the relay ends it: otherwise the teardown below would prove nothing. It was
    // stalled from the start of the 300 ms in which nothing moved, at the latest.
    let stall_began = wait_until(
        "the flood to stall behind the agent that does not read",
        UP,
        || {
            let window = Instant::now();
            flooding.stuck().then_some(window)
        },
    );
    let stalled_after = stall_began - flooding_began;
    assert!(
        !relay
            .proc
            .log()
            .contains("name=\"stalled-1\"}: agent disconnected"),
        "the session ended before it was seen stalled:\n{}",
        relay.proc.log()
    );
    assert!(agent_listed(&relay, "stalled-1"));
    eprintln!(
        "stalled after {stalled_after:?}, {} bytes in",
        flooding.written.load(Ordering::SeqCst)
    );

    // While the stalled session is stuck, others come and go and their users are served.
    session.send(32);
    let other = Agent::start(dir.path(), &relay, "good-2", sshd.port, &[]);
    let other_port = other.wait_port(UP);
    let out = sshd.ssh("127.0.0.1", other_port, "echo through-good-2");
    assert_eq!(ok_stdout(&out).trim(), "through-good-2");
    drop(other);
    let again = Agent::start(dir.path(), &relay, "good-2", sshd.port, &[]);
    assert_eq!(
        again.wait_port(UP),
        other_port,
        "a reconnecting agent keeps its port"
    );
    session.send(32);

    // The stalled session ends on its own, although its pings keep arriving: the heartbeat
    // answer cannot be written, or the kernel gives up on the unread connection (the agent
    // leg's TCP user timeout is the heartbeat timeout), whichever comes first.
    // One heartbeat timeout from the stall (module doc), plus 1 s of margin for a loaded 2-core
    // host and for the up to 300 ms by which `stall_began` may trail the relay's socket filling
    // (it can only be earlier than `stall_began`). Before the relay timed the stall from its
    // socket: about 4.2 s, or 8.6 s in about one run of three, when a ping was read ~4.2 s into
    // the stall and its answer then could not be written within 4 s.
    relay.proc.wait_log(
        "name=\"stalled-1\"}: agent disconnected",
        heartbeat_timeout * 5,
    );
    let took = stall_began.elapsed();
    eprintln!("the stalled session ended {took:?} after it stalled");
    let bound = heartbeat_timeout + Duration::from_secs(1);
    assert!(
        took < bound,
        "the stalled session took {took:?} to end (heartbeat timeout {heartbeat_timeout:?}, bound {bound:?}):\n{}",
        relay.proc.log()
    );
    assert!(
        flooding.ended.load(Ordering::SeqCst)
            || wait_for(UP, || flooding.ended.load(Ordering::SeqCst).then_some(())).is_some(),
        "the flood's connection stayed open after the session ended"
    );
    assert!(wait_for(UP, || (!agent_listed(&relay, "stalled-1")).then_some(())).is_some());
    session.send(32);
    session.finish();
}

#[test]
fn an_operators_disconnect_ends_a_stalled_session_at_once() {
    let dir = scratch();
    let sshd = Sshd::start(dir.path(), "stalled-delete");
    // A long heartbeat timeout: only the operator's request can end the session in this test.
    let relay = Relay::start(
        dir.path(),
        port_range(20),
        &["--heartbeat-interval", "1s", "--heartbeat-timeout", "60s"],
    );
    let token = std::fs::read_to_string(relay.token_file()).unwrap();
    let good = Agent::start(dir.path(), &relay, "good-1", sshd.port, &[]);
    let mut session = EchoSession::start(&sshd, good.wait_port(UP));

    let (port_tx, port_rx) = mpsc::channel();
    stalled_agent(&relay, "stalled-2", token.trim(), port_tx);
    let stalled_port = port_rx.recv_timeout(UP).unwrap();
    let flooding = flood(stalled_port);
    wait_until(
        "the flood to stall behind the agent that does not read",
        UP,
        || flooding.stuck().then_some(()),
    );
    // Let several heartbeat answers pile up behind the full socket (this wait is the scenario:
    // there is nothing to observe from outside but time passing while the agent does not read).
    std::thread::sleep(Duration::from_secs(3));

    let asked = Instant::now();
    let (status, body) = relay.admin("DELETE", "/api/agents/stalled-2");
    let took = asked.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"disconnected\":true"), "{body}");
    assert!(
        took < Duration::from_secs(5),
        "disconnecting a stalled agent took {took:?}"
    );
    assert!(!agent_listed(&relay, "stalled-2"));
    session.send(32);
    session.finish();
}
