//! The agent's side of a proxy exchange (`worker_agent::proxy::ask_proxy`) against whatever a
//! proxy answers: an HTTP CONNECT response head (httparse, the agent's checks and refusal text)
//! or SOCKS5 replies (method choice, password verdict, the CONNECT reply with its address), with
//! and without credentials. The answer is the input after a first byte choosing the proxy; it
//! ends where the input ends. Must never panic, and a success must leave the tunnel unread.
#![no_main]

use jumpgate_proto::Secret;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use worker_agent::proxy::{ask_proxy, Choice, Proxy};

const PROXIES: [&str; 4] = [
    "http://proxy.example:3128",
    "http://user@proxy.example:3128",
    "socks5h://proxy.example:1080",
    "socks5h://user@proxy.example:1080",
];

fuzz_target!(|data: &[u8]| {
    let Some((&choice, answer)) = data.split_first() else {
        return;
    };
    let url = PROXIES[usize::from(choice) % PROXIES.len()];
    let password = url.contains("user@").then(|| Secret::new("pw"));
    let Ok(Some(proxy)) = Proxy::resolve(Choice::Url(url.into()), |_| None, password, None) else {
        panic!("the fixed proxy URL {url} did not parse");
    };
    // The relay by address for one half of the inputs, by name (asked of the proxy) for the other.
    let addr = (choice & 0x80 != 0).then(|| "192.0.2.1:7000".parse().unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        // The proxy's end holds the whole answer, then EOF; the agent's requests fit the buffer.
        let (agent, mut proxy_end) = tokio::io::duplex(answer.len() + 64 * 1024);
        proxy_end.write_all(answer).await.unwrap();
        proxy_end.shutdown().await.unwrap();
        if let Ok(mut tunnel) = ask_proxy(agent, &proxy, "relay.example", 7000, addr).await {
            // Whatever followed the answer is the relay's, still readable.
            let mut rest = Vec::new();
            let _ = tunnel.read_to_end(&mut rest).await;
            assert!(rest.len() <= answer.len());
        }
        drop(proxy_end);
    });
});
