//! The systems under test, each exposing the same two targets (echo and iperf3) to the user on
//! loopback. The worker side (agent, targets) runs where a [`Site`] says: on loopback too, or in
//! the network namespace behind a WAN delay line.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::measure::wait_echo;
use crate::proc::{free_port, Proc};

/// A running system: where its echo and iperf ports are, and which processes to watch.
pub struct System {
    /// Name in the report.
    pub name: &'static str,
    /// Echo target through the system.
    pub echo: SocketAddr,
    /// iperf3 target through the system.
    pub iperf: SocketAddr,
    /// Public-side process (relay, frps, rathole server).
    pub relay: Option<Proc>,
    /// Private-side process (agent, frpc, rathole client).
    pub agent: Option<Proc>,
    /// What else the path needs while it runs (a proxy, an ingress), not counted as the tunnel's.
    #[expect(dead_code, reason = "held so its processes stop when the system drops")]
    pub helpers: Vec<Proc>,
}

/// Targets every system forwards to: ports on the worker side's loopback (which, for the direct
/// path, are also reachable at [`Site::worker_ip`]).
#[derive(Clone, Copy)]
pub struct Targets {
    /// Echo server port.
    pub echo: u16,
    /// iperf3 server port.
    pub iperf: u16,
}

/// Where the worker side (agents, frpc, rathole client, targets) runs and how the two sides reach
/// each other; the relay side and the user always stay in the root namespace on loopback.
#[derive(Clone, Debug)]
pub struct Site {
    /// Network namespace of the worker side (`None`: the root namespace).
    pub netns: Option<String>,
    /// Address relays listen on for agents, reachable from the worker side.
    pub relay_ip: IpAddr,
    /// Address at which the user reaches the worker side's targets without a tunnel.
    pub worker_ip: IpAddr,
}

impl Site {
    /// Everything on loopback in the root namespace (the default benchmark).
    pub fn loopback() -> Self {
        Self {
            netns: None,
            relay_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            worker_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    /// A command for `program` that runs on the worker side (`ip netns exec NS program`, which
    /// execs, so the child's pid is the program's own).
    pub fn worker_command(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
        }
    }

    /// `port` on the relay-side address agents dial.
    fn relay_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.relay_ip, port)
    }
}

/// No tunnel: the physical limit.
pub fn direct(t: Targets, site: &Site) -> System {
    System {
        name: "direct",
        echo: SocketAddr::new(site.worker_ip, t.echo),
        iperf: SocketAddr::new(site.worker_ip, t.iperf),
        relay: None,
        agent: None,
        helpers: Vec::new(),
    }
}

