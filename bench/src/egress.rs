//! The agent link's egress paths (issue 24) as systems of their own: jumpgate with its agent
//! dialling through a real HTTP CONNECT proxy (tinyproxy), a real SOCKS5 proxy (microsocks), and
//! as WebSocket through a real nginx in front of the relay's `ws_listen`; and frp's websocket
//! transport, the peer figure the issue compares against.
//!
//! The proxies and nginx run beside the relay (root namespace, on the address agents dial), so on
//! a WAN site the worker's leg to them crosses the delay line, as a worker's leg to a corporate
//! proxy or an ingress in front of the relay would. Their CPU is not in the "relay+agent" rows:
//! the tunnel is what is measured; the proxy is the network's.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::measure::wait_echo;
use crate::proc::{free_port, Proc};
use crate::systems::{
    wait_listening, wait_status, JumpgateRelay, RelayFlags, Site, System, Targets,
};

/// How a jumpgate agent reaches its relay.
#[derive(Clone, Copy, Debug)]
pub enum Egress {
    /// `--proxy http://…` through tinyproxy.
    HttpProxy,
    /// `--proxy socks5://…` through microsocks.
    Socks5,
    /// `--server ws://…/jumpgate` through nginx to the relay's `--ws-listen`.
    WebSocket,
}

impl Egress {
    /// Every egress path, in report order.
    pub const ALL: [Egress; 3] = [Egress::HttpProxy, Egress::Socks5, Egress::WebSocket];

    /// The report column.
    pub fn name(self) -> &'static str {
        match self {
            Egress::HttpProxy => "jumpgate via HTTP proxy",
            Egress::Socks5 => "jumpgate via SOCKS5",
            Egress::WebSocket => "jumpgate via WS+nginx",
        }
    }
}

/// Name of frp's websocket column.
pub const FRP_WS: &str = "frp websocket";

/// jumpgate whose agent reaches the relay by `egress`; the proxy or nginx lives as long as the
/// returned system.
pub fn jumpgate(bin: &Path, t: Targets, dir: &Path, site: &Site, egress: Egress) -> Result<System> {
    let front = SocketAddr::new(site.relay_ip, free_port()?);
    let ws = free_port()?;
    let mut flags = RelayFlags::rows(10);
    if let Egress::WebSocket = egress {
        flags
            .extra
            .extend(["--ws-listen".to_string(), format!("127.0.0.1:{ws}")]);
    }
    let relay = JumpgateRelay::start_for_with(bin, dir, site, flags)?;
    let direct = relay.listen().to_string();
    let (helper, server, proxy) = match egress {
        Egress::HttpProxy => (tinyproxy(front, dir)?, direct, format!("http://{front}")),
        Egress::Socks5 => (microsocks(front, dir)?, direct, format!("socks5://{front}")),
        Egress::WebSocket => (
            nginx(front, "/jumpgate", ws, dir)?,
            format!("ws://{front}/jumpgate"),
            "none".to_string(),
        ),
    };
    let status = dir.join("status.json");
    let agent = relay.agent_with(
        "bench-agent",
        &[
            format!("echo=127.0.0.1:{}", t.echo),
            format!("iperf=127.0.0.1:{}", t.iperf),
        ],
        &status,
        dir,
        &["--server".into(), server, "--proxy".into(), proxy],
    )?;
    let ports = wait_status(&status, Duration::from_secs(30))
        .with_context(|| format!("{}: {}", egress.name(), agent.log_text()))?;
    let port_of = |name: &str| {
        ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| SocketAddr::from(([127, 0, 0, 1], *p)))
            .context("service missing from status file")
    };
    let echo = port_of("echo")?;
    wait_echo(echo, Duration::from_secs(10))?;
    Ok(System {
        name: egress.name(),
        echo,
        iperf: port_of("iperf")?,
        relay: Some(relay.proc),
        agent: Some(agent),
        helpers: vec![helper],
    })
}

/// microsocks on `at`, no authentication.
fn microsocks(at: SocketAddr, dir: &Path) -> Result<Proc> {
    let p = Proc::spawn(
        "microsocks",
        Command::new("microsocks").args(["-i", &at.ip().to_string(), "-p", &at.port().to_string()]),
        dir,
    )?;
    wait_listening(at, Duration::from_secs(10))?;
    Ok(p)
}

/// tinyproxy on `at`, any CONNECT port allowed, no authentication.
fn tinyproxy(at: SocketAddr, dir: &Path) -> Result<Proc> {
    let conf = dir.join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "Port {}\nListen {}\nUser nobody\nGroup nogroup\nTimeout 600\nMaxClients 200\nLogLevel Warning\n",
            at.port(),
            at.ip()
        ),
    )?;
    let p = Proc::spawn(
        "tinyproxy",
        Command::new("tinyproxy").arg("-d").arg("-c").arg(&conf),
        dir,
    )?;
    wait_listening(at, Duration::from_secs(10))?;
    Ok(p)
}

/// nginx on `at` forwarding WebSocket upgrades on `path` to 127.0.0.1:`upstream`, configured as
/// docs/operations.md ("Relay behind an ingress") tells operators to.
fn nginx(at: SocketAddr, path: &str, upstream: u16, dir: &Path) -> Result<Proc> {
    let root = dir.join("nginx");
    std::fs::create_dir_all(&root)?;
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {r}/nginx.pid;\nerror_log {r}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n access_log off;\n client_body_temp_path {r}/body;\n proxy_temp_path {r}/proxy;\n\
         fastcgi_temp_path {r}/fcgi;\n uwsgi_temp_path {r}/uwsgi;\n scgi_temp_path {r}/scgi;\n\
         server {{ listen {at}; location = {path} {{ proxy_pass http://127.0.0.1:{upstream}; \
         proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; \
         proxy_set_header Connection \"upgrade\"; proxy_read_timeout 3600s; \
         proxy_send_timeout 3600s; proxy_buffering off; }} }}\n}}\n",
        r = root.display(),
    );
    let path = root.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let nginx = ["/usr/sbin/nginx", "nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("nginx");
    let p = Proc::spawn(
        "nginx",
        Command::new(nginx)
            .arg("-p")
            .arg(&root)
            .arg("-c")
            .arg(&path),
        dir,
    )?;
    wait_listening(at, Duration::from_secs(10))?;
    Ok(p)
}

/// frp with `transport.protocol = "websocket"` (frps takes WebSocket on its bind port), TLS and
/// tcpMux at their defaults, as [`crate::systems::frp`] runs it otherwise.
pub fn frp_websocket(
    frps: &Path,
    frpc: &Path,
    t: Targets,
    dir: &Path,
    site: &Site,
) -> Result<System> {
    crate::systems::frp_with(
        frps,
        frpc,
        t,
        dir,
        site,
        "transport.protocol = \"websocket\"\n",
    )
    .map(|mut s| {
        s.name = FRP_WS;
        s
    })
}
