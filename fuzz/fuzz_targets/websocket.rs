//! The WebSocket side of the agent link: the relay's upgrade (the request an agent or ingress
//! sends, answered by tungstenite with the agent link's limits), then
//! `jumpgate_transport::ws::WsIo`, the message-to-byte-stream adapter both ends run, fed
//! arbitrary frames; and `forwarded_client`, which reads the client a trusted ingress names in
//! `Forwarded` / `X-Forwarded-For`. Must never panic; bytes out are bounded by bytes in.
#![no_main]

use jumpgate_transport::ws::tokio_tungstenite::tungstenite::protocol::Role;
use jumpgate_transport::ws::tokio_tungstenite::{self, WebSocketStream};
use jumpgate_transport::ws::{config, forwarded_client, WsIo, MAX_HOPS};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => run(input, false),
        1 => run(input, true),
        _ => forwarded(input),
    }
});

/// `input` as a client sends it to the relay: an upgrade request then frames (`upgrade`), or
/// frames on an upgraded connection; whatever the relay reads out of them is at most as long.
fn run(input: &[u8], upgrade: bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (relay_end, mut client) = tokio::io::duplex(input.len() + 64 * 1024);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let socket = if upgrade {
            let path_check =
                |request: &tokio_tungstenite::tungstenite::handshake::server::Request, response| {
                    let _ = request.headers().get_all("x-forwarded-for").iter().count();
                    Ok(response)
                };
            match tokio_tungstenite::accept_hdr_async_with_config(
                relay_end,
                path_check,
                Some(config()),
            )
            .await
            {
                Ok(socket) => socket,
                Err(_) => return,
            }
        } else {
            WebSocketStream::from_raw_socket(relay_end, Role::Server, Some(config())).await
        };
        let mut io = WsIo::new(socket);
        let mut out = Vec::new();
        let _ = io.read_to_end(&mut out).await;
        assert!(out.len() <= input.len());
        let _ = io.write_all(b"reply").await;
        let _ = io.shutdown().await;
        drop(client);
    });
}

/// `input` as header values: lines before the first NUL are `Forwarded` values, lines after
/// it `X-Forwarded-For` values; addresses in 10.0.0.0/8 are trusted.
fn forwarded(input: &[u8]) {
    let (fwd, xff) = match input.iter().position(|&b| b == 0) {
        Some(i) => (&input[..i], &input[i + 1..]),
        None => (&[][..], input),
    };
    let fwd: Vec<&[u8]> = if fwd.is_empty() {
        Vec::new()
    } else {
        fwd.split(|&b| b == b'\n').collect()
    };
    let xff: Vec<&[u8]> = if xff.is_empty() {
        Vec::new()
    } else {
        xff.split(|&b| b == b'\n').collect()
    };
    let trusted =
        |ip: std::net::IpAddr| matches!(ip, std::net::IpAddr::V4(v4) if v4.octets()[0] == 10);
    let named = forwarded_client(fwd.iter().copied(), xff.iter().copied(), trusted);
    if let Ok(Some(_)) = named {
        // A chain that named a client had at most MAX_HOPS entries.
        let entries = if fwd.is_empty() { &xff } else { &fwd };
        let hops: usize = entries
            .iter()
            .map(|v| v.split(|&b| b == b',').count())
            .sum();
        assert!(hops <= MAX_HOPS);
    }
}
