//! A user who stops reading must not make the relay or the agent buffer without bound.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use jumpgate_tests::*;

const UP: Duration = Duration::from_secs(30);

/// A target that writes an endless, checkable byte pattern to whoever connects.
fn firehose() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
                while conn.write_all(&chunk).is_ok() {}
            });
        }
    });
    port
}

#[test]
fn slow_reader_keeps_memory_flat_and_loses_nothing() {
    let dir = scratch();
    let target = firehose();
    let relay = Relay::start(dir.path(), port_range(5), &[]);
    let agent = Agent::start(dir.path(), &relay, "firehose", target, &[]);
    let port = agent.wait_port(UP);
    let (relay_pid, agent_pid) = (relay.proc.pid(), agent.proc.pid());
    let before = (rss_kib(relay_pid), rss_kib(agent_pid));

    let mut user = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // Read a little to be sure the stream is flowing, then stop reading for a while.
    let mut buf = vec![0u8; 1 << 20];
    user.read_exact(&mut buf[..4096]).unwrap();
    // Not a wait for an event: the stall itself is the test. For these 4 s the firehose pushes
    // and nobody reads; memory must stay flat throughout.
    std::thread::sleep(Duration::from_secs(4));
    let stalled = (rss_kib(relay_pid), rss_kib(agent_pid));

    // Now read 64 MiB and check every byte continues the pattern.
    let mut offset = 4096u64;
    let mut left = 64u64 << 20;
    user.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    while left > 0 {
        let n = user.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early");
        for (i, b) in buf[..n].iter().enumerate() {
            let expect = (((offset + i as u64) % 65536) % 251) as u8;
            assert_eq!(*b, expect, "corrupt byte at {}", offset + i as u64);
        }
        offset += n as u64;
        left = left.saturating_sub(n as u64);
    }
    let after = (rss_kib(relay_pid), rss_kib(agent_pid));
    eprintln!(
        "RSS KiB relay/agent: before {before:?}, stalled {stalled:?}, after 64 MiB {after:?}"
    );
    // While stalled the firehose would have pushed gigabytes; only windows and socket buffers
    // may be held, a few MiB at most.
    let limit = 24 * 1024;
    assert!(
        stalled.0 < before.0 + limit,
        "relay grew from {} to {} KiB",
        before.0,
        stalled.0
    );
    assert!(
        stalled.1 < before.1 + limit,
        "agent grew from {} to {} KiB",
        before.1,
        stalled.1
    );
    assert!(
        after.0 < before.0 + limit && after.1 < before.1 + limit,
        "{after:?}"
    );
}