/// Extra flags for a jumpgate binary from the environment (whitespace-separated), so a tuning
/// such as `--worker-threads 1` can be measured without editing the benchmark.
fn extra_args(var: &str) -> Vec<String> {
    std::env::var(var)
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if std::time::Instant::now() > deadline {
            bail!("nothing listens on {addr} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// jumpgate: the real relay-server and worker-agent binaries.
pub fn jumpgate(bin: &Path, t: Targets, dir: &Path, site: &Site) -> Result<System> {
    let relay = JumpgateRelay::start_for(bin, dir, 10, site)?;
    let status = dir.join("status.json");
    let agent = relay.agent(
        "bench-agent",
        &[
            format!("echo=127.0.0.1:{}", t.echo),
            format!("iperf=127.0.0.1:{}", t.iperf),
        ],
        &status,
        dir,
    )?;
    let ports = wait_status(&status, Duration::from_secs(20))?;
    let port_of = |name: &str| {
        ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .context("service missing from status file")
    };
    let echo = loopback(port_of("echo")?);
    wait_echo(echo, Duration::from_secs(10))?;
    Ok(System {
        name: "jumpgate",
        echo,
        iperf: loopback(port_of("iperf")?),
        relay: Some(relay.proc),
        agent: Some(agent),
        helpers: Vec::new(),
    })
}

/// A running relay-server for the benchmark.
pub struct JumpgateRelay {
    /// The process.
    pub proc: Proc,
    bin: PathBuf,
    listen: String,
    state: PathBuf,
    flags: RelayFlags,
    pin: String,
    site: Site,
    /// Processes started so far (each restart logs to a file of its own).
    starts: u32,
}

/// A benchmark relay's flags beyond its agent address and state dir.
#[derive(Clone, Debug)]
pub struct RelayFlags {
    /// Ports to allocate.
    pub range: (u16, u16),
    /// `--admin`: "off" or an address.
    pub admin: String,
    /// `--max-handshakes`; `None`: the relay's default.
    pub max_handshakes: Option<usize>,
    /// `--proxy-bind`, when not the relay's default (0.0.0.0).
    pub proxy_bind: Option<String>,
    /// Appended last, after `JUMPGATE_RELAY_ARGS`.
    pub extra: Vec<String>,
}

impl RelayFlags {
    /// What the loopback and WAN rows use: `width` ports from a range chosen per process, no
    /// admin endpoint.
    pub fn rows(width: u16) -> Self {
        let lo = 20_000 + (std::process::id() % 5_000) as u16;
        Self {
            range: (lo, lo + width - 1),
            admin: "off".into(),
            max_handshakes: Some(5000),
            proxy_bind: None,
            extra: Vec::new(),
        }
    }
}

impl JumpgateRelay {
    /// Starts a relay with a range of `width` ports and limits high enough for the benchmark,
    /// agents on loopback.
    pub fn start(bin: &Path, dir: &Path, width: u16) -> Result<Self> {
        Self::start_for(bin, dir, width, &Site::loopback())
    }

    /// Like [`JumpgateRelay::start`], listening for agents where `site`'s worker side reaches it;
    /// its agents run on that side.
    pub fn start_for(bin: &Path, dir: &Path, width: u16, site: &Site) -> Result<Self> {
        Self::start_for_with(bin, dir, site, RelayFlags::rows(width))
    }

    /// Like [`JumpgateRelay::start_for`], with exactly these flags.
    pub fn start_for_with(bin: &Path, dir: &Path, site: &Site, flags: RelayFlags) -> Result<Self> {
        let listen = site.relay_addr(free_port()?).to_string();
        Self::start_at(bin, dir, listen, flags, site.clone(), 1)
    }

    /// A relay on loopback with exactly these flags (the agent simulator's).
    pub fn start_with(bin: &Path, dir: &Path, flags: RelayFlags) -> Result<Self> {
        let site = Site::loopback();
        let listen = site.relay_addr(free_port()?).to_string();
        Self::start_at(bin, dir, listen, flags, site, 1)
    }

    fn start_at(
        bin: &Path,
        dir: &Path,
        listen: String,
        flags: RelayFlags,
        site: Site,
        starts: u32,
    ) -> Result<Self> {
        let state = dir.join("relay-state");
        let name = match starts {
            1 => "relay".to_string(),
            n => format!("relay-{n}"),
        };
        let mut cmd = Command::new(bin.join("relay-server"));
        cmd.args([
            "--listen",
            &listen,
            "--public-host",
            "127.0.0.1",
            "--admin",
            &flags.admin,
        ])
        .args([
            "--port-range",
            &format!("{}-{}", flags.range.0, flags.range.1),
        ])
        .args([
            "--max-streams-per-agent",
            "4000",
            "--max-conns-per-port",
            "100000",
            // Every benchmark connection comes from 127.0.0.1: the per-source cap (64) would
            // refuse the 2,000 held connections.
            "--max-conns-per-source",
            "100000",
        ])
        .args(["--max-new-conns-per-sec", "1000000"]);
        if let Some(n) = flags.max_handshakes {
            cmd.args(["--max-handshakes", &n.to_string()]);
        }
        if let Some(bind) = &flags.proxy_bind {
            cmd.args(["--proxy-bind", bind]);
        }
        cmd.arg("--state-dir")
            .arg(&state)
            .args(extra_args("JUMPGATE_RELAY_ARGS"))
            .args(&flags.extra)
            .env("RUST_LOG", "warn,relay_server=info");
        let proc = Proc::spawn(&name, &mut cmd, dir)?;
        proc.wait_log("relay listening for agents", Duration::from_secs(60))?;
        let out = Command::new(bin.join("relay-server"))
            .arg("fingerprint")
            .arg("--state-dir")
            .arg(&state)
            .output()?;
        let pin = String::from_utf8(out.stdout)?.trim().to_string();
        Ok(Self {
            proc,
            bin: bin.to_path_buf(),
            listen,
            state,
            flags,
            pin,
            site,
            starts,
        })
    }

    /// Kills the relay with SIGKILL and starts it again on the same address and state.
    pub fn restart(&mut self, dir: &Path) -> Result<()> {
        self.proc.kill();
        let again = Self::start_at(
            &self.bin,
            dir,
            self.listen.clone(),
            self.flags.clone(),
            self.site.clone(),
            self.starts + 1,
        )?;
        *self = again;
        Ok(())
    }

    /// Where agents dial.
    pub fn listen(&self) -> &str {
        &self.listen
    }

    /// The SHA-256 pin of its certificate.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// The shared agent token file it generated.
    pub fn token_file(&self) -> PathBuf {
        self.state.join("token")
    }

    /// Starts an agent exposing `services` (NAME=HOST:PORT).
    pub fn agent(
        &self,
        name: &str,
        services: &[String],
        status: &Path,
        dir: &Path,
    ) -> Result<Proc> {
        self.agent_with(name, services, status, dir, &[])
    }

    /// Like [`JumpgateRelay::agent`], with `extra` flags last (a later `--server` or `--proxy`
    /// overrides an earlier one).
    pub fn agent_with(
        &self,
        name: &str,
        services: &[String],
        status: &Path,
        dir: &Path,
        extra: &[String],
    ) -> Result<Proc> {
        let mut cmd = self.site.worker_command(self.bin.join("worker-agent"));
        cmd.args([
            "--server",
            &self.listen,
            "--name",
            name,
            "--fingerprint",
            &self.pin,
        ])
        .arg("--token-file")
        .arg(self.token_file())
        .arg("--status-file")
        .arg(status)
        .args(extra_args("JUMPGATE_AGENT_ARGS"))
        .env("RUST_LOG", "warn");
        for s in services {
            cmd.args(["--service", s]);
        }
        cmd.args(extra);
        Proc::spawn(&format!("agent-{name}"), &mut cmd, dir)
    }
}

/// (service, port) pairs from an agent's status file once it is connected.
pub fn wait_status(path: &Path, timeout: Duration) -> Result<Vec<(String, u16)>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if v["relays"][0]["state"] == "connected" {
                    let ports = v["services"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|s| {
                            Some((s["name"].as_str()?.to_string(), s["port"].as_u64()? as u16))
                        })
                        .collect();
                    return Ok(ports);
                }
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("agent never reported connected in {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// frp as its users run it: frps + frpc with its defaults (TLS on, tcpMux on).
pub fn frp(frps: &Path, frpc: &Path, t: Targets, dir: &Path, site: &Site) -> Result<System> {
    frp_with(frps, frpc, t, dir, site, "")
}

/// [`frp`] with `client_extra` (TOML lines) in frpc's configuration.
pub fn frp_with(
    frps: &Path,
    frpc: &Path,
    t: Targets,
    dir: &Path,
    site: &Site,
    client_extra: &str,
) -> Result<System> {
    let (bind, echo, iperf) = (free_port()?, free_port()?, free_port()?);
    let relay_ip = site.relay_ip;
    let server = dir.join("frps.toml");
    // Agents come in on `bindAddr`; users stay on loopback (`proxyBindAddr` would otherwise
    // default to `bindAddr`).
    std::fs::write(
        &server,
        format!("bindAddr = \"{relay_ip}\"\nbindPort = {bind}\nproxyBindAddr = \"127.0.0.1\"\nauth.token = \"bench-token\"\nlog.level = \"warn\"\n"),
    )?;
    let client = dir.join("frpc.toml");
    std::fs::write(
        &client,
        format!(
            "serverAddr = \"{relay_ip}\"\nserverPort = {bind}\nauth.token = \"bench-token\"\nlog.level = \"warn\"\n{client_extra}\n\
             [[proxies]]\nname = \"echo\"\ntype = \"tcp\"\nlocalIP = \"127.0.0.1\"\nlocalPort = {}\nremotePort = {echo}\n\n\
             [[proxies]]\nname = \"iperf\"\ntype = \"tcp\"\nlocalIP = \"127.0.0.1\"\nlocalPort = {}\nremotePort = {iperf}\n",
            t.echo,
            t.iperf
        ),
    )?;
    let relay = Proc::spawn("frps", Command::new(frps).arg("-c").arg(&server), dir)?;
    // frpc gives up for good if its first login fails, so the server must be listening first.
    wait_listening(site.relay_addr(bind), Duration::from_secs(20))?;
    let agent = Proc::spawn(
        "frpc",
        site.worker_command(frpc).arg("-c").arg(&client),
        dir,
    )?;
    wait_echo(loopback(echo), Duration::from_secs(20))?;
    Ok(System {
        name: "frp",
        echo: loopback(echo),
        iperf: loopback(iperf),
        relay: Some(relay),
        agent: Some(agent),
        helpers: Vec::new(),
    })
}

/// rathole over TCP with its defaults (no TLS, one TCP data channel per connection).
pub fn rathole(bin: &Path, t: Targets, dir: &Path, site: &Site) -> Result<System> {
    let (bind, echo, iperf) = (free_port()?, free_port()?, free_port()?);
    let relay_addr = site.relay_addr(bind);
    let server = dir.join("rathole-server.toml");
    std::fs::write(
        &server,
        format!(
            "[server]\nbind_addr = \"{relay_addr}\"\ndefault_token = \"bench-token\"\n\n\
             [server.services.echo]\nbind_addr = \"127.0.0.1:{echo}\"\n\n\
             [server.services.iperf]\nbind_addr = \"127.0.0.1:{iperf}\"\n"
        ),
    )?;
    let client = dir.join("rathole-client.toml");
    std::fs::write(
        &client,
        format!(
            "[client]\nremote_addr = \"{relay_addr}\"\ndefault_token = \"bench-token\"\n\n\
             [client.services.echo]\nlocal_addr = \"127.0.0.1:{}\"\n\n\
             [client.services.iperf]\nlocal_addr = \"127.0.0.1:{}\"\n",
            t.echo, t.iperf
        ),
    )?;
    let relay = Proc::spawn(
        "rathole-server",
        Command::new(bin)
            .arg("--server")
            .arg(&server)
            .env("RUST_LOG", "warn"),
        dir,
    )?;
    wait_listening(relay_addr, Duration::from_secs(20))?;
    let agent = Proc::spawn(
        "rathole-client",
        site.worker_command(bin)
            .arg("--client")
            .arg(&client)
            .env("RUST_LOG", "warn"),
        dir,
    )?;
    wait_echo(loopback(echo), Duration::from_secs(20))?;
    Ok(System {
        name: "rathole",
        echo: loopback(echo),
        iperf: loopback(iperf),
        relay: Some(relay),
        agent: Some(agent),
        helpers: Vec::new(),
    })
}
