//! A hand-driven agent-port client, for speaking broken or hostile protocol to the relay.

use std::time::Duration;

use jumpgate_proto::{AgentHello, RelayHello, Secret, ServiceRequest, PREFACE};
use jumpgate_transport::frame_io::{read_frame, write_frame};
use jumpgate_transport::tls::{self, Fingerprint, ServerTrust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A TLS connection to the relay's agent port, pinned like a real agent.
pub async fn tls(addr: &str, pin: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let pin: Fingerprint = pin.parse().unwrap();
    let config = tls::client_config(ServerTrust::Pinned(vec![pin]), None).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(config)
        .connect(tls::server_name("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// A hello for `name` with `token`, one ssh service.
pub fn hello(name: &str, token: &str, versions: (u16, u16)) -> AgentHello {
    AgentHello {
        min_version: versions.0,
        max_version: versions.1,
        name: name.into(),
        token: Some(Secret::new(token)),
        services: vec![ServiceRequest {
            name: "ssh".into(),
            target_port: 22,
            preferred_port: None,
            strict: false,
            allow: vec![],
            no_port: false,
        }],
        software: "raw-test".into(),
        max_lanes: 0,
        lane_of: None,
        jump_keys: Vec::new(),
        host: false,
    }
}

/// Sends a hello and returns the relay's answer.
pub async fn exchange(addr: &str, pin: &str, hello: &AgentHello) -> RelayHello {
    let mut s = tls(addr, pin).await;
    s.write_all(PREFACE).await.unwrap();
    write_frame(&mut s, hello).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s))
        .await
        .expect("relay did not answer")
        .unwrap()
}

/// Writes `bytes` after TLS and reports whether the relay then closed the connection.
pub async fn send_after_tls(addr: &str, pin: &str, bytes: &[u8]) -> bool {
    let mut s = tls(addr, pin).await;
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}
